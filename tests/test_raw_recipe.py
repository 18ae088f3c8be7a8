"""The raw-source recipe runner and the StackExchange reader, on a real dump excerpt bundled in tests/data."""

import contextlib
import gzip
import json
import re
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from data_pipeline.configfile import ConfigError
from data_pipeline.raw.common import CorruptInput, Tally
from data_pipeline.raw.recipe import RawSourceConfig, RecipeConfig
from data_pipeline.raw.runner import run_recipe
from data_pipeline.sources import DataError

POSTS = Path(__file__).resolve().parent / "data" / "raw" / "stackexchange" / "cstheory.meta" / "Posts.xml"
QUESTIONS = 91  # the excerpt's questions: one document each


def read_output(folder: Path) -> list[dict]:
    docs = []
    for path in sorted(folder.glob(f"{folder.name}-*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs += [json.loads(line) for line in f]
    return docs


def test_stackexchange_questions_with_answers_by_score(tmp_path):
    from data_pipeline.raw import stackexchange

    tally = Tally()
    docs = list(stackexchange.documents(POSTS, stackexchange.Options(), tally))
    rows = [r.attrib for r in ET.parse(POSTS).getroot()]
    questions = [r for r in rows if r["PostTypeId"] == "1"]
    others = [r for r in rows if r["PostTypeId"] not in ("1", "2")]  # tag wikis and the like
    assert len(docs) == len(questions) and tally.docs_in == len(questions) + len(others)  # answers are in docs
    assert tally.dropped == {"not_question_or_answer": len(others)}
    by_id = {d["id"].rsplit("-", 1)[1]: d for d in docs}
    answered = max(questions, key=lambda q: sum(r.get("ParentId") == q["Id"] for r in rows))
    doc = by_id[answered["Id"]]
    assert doc["text"].startswith(f"Q: {answered['Title']}\n\n")
    answers = sorted(
        (r for r in rows if r.get("ParentId") == answered["Id"]), key=lambda r: (-int(r["Score"]), int(r["Id"]))
    )
    assert doc["meta"]["answers"] == len(answers) > 3
    positions = []
    for answer in answers:  # each answer's first words appear as an "A:" block, in score order
        first_line = stackexchange.html_to_text(answer["Body"]).splitlines()[0]
        positions.append(doc["text"].index(f"A: {first_line}"))
    assert positions == sorted(positions)
    assert int(answers[0]["Score"]) > int(answers[-1]["Score"])
    assert "<p>" not in doc["text"] and "&lt;" not in doc["text"] and "&amp;" not in doc["text"]
    assert doc["meta"]["url"] == f"https://cstheory.meta.stackexchange.com/questions/{answered['Id']}"
    assert doc["meta"]["license"].startswith("CC BY-SA")


def recipe(tmp_path: Path, *sources: RawSourceConfig, **settings) -> RecipeConfig:
    return RecipeConfig(output=str(tmp_path / "clean"), sources=list(sources), **settings)


def test_damaged_input_is_reported_and_the_rest_processed_or_strict_stops(tmp_path):
    data = POSTS.read_bytes()
    cut = tmp_path / "cut" / "Posts.xml.gz"
    cut.parent.mkdir()
    cut.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])  # a truncated download
    whole = RawSourceConfig(name="whole", kind="stackexchange", inputs=[str(POSTS)])
    damaged = RawSourceConfig(name="damaged", kind="stackexchange", inputs=[str(cut), str(POSTS)], exact_dedup=False)
    reports = run_recipe(recipe(tmp_path, whole, damaged))
    assert reports["whole"]["failed_files"] == [] and reports["whole"]["docs_out"] == QUESTIONS
    failed = reports["damaged"]["failed_files"]
    assert len(failed) == 1 and failed[0]["file"] == str(cut) and str(cut) in failed[0]["error"]
    # the questions read before the cut are kept, and the intact file behind it is processed whole
    assert QUESTIONS < reports["damaged"]["docs_out"] < 2 * QUESTIONS
    assert str(cut) in (tmp_path / "clean" / "report.md").read_text()
    with pytest.raises(DataError, match=str(cut)):
        run_recipe(recipe(tmp_path / "strict", damaged, strict=True))
    with pytest.raises(DataError, match=str(cut)):  # in a pool of workers too
        run_recipe(recipe(tmp_path / "strict-pool", damaged, strict=True, workers=2))
    with pytest.raises(DataError, match=str(cut)):  # and over the first run's markers, which saw the damage
        run_recipe(recipe(tmp_path, whole, damaged, strict=True))
    from data_pipeline.raw import stackexchange

    with pytest.raises(CorruptInput, match="Posts.xml.gz"):
        list(stackexchange.documents(cut, stackexchange.Options(), Tally()))


