"""
Tests for data.py: image-mode rules, every DataError, the dataset folder and a user's pair, check, and fuzz
tests: on random files only DataError escapes, and valid folders are read. (The synthetic scenes are tested in
test_synth.py, the importers in test_importers.py; here synthetic scenes only serve as ready-made dataset folders.)
"""

import os
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data
from conftest import REAL_SIZES, make_dataset_root as make_root, make_real_size_set, save_image as save  # noqa: E402
from tools import importers  # noqa: E402
from tools import synth  # noqa: E402
from data import DataError, SemClass  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ID = {c.name: c.id for c in data.DEFAULT_CLASSES}
COLOR = {c.name: c.color for c in data.DEFAULT_CLASSES}




def exif_bytes(orientation):
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def png_claiming(path, w, h):
    """A PNG whose header says w x h while its pixel data is that of 16x16: only decoding would notice."""
    save(np.zeros((16, 16), np.uint8), path)
    b = bytearray(path.read_bytes())
    b[16:24] = struct.pack(">II", w, h)                             # IHDR width, height
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))       # IHDR checksum
    path.write_bytes(bytes(b))
    return path


# -----------------------------------------------------------------------------
# Image-mode rules

def test_rgb_modes_grey_replicated_alpha_dropped_palette_applied(tmp_path):
    L = save(np.array([[0, 51, 255]], np.uint8), tmp_path / "l.png")
    assert torch.allclose(data.load_rgb(L), torch.tensor([0, 0.2, 1.0]).expand(3, 1, 3) * 2 - 1, atol=1e-6)

    rgba = np.array([[[200, 100, 50, 0], [10, 20, 30, 255]]], np.uint8)  # alpha 0 must NOT blacken the pixel
    x = data.load_rgb(save(rgba, tmp_path / "rgba.png"))
    assert torch.allclose((x + 1) * 127.5, torch.tensor(rgba[0, :, :3].T[:, None, :], dtype=torch.float), atol=1e-3)

    la = save(np.array([[[100, 0]]], np.uint8), tmp_path / "la.png", mode="LA")
    assert torch.allclose((data.load_rgb(la) + 1) * 127.5, torch.full((3, 1, 1), 100.0), atol=1e-3)

    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 20, 30])
    p.putdata([1, 0])
    x = data.load_rgb(save(p, tmp_path / "p.png"))
    assert torch.allclose((x[:, 0, 0] + 1) * 127.5, torch.tensor([10.0, 20, 30]), atol=1e-3)

    one = save(Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1"), tmp_path / "one.png")
    assert data.load_rgb(one).tolist() == [[[-1.0, 1.0]]] * 3

    cmyk = save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / "cmyk.jpg")
    assert data.load_rgb(cmyk).shape == (3, 4, 4) and data.load_rgb(cmyk).min() > 0.9  # no ink = white


def test_16bit_grey_scaled_by_65535_and_8bit_by_255(tmp_path):
    v16 = np.array([[0, 13107, 65535]], np.uint16)
    v8 = np.array([[0, 51, 255]], np.uint8)
    want = torch.tensor([[[0.0, 0.2, 1.0]]])
    assert torch.allclose(data.load_ir(save(v16, tmp_path / "a.png")), want, atol=1e-6)
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    assert torch.allclose(data.load_ir(save(v8, tmp_path / "b.png")), want, atol=1e-6)
    assert torch.allclose(data.load_ir(save(v16.astype(np.int32), tmp_path / "c.tif", mode="I")), want, atol=1e-6)
    grey_rgb = np.repeat(v8[..., None], 3, axis=2)  # LLVIP/FLIR store IR as 3 equal channels
    assert torch.allclose(data.load_ir(save(grey_rgb, tmp_path / "d.png")), want, atol=1e-6)
    assert torch.allclose(data.load_rgb(tmp_path / "a.png"), (want * 2 - 1).expand(3, 1, 3), atol=1e-6)


def test_exif_orientation_is_applied_by_every_loader_and_the_size_check(tmp_path):
    img = np.zeros((16, 32, 3), np.uint8)  # stored 32 wide x 16 high: left half red, right half blue
    img[:, :16, 0] = 255
    img[:, 16:, 2] = 255
    jpg = save(img, tmp_path / "r.jpg", exif=exif_bytes(6), quality=95)  # 6: display rotated 90 deg clockwise
    x = data.load_rgb(jpg)
    assert x.shape == (3, 32, 16)
    assert x[0, 2, 8] > 0.5 and x[2, 2, 8] < -0.5   # the red left half is now on top
    assert x[2, -3, 8] > 0.5 and x[0, -3, 8] < -0.5
    assert data.image_size(jpg) == (16, 32)

    ids = np.zeros((16, 32), np.uint8)
    ids[:, 16:] = ID["person"]
    sem = save(ids, tmp_path / "s.png", exif=exif_bytes(6))
    got, _ = data.load_semantic(sem, data.DEFAULT_CLASSES)
    assert got.shape == (32, 16) and (got[:16] == 0).all() and (got[16:] == ID["person"]).all()
    assert data.load_ir(save(ids, tmp_path / "i.png", exif=exif_bytes(8))).shape == (1, 32, 16)

    root = tmp_path / "ds"  # rotated JPEG + upright PNGs of the displayed size form a valid pair
    for d in data.FOLDERS:
        (root / d).mkdir(parents=True)
    save(img, root / "rgb" / "x.jpg", exif=exif_bytes(6))
    save(np.zeros((32, 16), np.uint8), root / "sem" / "x.png")
    save(np.zeros((32, 16), np.uint8), root / "ir" / "x.png")
    assert data.PairedDataset(root)[0]["rgb"].shape == (3, 32, 16)


