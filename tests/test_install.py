"""The default install (no extras) works, and a feature of an extra says which one to install.

The test venv has every extra, so the packages of the extras are made unimportable in a
subprocess (a meta-path finder that refuses them, as if they were not installed); the real
``lookalike`` command then runs there. The install itself (sizes, no torch, the demo indexed
and searched on Python 3.12 and 3.13) is checked by ``scripts/smoke.sh`` in CI.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The import names of what the extras add (pyproject.toml [project.optional-dependencies]).
EXTRA_MODULES = ("torch", "efficientnet_lite_pytorch", "pyarrow", "matplotlib", "pyspark", "pandas")

BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = {blocked!r}

class Missing(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Missing())
sys.argv = ["lookalike", *{args!r}]
from lookalike.cli import main
main()
"""


def run_without_extras(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lookalike ARGS`` in a subprocess where the extras' packages cannot be imported."""
    code = BLOCKER.format(blocked=list(EXTRA_MODULES), args=list(args))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_default_dependencies_have_no_torch_and_extras_are_by_role() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [d.split("==")[0].split("[")[0] for d in project["dependencies"]]
    for heavy in ("torch", "efficientnet-lite-pytorch", "pyarrow", "matplotlib", "pyspark"):
        assert heavy not in core
    extras = project["optional-dependencies"]
    assert {"parquet", "plot", "gpu", "spark", "dev"} <= set(extras)
    assert any(d.startswith("torch==") for d in extras["gpu"])
    # the test tools install every extra, so the suite covers them all
    assert any("lookalike[" in d and "gpu" in d and "spark" in d for d in extras["dev"])


def test_cli_starts_and_stats_without_extras(tmp_path: Path) -> None:
    r = run_without_extras("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "search" in r.stdout and "Traceback" not in r.stderr
    r = run_without_extras("stats", "--catalog", str(tmp_path / "none"), cwd=tmp_path)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("export", "--catalog", "CAT", "--parquet", "lake"), "parquet"),
        (("import", "--catalog", "CAT2", "--parquet", "lake"), "parquet"),
        (("index", "manifest.parquet", "--catalog", "CAT3", "--extractor", "hog"), "parquet"),
        (("analyze", "map", "--catalog", "CAT", "--png", "map.png"), "plot"),
    ],
)
def test_a_feature_of_an_extra_names_it_in_one_line(
    tmp_path: Path, cnn_catalog_copy: Path, args: tuple[str, ...], extra: str
) -> None:
    (tmp_path / "manifest.parquet").write_bytes(b"PAR1")
    (tmp_path / "lake").mkdir()
    args = tuple(str(cnn_catalog_copy) if a == "CAT" else a for a in args)
    r = run_without_extras(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert f"pip install 'lookalike[{extra}]'" in r.stderr, r.stderr
