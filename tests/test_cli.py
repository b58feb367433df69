"""The ``lookalike`` command through subprocess, as a user runs it (and as the README says)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


def cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([LOOKALIKE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def search_json(*args: str) -> dict:
    """``lookalike search ARGS --format json``, parsed."""
    return json.loads(cli("search", *args, "--format", "json").stdout)


def quickstart_commands() -> list[list[str]]:
    """The `run ...` lines of scripts/quickstart.sh, the README's first command."""
    text = (ROOT / "scripts" / "quickstart.sh").read_text()
    return [shlex.split(line)[1:] for line in text.splitlines() if line.startswith("run ")]


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme
    assert "bash scripts/test.sh" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_quickstart_commands_work_and_find_the_right_listing(tmp_path):
    commands = quickstart_commands()
    assert commands, "no run lines in scripts/quickstart.sh"
    outputs = []
    for argv in commands:
        assert argv[0] == ".venv/bin/lookalike"
        outputs.append(cli(*argv[1:], cwd=tmp_path).stdout)
    # the first search (table) shows the motorcycle listing (right camera) first
    table_rows = [ln for ln in outputs[3].splitlines() if re.match(r"^│\s+1 ", ln)]
    assert table_rows and "motorcycle" in table_rows[0]
    # the filtered JSON search: chelsea (in stock) first, coffee (stock 0) absent
    result = json.loads(outputs[4])
    assert set(result) == {"query_id", "hits"}
    assert result["hits"][0]["listing_id"] == "chelsea"
    assert list(result["hits"][0])[:3] == ["listing_id", "image_id", "score"]
    assert "coffee" not in [h["listing_id"] for h in result["hits"]]
    # running the index step again adds nothing
    again = cli(
        "index",
        "demo/photos",
        "--catalog",
        "demo/cat",
        "--format",
        "json",
        "--no-progress",
        cwd=tmp_path,
    )
    assert json.loads(again.stdout)["added"] == 0


@pytest.fixture
def catalog(cnn_catalog_copy: Path) -> str:
    return str(cnn_catalog_copy)


def test_search_json_save_and_results(catalog, demo_dir):
    q = str(demo_dir / "queries" / "flower" / "q-01.jpg")
    res = json.loads(cli("search", q, "-c", catalog, "-k", "3", "--save", "-f", "json").stdout)
    assert res["hits"][0]["listing_id"] == "flower" and len(res["hits"]) == 3
    saved = json.loads(cli("results", res["query_id"], "-c", catalog, "-f", "json").stdout)
    assert [h["image_id"] for h in saved["hits"]] == [h["image_id"] for h in res["hits"]]


def test_search_by_id_threshold_and_vector(catalog, tmp_path):
    res = json.loads(
        cli(
            "search",
            "--id",
            "china/china-03.jpg",
            "-c",
            catalog,
            "--threshold",
            "0.6",
            "-f",
            "json",
        ).stdout
    )
    assert res["hits"] and all(h["score"] > 0.6 for h in res["hits"])
    assert {h["listing_id"] for h in res["hits"]} == {"china"}
    vec = tmp_path / "q.npy"
    rng = np.random.default_rng(0)
    np.save(vec, rng.standard_normal((2, 1280)).astype(np.float32))
    out = cli("search", "--vector", str(vec), "-c", catalog, "-k", "2", "-f", "json").stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == 2 and all(len(x["hits"]) == 2 for x in lines)


def test_group_by_agg_options(catalog, demo_dir):
    q = str(demo_dir / "queries" / "retina" / "q-01.jpg")
    for agg in ("max", "mean", "sum-top-n"):
        res = search_json(
            q, "-c", catalog, "--group-by", "listing", "--agg", agg, "--top-n", "2", "-k", "2"
        )
        assert res["hits"][0]["listing_id"] == "retina"
        assert res["hits"][0]["n_images"] == 6