def test_semantic_palette_image_indices_are_ids_not_colours(tmp_path):
    p = Image.new("P", (3, 1))
    p.putpalette([1, 2, 3, 4, 5, 6, 7, 8, 9])  # colours unrelated to the class palette
    p.putdata([0, 1, 2])
    ids, colour = data.load_semantic(save(p, tmp_path / "p.png"), data.DEFAULT_CLASSES)
    assert ids.dtype == torch.long and ids.tolist() == [[0, 1, 2]]
    assert torch.allclose((colour[:, 0, 1] + 1) * 127.5, torch.tensor(COLOR["road"], dtype=torch.float), atol=1e-3)


def palette_image(index, colours):
    """P image of `index` [H, W] whose palette gives index i the colour colours[i] (a dict)."""
    p = Image.fromarray(np.asarray(index, np.uint8), "P")
    flat = [0] * 768
    for i, rgb in colours.items():
        flat[3 * i:3 * i + 3] = rgb
    p.putpalette(flat)
    return p


def test_palette_map_that_fits_both_readings_is_refused(tmp_path):
    ids = np.array([[0, 4, 5], [6, 7, 1]], np.uint8)
    lut = data.palette(data.DEFAULT_CLASSES)
    # A lossless palette re-save of a colour map (PIL's quantize, as optipng does) whose indices (0..5) are class ids
    # too: by colour and by index it names different classes, and the file cannot say which was meant
    q = save(Image.fromarray(lut[ids]).quantize(), tmp_path / "q.png")
    assert Image.open(q).mode == "P" and not np.array_equal(np.asarray(Image.open(q)), ids)
    with pytest.raises(data.DataError, match="reads as label ids and as class colours"):
        data.load_semantic(q, data.DEFAULT_CLASSES)
    # MFNet's labels with the VOC palette: index 3 (bike) has VOC's colour (128, 128, 0), MFNet's car_stop colour
    mfnet = data.class_table([(0, "unlabeled", (0, 0, 0), False), (3, "bike", (0, 128, 192), True),
                              (5, "car_stop", (128, 128, 0), False)])
    voc = save(palette_image(np.array([[0, 3]], np.uint8), {0: (0, 0, 0), 3: (128, 128, 0)}), tmp_path / "voc.png")
    with pytest.raises(data.DataError, match="index 3 is class 3 by id but car_stop"):
        data.load_semantic(voc, mfnet)
    assert data.semantic_ids(Image.open(voc), voc, mfnet, index_palette=True).tolist() == [[0, 3]]


def test_palette_semantic_map_in_class_colours_is_a_colour_map(tmp_path):
    ids = np.array([[0, 4, 5], [6, 7, 1]], np.uint8)
    lut = data.palette(data.DEFAULT_CLASSES)
    # Palette colours that are class colours at indices that are not ids (ids 0..7, indices 20..27)
    p = save(palette_image(ids + 20, {i + 20: c for i, c in enumerate(lut.tolist())}), tmp_path / "p.png")
    assert data.load_semantic(p, data.DEFAULT_CLASSES)[0].tolist() == ids.tolist()
    # The class palette at the ids' own indices: both readings agree
    same = save(palette_image(ids, dict(enumerate(lut.tolist()))), tmp_path / "same.png")
    assert data.load_semantic(same, data.DEFAULT_CLASSES)[0].tolist() == ids.tolist()
    # One colour that is not a class colour makes it an index image again
    idx = save(palette_image(ids, {**dict(enumerate(lut.tolist())), 7: (1, 2, 3)}), tmp_path / "idx.png")
    assert data.load_semantic(idx, data.DEFAULT_CLASSES)[0].tolist() == ids.tolist()


def test_semantic_index_and_colour_images_give_the_same_ids(tmp_path):
    ids = np.array([[0, 4, 5], [6, 7, 1]], np.uint8)
    lut = data.palette(data.DEFAULT_CLASSES)
    for path in (save(ids, tmp_path / "l.png"), save(ids.astype(np.uint16), tmp_path / "i16.png"),
                 save(lut[ids], tmp_path / "rgb.png"),
                 save(np.concatenate([lut[ids], np.zeros((2, 3, 1), np.uint8)], 2), tmp_path / "rgba.png")):
        got, colour = data.load_semantic(path, data.DEFAULT_CLASSES)
        assert got.tolist() == ids.tolist(), path.name
        assert torch.equal(colour, data.render_semantic(got, data.DEFAULT_CLASSES))
        assert colour.shape == (3, 2, 3) and colour.min() >= -1 and colour.max() <= 1


# -----------------------------------------------------------------------------
# DataError cases: each names the file and the problem