def test_counts_add_up_dedup_and_resume(tmp_path):
    copy = tmp_path / "mirror" / "cstheory.meta" / "Posts.xml"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(POSTS.read_bytes())
    source = RawSourceConfig(name="se", kind="stackexchange", inputs=[str(POSTS), str(copy)], shard_docs=40)
    report = run_recipe(recipe(tmp_path, source))["se"]
    assert report["docs_out"] == QUESTIONS and report["dropped"]["exact_duplicate"] == QUESTIONS  # the mirror's copy
    assert report["docs_in"] == report["docs_out"] + sum(report["dropped"].values())
    docs = read_output(tmp_path / "clean" / "se")
    assert len(docs) == QUESTIONS and len({d["id"] for d in docs}) == QUESTIONS
    assert len(list((tmp_path / "clean" / "se").glob("se-*.jsonl.gz"))) == 3  # shards of 40
    assert len(report["examples"]["exact_duplicate"]) == 3
    # a rerun finds both files done (markers) and gives the same output without reading them again
    from data_pipeline.raw.recipe import part_name

    part = tmp_path / "clean" / "se" / "files" / f"{part_name(POSTS.resolve())}.jsonl.gz"
    shard = tmp_path / "clean" / "se" / "se-00000.jsonl.gz"
    before, shard_before = part.stat().st_mtime_ns, shard.stat().st_mtime_ns
    assert run_recipe(recipe(tmp_path, source))["se"] == report
    assert part.stat().st_mtime_ns == before and read_output(tmp_path / "clean" / "se") == docs
    assert shard.stat().st_mtime_ns == shard_before  # the source-wide step was not redone either
    source.near_dedup = 0.9  # another dedup setting: the source-wide step is redone, the files are not
    assert run_recipe(recipe(tmp_path, source))["se"]["step2"] != report["step2"]
    assert shard.stat().st_mtime_ns != shard_before and part.stat().st_mtime_ns == before
    source.near_dedup = None
    # an input added in front leaves the others done; one removed is forgotten
    front = tmp_path / "a-first" / "cstheory.meta" / "Posts.xml"
    front.parent.mkdir(parents=True)
    front.write_bytes(POSTS.read_bytes())
    source.inputs = [str(front), str(POSTS)]
    assert run_recipe(recipe(tmp_path, source))["se"]["dropped"]["exact_duplicate"] == QUESTIONS
    assert part.stat().st_mtime_ns == before
    assert len(list((tmp_path / "clean" / "se" / "files").glob("*.jsonl.gz"))) == 2  # the mirror's is gone
    # other options make other documents: the markers of the old ones are not reused
    source.options = {"min_answers": 3}
    fewer = run_recipe(recipe(tmp_path, source))["se"]
    assert part.stat().st_mtime_ns != before and fewer["docs_out"] < QUESTIONS and "too_few_answers" in fewer["dropped"]
    # two worker processes give the same documents
    source.options, source.inputs = {}, [str(POSTS), str(copy)]
    parallel = run_recipe(recipe(tmp_path / "parallel", source, workers=2))["se"]
    assert parallel["docs_out"] == QUESTIONS and read_output(tmp_path / "parallel" / "clean" / "se") == docs


