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
    for buckets in (1, 5):
        dropped = near_pass(tmp_path / str(buckets), [docs], buckets)
        assert [docs[p]["id"] for p in dropped["pos"].tolist()] == ["b", "a2"]


def near_pass(folder: Path, parts: list[list[dict]], buckets: int, threshold: float = 0.9, **bucket_args):
    """The near pass's scan, bucket and greedy steps over `parts` through their files: the dropped pairs."""
    hasher = bk.MinHasher(threshold=threshold)
    for n, part in enumerate(parts):
        with bk.ScanWriter(folder, n, bk.BAND_RECORD, "h", buckets, ids=True, signatures=True) as out:
            for scanned in bk.near_scan(iter(part), n, hasher):
                out.add(*scanned)
    reader = bk.ScanReader(folder, len(parts), bk.BAND_RECORD, buckets)
    signatures = bk.Signatures(folder, hasher.num_perm)
    pairs = [bk.near_bucket(reader.bucket(b), signatures, threshold, **bucket_args) for b in range(buckets)]
    return bk.near_greedy(np.concatenate(pairs))


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


@pytest.mark.parametrize("machines", [3])  # 3 machines: parts that do not split evenly (2 added nothing more)
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
    assert list((tmp_path / "out").rglob("*.jsonl.gz.*.tmp"))  # the killed task's output, never renamed
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
def test_line_dedup_in_buckets_removes_what_ccnet_line_dedup_removes(group_docs, tmp_path):
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
        folder = tmp_path / str(buckets)
        for n, part in enumerate(parts):
            with bk.ScanWriter(folder, n, bk.LINE_RECORD, "h", buckets, chunk=7) as out:  # runs of 7 records
                for records in bk.line_scan(iter(part), n, 5 * n, group_docs):
                    out.add(records)
        reader = bk.ScanReader(folder, len(parts), bk.LINE_RECORD, buckets)
        losers = [bk.line_bucket(reader.bucket(b)) for b in range(buckets)]
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


def page_copies(n: int, seed: int = 0) -> list[dict]:
    """`n` near copies of one page of real text (400 words of StackExchange posts), 2 words replaced in each."""
    import random
    import xml.etree.ElementTree as ET

    from data_pipeline.raw.stackexchange import html_to_text

    words = " ".join(html_to_text(row.get("Body")) for row in ET.parse(POSTS).getroot()).split()
    page, rng = words[5000:5400], random.Random(seed)
    copies = []
    for c in range(n):
        copy = list(page)
        for _ in range(2):
            copy[rng.randrange(len(copy))] = rng.choice(page) + "x"
        copies.append({"id": f"copy-{c}", "text": " ".join(copy)})
    return copies