def test_unknown_colour_names_file_colour_and_pixel_count(tmp_path):
    img = np.zeros((2, 3, 3), np.uint8)
    img[:] = COLOR["road"]
    img[0, :] = (1, 2, 3)
    with pytest.raises(DataError, match=r"odd\.png.*\(1, 2, 3\) x 3 px"):
        data.load_semantic(save(img, tmp_path / "odd.png"), data.DEFAULT_CLASSES)
    with pytest.raises(DataError, match="JPEG"):  # lossy semantic maps get a hint
        data.load_semantic(save(np.full((8, 8, 3), 37, np.uint8), tmp_path / "s.jpg"), data.DEFAULT_CLASSES)


def test_unknown_label_id_names_file_id_and_count(tmp_path):
    with pytest.raises(DataError, match=r"ids\.png.*9 x 2 px"):
        data.load_semantic(save(np.array([[9, 9, 0]], np.uint8), tmp_path / "ids.png"), data.DEFAULT_CLASSES)


def test_images_over_the_pixel_limit_are_refused_from_the_header(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(data.PIXELS_ENV, raising=False)
    bomb = png_claiming(tmp_path / "bomb.png", 8000, 8000)  # 64M pixels claimed by a file of a few bytes
    over = r"bomb\.png: 8000x8000 is 64,000,000 pixels, over the limit of 33,554,432; set FLUX_IR_MAX_PIXELS=N"
    for load in (data.load_rgb, data.load_ir, data.image_size, lambda p: data.load_semantic(p, data.DEFAULT_CLASSES)):
        with pytest.raises(DataError, match=over):
            load(bomb)
    # Refused before decoding: under the limit, the decoder is what finds the missing pixels
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    small = png_claiming(tmp_path / "small.png", 64, 64)
    with pytest.raises(DataError, match="4,096 pixels, over the limit of 1,000"):
        data.load_rgb(small)
    with pytest.raises(DataError, match="cannot read image"):
        data.load_rgb(small, max_pixels=4096)
    # A dataset is refused from its headers; the argument, the variable and check's flag raise the limit
    root = make_root(tmp_path / "d", hw=(32, 48))
    with pytest.raises(DataError, match=r"a\.png: 48x32 is 1,536 pixels, over the limit of 1,000"):
        data.PairedDataset(root)
    assert data.PairedDataset(root, max_pixels=1536)[0]["rgb"].shape == (3, 32, 48)
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(root)])
    assert e.value.code == 2 and "over the limit" in capsys.readouterr().err
    data.main(["check", str(root), "--max-pixels", "1536"])
    assert "1 pairs" in capsys.readouterr().out
    monkeypatch.setenv(data.PIXELS_ENV, "1536")
    assert len(data.PairedDataset(root)) == 1
    monkeypatch.setenv(data.PIXELS_ENV, "lots")
    with pytest.raises(DataError, match="FLUX_IR_MAX_PIXELS is 'lots'; it must be a positive whole number"):
        data.PairedDataset(root)


