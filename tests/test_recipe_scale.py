"""The recipe at scale: dedup split into hash buckets gives the in-memory result for any bucket count, and
the stages give the same bytes in a local pool, on a 2-node Ray cluster and as Slurm arrays on 2 and 3
machines, also when a task is killed half-way and the run is resumed; inputs from fsspec URLs and
Common Crawl listings."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.raw import bucketed as bk
from data_pipeline.raw.common import Tally
from data_pipeline.raw.dedup import exact_dedup, near_dedup
from data_pipeline.raw.recipe import RawSourceConfig, RecipeConfig, expand_inputs, part_name
from data_pipeline.raw.runner import run_recipe
from pretrain.config import load_structured

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "tests" / "data" / "raw"
POSTS = RAW / "stackexchange" / "cstheory.meta" / "Posts.xml"


def sample_config(tmp_path: Path, output: Path, *overrides: str) -> RecipeConfig:
    """configs/recipe/sample.yaml with duplicates for every pass: a second edition of a bundled book (near),
    a mirror of the StackExchange dump (exact); the WARC captures repeat lines across pages (line)."""
    from test_raw_gutenberg_github import new_edition, raw_text

    extra = tmp_path / "extra"
    if not extra.is_dir():
        (extra / "mirror" / "cstheory.mirror").mkdir(parents=True)
        (extra / "pg1661-2023.txt").write_text(new_edition(raw_text("pg1661.txt.gz")))
        (extra / "mirror" / "cstheory.mirror" / "Posts.xml").write_bytes(POSTS.read_bytes())
    cfg = load_structured(RecipeConfig, ROOT / "configs" / "recipe" / "sample.yaml", [f"output={output}", *overrides])
    for s in cfg.sources:
        s.inputs = [p if Path(p).is_absolute() else str(ROOT / p) for p in s.inputs]
        s.shard_docs = 4  # several output shards per source, some cut across inputs
    source = {s.name: s for s in cfg.sources}
    source["books"].inputs.append(str(extra / "pg1661-2023.txt"))
    source["stackexchange"].inputs.append(str(extra / "mirror" / "cstheory.mirror" / "Posts.xml"))
    return cfg


def shards(output: Path) -> dict[str, bytes]:
    """Every output shard's bytes, by path under `output`."""
    found = {str(p.relative_to(output)): p.read_bytes() for p in output.glob("*/*-*.jsonl.gz")}
    assert found
    return found