def test_listing_import_sets_attributes_from_csv(tmp_path):
    cat = str(tmp_path / "cat")
    good = tmp_path / "good.csv"
    good.write_text("listing_id,stock_level,color\na,3,red\nb,0,\na,1,blue\n")
    assert "updated 2 listing(s)" in cli("listing", "import", str(good), "-c", cat).stdout
    assert json.loads(cli("listing", "show", "a", "-c", cat).stdout) == {
        "listing_id": "a",
        "stock_level": 1,  # the last row of a listing wins
        "color": "blue",
    }
    assert json.loads(cli("listing", "show", "b", "-c", cat).stdout) == {
        "listing_id": "b",
        "stock_level": 0,
    }
    bad = tmp_path / "bad.csv"
    bad.write_text("listing_id,stock_level\nc,2\nd,1.5\n")
    proc = cli("listing", "import", str(bad), "-c", cat, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "'d'" in proc.stderr and "stock_level" in proc.stderr
    assert cli("listing", "show", "c", "-c", cat, check=False).returncode != 0  # none written


def test_listing_set_delete_and_stats(catalog, demo_dir):
    q = str(demo_dir / "queries" / "page" / "q-01.jpg")
    cli("listing", "set", "page", "stock_level=0", "-c", catalog)
    shown = json.loads(cli("listing", "show", "page", "-c", catalog).stdout)
    assert shown["stock_level"] == 0 and shown["category"] == "document"
    res = search_json(q, "-c", catalog, "--group-by", "listing", "--where", "stock_level > 0")
    assert "page" not in [h["listing_id"] for h in res["hits"]]
    assert "deleted 1" in cli("delete", "page/page-01.jpg", "-c", catalog).stdout
    stats = json.loads(cli("stats", "-c", catalog, "-f", "json").stdout)
    assert stats["images"] == 83 and stats["model"]["dim"] == 1280
    assert stats["listings"] == 14 and stats["engine_loaded"] is False  # no vector was read


def test_index_exit_code_and_failed_csv_when_files_fail(demo_dir, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(demo_dir / "photos" / "coins", photos / "coins")
    (photos / "coins" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report = tmp_path / "failed.csv"
    proc = cli(
        "index",
        str(photos),
        "-c",
        str(tmp_path / "cat"),
        "--failed-csv",
        str(report),
        "-f",
        "json",
        "--no-progress",
        check=False,
    )
    assert proc.returncode == 3
    body = json.loads(proc.stdout)
    assert body["added"] == 6 and len(body["failed"]) == 1
    assert "broken.jpg" in body["failed"][0]["location"]
    assert "broken.jpg" in proc.stderr
    assert "broken.jpg" in report.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["search", "x.jpg", "-c", "/nonexistent/cat"], "no catalog"),
        (["search", "--where", "stock_level >", "--id", "coins/coins-01.jpg"], "where:"),
        (["search", "--id", "nope.jpg"], "no image 'nope.jpg'"),
        (["index", "/nonexistent/photos"], "no such file or folder"),
    ],
)
def test_errors_are_one_clear_line(args, message, catalog):
    if "-c" not in args:
        args = [*args, "-c", catalog]
    proc = cli(*args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_teaches(catalog):
    text = cli("search", "--help").stdout
    for flag in ("--group-by", "--agg", "--threshold", "--where", "--save", "--format"):
        assert flag in text


def test_help_paragraphs_reflow_to_the_terminal_width():
    """typer keeps the source line breaks of a docstring's later paragraphs; every command's
    help is reflowed so `--help` reads as prose (indented example lines kept)."""
    from lookalike import cli as lcli
    from lookalike.cli.common import reflow
    from lookalike.cli.search import index

    commands = [c for g in lcli.GROUPS for c in g.registered_commands]
    assert len(commands) > 20
    for command in commands:
        assert command.help, command.callback
        for para in command.help.split("\n\n"):
            assert para.startswith(" ") or "\n" not in para, (command.name, para)
    assert "skipped, so re-running the same command" in reflow(index.__doc__)


def test_config_ann_build_search_and_bench(catalog, demo_dir):
    out = cli("config", "-c", catalog, "--codes", "float16").stdout
    assert "codes: float16" in out
    assert json.loads(cli("stats", "-c", catalog, "-f", "json").stdout)["codes"] == "float16"
    assert "built hnsw over 84 vectors" in cli("ann", "build", "-c", catalog).stdout
    q = str(demo_dir / "queries" / "astronaut" / "q-01.jpg")
    res = search_json(q, "-c", catalog, "--index", "hnsw", "-k", "3")
    assert res["hits"][0]["listing_id"] == "astronaut"
    rows = [
        json.loads(x)
        for x in cli("bench", "-c", catalog, "--queries", "10", "-f", "json").stdout.splitlines()
    ]
    names = [r["name"] for r in rows]
    assert names[0] == "exact numpy" and "ann hnsw" in names
    assert all(r["recall_at_k"] == 1.0 for r in rows if r["name"].startswith("exact"))
    bad = cli("search", q, "-c", catalog, "--index", "ivf", check=False)
    assert bad.returncode == 1 and "no ivf index" in bad.stderr


def _help_paths(group, prefix=()):
    """Every command path under a typer app: ("search",), ("spark", "search"), ..."""
    for cmd in group.registered_commands:
        yield (*prefix, cmd.name or cmd.callback.__name__.replace("_", "-"))
    for sub in group.registered_groups:
        if isinstance(sub.name, str):
            yield (*prefix, sub.name)
            yield from _help_paths(sub.typer_instance, (*prefix, sub.name))
        else:  # a typer without a name: its commands are merged into this level
            yield from _help_paths(sub.typer_instance, prefix)


def test_every_help_renders_and_keeps_brackets():
    """`lookalike --help` and every subcommand's `--help` render; rich markup does not eat
    `[spark]`-style brackets (it used to print "pip install 'lookalike'")."""
    from typer.testing import CliRunner

    from lookalike.cli import app

    runner = CliRunner()
    paths = [(), *_help_paths(app)]
    assert len(paths) > 30
    for path in paths:
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (path, res.output)
        assert "Usage:" in res.output, path
    spark = runner.invoke(app, ["spark", "--help"], env={"COLUMNS": "200"}).output
    assert "pip install 'lookalike[spark]'" in spark
    search = runner.invoke(app, ["spark", "search", "--help"], env={"COLUMNS": "200"}).output
    assert "--output" in search and "--save" in search and "local[*]" in search


def test_error_handler_one_line_for_every_kind_of_error(monkeypatch, capsys):
    import sqlite3

    import typer

    from lookalike.cli.common import handle_errors
    from lookalike.errors import QueryError

    def raising(exc):
        @handle_errors
        def command():
            raise exc

        return command

    cases = [
        (QueryError("where: bad"), "error: where: bad"),
        (sqlite3.OperationalError("database is locked"), "error: catalog database error:"),
        (FileNotFoundError(2, "No such file or directory", "x.npy"), "error: x.npy: No such"),
        (ValueError("cannot reshape\nsecond line"), "error: cannot reshape second line"),
        (RuntimeError("boom"), "error: internal error: RuntimeError: boom"),
    ]
    monkeypatch.delenv("LOOKALIKE_DEBUG", raising=False)
    for exc, line in cases:
        with pytest.raises(typer.Exit) as info:
            raising(exc)()
        assert info.value.exit_code == 1
        stderr = capsys.readouterr().err
        assert stderr.startswith(line) and stderr.count("\n") == 1, stderr
    with pytest.raises(typer.Exit) as info:  # typer's own exits pass through untouched
        raising(typer.Exit(3))()
    assert info.value.exit_code == 3
    monkeypatch.setenv("LOOKALIKE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        raising(RuntimeError("boom"))()


def test_key_value_type_and_usage_errors(tmp_path):
    from typer.testing import CliRunner

    from lookalike.cli import app
    from lookalike.cli.common import Assignment, key_value

    assert key_value("stock_level=0") == Assignment("stock_level", 0)
    assert key_value(" color = red") == Assignment("color", " red")
    assert key_value("gone=null") == Assignment("gone", None)
    assert key_value("expr=a=b") == Assignment("expr", "a=b")
    runner = CliRunner()
    for argv in (
        ["listing", "set", "x", "nokey", "-c", str(tmp_path / "cat")],
        ["listing", "set", "x", "=1", "-c", str(tmp_path / "cat")],
        ["publish", "--listing", "x", "--attr", "bad"],
    ):
        res = runner.invoke(app, argv)
        assert res.exit_code == 2, (argv, res.output)
        assert "is not key=value" in res.output
    assert not (tmp_path / "cat").exists()  # rejected before anything was opened