@pytest.mark.parametrize("case", ["missing", "folder", "junk", "truncated", "gif", "float", "int-range"])
def test_unreadable_files_raise_dataerror_naming_the_file(tmp_path, case):
    path = tmp_path / f"bad_{case}.png"
    if case == "folder":
        path.mkdir()
    elif case == "junk":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    elif case == "truncated":
        save(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "gif":  # PIL can read it, but only PNG/JPEG/BMP/TIFF decoders are allowed to run
        Image.new("L", (4, 4)).save(path, format="GIF")
    elif case == "float":
        path = save(np.zeros((2, 2), np.float32), tmp_path / "bad_float.tif", mode="F")
    elif case == "int-range":
        path = save(np.array([[70000]], np.int32), tmp_path / "bad_int-range.tif", mode="I")
    for load in (data.load_rgb, data.load_ir, lambda p: data.load_semantic(p, data.DEFAULT_CLASSES)):
        with pytest.raises(DataError, match=re.escape(path.name)):
            load(path)


def write_classes(path, classes):
    import json
    path.write_text(json.dumps({"classes": classes}))
    return path


def test_load_classes_roundtrip_and_default(tmp_path):
    data.save_classes(importers.FMB_CLASSES, tmp_path / "c.json")
    assert data.load_classes(tmp_path / "c.json") == importers.FMB_CLASSES
    assert data.load_classes(None) == data.DEFAULT_CLASSES
    got = data.load_classes(write_classes(tmp_path / "h.json", [{"id": 3, "name": "a", "color": [1, 2, 3]}]))
    assert got == (SemClass(3, "a", (1, 2, 3), False),)  # "hot" defaults to false
    assert data.hot_ids(data.DEFAULT_CLASSES) == [ID["person"], ID["car_running"]]


@pytest.mark.parametrize("classes, problem", [
    ([{"id": 0, "name": "a", "color": [0, 0, 0]}, {"id": 0, "name": "b", "color": [1, 1, 1]}], "share the id 0"),
    ([{"id": 0, "name": "a", "color": [5, 5, 5]}, {"id": 1, "name": "b", "color": [5, 5, 5]}], "share the color"),
    ([{"id": 0, "name": "a", "color": [0, 0, 256]}], "colours are"),
    ([{"id": 0, "name": "a", "color": [0, 0]}], "colours are"),
    ([{"id": 0, "name": "a", "color": "red"}], "not a list"),
    ([{"id": -1, "name": "a", "color": [0, 0, 0]}], "ids are"),
    ([{"id": 0, "name": "a", "color": [0, 0, 0], "hot": "yes"}], "hot is"),
    ([{"id": 0, "name": "a", "colour": [0, 0, 0]}], "unknown keys"),
    ([], "no classes"),
])
def test_bad_class_tables_are_rejected(tmp_path, classes, problem):
    path = write_classes(tmp_path / "classes.json", classes)
    with pytest.raises(DataError, match=re.escape(problem)) as e:
        data.load_classes(path)
    assert str(path) in str(e.value)


def test_unparseable_class_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(DataError, match=r"c\.json"):
        data.load_classes(tmp_path / "c.json")
    with pytest.raises(DataError, match="nope"):
        data.load_classes(tmp_path / "nope.json")


def test_classes_json_that_is_a_folder_or_a_broken_link_is_an_error(tmp_path):
    root = make_root(tmp_path / "d")
    (root / "classes.json").mkdir()
    with pytest.raises(DataError, match=r"classes\.json: is a folder"):
        data.PairedDataset(root)
    (root / "classes.json").rmdir()
    (root / "classes.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(DataError, match=r"classes\.json: cannot read class table"):
        data.PairedDataset(root)


# -----------------------------------------------------------------------------
# PairedDataset



def test_dataset_item_keys_shapes_ranges(tmp_path):
    synth.write_synth(tmp_path, 3, 32, seed=1)
    ds = data.PairedDataset(tmp_path)
    assert len(ds) == 3 and ds.classes == data.DEFAULT_CLASSES
    item = ds[1]
    assert set(item) == {"name", "rgb", "sem", "sem_ids", "ir"} and item["name"] == "000001"
    assert item["rgb"].shape == (3, 32, 32) and item["rgb"].dtype == torch.float32
    assert item["sem"].shape == (3, 32, 32) and item["sem_ids"].shape == (32, 32)
    assert item["sem_ids"].dtype == torch.long
    assert item["ir"].shape == (1, 32, 32)
    assert -1 <= item["rgb"].min() and item["rgb"].max() <= 1 and 0 <= item["ir"].min() and item["ir"].max() <= 1
    raw = np.asarray(Image.open(tmp_path / "ir" / "000001.png"), np.float64) / 65535
    assert np.allclose(item["ir"][0].numpy(), raw, atol=1e-6)
    assert torch.equal(item["sem"], data.render_semantic(item["sem_ids"], ds.classes))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["rgb"].shape == (3, 3, 32, 32) and batch["name"] == ["000000", "000001", "000002"]


def test_dataset_uses_root_classes_json(tmp_path):
    make_root(tmp_path)
    save(np.full((32, 32, 3), 9, np.uint8), tmp_path / "sem" / "a.png")
    write_classes(tmp_path / "classes.json", [{"id": 5, "name": "x", "color": [9, 9, 9], "hot": True}])
    assert (data.PairedDataset(tmp_path)[0]["sem_ids"] == 5).all()
    with pytest.raises(DataError, match=r"a\.png"):  # explicit classes win over the file
        data.PairedDataset(tmp_path, classes=data.DEFAULT_CLASSES)[0]


def test_dataset_missing_folder(tmp_path):
    make_root(tmp_path)
    for f in (tmp_path / "ir").iterdir():
        f.unlink()
    (tmp_path / "ir").rmdir()
    with pytest.raises(DataError, match="missing folder.*ir/"):
        data.PairedDataset(tmp_path)
    with pytest.raises(DataError, match="no such dataset folder"):
        data.PairedDataset(tmp_path / "nowhere")


def test_dataset_empty(tmp_path):
    for d in data.FOLDERS:
        (tmp_path / d).mkdir()
    (tmp_path / "rgb" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        data.PairedDataset(tmp_path)


def test_dataset_mismatched_stems_listed_with_counts(tmp_path):
    make_root(tmp_path, names=["a", "b"])
    for i in range(13):
        save(np.zeros((32, 32, 3), np.uint8), tmp_path / "rgb" / f"extra{i:02d}.png")
    (tmp_path / "ir" / "b.png").unlink()
    with pytest.raises(DataError) as e:
        data.PairedDataset(tmp_path)
    msg = str(e.value)
    assert "13 stem(s) missing from sem/" in msg and "extra00" in msg and "and 3 more" in msg
    assert "14 stem(s) missing from ir/" in msg and "missing from rgb/" not in msg


def test_dataset_duplicate_stem_in_one_folder(tmp_path):
    make_root(tmp_path)
    save(np.zeros((32, 32, 3), np.uint8), tmp_path / "rgb" / "a.jpg")
    with pytest.raises(DataError, match="a.jpg and a.png|a.png and a.jpg"):
        data.PairedDataset(tmp_path)


def test_dataset_size_disagreement_names_pair_and_sizes(tmp_path):
    make_root(tmp_path, names=["a", "b"])
    save(np.zeros((48, 32), np.uint8), tmp_path / "ir" / "b.png")
    with pytest.raises(DataError, match=r"b: rgb 32x32, sem 32x32, ir 32x48"):
        data.PairedDataset(tmp_path)
    with pytest.raises(DataError, match="32x48"):  # never silently resized, even when size is given
        data.PairedDataset(tmp_path, size=16)


def test_dataset_non_multiple_of_16_needs_size(tmp_path):
    make_root(tmp_path, hw=(24, 40))
    with pytest.raises(DataError, match=r"multiples of 16.*a 40x24.*--size"):
        data.PairedDataset(tmp_path)
    with pytest.raises(DataError, match="positive multiple of 16"):
        data.PairedDataset(tmp_path, size=20)
    assert data.PairedDataset(tmp_path, size=32)[0]["rgb"].shape == (3, 32, 48)  # about 32x32 pixels at 5:3


def test_dataset_size_crops_centre_and_keeps_ids_valid(tmp_path):
    make_root(tmp_path, hw=(32, 48))
    rgb = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    save(rgb, tmp_path / "rgb" / "a.png")
    stripes = np.array([0, 4, 5, 6])[np.arange(48) // 3 % 4]  # thin stripes: a smooth filter would blend ids
    save(np.broadcast_to(stripes, (32, 48)).astype(np.uint8), tmp_path / "sem" / "a.png")
    item = data.PairedDataset(tmp_path, size=32)[0]  # shorter side already 32: a pure centre crop
    want = torch.from_numpy(rgb[:, 8:40]).permute(2, 0, 1).float()  # [32, 32, 3] -> [3, 32, 32]
    assert torch.allclose((item["rgb"] + 1) * 127.5, want, atol=1e-3)
    assert item["sem_ids"].tolist() == np.broadcast_to(stripes[8:40], (32, 32)).tolist()
    small = data.PairedDataset(tmp_path, size=16)[0]
    assert small["sem_ids"].shape == (16, 16) and set(small["sem_ids"].unique().tolist()) <= {0, 4, 5, 6}
    assert small["rgb"].min() >= -1 and small["rgb"].max() <= 1 and small["ir"].min() >= 0


def test_load_pair_refuses_mismatch_and_unaligned_sizes_and_crops_with_size(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    stripes = np.broadcast_to(np.array([0, 4, 5, 6])[np.arange(48) // 3 % 4], (32, 48)).astype(np.uint8)
    rgb_path, sem_path = save(rgb, tmp_path / "rgb.png"), save(stripes, tmp_path / "sem.png")
    x, sem, ids = data.load_pair(rgb_path, sem_path, data.DEFAULT_CLASSES, None)  # 48x32: kept as is
    assert torch.equal(x, data.load_rgb(rgb_path)) and ids.tolist() == stripes.tolist()
    assert torch.equal(sem, data.render_semantic(ids, data.DEFAULT_CLASSES))
    x, sem, ids = data.load_pair(rgb_path, sem_path, data.DEFAULT_CLASSES, 32)  # shorter side 32: a pure crop
    assert torch.equal(x, data.load_rgb(rgb_path)[:, :, 8:40]) and ids.tolist() == stripes[:, 8:40].tolist()
    assert torch.equal(sem, data.render_semantic(ids, data.DEFAULT_CLASSES))
    x, sem, ids = data.load_pair(rgb_path, sem_path, data.DEFAULT_CLASSES, 16)  # resized: ids stay labels
    assert x.shape == sem.shape == (3, 16, 16) and ids.shape == (16, 16) and ids.dtype == torch.long
    assert set(ids.unique().tolist()) <= {0, 4, 5, 6}

    small = save(stripes[:, :32], tmp_path / "sem32.png")
    with pytest.raises(DataError, match=r"rgb\.png is 48x32 but .*sem32\.png is 32x32: the semantic map must match"):
        data.load_pair(rgb_path, small, data.DEFAULT_CLASSES, 16)  # never resized to agree, even with size
    odd_rgb, odd_sem = save(rgb[:24, :40], tmp_path / "odd.png"), save(stripes[:24, :40], tmp_path / "odd_s.png")
    with pytest.raises(DataError, match=r"odd\.png: 40x24 is not a multiple of 16 on each side; pass --size S"):
        data.load_pair(odd_rgb, odd_sem, data.DEFAULT_CLASSES, None)
    x, _, ids = data.load_pair(odd_rgb, odd_sem, data.DEFAULT_CLASSES, 16)
    assert x.shape == (3, 16, 16) and ids.shape == (16, 16)


def test_ir_rgb_conversions_roundtrip():
    ir = torch.rand(2, 1, 8, 8)
    rgb = data.ir_to_rgb(ir)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2]) and rgb.min() >= -1
    assert torch.allclose(data.rgb_to_ir(rgb), ir, atol=1e-6)
    with pytest.raises(DataError, match="expected"):
        data.ir_to_rgb(rgb)
    with pytest.raises(DataError, match="expected"):
        data.rgb_to_ir(ir)


# -----------------------------------------------------------------------------
# Command line and check

def test_cli_check(tmp_path, capsys):
    synth.write_synth(tmp_path / "s", 3, 32, seed=2)
    data.main(["check", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "3 pairs" in out and "32x32 (3)" in out and re.search(r"4 person\s+yes", out)
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err


def test_check_reports_pairs_that_fail_to_decode(tmp_path):
    synth.write_synth(tmp_path, 3, 32)
    p = tmp_path / "ir" / "000002.png"
    p.write_bytes(p.read_bytes()[:-40])  # header intact, pixels cut: only decoding finds it
    with pytest.raises(DataError, match=r"(?s)1 of 3 pair.*000002\.png"):
        data.check(tmp_path)


# -----------------------------------------------------------------------------
# Fuzz: whatever is on disk, only DataError escapes

FULL = tuple(SemClass(i, f"c{i}", (i, i, i)) for i in range(256))  # every 8-bit id valid, grey colours
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"]
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_image(mode, w, h, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 70000, (h, w)).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32), "F")
    base = Image.fromarray(rng.choice([0, 1, 4, 255], (h, w, 3)).astype(np.uint8) if seed % 2
                           else rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return base.convert(mode) if mode != "PA" else base.convert("P").convert("PA")


images = st.tuples(st.sampled_from(MODES), st.sampled_from(["png", "jpg", "bmp", "tif"]),
                   st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**16), st.integers(0, 8))


def write_random(path, spec):
    mode, ext, w, h, seed, orient = spec
    kw = {"exif": exif_bytes(orient)} if orient and ext in ("png", "jpg") else {}
    try:
        random_image(mode, w, h, seed).save(path.with_suffix("." + ext), **kw)
    except (OSError, ValueError, KeyError):
        return None  # PIL cannot write this mode in this format
    return path.with_suffix("." + ext)


def try_load_all(path, must_load=False):
    for classes in (data.DEFAULT_CLASSES, FULL):
        try:
            ids, colour = data.load_semantic(path, classes)
            assert ids.dtype == torch.long and colour.shape == (3, *ids.shape)
        except DataError as e:
            assert path.name in str(e)
    try:
        x = data.load_rgb(path)
        assert x.shape[0] == 3 and x.min() >= -1 and x.max() <= 1
        ir = data.load_ir(path)
        assert ir.shape == (1, *x.shape[1:]) and ir.min() >= 0 and ir.max() <= 1
    except DataError as e:
        assert not must_load, f"a valid image was refused: {e}"
        assert path.name in str(e)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt EXIF it skips
@FUZZ
@given(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"MM\x00*"]),
       st.binary(max_size=300))
def test_fuzz_random_bytes_raise_only_dataerror(magic, body):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.png"
        path.write_bytes(magic + body)
        try_load_all(path)


@FUZZ
@given(images)
def test_fuzz_random_images_in_random_modes(spec):
    with tempfile.TemporaryDirectory() as d:
        path = write_random(Path(d) / "img", spec)
        if path is not None:
            try_load_all(path, must_load=spec[0] not in ("F", "I"))  # F has no scale; I may leave 0..65535


@FUZZ
@given(images, images, images, st.sampled_from([None, 16]))
def test_fuzz_random_dataset_folders(rgb, sem, ir, size):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for folder, spec in zip(data.FOLDERS, (rgb, sem, ir)):
            (root / folder).mkdir()
            write_random(root / folder / "x", spec)
        try:
            ds = data.PairedDataset(root, size=size, classes=FULL)
            item = ds[0]
            assert item["rgb"].shape[1:] == item["sem_ids"].shape == item["ir"].shape[1:]
        except DataError as e:
            assert d in str(e)  # the message names the folder or a file in it


# Folders that are valid by construction: every file PNG, the same size and EXIF orientation in all three
# folders, sides multiples of 16 (or size=16 given), modes the loaders accept (8-bit index modes for the
# semantic map, whose ids are all classes of FULL; no F, no out-of-range I). Each must load.
VALID_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]
valid_folders = st.tuples(st.sampled_from(VALID_MODES), st.sampled_from(["1", "L", "LA", "P"]),
                          st.sampled_from(VALID_MODES), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16),
                          st.integers(0, 8), st.sampled_from([None, 16]), st.integers(-9, 9), st.integers(-9, 9))


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ
@given(valid_folders)
def test_fuzz_valid_dataset_folders_are_read(spec):
    rgb_mode, sem_mode, ir_mode, kw, kh, seed, orient, size, dw, dh = spec
    w, h = (16 * kw, 16 * kh) if size is None else (max(1, 16 * kw + dw), max(1, 16 * kh + dh))
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for i, (folder, mode) in enumerate(zip(data.FOLDERS, (rgb_mode, sem_mode, ir_mode))):
            (root / folder).mkdir()
            path = write_random(root / folder / "x", (mode, "png", w, h, seed + i, orient))
            assert path is not None, f"could not write {mode} as PNG"
        ds = data.PairedDataset(root, size=size, classes=FULL)
        item = ds[0]
        shown = (h, w) if orient not in (5, 6, 7, 8) else (w, h)  # these orientations swap the sides
        want = data.served_size(shown[1], shown[0], size)[::-1]  # (H, W); no size: as shown
        assert len(ds) == 1 and item["name"] == "x"
        assert item["rgb"].shape == (3, *want) and item["sem"].shape == (3, *want) and item["ir"].shape == (1, *want)
        assert item["sem_ids"].shape == want and item["sem_ids"].dtype == torch.long
        assert -1 <= item["rgb"].min() and item["rgb"].max() <= 1 and 0 <= item["ir"].min() and item["ir"].max() <= 1


def test_misalign_moves_the_labels_and_coarsens_them_to_cells():
    ids = torch.arange(64).reshape(8, 8)
    moved = data.misalign(ids, 2, -3)
    assert torch.equal(moved[2:, :5], ids[:6, 3:])  # content moved down 2, left 3
    assert torch.equal(moved[0], moved[2]) and torch.equal(moved[:, 5], moved[:, 7])  # the edges repeat
    coarse = data.misalign(ids, down=4)
    assert coarse.unique().numel() == 4 and torch.equal(coarse[:4, :4], torch.full((4, 4), int(ids[2, 2])))
    assert torch.equal(data.misalign(ids), ids)


# ---------------------------------------------------------------------------------------------------------------
# Sizing: --size S is about SxS pixels at the frame's own aspect ratio; several shapes are buckets

def test_real_frames_keep_their_aspect_ratio_at_sides_that_are_multiples_of_16(tmp_path):
    """MSRS 640x480, PST900 1280x720, LLVIP 1280x1024 read at --size 128: each side within rounding (8 px) of the
    aspect-true size of 128x128 pixels and a multiple of 16, and the labels at both side edges survive (a square
    centre crop would cut the outer eighth to fifth of the width)."""
    ds = data.PairedDataset(make_real_size_set(tmp_path / "d"), size=128)
    for name, (w, h) in REAL_SIZES.items():
        i = ds.names.index(f"{name}_0")
        item = ds[i]
        H, W = item["sem_ids"].shape
        scale = (128 * 128 / (w * h)) ** 0.5
        assert W % 16 == 0 and H % 16 == 0 and abs(W - w * scale) <= 8 and abs(H - h * scale) <= 8, (name, W, H)
        assert item["rgb"].shape == (3, H, W) and item["ir"].shape == (1, H, W) and ds.served[i] == (W, H)
        assert item["sem_ids"][:, 0].eq(4).all() and item["sem_ids"][:, -1].eq(6).all(), name  # both edges kept
    # at the --size 512 class of settings (headers only): the pixel budget at the frame's own shape
    assert [data.served_size(w, h, 512) for w, h in REAL_SIZES.values()] == [(592, 448), (688, 384), (576, 464)]
    assert data.served_size(512, 512, 512) == (512, 512) and data.served_size(480, 640, 512) == (448, 592)
    assert data.served_size(640, 480, None) == (640, 480)


def test_what_the_sizing_crops_is_said_in_one_line(tmp_path, capsys):
    assert data.crop_note([(640, 480)] * 3, 512) == ("--size 512 crops the centre to sides that are multiples of 16: "
                                                     "640x480 -> 592x448 keeps 99.1% of its width (3 pairs)")
    assert data.crop_note([(1280, 720)], 512).endswith("1280x720 -> 688x384 keeps 99.2% of its height (1 pair)")
    assert data.crop_note([(512, 512), (1024, 1024)], 512) == "" and data.crop_note([(640, 480)], None) == ""
    make_real_size_set(tmp_path / "msrs", {"msrs": (640, 480)}, per_set=2)
    data.main(["check", str(tmp_path / "msrs"), "--size", "512"])
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("--size")] == [data.crop_note([(640, 480)] * 2, 512)]
    assert "served at: about 512x512 pixels, aspect kept; 1 bucket(s), each training batch from one: 592x448 " \
           "(2 pairs)" in out
    data.main(["check", str(tmp_path / "msrs")])  # 640x480 is a multiple of 16: served as stored, nothing cropped
    out = capsys.readouterr().out
    assert "--size" not in out and "640x480 (2 pairs)" in out