def documents(folder: Path) -> list[dict]:
    return [d for p in sorted(folder.glob(f"{folder.name}-*.jsonl.gz")) for d in bk.read_jsonl_gz(p)]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The sample recipe with a local pool of 2 workers and 16 buckets: the reference for every executor."""
    tmp = tmp_path_factory.mktemp("local")
    cfg = sample_config(tmp, tmp / "out", "workers=2", "dedup_buckets=16")
    return cfg, run_recipe(cfg), shards(tmp / "out")


def test_any_bucket_count_gives_the_in_memory_passes_result(local_run, tmp_path):
    from data_pipeline.raw import commoncrawl

    cfg, reports, reference = local_run
    one = sample_config(tmp_path, tmp_path / "one", "workers=1", "dedup_buckets=1")
    unchanging = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "step2")}  # noqa: E731
    assert {n: unchanging(r) for n, r in run_recipe(one).items()} == {n: unchanging(r) for n, r in reports.items()}
    assert shards(tmp_path / "one") == reference
    # the in-memory generators over step 1's outputs keep the same documents, in the same order
    for source in cfg.sources:
        folder = Path(cfg.output) / source.name
        docs = (
            d for p in expand_inputs(source) for d in bk.read_jsonl_gz(folder / "files" / f"{part_name(p)}.jsonl.gz")
        )
        tally = Tally()
        if source.kind == "commoncrawl":
            docs = commoncrawl.finalize(docs, commoncrawl.Options(), tally)
        docs = exact_dedup(docs, tally)
        if source.near_dedup:
            docs = near_dedup(docs, tally, threshold=source.near_dedup)
        assert list(docs) == documents(folder), source.name
        assert {r: reports[source.name]["dropped"][r] for r in tally.dropped} == tally.dropped, source.name
    # every pass had something to remove
    assert reports["stackexchange"]["dropped"]["exact_duplicate"] == 91
    assert reports["books"]["dropped"]["near_duplicate"] == 1
    for name, r in reports.items():
        assert r["docs_in"] == r["docs_out"] + sum(r["dropped"].values()), name


def test_near_dedup_keeps_what_the_greedy_in_order_rule_keeps(tmp_path):
    """a ~ b and b ~ c but not a ~ c: b is dropped (it overlaps a), so c, which overlaps only b, is kept,
    as the in-memory pass decides; with 1 or 5 buckets alike."""
    import xml.etree.ElementTree as ET

    from data_pipeline.raw.stackexchange import html_to_text

    words = " ".join(html_to_text(row.get("Body")) for row in ET.parse(POSTS).getroot()).split()
    window = lambda start: " ".join(words[start : start + 3000])  # noqa: E731
    # shingle overlap: a-b and b-c 93%, a-c 87%; "a2" is a with one more word
    docs = [{"id": "a", "text": window(0)}, {"id": "b", "text": window(200)}, {"id": "c", "text": window(400)}]
    docs.append({"id": "a2", "text": window(0) + " more"})
    expected = [d["id"] for d in near_dedup(iter(docs), Tally(), threshold=0.9)]
    assert expected == ["a", "c"]
    hasher = bk.MinHasher(threshold=0.9)
    for buckets in (1, 5):
        ids: list[str] = []
        sigs, sizes, records = bk.near_scan(iter(docs), 0, hasher, ids)
        folder = tmp_path / str(buckets)
        folder.mkdir()
        bk.save_array(folder / "00000000.sig.npy", sigs)
        bk.save_array(folder / "00000000.size.npy", sizes)
        pairs = [
            bk.near_bucket(chunk, bk.Signatures(folder), 0.9)
            for chunk in bk.split_by_bucket(records, records["h"], buckets)
        ]
        dropped = bk.near_greedy(np.concatenate(pairs))
        assert [docs[p]["id"] for p in dropped["pos"].tolist()] == ["b", "a2"]


FAKE_SBATCH = r'''#!PYTHON
"""Stands in for sbatch on one machine: runs the array's tasks at once, in parallel, and remembers how each
job ended; a job whose afterok dependency failed is not run (it would wait forever)."""
import os, subprocess, sys
state = os.environ["FAKE_SLURM_STATE"]
args, env, array, after = sys.argv[1:], dict(os.environ), "0-0", []
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag.startswith("--array="):
        array = flag.split("=", 1)[1]
    elif flag.startswith("--dependency=afterok:"):
        after = flag.split(":", 1)[1].split(":")
    elif flag.startswith("--export="):
        for item in flag.split("=", 1)[1].split(",")[1:]:
            key, value = item.split("=", 1)
            env[key] = value
job = str(len(os.listdir(state)) + 1000)
first, last = map(int, array.split("-"))
ok = all(open(os.path.join(state, j)).read() == "0" for j in after)
codes = []
if ok:
    tasks = []
    for k in range(first, last + 1):
        task_env = {**env, "SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": str(last - first + 1)}
        task_env["SLURM_CPUS_PER_TASK"] = "1"
        tasks.append(subprocess.Popen(["bash", *args], env=task_env))
    codes = [t.wait() for t in tasks]
with open(os.path.join(state, job), "w") as f:
    f.write("0" if ok and not any(codes) else "1")
print(job)
'''

KILLER = """
import os, signal
stage, index, flag = os.environ["RECIPE_KILL"].split(":", 2)
if not os.path.exists(flag):
    from data_pipeline.raw import stages
    real = stages.function(stage)
    def killer(cfg, name, i, _real=real):
        if str(i) == index and not os.path.exists(flag):
            open(flag, "w").close()
            def die(*args, **kwargs):  # killed when the task puts its first output in place
                os.kill(os.getpid(), signal.SIGKILL)
            os.replace = die
        return _real(cfg, name, i)
    setattr(stages, real.__name__, killer)
"""


def killer_env(tmp_path: Path, stage: str, index: int) -> tuple[dict, Path]:
    """Environment variables under which the Python processes started kill themselves (SIGKILL) in task
    `index` of `stage`, once, half-way: its output written under the temporary name, not yet renamed."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(KILLER)
    flag = tmp_path / f"killed-{stage}-{index}"
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "RECIPE_KILL": f"{stage}:{index}:{flag}"}, flag


def markers(output: Path) -> dict[str, int]:
    """Every completion marker under `output` and its modification time."""
    return {str(p.relative_to(output)): p.stat().st_mtime_ns for p in output.rglob("*.done.json")}


