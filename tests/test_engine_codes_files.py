"""Codes saved with the engine files (issue 18 item 1): a new process maps the int8 codes the
last one built instead of encoding every row again, encodes only the rows added since, and
never trusts them blindly: codes of another generation or kind are not used, and a corrupt
byte is caught by the background check, which drops the files and the cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

import lookalike
import oracle
from test_engine_files import answers, catalog, header, store_answers

__all__ = ["catalog"]


def codes_meta(path):
    gen = header(path)["generation"]
    return json.loads((path / "engine" / gen / "codes-int8.json").read_text())


def test_a_new_process_maps_the_saved_codes_and_answers_as_the_store(catalog, monkeypatch):
    path, rng = catalog  # its first process built the codes and saved them on close
    meta = codes_meta(path)
    assert meta["generation"] == header(path)["generation"]
    assert meta["n_encoded"] == 288  # the whole 16-row blocks of 300 rows
    queries = oracle.quantized(rng, 3, 16)
    with lookalike.open_catalog(path) as cat:
        got = answers(cat, queries)
        facts = cat.stats()
        assert facts["codes_source"] == "files" and facts["engine"] == "fast"
        assert cat._engines.source.await_verified(30)  # vectors and codes match their digests
    assert got == store_answers(path, queries, monkeypatch)


def test_rows_added_since_the_codes_are_encoded_and_found(catalog, monkeypatch):
    path, rng = catalog
    code = textwrap.dedent(f"""
        import numpy as np, lookalike
        from lookalike.types import ModelInfo
        with lookalike.open_catalog({str(path)!r}) as cat:  # another process, no search
            cat.add_vectors([f"n{{i}}" for i in range(40)], [f"n{{i}}/0.jpg" for i in range(40)],
                            np.full((40, 16), 0.25), model=ModelInfo("external", "1", 16),
                            normalize=False)
            cat.delete("L05/2.jpg")
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    queries = [np.full(16, 0.25, np.float32), *oracle.quantized(rng, 2, 16)]
    with lookalike.open_catalog(path) as cat:
        got = answers(cat, queries)
        assert cat.stats()["codes_source"] == "files"
        assert "n7/0.jpg" in cat.search(vector=queries[0], k=40).image_ids
        assert "L05/2.jpg" not in cat.search(vector=queries[0], k=400).image_ids
    assert got == store_answers(path, queries, monkeypatch)


def test_corrupt_codes_are_caught_in_the_background(catalog, monkeypatch):
    path, rng = catalog
    gen = header(path)["generation"]
    codes = np.memmap(path / "engine" / gen / "codes-int8.bin", np.uint8, "r+")
    codes[5] ^= 0x7F  # one code byte: the scan could miss a row
    codes.flush()
    del codes
    with lookalike.open_catalog(path) as cat:
        cat.search(vector=np.ones(16), k=1)
        source = cat._engines.source
        assert source.codes_kind() == "files"  # the foreground checks do not read codes
        assert source.await_verified(30) is False  # the background one did
        q = oracle.quantized(rng, 2, 16)
        got = answers(cat, q)  # the next search read the store and built its codes
        assert cat.stats()["cache_source"] == "store"
        assert cat.stats()["codes_source"] == "built"
    assert got == store_answers(path, q, monkeypatch)


def test_codes_of_another_kind_or_generation_are_not_used(catalog, monkeypatch):
    path, rng = catalog
    queries = oracle.quantized(rng, 2, 16)
    with lookalike.open_catalog(path) as cat:
        cat.configure(codes="float16")
        got = answers(cat, queries)  # no float16 codes were saved: built
        assert cat.stats()["codes_source"] == "built"
    gen = header(path)["generation"]
    assert (path / "engine" / gen / "codes-float16.json").exists()  # saved on close
    with lookalike.open_catalog(path) as cat:
        assert answers(cat, queries) == got
        assert cat.stats()["codes_source"] == "files"
        cat.configure(codes="int8")
        for i in range(20):  # a third of the rows: the cache compacts, a new generation
            for j in range(5):
                cat.delete(f"L{i:02d}/{j}.jpg")
        cat.search(vector=np.ones(16), k=1)
    assert header(path)["generation"] != gen
    assert codes_meta(path)["generation"] == header(path)["generation"]
    with lookalike.open_catalog(path) as cat:
        got = answers(cat, queries)
        assert cat.stats()["codes_source"] == "files"
    assert got == store_answers(path, queries, monkeypatch)