def test_a_folder_of_several_shapes_is_grouped_into_buckets_by_served_size(tmp_path, capsys):
    root = make_real_size_set(tmp_path / "d", per_set=2)
    ds = data.PairedDataset(root, size=128)  # names sort as llvip_*, msrs_*, pst900_*
    assert ds.served == [(144, 112)] * 4 + [(176, 96)] * 2  # LLVIP's 5:4 and MSRS' 4:3 round to one shape at 128
    assert ds.buckets() == {(144, 112): [0, 1, 2, 3], (176, 96): [4, 5]}
    assert ds.describe_buckets() == "144x112 (4 pairs), 176x96 (2 pairs)"
    data.main(["check", str(root), "--size", "128"])
    out = capsys.readouterr().out
    assert "2 bucket(s), each training batch from one: 144x112 (4 pairs), 176x96 (2 pairs)" in out
    assert len([line for line in out.splitlines() if line.startswith("--size 128 crops")]) == 1  # one for the set
    assert data.PairedDataset(root).buckets().keys() == {(640, 480), (1280, 720), (1280, 1024)}  # stored sizes
    prints = {s: data.PairedDataset(root, size=s).fingerprint() for s in (None, 128, 256)}
    assert len(set(prints.values())) == 3  # the size setting is part of what the set serves