def test_rows_without_ids_are_counted_not_fatal(tmp_path):
    from data_pipeline.raw import stackexchange

    rows = POSTS.read_text(encoding="utf-8-sig").splitlines()
    answer = next(i for i, line in enumerate(rows) if 'PostTypeId="2"' in line)
    rows[answer] = rows[answer].replace(' Id="', ' Xd="', 1)  # an answer row that lost its Id
    broken = tmp_path / "site" / "Posts.xml"
    broken.parent.mkdir()
    broken.write_text("\n".join(rows), encoding="utf-8")
    tally = Tally()
    docs = list(stackexchange.documents(broken, stackexchange.Options(), tally))
    assert len(docs) == QUESTIONS and tally.dropped["bad_post_ids"] == 1


def test_config_errors_name_the_key(tmp_path):
    from pretrain.config import ConfigError

    bad_option = RawSourceConfig(name="se", kind="stackexchange", inputs=[str(POSTS)], options={"min_answer": 1})
    with pytest.raises(ConfigError, match=r"sources\[se\].options: unknown \['min_answer'\]"):
        run_recipe(recipe(tmp_path, bad_option))
    with pytest.raises(ConfigError, match="kind='webpages'"):
        run_recipe(recipe(tmp_path, RawSourceConfig(name="x", kind="webpages", inputs=[str(POSTS)])))
    with pytest.raises(ConfigError, match="matches nothing"):
        run_recipe(recipe(tmp_path, RawSourceConfig(name="x", kind="stackexchange", inputs=["/nonexistent/*.xml"])))


def test_the_sample_recipe_runs_every_source_and_its_output_tokenizes(tmp_path, tiny_data):
    """configs/recipe/sample.yaml (every kind, on the bundled raw files), plus a second edition of a
    bundled book: counts add up, the two editions come out as one, and the documents tokenize."""
    from test_raw_gutenberg_github import new_edition, raw_text

    from data_pipeline.shards import Manifest
    from data_pipeline.tokenize import TokenizeSettings, tokenize_source
    from pretrain.config import load_structured

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "editions").mkdir()
    (tmp_path / "editions" / "pg1661-2023.txt").write_text(new_edition(raw_text("pg1661.txt.gz")))
    cfg = load_structured(RecipeConfig, root / "configs" / "recipe" / "sample.yaml", [f"output={tmp_path / 'clean'}"])
    books = next(s for s in cfg.sources if s.name == "books")
    books.inputs = [str(root / p) for p in books.inputs] + [str(tmp_path / "editions" / "pg1661-2023.txt")]
    for s in cfg.sources:
        s.inputs = [p if Path(p).is_absolute() else str(root / p) for p in s.inputs]
    reports = run_recipe(cfg)
    assert set(reports) == {"commoncrawl", "wikipedia", "books", "arxiv", "github", "stackexchange"}
    for name, r in reports.items():
        assert r["failed_files"] == [], name
        assert r["docs_in"] == r["docs_out"] + sum(r["dropped"].values()), name
        assert r["docs_out"] > 0 and r["input_bytes"] > 0, name
    assert reports["books"]["docs_out"] == 5 and reports["books"]["dropped"] == {"near_duplicate": 1}
    assert "pg1661-2023" in reports["books"]["examples"]["near_duplicate"][0]
    tokenizer = tiny_data["tokenizer"]
    for name, r in reports.items():
        docs = read_output(tmp_path / "clean" / name)
        assert len(docs) == r["docs_out"] and all(d["meta"]["source"] and d["text"].strip() for d in docs), name
        settings = TokenizeSettings(source=name, tokenizer_path=str(tokenizer), val_fraction=0.0)
        files = sorted((tmp_path / "clean" / name).glob(f"{name}-*.jsonl.gz"))
        tokenize_source(files, tmp_path / "tokens" / name, settings)
        assert sum(s.documents for s in Manifest.load(tmp_path / "tokens" / name).shards) == r["docs_out"], name


