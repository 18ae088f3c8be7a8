"""A Hugging Face dataset as a source: its shards are tokenized, split and resumed like input files."""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import data_pipeline.tokenize as tok_mod
from conftest import corpus_docs
from data_pipeline.__main__ import main, tokenizer_sample
from data_pipeline.config import PipelineConfig, SourceConfig, validate_pipeline
from data_pipeline.configfile import ConfigError, load_structured
from data_pipeline.shards import Manifest
from data_pipeline.sources import (
    DataError,
    DatasetShard,
    _import_datasets,
    dataset_shards,
    keep_hub_on,
    read_documents,
)
from data_pipeline.tokenize import TokenizeSettings, tokenize_source


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A local dataset folder of real text in four JSONL data files (so four shards), one record without text."""
    folder = tmp_path_factory.mktemp("hf") / "corpus"
    docs = corpus_docs(30)
    records = [{"id": r["id"], "text": r["text"]} for name in ("wikipedia", "stackexchange") for r in docs[name]]
    records.insert(45, {"id": "no-text-here"})
    (folder / "data").mkdir(parents=True)
    for k in range(4):
        lines = "".join(json.dumps(r) + "\n" for r in records[k::4])
        (folder / "data" / f"train-{k:05d}-of-00004.jsonl").write_text(lines)
    return folder


def data_files(folder: Path) -> list[Path]:
    return sorted((folder / "data").glob("*.jsonl"))


def settings(tiny_data) -> TokenizeSettings:
    return TokenizeSettings(source="hf", tokenizer_path=str(tiny_data["tokenizer"]), val_fraction=0.1)


def folder_bytes(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """The token streams and document indexes of a source folder."""
    return {**folder_bytes(folder, "*.bin"), **folder_bytes(folder, "*.idx")}


def test_a_dataset_gives_the_shards_of_its_records_given_as_files(tiny_data, hf_folder, tmp_path):
    shards = dataset_shards(str(hf_folder))
    assert len(shards) == 4 and shards[2] == DatasetShard(str(hf_folder), None, "train", 2, 4)
    from_dataset = tokenize_source(shards, tmp_path / "dataset", settings(tiny_data))
    from_files = tokenize_source(data_files(hf_folder), tmp_path / "files", settings(tiny_data))
    assert shard_bytes(tmp_path / "dataset") == shard_bytes(tmp_path / "files")
    assert len(shard_bytes(tmp_path / "dataset")) == 16 and from_dataset.documents_written["val"] > 0
    # the bad record is counted, by reason, and named by its dataset shard and row
    records = sum(len(p.read_text().splitlines()) for p in data_files(hf_folder))
    assert from_dataset.documents_in == from_files.documents_in == records
    assert from_dataset.dropped == from_files.dropped == {"missing_text": 1}
    row = 45 // 4 + 1  # record 45 is the 12th of file 1
    assert from_dataset.examples["missing_text"] == [f"{hf_folder} (train shard 1/4):row {row}"]
    inputs = {shard.name: shard.inputs for shard in Manifest.load(tmp_path / "dataset").shards}
    assert inputs["train-00001"] == inputs["val-00001"] == [str(shards[1])]
    with pytest.raises(DataError, match=r"shard 1/4\):row 12: missing text"):
        tokenize_source(shards, tmp_path / "strict", replace(settings(tiny_data), strict=True))


def test_machines_and_workers_split_a_dataset_like_files(tiny_data, hf_folder, tmp_path):
    shards = dataset_shards(str(hf_folder))
    tokenize_source(shards, tmp_path / "one", settings(tiny_data))
    assert tokenize_source(shards, tmp_path / "split", settings(tiny_data), machine=(1, 2)) is None
    assert sorted(p.name for p in (tmp_path / "split").glob("part-*")) == ["part-00001.json", "part-00003.json"]
    tokenize_source(shards, tmp_path / "split", settings(tiny_data), machine=(0, 2))
    assert folder_bytes(tmp_path / "split") == folder_bytes(tmp_path / "one")
    tokenize_source(shards, tmp_path / "workers", settings(tiny_data), workers=2)
    assert folder_bytes(tmp_path / "workers") == folder_bytes(tmp_path / "one")


def test_a_killed_dataset_run_resumes_per_shard(tiny_data, hf_folder, tmp_path, monkeypatch):
    shards = dataset_shards(str(hf_folder))
    tokenize_source(shards, tmp_path / "whole", settings(tiny_data))
    real = tok_mod.tokenize_file

    def dies_on_third_shard(index, shard, output, s):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, shard, output, s)

    monkeypatch.setattr(tok_mod, "tokenize_file", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        tokenize_source(shards, tmp_path / "broken", settings(tiny_data))
    calls = []
    monkeypatch.setattr(tok_mod, "tokenize_file", lambda *a: calls.append(a[0]) or real(*a))
    tokenize_source(dataset_shards(str(hf_folder)), tmp_path / "broken", settings(tiny_data))
    assert calls == [2, 3]  # finished shards are skipped
    assert folder_bytes(tmp_path / "broken") == folder_bytes(tmp_path / "whole")


def pipeline_yaml(path: Path, source: str, tmp_path: Path) -> Path:
    path.write_text(
        f"sources:\n  - name: hf\n{source}"
        f"tokenizer:\n  path: {tmp_path}/tok.model\n  vocab_size: 600\n  sample_bytes: 200000\n"
        f"tokenize:\n  output: {tmp_path}/tokens\n  val_fraction: 0.1\n"
    )
    return path


def test_the_cli_samples_and_tokenizes_a_dataset_source(hf_folder, tmp_path):
    as_files = pipeline_yaml(tmp_path / "files.yaml", f"    files: ['{hf_folder}/data/*.jsonl']\n", tmp_path)
    as_dataset = pipeline_yaml(tmp_path / "dataset.yaml", f"    dataset: {hf_folder}\n    split: train\n", tmp_path)
    sample = {}
    for name, yaml in (("files", as_files), ("dataset", as_dataset)):
        cfg = load_structured(PipelineConfig, yaml, [])
        validate_pipeline(cfg)
        taken = {}
        sample[name] = (list(tokenizer_sample(cfg, taken)), taken)
    texts = [json.loads(line).get("text") or "" for p in data_files(hf_folder) for line in p.open()]
    assert sample["dataset"] == sample["files"]
    assert 200000 <= sample["dataset"][1]["hf"] < sum(len(t.encode()) for t in texts)  # each shard stops at its quota
    assert main(["prepare", str(as_dataset), "--machine", "1/2"]) == 0
    assert not (tmp_path / "tokens" / "hf" / "manifest.json").exists()
    assert main(["tokenize", str(as_dataset), "--machine", "0/2"]) == 0
    record = json.loads((tmp_path / "tok.json").read_text())
    spec = {"dataset": str(hf_folder), "dataset_config": None, "split": "train"}
    assert record["sources"]["hf"] == spec and record["sample_bytes"]["hf"] == sample["dataset"][1]["hf"]
    manifest = Manifest.load(tmp_path / "tokens" / "hf")
    assert {k: manifest.config[k] for k in spec} == spec and len(manifest.shards) == 8
    assert main(["verify", str(tmp_path / "tokens"), "--tokenizer", str(tmp_path / "tok.model")]) == 0


def test_a_source_has_files_or_a_dataset(hf_folder):
    def check(**source):
        validate_pipeline(PipelineConfig(sources=[SourceConfig(name="s", **source)]))

    check(dataset="wikimedia/wikipedia", dataset_config="20231101.en", split="train")
    with pytest.raises(ConfigError, match=r"sources\[0\].dataset: source 's' has files too"):
        check(files=["a.jsonl"], dataset="wikimedia/wikipedia")
    with pytest.raises(ConfigError, match=r"sources\[0\].files: no input files \(nor a dataset\)"):
        check()
    with pytest.raises(ConfigError, match=r"sources\[0\].split: only for a dataset source"):
        check(files=["a.jsonl"], split="train")
    with pytest.raises(ConfigError, match=r"sources\[0\].dataset_config: only for a dataset source"):
        check(files=["a.jsonl"], dataset_config="en")


def test_unloadable_datasets_are_named(hf_folder, monkeypatch):
    with pytest.raises(DataError, match=r"corpus \(default, validation\): cannot load: Bad split"):
        dataset_shards(str(hf_folder), split="validation")
    with pytest.raises(DataError, match=r"now has 4 shards"):
        list(read_documents(DatasetShard(str(hf_folder), None, "train", 0, 5)))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"needs Hugging Face datasets: pip install -e '\.\[data\]'"):
        dataset_shards(str(hf_folder / "data"))


def test_a_hub_source_keeps_the_hub_on_unless_the_environment_turns_it_off(monkeypatch):
    for user, expected in ((None, "0"), ("1", "1"), ("0", "0")):
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        if user is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", user)
        keep_hub_on()
        _import_datasets("a local input read afterwards", offline=True)
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == expected


def mixed_meta_folder(folder: Path, fmt: str) -> Path:
    """A dataset folder of two data files whose `meta` column is a struct in one and a string in the other."""
    rows = [
        [
            {"id": "a1", "text": "alpha one", "meta": {"url": "https://a.example", "n": 1}},
            {"id": "a2", "text": "alpha two", "meta": {"url": "u", "n": 2}},
        ],
        [{"id": "b1", "text": "beta one", "meta": "a plain string"}],
    ]
    (folder / "data").mkdir(parents=True)
    for k, part in enumerate(rows):
        path = folder / "data" / f"train-{k:05d}-of-00002.{fmt}"
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(part), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_dataset_whose_other_columns_differ_between_files_is_read(tmp_path, fmt):
    folder = mixed_meta_folder(tmp_path / "mixed", fmt)
    docs = [d for shard in dataset_shards(str(folder)) for d in read_documents(shard)]
    assert [(d.id, d.text) for d in docs] == [("a1", "alpha one"), ("a2", "alpha two"), ("b1", "beta one")]
    if fmt == "parquet":  # one file alone, only its text and id columns read
        (doc,) = read_documents(folder / "data" / "train-00001-of-00002.parquet")
        assert (doc.id, doc.text) == ("b1", "beta one")


def test_an_unreadable_data_file_is_one_line_naming_it(tmp_path):
    folder = mixed_meta_folder(tmp_path / "broken", "parquet")
    broken = folder / "data" / "train-00001-of-00002.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    shards = dataset_shards(str(folder))
    assert [d.id for d in read_documents(shards[0])] == ["a1", "a2"]
    with pytest.raises(DataError, match=rf"shard 1/2\) file {broken}: cannot read( at row 1)?: ArrowInvalid: ") as e:
        list(read_documents(shards[1]))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=rf"^{broken}: cannot read( at row 1)?: ArrowInvalid: ") as e:
        list(read_documents(broken))
    assert "\n" not in str(e.value)