def test_sampling_far_from_the_training_size_is_noted(tmp_path):
    assert data.trained_sizes({"train_sizes": [[592, 448], [688, 384]], "size": 512}) == [(592, 448), (688, 384)]
    assert data.trained_sizes({"size": 512}) == [(512, 512)]  # a run from before buckets
    assert data.trained_sizes({"size": 0}) == [] == data.trained_sizes({"train_sizes": [["x", 1]]})
    note = data.size_note([(1280, 720)], [(592, 448)])
    assert note.startswith("the image is sampled far from the training size: 1280x720 is 3.5x the pixels")
    assert note.endswith("--size 512 samples at about the training size")
    assert "1/4.0 of the pixels" in data.size_note([(256, 256)], [(512, 512)])
    assert data.size_note([(688, 384)], [(512, 512)]) == "" and data.size_note([(64, 64)], []) == ""
    assert data.size_note([(64, 64), (512, 512)], [(512, 512)]).startswith("1 of 2 images are sampled far")


def test_a_folder_without_semantic_maps_points_to_the_label_maker(tmp_path):
    root = make_root(tmp_path / "d")
    for f in (root / "sem").iterdir():
        f.unlink()
    (root / "sem").rmdir()
    with pytest.raises(DataError, match=r"missing folder\(s\) sem/.*python -m tools\.labels .*d .*d --model DIR"):
        data.check(root)