@pytest.mark.parametrize("machines", [2, 3])
def test_slurm_arrays_give_the_local_bytes_and_resume_after_a_killed_task(local_run, tmp_path, machines):
    _, _, reference = local_run
    cfg = sample_config(tmp_path, tmp_path / "out")
    config = tmp_path / "recipe.yaml"
    from omegaconf import OmegaConf

    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.replace("PYTHON", sys.executable))
    (bin_dir / "sbatch").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_STATE": str(state),
    }
    command = [sys.executable, "-m", "data_pipeline", "recipe", str(config), "executor=slurm", f"machines={machines}"]
    kill, flag = killer_env(tmp_path, "exact-apply", 1)
    first = subprocess.run([*command, "keep_work=true"], env={**env, **kill}, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert flag.is_file() and "submitted 16 stages" in first.stdout
    assert not (tmp_path / "out" / "report.md").exists()  # the chain stopped at the killed stage
    assert list((tmp_path / "out").rglob("*.jsonl.gz.tmp"))  # the killed task's output, never renamed
    finished = markers(tmp_path / "out")
    assert any(k.startswith("stackexchange/work/exact/out/") for k in finished)  # part of the stage was done
    second = subprocess.run([*command, "keep_work=true"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert shards(tmp_path / "out") == reference
    after = markers(tmp_path / "out")
    assert {k: after[k] for k in finished} == finished  # nothing that had finished was redone
    assert len(after) > len(finished)


def test_ray_two_node_cluster_gives_the_local_bytes_after_a_worker_is_killed(local_run, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    _, _, reference = local_run
    kill, flag = killer_env(tmp_path, "near-scan", 0)
    for key, value in kill.items():
        monkeypatch.setenv(key, value)  # the Ray nodes' workers start with these
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        cfg = sample_config(tmp_path, tmp_path / "out", "executor=ray", f"ray_address={cluster.address}")
        reports = run_recipe(cfg)
        assert flag.is_file()  # a worker died half-way through a task; Ray ran the task again
        assert len(cluster.list_all_nodes()) == 2
        assert shards(tmp_path / "out") == reference
        before = markers(tmp_path / "out")
        stamps = {k: (tmp_path / "out" / k).stat().st_mtime_ns for k in shards(tmp_path / "out")}
        assert run_recipe(cfg) == reports  # a rerun finds everything done
        assert markers(tmp_path / "out") == before
        assert {k: (tmp_path / "out" / k).stat().st_mtime_ns for k in stamps} == stamps
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_inputs_from_fsspec_urls_and_a_common_crawl_listing(tmp_path, monkeypatch, capsys):
    """Inputs on an fsspec filesystem (memory://, an object store's stand-in) and a warc.paths.gz listing
    give the documents the local files give; the marker names the URL and its errors name it too; a batch
    log (not a terminal) gets plain progress lines."""
    import fsspec

    monkeypatch.setenv("LLAMA_PROGRESS_EVERY", "0")

    fs = fsspec.filesystem("memory")
    for p in sorted((RAW / "warc").glob("*.warc.gz")):
        fs.pipe(f"/crawl-data/CC-TEST/segments/1/warc/{p.name}", p.read_bytes())
    fs.pipe("/crawl-data/CC-TEST/segments/1/warc/empty.warc.gz", b"")
    names = [p.name for p in sorted((RAW / "warc").glob("*.warc.gz"))]
    listing = tmp_path / "warc.paths.gz"
    listing.write_bytes(gzip.compress("".join(f"crawl-data/CC-TEST/segments/1/warc/{n}\n" for n in names).encode()))
    local = RawSourceConfig(name="cc", kind="commoncrawl", inputs=[str(RAW / "warc" / "*.warc.gz")])
    by_listing = RawSourceConfig(name="cc", kind="commoncrawl", inputs=[str(listing)], paths_prefix="memory://")
    by_glob = RawSourceConfig(name="cc", kind="commoncrawl", inputs=["memory:///crawl-data/CC-TEST/*/*/warc/*.warc.gz"])
    expected = documents_of(tmp_path / "local", local)
    assert documents_of(tmp_path / "listing", by_listing) == expected
    assert documents_of(tmp_path / "glob", by_glob) == expected
    report = json.loads((tmp_path / "glob" / "cc" / "report.json").read_text())
    assert [f["file"] for f in report["failed_files"]] == ["memory:///crawl-data/CC-TEST/segments/1/warc/empty.warc.gz"]
    assert "empty input (0 bytes)" in report["failed_files"][0]["error"]
    assert expand_inputs(by_listing)[0] == f"memory://crawl-data/CC-TEST/segments/1/warc/{names[0]}"
    log = capsys.readouterr().err
    assert f"recipe files: 1/{len(names)} files (" in log and "docs" in log and "ETA" in log
    assert f"recipe files: {len(names)}/{len(names)} files (100.0%)" in log and "recipe report: 1/1 tasks" in log


def documents_of(output: Path, source: RawSourceConfig) -> list[dict]:
    run_recipe(RecipeConfig(output=str(output), sources=[source]))
    return documents(output / source.name)


@pytest.mark.parametrize("group_docs", [0, 2])
def test_line_dedup_in_buckets_removes_what_ccnet_line_dedup_removes(group_docs):
    """Pages sharing lines (real StackExchange answers, each page some of them, in another order): the
    scan/bucket/apply line pass, over 2 parts and 1 or 3 buckets, leaves what `finalize` leaves: the
    first occurrence of a line in input order (within a group of `group_docs` pages) stays."""
    import random
    import xml.etree.ElementTree as ET

    from data_pipeline.raw import commoncrawl
    from data_pipeline.raw.stackexchange import html_to_text

    rows = [r for r in ET.parse(POSTS).getroot() if r.get("PostTypeId") == "2"]
    lines = [line for r in rows for line in html_to_text(r.get("Body")).split("\n") if len(line.split()) > 3][:60]
    rng = random.Random(0)
    docs = [
        {"id": f"page-{n}", "text": "\n".join(rng.sample(lines, 12)), "meta": {"source": "commoncrawl"}}
        for n in range(8)
    ]
    options = commoncrawl.Options(min_chars=300, line_dedup_group_docs=group_docs)
    reference_tally = Tally()
    expected = list(commoncrawl.finalize(iter(docs), options, reference_tally))
    original = {d["id"]: d["text"] for d in docs}
    assert any(e["text"] != original[e["id"]] for e in expected)  # lines were removed
    assert len(expected) < len(docs) or group_docs  # and pages dropped, without groups
    parts = [docs[:5], docs[5:]]
    for buckets in (1, 3):
        records = [bk.line_scan(iter(p), n, 5 * n, group_docs) for n, p in enumerate(parts)]
        losers = [
            bk.line_bucket(np.concatenate([split[b] for split in splits]))
            for b in range(buckets)
            for splits in [[bk.split_by_bucket(r, r["h"], buckets) for r in records]]
        ]
        tally, kept = Tally(), []
        for n, part in enumerate(parts):
            lo, hi = bk.part_range(n)
            mine = np.sort(
                np.concatenate([x[(x["pos"] >= lo) & (x["pos"] < hi)] for x in losers]), order=["pos", "line"]
            )
            kept += bk.line_apply(iter(part), n, mine, options.min_chars, tally)
        assert kept == expected and tally.dropped == reference_tally.dropped, buckets


def test_empty_inputs_are_named_and_a_strict_stop_leaves_no_temporary_file(tmp_path):
    """A 0-byte .warc.gz is a damaged input (named; --strict stops, leaving no *.tmp behind); a WARC read
    whole that holds no record is named as empty."""
    from data_pipeline.sources import DataError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "zero.warc.gz").write_bytes(b"")
    (tmp_path / "in" / "no-records.warc.gz").write_bytes(gzip.compress(b""))
    cut = (RAW / "warc" / "iana.warc.gz").read_bytes()
    (tmp_path / "in" / "cut.warc.gz").write_bytes(cut[: len(cut) // 2])
    source = RawSourceConfig(name="cc", kind="commoncrawl", inputs=[str(tmp_path / "in" / "*.warc.gz")])
    report = run_recipe(RecipeConfig(output=str(tmp_path / "out"), sources=[source]))["cc"]
    assert sorted(Path(f["file"]).name for f in report["failed_files"]) == ["cut.warc.gz", "zero.warc.gz"]
    assert [Path(f).name for f in report["empty_files"]] == ["no-records.warc.gz"]
    assert "no-records.warc.gz" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(DataError, match="cut.warc.gz"):
        run_recipe(RecipeConfig(output=str(tmp_path / "strict"), sources=[source], strict=True))
    assert not list((tmp_path / "strict").rglob("*.tmp"))


def test_a_missing_optional_package_is_one_line_naming_the_install(monkeypatch):
    import sys

    from data_pipeline.configfile import ConfigError
    from data_pipeline.raw.recipe import load_module

    monkeypatch.delitem(sys.modules, "data_pipeline.raw.commoncrawl", raising=False)
    monkeypatch.setitem(sys.modules, "fasttext", None)  # as if the 'raw' extra were not installed
    with pytest.raises(ConfigError, match=r"kind=commoncrawl needs the package 'fasttext': pip install -e '.\[raw\]'"):
        load_module("commoncrawl")