def test_the_full_llama1_recipe_config_is_valid():
    from data_pipeline.raw.recipe import validate_recipe
    from pretrain.config import load_structured

    cfg = load_structured(RecipeConfig, Path(__file__).resolve().parent.parent / "configs" / "recipe" / "llama1.yaml")
    validate_recipe(cfg)  # every source's kind and options are known
    assert [s.name for s in cfg.sources] == [
        "commoncrawl",
        "c4",
        "github",
        "wikipedia",
        "books",
        "arxiv",
        "stackexchange",
    ]
    assert next(s for s in cfg.sources if s.name == "books").near_dedup == 0.9


def test_recipe_command_prints_the_report_and_names_config_mistakes(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"output: {tmp_path / 'out'}\nsources:\n  - {{name: se, kind: stackexchange, inputs: [{POSTS}]}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "recipe", str(config)], capture_output=True, text=True, cwd=root
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| se | 1 | 0 | 94 | 91 |" in result.stdout and (tmp_path / "out" / "se" / "report.json").is_file()
    config.write_text(config.read_text().replace("inputs:", "options: {min_answer: 1}, inputs:"))
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "recipe", str(config)], capture_output=True, text=True, cwd=root
    )
    assert result.returncode == 2 and "error: sources[se].options: unknown ['min_answer']" in result.stderr


# --- paths, packages, next steps, progress: what the driver says and ships ---------------------------


def se_config(path: Path, output: str, inputs: str, extra: str = "") -> Path:
    """A recipe YAML of one StackExchange source."""
    path.write_text(f"output: {output}\nsources:\n  - {{name: se, kind: stackexchange, inputs: [{inputs}]{extra}}}\n")
    return path


class Recorder:
    """An executor that runs nothing and keeps the tasks it was given."""

    name = "record"

    def __init__(self) -> None:
        self.tasks: list[tuple] = []

    def run(self, stage, fn, tasks, total_bytes=0) -> list:
        self.tasks += tasks
        return [None] * len(tasks)


def test_relative_output_inputs_and_path_options_reach_the_tasks_absolute(tmp_path, monkeypatch):
    """A Ray worker or a Slurm array task runs in another directory: the driver resolves every local path
    against its own before the tasks leave it."""
    from data_pipeline.raw.recipe import absolute_paths
    from data_pipeline.raw.runner import run_stage
    from pretrain.config import load_structured

    (tmp_path / "raw" / "cstheory.meta").mkdir(parents=True)
    (tmp_path / "raw" / "cstheory.meta" / "Posts.xml").write_bytes(POSTS.read_bytes())
    config = se_config(tmp_path / "recipe.yaml", "clean", "raw/*/Posts.xml", ", options: {tmp_dir: scratch}")
    monkeypatch.chdir(tmp_path)
    cfg = load_structured(RecipeConfig, config)
    executor = Recorder()
    run_stage(cfg, "files", executor)
    ((shipped, name, entry),) = executor.tasks
    assert shipped.output == str(tmp_path / "clean") and entry == str(tmp_path / "raw" / "cstheory.meta" / "Posts.xml")
    assert shipped.sources[0].options["tmp_dir"] == str(tmp_path / "scratch")
    assert cfg.output == "clean"  # the caller's config is left as it was
    url = RawSourceConfig(name="u", kind="stackexchange", inputs=["s3://bucket/Posts.xml", "file://raw/a.xml"])
    resolved = absolute_paths(RecipeConfig(sources=[url]), base="/data")
    assert resolved.sources[0].inputs == ["s3://bucket/Posts.xml", "/data/raw/a.xml"]


