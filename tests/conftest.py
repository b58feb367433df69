"""Shared fixtures: the real demo collection (photos from scikit-image / scikit-learn wheels) and a
catalog of it indexed once per test run with the real ``cnn`` model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import lookalike
from lookalike.demo import write_demo


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo collection: 14 listings x 6 images, 2 held-out queries each."""
    root = tmp_path_factory.mktemp("demo")
    write_demo(root)
    return root


@pytest.fixture(scope="session")
def cnn_catalog_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cnn catalog of the demo photos with the demo listing attributes. Treat as read-only;
    use ``cnn_catalog_copy`` to modify."""
    path = tmp_path_factory.mktemp("cnn") / "cat"
    with lookalike.open_catalog(path, extractor="cnn") as cat:
        report = cat.index([demo_dir / "photos"])
        assert report.added == 84 and not report.failed
        import csv

        with open(demo_dir / "listings.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                cat.update_listing(
                    row["listing_id"], stock_level=int(row["stock_level"]), category=row["category"]
                )
    return path


@pytest.fixture
def cnn_catalog_copy(cnn_catalog_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the cnn demo catalog (safe to modify)."""
    dst = tmp_path / "cat"
    shutil.copytree(cnn_catalog_dir, dst)
    return dst


# ------------------------------------------------------------------ stores

import os  # noqa: E402
import shutil as _shutil  # noqa: E402
import uuid  # noqa: E402

HAVE_POSTGRES = bool(
    _shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A PostgreSQL cluster of the test run (initdb + pg_ctl on a free loopback port)."""
    if not HAVE_POSTGRES:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (.ci/run installs it)")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    from lookalike.store.localpg import LocalPostgres

    server = LocalPostgres(tmp_path_factory.mktemp("pg")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request, tmp_path, monkeypatch):
    """Where a fresh catalog lives, for every store backend: a folder, or a new database."""
    monkeypatch.setenv("LOOKALIKE_STATE_DIR", str(tmp_path / "state"))
    if request.param == "sqlite":
        return str(tmp_path / "cat")
    server = request.getfixturevalue("pg_server")
    return server.create_database(f"t{uuid.uuid4().hex[:12]}")
