"""Image decoding rules and source discovery."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lookalike.errors import ImageError, SourceError
from lookalike.images import (
    MAX_IMAGE_PIXELS,
    MAX_UPLOAD_PIXELS,
    ImageSource,
    decode_image,
    iter_sources,
    load_image,
    probe_image,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    # a 40x20 image, left half red, right half blue; EXIF 6 = "rotate 90 CW to display"
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    dec = decode_image(data, "rot.jpg")
    assert dec.image.size == (20, 40)
    assert (dec.width, dec.height) == (20, 40)
    top = np.asarray(dec.image)[2, 10]
    bottom = np.asarray(dec.image)[37, 10]
    assert top[0] > 200 and top[2] < 60  # red moved to the top
    assert bottom[2] > 200 and bottom[0] < 60


def test_cmyk_is_converted_to_rgb():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    dec = decode_image(encode(img, "JPEG"), "cmyk.jpg")
    assert dec.image.mode == "RGB"
    r, g, b = np.asarray(dec.image)[8, 8]
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grey_is_scaled_to_8_bit():
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:, :4] = 32768
    dec = decode_image(encode(Image.fromarray(arr), "PNG"), "g16.png")
    out = np.asarray(dec.image)
    assert dec.image.mode == "RGB"
    assert out[0, 7].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [128, 128, 128]


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    dec = decode_image(encode(img, "PNG"), "alpha.png")
    assert np.asarray(dec.image)[0, 0].tolist() == [255, 255, 255]


def test_palette_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    dec = decode_image(encode(img, "PNG", transparency=0), "pal.png")
    assert np.asarray(dec.image)[0, 0].tolist() == [255, 255, 255]


def test_sha256_is_of_the_file_bytes():
    import hashlib

    data = encode(Image.new("RGB", (4, 4)), "PNG")
    assert decode_image(data).sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:300], "corrupt or truncated"),
        (encode(Image.new("RGB", (64, 64)), "PNG")[:60], "corrupt or truncated|not an image"),
    ],
)
def test_bad_bytes_raise_image_error_naming_the_file(data, reason):
    with pytest.raises(ImageError, match=reason) as info:
        decode_image(data, "some/file.jpg")
    assert "some/file.jpg" in str(info.value)


def test_decompression_bomb_is_refused():
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    data = encode(Image.new("1", (side, side)), "PNG")  # tiny file, huge image
    assert len(data) < 2_000_000
    with pytest.raises(ImageError, match="decompression-bomb"):
        decode_image(data, "bomb.png")


def test_draft_mode_shrinks_large_jpegs_but_reports_full_size():
    data = encode(Image.new("RGB", (2000, 1000), (10, 200, 30)), "JPEG")
    dec = decode_image(data, "big.jpg", draft_size=224)
    assert (dec.width, dec.height) == (2000, 1000)
    assert min(dec.image.size) >= 224 and dec.image.size[0] < 2000


def test_large_16_bit_png_is_reduced_before_it_is_widened():
    arr = np.full((3000, 2400), 65535, np.uint16)
    arr[:, :1200] = 32768
    data = encode(Image.fromarray(arr), "PNG")
    dec = decode_image(data, "g16.png", draft_size=224)
    assert (dec.width, dec.height) == (2400, 3000)
    assert dec.image.size == (480, 600)  # reduced by 5: shorter side >= 2 x 224
    out = np.asarray(dec.image)
    assert out[10, 10].tolist() == [128, 128, 128] and out[10, -10].tolist() == [255] * 3


@pytest.mark.parametrize("mode", ["RGBA", "P", "1", "CMYK", "LA", "I", "F"])
def test_every_mode_is_reduced_and_converted(mode):
    img = Image.new("RGB", (1200, 1000), (200, 30, 30)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    dec = decode_image(encode(img, fmt), f"x.{fmt}", draft_size=100)
    full = decode_image(encode(img, fmt), f"x.{fmt}")
    assert dec.image.mode == "RGB" and dec.image.size == (240, 200)
    small = np.asarray(full.image.resize((240, 200), Image.Resampling.BOX), np.int16)
    assert np.abs(np.asarray(dec.image, np.int16) - small).max() <= 2


def test_reduced_decode_keeps_exif_orientation():
    arr = np.zeros((1000, 2000, 3), np.uint8)
    arr[:, :1000] = (255, 0, 0)
    arr[:, 1000:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    dec = decode_image(encode(Image.fromarray(arr), "PNG", exif=exif), "rot.png", draft_size=100)
    assert (dec.width, dec.height) == (1000, 2000)
    assert dec.image.size == (200, 400)
    assert np.asarray(dec.image)[20, 100][0] > 200  # red moved to the top


def test_probe_reads_the_size_from_the_header():
    data = encode(Image.new("1", (8000, 6000)), "PNG")  # 48 M pixels, a few KB
    assert MAX_UPLOAD_PIXELS == 40_000_000
    with pytest.raises(ImageError, match=r"8000x6000 pixels is over .* 40000000-pixel"):
        probe_image(data, "up.png")
    assert probe_image(data, "up.png", max_pixels=50_000_000) == (8000, 6000)
    with pytest.raises(ImageError, match="not an image"):
        probe_image(b"hello", "up.png")


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


# --------------------------------------------------------------------------- sources


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for rel in ["truck-17/front.jpg", "truck-17/back.PNG", "truck-18/a/side.jpg", "solo.jpg"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (root / "truck-17" / "notes.txt").write_text("not an image")
    (root / "truck-17" / ".hidden.jpg").write_bytes(b"x")
    return root


def test_folder_convention(tree):
    got = {(s.listing_id, s.image_id) for s in iter_sources([tree])}
    assert got == {
        ("truck-17", "truck-17/front.jpg"),
        ("truck-17", "truck-17/back.PNG"),
        ("a", "truck-18/a/side.jpg"),
        ("photos", "photos/solo.jpg"),
    }


def test_keys_do_not_depend_on_the_level_indexed_from(tree):
    from_top = {s.location: (s.listing_id, s.image_id) for s in iter_sources([tree])}
    from_listing = list(iter_sources([tree / "truck-17"]))
    assert from_listing
    for s in from_listing:
        assert (s.listing_id, s.image_id) == from_top[s.location]
    single = next(iter(iter_sources([tree / "truck-17" / "front.jpg"])))
    assert (single.listing_id, single.image_id) == ("truck-17", "truck-17/front.jpg")


def test_list_file_resolves_relative_paths(tree):
    lst = tree.parent / "list.txt"
    lst.write_text("# a comment\nphotos/truck-17/front.jpg\n\nhttp://example.test/x/y.jpg\n")
    got = list(iter_sources([lst]))
    assert got[0] == ImageSource(
        "truck-17", "truck-17/front.jpg", str(tree / "truck-17" / "front.jpg")
    )
    assert got[1] == ImageSource("x", "x/y.jpg", "http://example.test/x/y.jpg")


def test_csv_and_parquet_manifests(tree):
    csv_path = tree.parent / "m.csv"
    csv_path.write_text("listing_id,image_id,path\nL1,img-a,photos/solo.jpg\n")
    pq_path = tree.parent / "m.parquet"
    pq.write_table(
        pa.table({"listing_id": ["L2"], "image_id": ["img-b"], "path": [str(tree / "solo.jpg")]}),
        pq_path,
    )
    got = list(iter_sources([csv_path, pq_path]))
    assert got == [
        ImageSource("L1", "img-a", str(tree / "solo.jpg")),
        ImageSource("L2", "img-b", str(tree / "solo.jpg")),
    ]


def test_manifest_errors_name_file_and_row(tmp_path):
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("listing,image_id,path\nL1,a,x.jpg\n")
    with pytest.raises(SourceError, match=r"cols.csv: manifest lacks column\(s\) listing_id"):
        list(iter_sources([bad_cols]))
    bad_row = tmp_path / "rows.csv"
    bad_row.write_text("listing_id,image_id,path\nL1,a,x.jpg\nL2,,y.jpg\n")
    with pytest.raises(SourceError, match=r"rows\.csv: row 2: image_id is empty"):
        list(iter_sources([bad_row]))


def test_missing_input_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        list(iter_sources([tmp_path / "missing"]))