def test_near_dedup_verifies_a_bounded_number_of_pairs_per_document_whatever_the_cluster_size(tmp_path, monkeypatch):
    """A page's N near copies among other documents: the bucket tasks verify O(N) pairs (at most one per
    copy and band from N = 250 to 1,000; comparing every pair sharing a band grows 4x per copy), and the
    documents kept are those datasketch's in-memory LSH keeps (`near_dedup`)."""
    import xml.etree.ElementTree as ET

    from data_pipeline.raw.stackexchange import html_to_text

    others = [
        {"id": f"post-{n}", "text": html_to_text(row.get("Body"))}
        for n, row in enumerate(ET.parse(POSTS).getroot())
        if len(html_to_text(row.get("Body")).split()) > 40
    ][:150]
    verified = []
    real = bk.containment

    def counting(jaccard, size_a, size_b):
        verified[-1] += np.size(jaccard)
        return real(jaccard, size_a, size_b)

    monkeypatch.setattr(bk, "containment", counting)
    per_copy = {}
    for n in (250, 1000):
        docs = [d for pair in zip(others, page_copies(n)[: len(others)]) for d in pair] + page_copies(n)[len(others) :]
        verified.append(0)
        dropped = near_pass(tmp_path / str(n), [docs[: len(docs) // 2], docs[len(docs) // 2 :]], buckets=3)
        per_copy[n] = verified[-1] / n
        gone = {
            docs[p]["id"] if p < 1 << 32 else docs[len(docs) // 2 + (p & 0xFFFFFFFF)]["id"]
            for p in dropped["pos"].tolist()
        }
        kept = [d["id"] for d in docs if d["id"] not in gone]
        assert kept == [d["id"] for d in near_dedup(iter(docs), Tally(), threshold=0.9)], n
        assert sum(k.startswith("copy-") for k in kept) == 1
    assert per_copy[1000] < 1.25 * per_copy[250], per_copy
    assert per_copy[1000] <= bk.MinHasher(0.9).bands  # one verification per band: only the page is a representative


def given_step1(work: Path, parts: list[list[dict]], buckets: int) -> RecipeConfig:
    """A CommonCrawl-kind source with line, exact and near dedup whose step 1 is given: each part's
    documents and marker written here, as `files` leaves them (its tasks then find them done)."""
    from data_pipeline.raw.recipe import _fingerprint

    inputs, files = work / "inputs", work / "out" / "web" / "files"
    inputs.mkdir(parents=True)
    files.mkdir(parents=True)
    source = RawSourceConfig(name="web", kind="commoncrawl", inputs=[str(inputs / "*.jsonl")], near_dedup=0.9)
    source.options = {"min_chars": 10, "line_dedup_group_docs": 4}  # line dedup within each part
    for n, docs in enumerate(parts):
        entry = inputs / f"part-{n:05d}.jsonl"
        entry.write_text("")
        tally = Tally()
        with gzip.open(files / f"{part_name(str(entry))}.jsonl.gz", "wt", encoding="utf-8") as f:
            for doc in docs:
                tally.read(doc["text"])
                f.write(json.dumps(tally.keep({**doc, "meta": {"source": "commoncrawl"}})) + "\n")
        marker = {**_fingerprint(source, str(entry), Tally()), "tally": tally.to_dict()}
        (files / f"{part_name(str(entry))}.done.json").write_text(json.dumps(marker))
    return RecipeConfig(output=str(work / "out"), sources=[source], dedup_buckets=buckets, keep_work=True)


def test_4096_buckets_over_100_parts_leave_a_few_files_per_part_and_pass(tmp_path):
    """dedup_buckets=4096 (the LLaMA-1 config's) on 100 parts: the work folder holds a few files per part
    and pass (writing one per part and bucket would be 1.2 million), and the output is the bytes of 16
    buckets."""
    copies = page_copies(100)
    lines = [f"line {n} of a page that another page of its part repeats, long enough to count" for n in range(30)]
    parts = [
        [
            copies[n],  # near copies: one kept
            {"id": f"same-{n}", "text": "one text that every part holds, the exact duplicate of them all"},
            {"id": f"page-{n}", "text": "\n".join(lines[n % 10 : n % 10 + 12] + [f"page {n} alone"])},
            {"id": f"other-{n}", "text": "\n".join(lines[n % 10 + 5 : n % 10 + 17] + [f"page {n} too"])},
        ]
        for n in range(100)
    ]
    outputs = {}
    for buckets in (4096, 16):
        run_recipe(given_step1(tmp_path / str(buckets), parts, buckets))
        kept = {d["id"]: set(d["text"].split("\n")) for d in documents(tmp_path / str(buckets) / "out" / "web")}
        assert [k for k in kept if k.startswith(("copy-", "same-"))] == ["copy-0", "same-0"]  # near, exact
        both = [n for n in range(100) if f"page-{n}" in kept and f"other-{n}" in kept]  # near dedup drops some
        assert both and all(not kept[f"page-{n}"] & kept[f"other-{n}"] for n in both)  # lines repeated: removed
        work = tmp_path / str(buckets) / "out" / "web" / "work"
        if buckets == 4096:
            files = [p for p in work.rglob("*") if p.is_file()]
            assert len(files) <= 10 * 100 * 3, len(files)
        outputs[buckets] = shards(tmp_path / str(buckets) / "out")
    assert outputs[4096] == outputs[16]


def test_two_live_copies_of_every_task_both_finish_with_the_local_bytes(local_run, tmp_path, monkeypatch):
    """Every task run twice at once (a requeue while the first copy is alive, a double submission): each
    step-2 copy passes its marker check before either writes, both finish, and the output is the bytes
    of one run."""
    import threading

    from data_pipeline.raw import stages

    cfg, _, reference = local_run
    real_once = stages.once
    local = threading.local()

    def once(marker, key, work):
        def together():
            local.barrier.wait(timeout=60)  # both copies are past the marker check
            return work()

        return real_once(marker, key, together)

    monkeypatch.setattr(stages, "once", once)

    def copy(barrier, fn, task, out):
        local.barrier = barrier
        try:
            out.append(fn(*task))
        except BaseException as e:  # noqa: BLE001 - asserted below
            out.append(e)

    class Twice:
        def run(self, stage, fn, tasks, total_bytes=0):
            results = []
            for task in tasks:
                barrier, out = threading.Barrier(2), []
                threads = [threading.Thread(target=copy, args=(barrier, fn, task, out)) for _ in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert len(out) == 2 and not [e for e in out if isinstance(e, BaseException)], (stage, out)
                results.append(out[0])
            return results

    twice = sample_config(tmp_path, tmp_path / "twice", "dedup_buckets=16")
    run_recipe(twice, executor=Twice())
    assert shards(tmp_path / "twice") == reference
    assert not list((tmp_path / "twice").rglob("*.tmp"))


def test_byte_ranges_hold_every_line_once_wherever_they_cut(tmp_path):
    from data_pipeline.raw.common import range_lines

    data = b"".join(f'{{"n": {n}, "pad": "{"x" * (n % 7)}"}}\n'.encode() for n in range(200)) + b"no newline at the end"
    path = tmp_path / "rows.jsonl"
    path.write_bytes(data)
    lines = data.splitlines(keepends=True)
    starts = [0, *np.cumsum([len(line) for line in lines])[:-1].tolist()]
    for cuts in (
        [0, len(data)],
        [0, 1, 2, 3, len(data)],
        [0, *starts[5:9], len(data)],
        [0, *range(0, len(data), 97)[1:], len(data)],
    ):
        got = []
        with open(path, "rb") as f:
            for a, b in zip(cuts[:-1], cuts[1:]):
                got += list(range_lines(f, a, b))
        assert got == list(zip(starts, lines)), cuts


def test_a_huge_jsonl_input_is_read_in_byte_ranges_with_the_documents_of_one_read(tmp_path):
    """A GitHub JSONL input over `split_bytes` becomes parts of that many bytes (so no task reads it
    whole); the source's documents are those of reading it in one piece."""
    github_files = sorted((RAW / "github").rglob("*.py"))
    rows = [
        {
            "content": p.read_text(),
            "repo_name": p.relative_to(RAW / "github").parts[0],
            "path": p.name,
            "license": "mit",
        }
        for p in github_files
    ]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs, reports = {}, {}
    for split in (0, 20_000):
        source = RawSourceConfig(name="github", kind="github", inputs=[str(path)], split_bytes=split)
        reports[split] = run_recipe(RecipeConfig(output=str(tmp_path / str(split)), sources=[source]))["github"]
        outputs[split] = documents(tmp_path / str(split) / "github")
    assert reports[0]["inputs"] == 1 and reports[20_000]["inputs"] == -(-path.stat().st_size // 20_000)
    assert outputs[20_000] == outputs[0] and len(outputs[0]) >= 5
    assert reports[20_000]["docs_in"] == reports[0]["docs_in"] == len(rows)


def test_a_large_warc_gz_is_read_in_byte_ranges_at_record_boundaries_with_the_pages_of_one_read(tmp_path):
    """A `.warc.gz` over `split_bytes` becomes parts; each reads the records whose gzip member starts in
    its range (a cut inside a member moves to the next record), and the source's pages are those of
    reading the file whole."""
    from data_pipeline.raw.common import warc_member_start

    big = tmp_path / "crawl.warc.gz"
    big.write_bytes(b"".join((RAW / "warc" / name).read_bytes() for name in ("iana.warc.gz", "example.warc.gz") * 3))
    with open(big, "rb") as f:
        starts = sorted({warc_member_start(f, offset) for offset in range(0, big.stat().st_size, 997)})
    assert len(starts) > 20  # one member per record: many places to cut
    outputs, reports = {}, {}
    for split in (0, 40_000):
        source = RawSourceConfig(name="cc", kind="commoncrawl", inputs=[str(big)], split_bytes=split)
        source.options = {"line_dedup": False}
        cfg = RecipeConfig(output=str(tmp_path / str(split)), sources=[source])
        reports[split] = run_recipe(cfg)["cc"]
        outputs[split] = documents(tmp_path / str(split) / "cc")
    assert reports[40_000]["inputs"] == -(-big.stat().st_size // 40_000) > 2 and reports[0]["inputs"] == 1
    assert outputs[40_000] == outputs[0] and outputs[0]
    assert reports[40_000]["docs_in"] == reports[0]["docs_in"]


def test_a_gzip_header_inside_a_record_is_not_taken_for_a_record_start(tmp_path):
    from data_pipeline.raw.common import warc_member_start

    inner = gzip.compress(b"not a WARC record, a gzip file archived inside one")
    first = gzip.compress(b"WARC/1.0\r\nWARC-Type: resource\r\n\r\n" + inner, compresslevel=0)  # stored: inner shows
    second = gzip.compress(b"WARC/1.0\r\nWARC-Type: resource\r\n\r\nthe second record")
    path = tmp_path / "two.warc.gz"
    path.write_bytes(first + second)
    assert first.find(b"\x1f\x8b\x08", 1) > 0  # the archived file's header is there to be mistaken
    with open(path, "rb") as f:
        assert [warc_member_start(f, at) for at in (0, 1, len(first), len(first) + 1)] == [
            0,
            len(first),
            len(first),
            len(first + second),
        ]