# ---------------------------------------------------------------------------------------------------------------
# Nothing silently wrong, nothing lost

def test_dangling_links_are_named_not_dropped(tmp_path):
    root = make_root(tmp_path / "d", names=("a", "b"))
    for d in data.FOLDERS:  # every file of stem c is a link whose target is gone
        (root / d / "c.png").symlink_to(tmp_path / "gone" / f"{d}.png")
    with pytest.raises(DataError, match=r"1 link\(s\) whose target is missing: c.png -> .*gone"):
        data.PairedDataset(root)


def test_sampling_resizes_a_pair_as_training_does(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, (40, 56)).astype(np.uint8)
    root = make_root(tmp_path / "d", names=())
    save(rng.integers(0, 256, (40, 56, 3)).astype(np.uint8), root / "rgb" / "a.png")
    save(ids, root / "sem" / "a.png")
    save(rng.integers(0, 256, (40, 56)).astype(np.uint8), root / "ir" / "a.png")
    item = data.PairedDataset(root, size=32)[0]
    rgb, sem, got_ids = data.load_pair(root / "rgb" / "a.png", root / "sem" / "a.png", data.DEFAULT_CLASSES, 32)
    assert torch.equal(rgb, item["rgb"]) and torch.equal(sem, item["sem"]) and torch.equal(got_ids, item["sem_ids"])
    assert rgb.min() >= -1 and rgb.max() <= 1  # bicubic overshoot clamped


