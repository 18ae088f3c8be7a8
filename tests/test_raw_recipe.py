"""The raw-source recipe runner and the StackExchange reader, on a real dump excerpt bundled in tests/data."""

import gzip
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

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