def test_ray_workers_elsewhere_write_a_relative_output_where_the_driver_runs(tmp_path, monkeypatch):
    """A 2-node Ray cluster started from another directory (its workers run there): the recipe with a
    relative `output:`, run from a third, writes there, the bytes of a local run."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from data_pipeline.__main__ import main

    for folder in ("cluster", "driver", "local"):
        (tmp_path / folder).mkdir()
    config = se_config(tmp_path / "recipe.yaml", "clean", str(POSTS), ", shard_docs: 40")
    monkeypatch.chdir(tmp_path / "local")
    assert main(["recipe", str(config)]) == 0
    monkeypatch.chdir(tmp_path / "cluster")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        monkeypatch.chdir(tmp_path / "driver")
        handler = signal.getsignal(signal.SIGTERM)
        assert main(["recipe", str(config), "executor=ray", f"ray_address={cluster.address}"]) == 0
        assert signal.getsignal(signal.SIGTERM) is handler  # Ray's own (it exits) does not outlive the recipe
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not (tmp_path / "cluster" / "clean").exists()
    local, driver = tmp_path / "local" / "clean" / "se", tmp_path / "driver" / "clean" / "se"
    assert sorted(p.name for p in driver.glob("se-*.jsonl.gz")) == [f"se-0000{k}.jsonl.gz" for k in range(3)]
    assert {p.name: p.read_bytes() for p in driver.glob("se-*")} == {p.name: p.read_bytes() for p in local.glob("se-*")}


@pytest.mark.parametrize(
    "url, package",
    [("s3://bucket/crawl/warc.paths.gz", "s3fs"), ("gs://bucket/Posts.xml", "gcsfs"), ("az://box/Posts.xml", "adlfs")],
)
def test_a_missing_fsspec_package_is_one_line_naming_the_url_and_the_install(tmp_path, capsys, url, package):
    import importlib.util

    from data_pipeline.__main__ import main
    from data_pipeline.raw.recipe import process_file
    from pretrain.config import ConfigError

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    protocol = url.split("://")[0]
    line = f"{url}: reading {protocol}:// URLs needs the package '{package}': pip install {package}"
    assert main(["recipe", str(se_config(tmp_path / "recipe.yaml", str(tmp_path / "out"), url))]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"
    source = RawSourceConfig(name="se", kind="stackexchange", inputs=[url])
    with pytest.raises(ConfigError, match=f"^{line}$"):  # in a task too (a URL listed by a local listing)
        process_file(source, url, tmp_path, strict=False)


def test_the_recipe_ends_naming_its_output_and_the_command_that_tokenizes_it(tmp_path, tiny_data, capsys, monkeypatch):
    from data_pipeline.__main__ import main
    from data_pipeline.shards import Manifest

    monkeypatch.chdir(tmp_path)
    assert main(["recipe", str(se_config(tmp_path / "recipe.yaml", "clean", str(POSTS)))]) == 0
    lines = capsys.readouterr().out.splitlines()
    pipeline = tmp_path / "clean" / "pipeline.yaml"
    assert lines[-2] == (
        f"cleaned documents: {tmp_path / 'clean'}/<source>/<source>-NNNNN.jsonl.gz "
        f"(report: {tmp_path / 'clean' / 'report.md'})"
    )
    assert lines[-1] == f"tokenize them: python -m data_pipeline prepare {pipeline}"
    # the command as printed (the tiny tokenizer instead of training one on 91 questions) tokenizes every document
    command = lines[-1].removeprefix("tokenize them: python -m data_pipeline ").split()
    assert main([*command, f"tokenizer.path={tiny_data['tokenizer']}"]) == 0
    shards = Manifest.load(tmp_path / "clean-tokens" / "se").shards
    assert sum(s.documents for s in shards) == QUESTIONS


def test_progress_prints_its_last_line_once():
    import io

    from data_pipeline.progress import Progress

    stream = io.StringIO()
    with Progress("step", total_files=3, every=0, stream=stream) as progress:
        for _ in range(3):
            progress.update(files=1, docs=2, nbytes=10)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("step: 3/3 files (100.0%), 6 docs, 30 B, ")
    stream = io.StringIO()
    with Progress("step", total_files=3, every=3600, stream=stream) as progress:
        progress.update(files=3)
    assert stream.getvalue().splitlines() == ["step: 3/3 files (100.0%), ETA 0:00:00"]


def test_a_long_read_prints_its_progress_from_inside_the_task(tmp_path, monkeypatch, capfd):
    """Step 1 on one input (hours for a whole Wikipedia dump) prints, from the task itself, a line of the
    documents and bytes read so far every LLAMA_PROGRESS_EVERY seconds; nothing when it ends sooner."""
    from data_pipeline.raw import recipe as recipe_module

    monkeypatch.setattr(recipe_module, "PROGRESS_CHECK_DOCS", 10)  # the clock looked at every 10 documents
    monkeypatch.setenv("LLAMA_PROGRESS_EVERY", "0")
    source = RawSourceConfig(name="se", kind="stackexchange", inputs=[str(POSTS)])
    for name in ("often", "never"):
        (tmp_path / name).mkdir()
    done = recipe_module.process_file(source, str(POSTS), tmp_path / "often", strict=False)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == done["tally"]["docs_in"] // 10 > 2
    for n, line in enumerate(lines, start=1):
        assert re.fullmatch(
            rf"recipe se: {re.escape(str(POSTS))}: {10 * n:,} docs, [\d.]+ k?B read, .*/s, .* docs/s, 0:00:\d\d", line
        )
    monkeypatch.setenv("LLAMA_PROGRESS_EVERY", "3600")
    recipe_module.process_file(source, str(POSTS), tmp_path / "never", strict=False)
    assert capfd.readouterr().err == ""


def test_stages_without_byte_counts_show_their_documents_or_only_their_tasks(monkeypatch, capsys):
    """A dedup stage counts documents (scan, apply) or nothing (bucket), never bytes: no `0 docs, 0 B`."""
    from data_pipeline.raw.executors import LocalExecutor

    monkeypatch.setenv("LLAMA_PROGRESS_EVERY", "0")
    executor = LocalExecutor(1)
    executor.run("exact-scan", lambda n: {"docs": n}, [(5,), (7,)])
    executor.run("exact-bucket", lambda b: {"docs": 0}, [(0,), (1,)])
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(", ")[:2] for line in lines] == [
        ["recipe exact-scan: 1/2 tasks (50.0%)", "5 docs"],
        ["recipe exact-scan: 2/2 tasks (100.0%)", "12 docs"],
        ["recipe exact-bucket: 1/2 tasks (50.0%)", "ETA 0:00:00"],
        ["recipe exact-bucket: 2/2 tasks (100.0%)", "ETA 0:00:00"],
    ]
    assert lines[1].split(", ")[2].endswith(" docs/s") and not any(" B" in line for line in lines)


def test_remote_inputs_are_tried_again_after_a_server_error_and_a_missing_one_is_reported(tmp_path, monkeypatch):
    """A local HTTP server stands in for data.commoncrawl.org: a listed input answering 503 three times is
    read on a later try (the tries counted in the report); one answering 404 is reported with its status,
    the rest processed, unless strict."""
    import functools
    import http.server
    import threading

    from data_pipeline.raw import recipe as recipe_module

    monkeypatch.setattr(recipe_module, "BACKOFF_S", 0.01)
    site = tmp_path / "site" / "flaky" / "cstheory.meta"
    site.mkdir(parents=True)
    (site / "Posts.xml").write_bytes(POSTS.read_bytes())
    failures = {"left": 3}

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            if self.path.startswith("/flaky/") and failures["left"] > 0:
                failures["left"] -= 1
                self.send_error(503)
                return None
            return super().send_head()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Flaky, directory=tmp_path / "site"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        listing = tmp_path / "posts.paths.gz"  # as Common Crawl's warc.paths.gz: paths under a prefix
        listing.write_bytes(gzip.compress(b"flaky/cstheory.meta/Posts.xml\ngone/cstheory.meta/Posts.xml\n"))
        missing = f"{base}/gone/cstheory.meta/Posts.xml"
        source = RawSourceConfig(name="se", kind="stackexchange", inputs=[str(listing)], paths_prefix=base)
        report = run_recipe(recipe(tmp_path, source))["se"]
        assert failures["left"] == 0 and report["retries"] >= 1
        assert report["inputs"] == 2 and report["docs_out"] == QUESTIONS  # the flaky one, read whole
        assert report["failed_files"] == [{"file": missing, "error": f"{missing}: unreadable, HTTP 404 (not found)"}]
        assert "remote reads tried again after a transient error" in (tmp_path / "clean" / "report.md").read_text()
        with pytest.raises(DataError, match=f"{missing}: unreadable, HTTP 404"):
            run_recipe(recipe(tmp_path / "strict", source, strict=True))
    finally:
        server.shutdown()


@contextlib.contextmanager
def flaky_site(root: Path, failures: dict[str, int]):
    """A local HTTP server of the files under `root` standing in for data.commoncrawl.org: a request for a
    path starting with a key of `failures` answers 503 that many times (a negative count: always),
    a path under `/gone/` 404. Yields its base URL."""
    import functools
    import http.server
    import threading

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            for prefix, left in failures.items():
                if self.path.startswith(prefix) and left != 0:
                    failures[prefix] = left - 1
                    self.send_error(503)
                    return None
            return super().send_head()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Flaky, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_remote_listings_and_urls_are_expanded_with_retries_and_an_unreadable_one_is_one_line(tmp_path, monkeypatch):
    """A remote `*.paths.gz` listing and a URL named in `inputs:` answering 503 a few times are read on a
    later try, in the driver, as step 1's reads are; a listing that stays unreadable (404, or 503 after
    every try) is one ConfigError line naming the URL and the HTTP status."""
    from data_pipeline.raw import recipe as recipe_module
    from data_pipeline.raw.recipe import TRIES, expand_inputs

    monkeypatch.setattr(recipe_module, "BACKOFF_S", 0.01)
    site = tmp_path / "site"
    (site / "crawl").mkdir(parents=True)
    (site / "crawl" / "posts.paths.gz").write_bytes(gzip.compress(b"a/Posts.xml\nb/Posts.xml\n"))
    (site / "down").mkdir()
    (site / "down" / "posts.paths.gz").write_bytes(gzip.compress(b"a/Posts.xml\n"))
    (site / "se" / "cstheory.meta").mkdir(parents=True)
    (site / "se" / "cstheory.meta" / "Posts.xml").write_bytes(POSTS.read_bytes())
    failures = {"/crawl/": 2, "/se/": 2, "/down/": -1}
    with flaky_site(site, failures) as base:

        def source(*inputs: str) -> RawSourceConfig:
            return RawSourceConfig(name="se", kind="stackexchange", inputs=list(inputs), paths_prefix=base)

        posts = f"{base}/se/cstheory.meta/Posts.xml"
        expanded = expand_inputs(source(f"{base}/crawl/posts.paths.gz", posts))
        assert expanded == [f"{base}/a/Posts.xml", f"{base}/b/Posts.xml", posts]
        assert failures["/crawl/"] == failures["/se/"] == 0  # both were refused, then read
        gone = f"{base}/gone/posts.paths.gz"
        with pytest.raises(ConfigError, match=rf"^sources\[se\].inputs: {gone}: unreadable, HTTP 404 \(not found\)$"):
            expand_inputs(source(gone))
        down = f"{base}/down/posts.paths.gz"
        message = rf"^sources\[se\].inputs: {down}: unreadable, HTTP 503 \(server error\) after {TRIES} tries$"
        with pytest.raises(ConfigError, match=message):
            expand_inputs(source(down))
        assert failures["/down/"] <= -1 - TRIES  # tried TRIES times (each try a HEAD and a GET)
