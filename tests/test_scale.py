"""Engine at marketplace scale (issue 18, issue 19 item 2): commands that need no vectors never
load them; searches read an immutable snapshot of the engine and concurrent ones are scanned
together; every answer stays exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lookalike
import oracle
from lookalike.types import ModelInfo

MODEL = ModelInfo("external", "1", 8)
LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


@pytest.fixture
def small_catalog(store_location):
    """60 quantized vectors in 12 listings (stock levels 0, 1, 2, ...), on every store."""
    rng = np.random.default_rng(7)
    keys = [(f"L{i:02d}", f"L{i:02d}/{j}.jpg") for i in range(12) for j in range(5)]
    vectors = oracle.quantized(rng, len(keys), 8)
    with lookalike.open_catalog(store_location) as cat:
        cat.add_vectors(
            [k[0] for k in keys], [k[1] for k in keys], vectors, model=MODEL, normalize=False
        )
        for i in range(12):
            cat.update_listing(f"L{i:02d}", stock_level=i % 3)
        hit = cat.search(vector=vectors[0], k=3, normalize=False, save=True)
    return store_location, keys, vectors, hit


def test_commands_that_need_no_vectors_never_load_them(small_catalog):
    location, _keys, _vectors, saved = small_catalog
    with lookalike.open_catalog(location) as cat:
        facts = cat.stats()
        assert facts["images"] == 60 and facts["listings"] == 12
        assert facts["model"] == {"name": "external", "version": "1", "dim": 8}
        assert facts["engine_loaded"] is False and facts["cache_rows"] is None
        assert facts["engine"] == "fast" and facts["codes"] == "int8"
        assert cat.get_listing("L01").attrs == {"stock_level": 1}
        assert len(cat.listings()) == 12
        assert cat.saved_results(saved.query_id).image_ids == saved.image_ids
        assert cat.count() == 60
        assert cat.resolve_key("L03/2.jpg") == ("L03", "L03/2.jpg")
        assert cat.get_image("L03/2.jpg").vector.shape == (8,)
        assert sum(len(b) for b in cat.iter_records()) == 60
        cat.update_listing("L01", stock_level=5)
        assert cat.delete("L02/0.jpg") == 1
        assert cat.configure(rerank=3)["rerank"] == "3"
        assert cat.stats()["images"] == 59
        assert not cat.engine_loaded  # nothing above read the vector cache
        cat.search(vector=np.ones(8), k=1)
        assert cat.engine_loaded
        facts = cat.stats()
        assert facts["engine_loaded"] is True and facts["cache_rows"] == 59
        assert facts["cache_bytes"] >= 59 * 8 * 4 and facts["codes_bytes"] > 0


def test_cli_stats_and_listing_show_do_not_load_vectors(small_catalog):
    location, *_ = small_catalog
    if "://" in location:
        pytest.skip("the CLI test runs on the folder catalog")
    out = subprocess.run(
        [LOOKALIKE, "stats", "-c", location, "-f", "json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["images"] == 60 and facts["listings"] == 12 and facts["engine_loaded"] is False
    table = subprocess.run([LOOKALIKE, "stats", "-c", location], capture_output=True, text=True)
    assert "cache_rows: -" in table.stdout and "listings: 12" in table.stdout
