"""Shared fixtures: the real demo collection (photos from scikit-image / scikit-learn wheels) and a
catalog of it indexed once per test run with the real ``cnn`` model; store backends; and
``no_orphans``, which fails a test that leaves a process it started running."""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import sys
import time
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


# ------------------------------------------------------------------ processes

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def proc_children(parent: int) -> dict[int, str]:
    """``pid -> state`` (``R``, ``S``, ``Z``, ...) of the processes whose parent is ``parent``,
    read from /proc (psutil is not a dependency)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and ')'
        if int(fields[1]) == parent:
            found[int(entry)] = fields[0]
    return found


def proc_descendants(root: int) -> set[int]:
    """Every process below ``root`` in the process tree (children, their children, ...)."""
    out: set[int] = set()
    todo = [root]
    while todo:
        for pid in proc_children(todo.pop()):
            if pid not in out:
                out.add(pid)
                todo.append(pid)
    return out


def proc_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie has exited: it only waits to be
    reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@pytest.fixture
def no_orphans():
    """Fail the test if it leaves a process it started running (checked after the other
    fixtures' teardown, within 5 s), and kill what is left.

    The test process becomes a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so that a
    grandchild orphaned by a killed child (a decode worker of a ``kill -9``-ed ``lookalike
    index``) is re-parented to it instead of to init, and is seen here.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    me = os.getpid()
    before = set(proc_children(me))
    yield
    deadline = time.monotonic() + 5
    while True:
        left = {}
        for pid, state in proc_children(me).items():
            if pid in before:
                continue
            if state == "Z":  # exited: an orphan re-parented to us, or an unwaited child
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                continue
            left[pid] = _cmdline(pid)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        pytest.fail(
            f"the test left {len(left)} process(es) running: "
            + "; ".join(f"{pid} {cmd}" for pid, cmd in left.items())
        )