def test_validate_names_every_bad_semantic_map_and_another_size_is_a_bucket(tmp_path):
    root = make_root(tmp_path / "d", names=("a", "b", "c", "d"))
    for n in ("b", "d"):
        save(np.full((32, 32, 3), 7, np.uint8), root / "sem" / f"{n}.png")  # a colour in no class
    make_root(root, names=("e",), hw=(16, 16))  # and one pair of another size: a bucket of its own, no problem
    with pytest.raises(DataError, match=r"2 problem\(s\) with its 5 pairs") as e:
        data.PairedDataset(root).validate()
    assert "b.png" in str(e.value) and "d.png" in str(e.value)
    assert data.PairedDataset(root).buckets() == {(16, 16): [4], (32, 32): [0, 1, 2, 3]}


def test_the_fingerprint_follows_content_not_names_sizes_or_times(tmp_path):
    root = make_root(tmp_path / "d", names=("a", "b"))
    for n, v in (("a", 0), ("b", 9)):  # uncompressed: two files of one size
        (root / "ir" / f"{n}.png").unlink()
        save(np.full((32, 32), v, np.uint8), root / "ir" / f"{n}.bmp")
    before = data.PairedDataset(root).fingerprint()
    a, b = root / "ir" / "a.bmp", root / "ir" / "b.bmp"
    times = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)]
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    for p, t in zip((a, b), times):
        os.utime(p, ns=t)  # swapped content, same sizes, the old times
    assert data.PairedDataset(root).fingerprint() != before


def test_a_deeply_nested_class_table_is_one_error(tmp_path):
    (tmp_path / "classes.json").write_text("[" * 100000)
    with pytest.raises(DataError, match="cannot read class table"):
        data.load_classes(tmp_path / "classes.json")


def test_a_dataset_is_written_through_a_link_to_an_empty_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    synth.write_synth(tmp_path / "link", count=2, size=16)
    assert (tmp_path / "link").is_symlink() and len(data.PairedDataset(tmp_path / "link")) == 2
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["classes.json", "ir", "rgb", "sem", "synth.json"]


def test_a_second_writer_of_one_dataset_is_refused_naming_the_first(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".set.partial-{other.pid}").mkdir()  # the first writer's folder
        with pytest.raises(DataError, match=f"another process \\(pid {other.pid}\\) is writing"):
            synth.write_synth(tmp_path / "set", count=2, size=16)
    finally:
        other.kill()
        other.wait()
    synth.write_synth(tmp_path / "set", count=2, size=16)  # its leftovers, once it is gone, are cleared
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
