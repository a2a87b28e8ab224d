"""
Tests for tools/importers.py on fake folders in each set's published layout: the pairs and class tables written, bit
depth kept, JPEGs copied byte for byte, PST900's projection holes filled, FLIR's split files found where the release
and its VOC-style repackagings put them, the same output from one worker process or two, every refusal naming the
file, and a failed import leaving nothing behind.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import make_dataset_root as make_root, save_image as save
from data import DataError
from tools import importers






def fake_mfnet(src, names=("00001D", "00002N"), hw=(32, 48)):
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    rng = np.random.default_rng(0)
    for n in names:
        save(rng.integers(0, 256, (*hw, 4), dtype=np.uint8), src / "images" / f"{n}.png")
        save(rng.integers(0, 9, hw, dtype=np.uint8), src / "labels" / f"{n}.png")
    return src


def test_import_mfnet_splits_rgbt_and_writes_classes(tmp_path):
    src, out = fake_mfnet(tmp_path / "mf"), tmp_path / "out"
    assert importers.import_mfnet(src, out) == 2
    rgbt = np.asarray(Image.open(src / "images" / "00002N.png"))
    assert np.array_equal(np.asarray(Image.open(out / "rgb" / "00002N.png")), rgbt[..., :3])
    assert np.array_equal(np.asarray(Image.open(out / "ir" / "00002N.png")), rgbt[..., 3])
    labels = np.asarray(Image.open(src / "labels" / "00002N.png"))
    sem = np.asarray(Image.open(out / "sem" / "00002N.png"))
    assert np.array_equal(sem, data.palette(importers.MFNET_CLASSES)[labels])
    classes = data.load_classes(out / "classes.json")
    assert classes == importers.MFNET_CLASSES and len(classes) == 9
    assert {c.name for c in classes if c.hot} == {"car", "person", "bike"}
    item = data.PairedDataset(out)[1]
    assert item["sem_ids"].tolist() == labels.tolist() and item["rgb"].shape == (3, 32, 48)


def test_import_mfnet_errors(tmp_path):
    src = fake_mfnet(tmp_path / "mf")
    (src / "labels" / "00002N.png").unlink()
    with pytest.raises(DataError, match="1 stem.*missing from labels/: 00002N"):
        importers.import_mfnet(src, tmp_path / "o1")
    save(np.zeros((32, 48, 3), np.uint8), src / "images" / "00001D.png")
    (src / "images" / "00002N.png").unlink()
    with pytest.raises(DataError, match=r"00001D\.png.*4-channel"):
        importers.import_mfnet(src, tmp_path / "o2")
    make_root(tmp_path / "full")
    with pytest.raises(DataError, match="not empty"):
        importers.import_mfnet(fake_mfnet(tmp_path / "mf2"), tmp_path / "full")


def fake_fmb(src, hw=(32, 48)):
    for d in ("Visible", "Infrared", "Label"):
        (src / d).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for n in ("00001", "00002"):
        save(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), src / "Visible" / f"{n}.png")
        save(rng.integers(0, 15, hw, dtype=np.uint8), src / "Label" / f"{n}.png")
    ir = rng.integers(0, 256, hw, dtype=np.uint8)
    save(np.repeat(ir[..., None], 3, 2), src / "Infrared" / "00001.png")  # grey stored as RGB
    save(ir.astype(np.uint16) * 257, src / "Infrared" / "00002.png")       # 16-bit
    return src, ir


def test_import_fmb_keeps_bit_depth_and_ids(tmp_path):
    (src, ir), out = fake_fmb(tmp_path / "fmb"), tmp_path / "out"
    assert importers.import_fmb(src, out) == 2
    assert np.array_equal(np.asarray(Image.open(out / "ir" / "00001.png")), ir)
    assert Image.open(out / "ir" / "00002.png").mode == "I;16"
    classes = data.load_classes(out / "classes.json")
    assert len(classes) == 15 and [c.id for c in classes] == list(range(15))
    assert {c.name for c in classes if c.hot} == {"person", "car", "truck", "bus", "motorcycle"}
    ds = data.PairedDataset(out)
    assert torch.allclose(ds[0]["ir"], ds[1]["ir"], atol=1e-6)  # 8-bit and 16-bit files of one scene agree
    labels = np.asarray(Image.open(src / "Label" / "00002.png"))
    assert ds[1]["sem_ids"].tolist() == labels.tolist()


def test_import_fmb_errors(tmp_path):
    src, _ = fake_fmb(tmp_path / "FMB" / "train")
    with pytest.raises(DataError, match="split"):
        importers.import_fmb(tmp_path / "FMB", tmp_path / "o0")
    save(np.full((32, 48), 255, np.uint8), src / "Label" / "00002.png")  # 255 "ignore" is not an FMB class
    with pytest.raises(DataError, match=r"00002\.png.*255 x 1536 px"):
        importers.import_fmb(src, tmp_path / "o1")
    save(np.zeros((32, 32), np.uint8), src / "Label" / "00002.png")
    with pytest.raises(DataError, match="00002.*sizes disagree"):
        importers.import_fmb(src, tmp_path / "o2")


def test_import_with_a_bad_pair_leaves_nothing_and_a_rerun_works(tmp_path):
    src = fake_mfnet(tmp_path / "mf", names=("00001D", "00002N", "00003D"))
    label = src / "labels" / "00003D.png"
    good = label.read_bytes()
    save(np.full((32, 48), 200, np.uint8), label)  # the last pair is bad
    out = tmp_path / "out"
    out.mkdir()  # an empty folder made beforehand
    with pytest.raises(DataError, match=r"00003D\.png.*200 x 1536 px"):
        importers.import_mfnet(src, out)
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["mf", "out"]
    label.write_bytes(good)
    assert importers.import_mfnet(src, out) == 3 and len(data.PairedDataset(out)) == 3

    (src, _), out = fake_fmb(tmp_path / "fmb"), tmp_path / "fout"
    label = src / "Label" / "00002.png"
    good = label.read_bytes()
    save(np.full((32, 48), 255, np.uint8), label)
    with pytest.raises(DataError, match=r"00002\.png"):
        importers.import_fmb(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmb", "mf", "out"]
    label.write_bytes(good)
    assert importers.import_fmb(src, out) == 2 and len(data.PairedDataset(out)) == 2


def test_cli_imports_and_reports_errors_with_status_2(tmp_path, capsys):
    src, out = fake_mfnet(tmp_path / "mf"), tmp_path / "out"
    importers.main(["mfnet", str(src), str(out)])
    assert f"imported 2 pairs into {out}" in capsys.readouterr().out and len(data.PairedDataset(out)) == 2
    with pytest.raises(SystemExit) as e:
        importers.main(["fmb", str(tmp_path / "nowhere"), str(tmp_path / "o")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ") and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# MSRS, PST900 (labelled) and M3FD, LLVIP, FLIR aligned (RGB-IR pairs, labelled afterwards by tools.labels), each on a
# tiny fake folder in its release's layout

def grey_as_rgb(rng, hw):
    g = rng.integers(0, 256, hw, dtype=np.uint8)
    return g, np.repeat(g[..., None], 3, 2)


def fake_labelled(src, split_dirs, names, n_ids, hw=(32, 48), seed=2):
    """src/<split>/<rgb>, <ir>, <label> for each split; IR as 3-channel grey. Returns {split: {name: grey IR}}."""
    rng, irs = np.random.default_rng(seed), {}
    for split in ("train", "test"):
        for d in split_dirs:
            (src / split / d).mkdir(parents=True)
        rgb_dir, ir_dir, label_dir = (src / split / d for d in split_dirs)
        for n in names[split]:
            save(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), rgb_dir / f"{n}.png")
            g, g3 = grey_as_rgb(rng, hw)
            save(g3, ir_dir / f"{n}.png")
            save(rng.integers(0, n_ids, hw, dtype=np.uint8), label_dir / f"{n}.png")
            irs.setdefault(split, {})[n] = g
    return irs


@pytest.mark.parametrize("name,dirs,classes,hot", [
    ("msrs", ("vi", "ir", "Segmentation_labels"), importers.MFNET_CLASSES, {"car", "person", "bike"}),
    ("pst900", ("rgb", "thermal", "labels"), importers.PST900_CLASSES, {"survivor"}),
])
def test_labelled_sets_respect_the_split_and_make_ir_one_channel(tmp_path, name, dirs, classes, hot):
    src = tmp_path / name
    names = {"train": ["00001D", "00002N"], "test": ["00100D"]}
    irs = fake_labelled(src, dirs, names, len(classes))
    fn = importers.IMPORTERS[name]
    assert fn(src, tmp_path / "train") == 2  # --split train by default
    assert fn(src, tmp_path / "test", split="test") == 1
    ds = data.PairedDataset(tmp_path / "test")
    assert ds.names == ["00100D"] and data.load_classes(tmp_path / "test" / "classes.json") == classes
    assert {c.name for c in classes if c.hot} == hot
    ir = Image.open(tmp_path / "test" / "ir" / "00100D.png")
    expected = irs["test"]["00100D"]
    if name == "pst900":  # its zeros are projection holes (test_pst900_projection_holes_are_filled)
        expected = importers.fill_holes(expected)[0]
    assert ir.mode == "L" and np.array_equal(np.asarray(ir), expected)
    labels = np.asarray(Image.open(src / "test" / dirs[2] / "00100D.png"))
    assert ds[0]["sem_ids"].tolist() == labels.tolist()
    assert [c.name for c in importers.PST900_CLASSES] == ["background", "fire_extinguisher", "backpack",
                                                         "hand_drill", "survivor"]
    with pytest.raises(DataError, match=f"{dirs[0]}: no such folder"):
        fn(tmp_path / "nowhere", tmp_path / "o")


def fake_m3fd(src, names=("00000", "00001"), hw=(32, 48)):
    rng = np.random.default_rng(3)
    (src / "Vis").mkdir(parents=True)
    (src / "Ir").mkdir()
    irs = {}
    for n in names:
        save(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), src / "Vis" / f"{n}.png")
        irs[n], g3 = grey_as_rgb(rng, hw)
        save(g3, src / "Ir" / f"{n}.png")
    return irs


def fake_llvip(src, hw=(32, 48)):
    rng = np.random.default_rng(4)
    irs = {}
    for split, names in (("train", ("010001", "010002")), ("test", ("190001",))):
        for d in ("visible", "infrared"):
            (src / d / split).mkdir(parents=True)
        for n in names:
            save(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), src / "visible" / split / f"{n}.jpg", quality=95)
            irs[n], g3 = grey_as_rgb(rng, hw)
            save(g3, src / "infrared" / split / f"{n}.png")  # PNG here, so the grey values are checked exactly
    return irs


def fake_flir(src, hw=(32, 48)):
    """The FLIR_aligned release: JPEGImages/ and the split files beside it, which list the thermal stems."""
    rng = np.random.default_rng(5)
    (src / "JPEGImages").mkdir(parents=True)
    for n in ("FLIR_00002", "FLIR_00005", "FLIR_08863"):
        save(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), src / "JPEGImages" / f"{n}_RGB.jpg")
        save(rng.integers(0, 256, hw, dtype=np.uint8), src / "JPEGImages" / f"{n}_PreviewData.jpeg")
    (src / "align_train.txt").write_text("FLIR_00002_PreviewData\nFLIR_00005_PreviewData\n")
    (src / "align_validation.txt").write_text("FLIR_08863_PreviewData\n")


def test_rgb_ir_sets_write_rgb_and_ir_for_labels_py(tmp_path, capsys):
    irs = fake_m3fd(tmp_path / "M3FD_Fusion")
    assert importers.import_m3fd(tmp_path / "M3FD_Fusion", tmp_path / "m3fd") == 2
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m3fd" / "ir" / "00001.png")), irs["00001"])
    assert not list((tmp_path / "m3fd" / "sem").iterdir()) and not (tmp_path / "m3fd" / "classes.json").exists()
    with pytest.raises(DataError, match="no split files"):
        importers.import_m3fd(tmp_path / "M3FD_Fusion", tmp_path / "o", split="test")

    irs = fake_llvip(tmp_path / "LLVIP")
    assert importers.import_llvip(tmp_path / "LLVIP", tmp_path / "llvip", split="test") == 1
    ir = Image.open(tmp_path / "llvip" / "ir" / "190001.png")
    assert ir.mode == "L" and np.array_equal(np.asarray(ir), irs["190001"])
    assert sorted(p.name for p in (tmp_path / "llvip" / "rgb").iterdir()) == ["190001.jpg"]  # its JPEG, as it is

    fake_flir(tmp_path / "align")
    importers.main(["flir", str(tmp_path / "align"), str(tmp_path / "flir")])  # --split train: align_train.txt
    out = capsys.readouterr().out
    assert f"python -m tools.labels {tmp_path / 'flir'} {tmp_path / 'flir'} --model DIR" in out
    assert sorted(p.name for p in (tmp_path / "flir" / "ir").iterdir()) == ["FLIR_00002.jpeg", "FLIR_00005.jpeg"]
    assert importers.import_flir(tmp_path / "align", tmp_path / "flir-test", split="test") == 1
    assert (tmp_path / "flir-test" / "rgb" / "FLIR_08863.jpg").is_file()


def test_rgb_ir_set_errors_name_the_file(tmp_path):
    fake_flir(tmp_path / "align")
    (tmp_path / "align" / "JPEGImages" / "FLIR_00005_RGB.jpg").unlink()
    with pytest.raises(DataError, match=r"align_train.txt: 1 listed file\(s\) are not in .*FLIR_00005_RGB.jpg"):
        importers.import_flir(tmp_path / "align", tmp_path / "o1")
    (tmp_path / "align" / "align_validation.txt").unlink()
    with pytest.raises(DataError, match="no split file for --split test: none of align_validation.txt, "
                                        "ImageSets/Main/test.txt, ImageSets/Main/val.txt"):
        importers.import_flir(tmp_path / "align", tmp_path / "o2", split="test")

    fake_m3fd(tmp_path / "m3fd")
    rng = np.random.default_rng(6)
    save(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), tmp_path / "m3fd" / "Ir" / "00001.png")  # false colour
    with pytest.raises(DataError, match=r"00001\.png: a colour infrared image"):
        importers.import_m3fd(tmp_path / "m3fd", tmp_path / "o3")
    save(np.zeros((16, 48), np.uint8), tmp_path / "m3fd" / "Ir" / "00001.png")
    with pytest.raises(DataError, match="00001.*sizes disagree"):
        importers.import_m3fd(tmp_path / "m3fd", tmp_path / "o4")
    (tmp_path / "m3fd" / "Ir" / "00000.png").unlink()
    with pytest.raises(DataError, match="missing from Ir/: 00000"):
        importers.import_m3fd(tmp_path / "m3fd", tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_mfnet_split_file_keeps_its_stems(tmp_path):
    src = fake_mfnet(tmp_path / "mf", names=("00001D", "00002N", "00003D"))
    (src / "test.txt").write_text("00002N\n00003D\n")
    assert importers.import_mfnet(src, tmp_path / "test", split="test") == 2
    assert data.PairedDataset(tmp_path / "test").names == ["00002N", "00003D"]
    (src / "val.txt").write_text("00009N\n")
    with pytest.raises(DataError, match="val.txt: 1 listed stem.*no pair: 00009N"):
        importers.import_mfnet(src, tmp_path / "val", split="val")


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened), as VOC-style label PNGs carry it."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def test_a_palette_label_with_the_voc_palette_imports_by_index_not_colour(tmp_path):
    """VOC index 3 is (128, 128, 0), MFNet's car_stop colour (id 5, cold): a published label PNG in P mode is a
    label-id image, so index 3 is bike (id 3, hot)."""
    src = tmp_path / "msrs"
    fake_labelled(src, ("vi", "ir", "Segmentation_labels"), {"train": ["00001D"], "test": ["00100D"]}, 9)
    index = np.zeros((32, 48), np.uint8)
    index[8:24, 10:30] = 3
    label = Image.fromarray(index, "P")
    label.putpalette(voc_palette())
    assert tuple(label.getpalette()[9:12]) == (128, 128, 0) == importers.MFNET_CLASSES[5].color
    label.save(src / "test" / "Segmentation_labels" / "00100D.png")
    out = tmp_path / "out"
    assert importers.import_msrs(src, out, split="test") == 1
    classes = data.PairedDataset(out).classes
    ids, _ = data.load_semantic(out / "sem" / "00100D.png", classes)
    assert np.array_equal(ids.numpy(), index)
    assert {c.id: c.name for c in classes}[int(ids[16, 20])] == "bike"


def test_a_split_file_with_a_byte_order_mark_lists_its_first_stem(tmp_path):
    """Windows editors start a UTF-8 file with a BOM; read as plain UTF-8 the first stem would be '\\ufeff00002N'."""
    src = fake_mfnet(tmp_path / "mf", names=("00001D", "00002N", "00003D"))
    (src / "test.txt").write_text("00002N\r\n00003D\r\n", encoding="utf-8-sig")
    assert (src / "test.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    assert importers.import_mfnet(src, tmp_path / "test", split="test") == 2
    assert data.PairedDataset(tmp_path / "test").names == ["00002N", "00003D"]


# ---------------------------------------------------------------------------------------------------------------
# FLIR's VOC-style split files, PST900's projection holes, JPEGs kept as they are, and the worker processes


def test_flir_split_files_under_imagesets_main_are_found(tmp_path, capsys):
    """Repackagings of FLIR aligned list the pairs VOC-style, one id per line, in ImageSets/Main/{train,val}.txt."""
    src = tmp_path / "FLIR_aligned"
    fake_flir(src)
    for f in ("align_train.txt", "align_validation.txt"):
        (src / f).unlink()
    (src / "ImageSets" / "Main").mkdir(parents=True)
    (src / "ImageSets" / "Main" / "train.txt").write_text("FLIR_00002\nFLIR_00005\n")
    (src / "ImageSets" / "Main" / "val.txt").write_text("FLIR_08863\n")
    assert importers.import_flir(src, tmp_path / "train") == 2
    assert sorted(data.list_images(tmp_path / "train" / "ir")) == ["FLIR_00002", "FLIR_00005"]
    assert importers.import_flir(src, tmp_path / "test", split="test") == 1  # val.txt: the held-out pairs
    assert importers.import_flir(src, tmp_path / "val", split="val") == 1
    assert sorted(data.list_images(tmp_path / "test" / "rgb")) == ["FLIR_08863"]
    (src / "align_train.txt").write_text("FLIR_00005_PreviewData\n")  # the release's own file comes first
    assert importers.import_flir(src, tmp_path / "release") == 1
    (src / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DataError, match="no split file for --split val: none of ImageSets/Main/val.txt"):
        importers.import_flir(src, tmp_path / "o", split="val")


def test_fill_holes_fills_from_the_edge_inward_and_leaves_the_rest():
    ir = np.full((9, 12), 90, np.uint8)
    ir[:, :6] = 30
    ir[3:6, 4:8] = 0                                                   # a hole across the 30 | 90 edge
    ir[0, 11] = 0                                                      # one in a corner
    filled, n = importers.fill_holes(ir)
    assert n == 13 and filled.dtype == np.uint8 and filled.min() > 0
    assert np.array_equal(filled[ir > 0], ir[ir > 0])
    assert filled[0, 11] == 90 and 30 < filled[4, 5] < 90               # the corner's neighbours; the edge between
    assert filled[3, 4] < filled[3, 7]                                  # each side of the hole keeps its side's level
    wide = np.full((6, 6), 7, np.uint16)
    wide[1:, :] = 0                                                    # five rows deep, filled ring by ring
    assert np.array_equal(importers.fill_holes(wide)[0], np.full((6, 6), 7, np.uint16))
    none = np.full((4, 4), 5, np.uint8)
    assert importers.fill_holes(none)[1] == 0 and importers.fill_holes(none)[0] is none


def test_pst900_projection_holes_are_filled_and_counted(tmp_path, capsys):
    src = tmp_path / "pst900"
    irs = fake_labelled(src, ("rgb", "thermal", "labels"), {"train": ["00001", "00002"], "test": ["00100"]}, 5)
    for split, names in irs.items():
        for name, g in names.items():
            g = np.maximum(g, 1)                                       # no zero but the holes below
            if name == "00002":
                g[:, :5] = 0                                           # the projection leaves a strip ...
                g[10:14, 20:30] = 0                                    # ... and a gap
            irs[split][name] = g
            save(np.repeat(g[..., None], 3, 2), src / split / "thermal" / f"{name}.png")
    out = tmp_path / "out"
    assert importers.import_pst900(src, out) == 2
    assert f"filled 200 thermal pixel(s) of 0 (projection holes), {100 * 200 / (2 * 32 * 48):.2f}% of the set's " \
           "thermal pixels, in 1 of 2 image(s)" in capsys.readouterr().out
    got = np.asarray(Image.open(out / "ir" / "00002.png"))
    hole = irs["train"]["00002"] == 0
    assert got.min() > 0 and np.array_equal(got[~hole], irs["train"]["00002"][~hole])
    assert np.array_equal(np.asarray(Image.open(out / "ir" / "00001.png")), irs["train"]["00001"])
    assert json.loads((out / "ir_filled.json").read_text())["pairs"] == {"00002": 200}
    data.check(out)
    (src / "test" / "thermal" / "00100.png").unlink()
    save(np.zeros((32, 48), np.uint8), src / "test" / "thermal" / "00100.png")
    with pytest.raises(DataError, match=r"00100\.png: every pixel is 0"):
        importers.import_pst900(src, tmp_path / "o", split="test")


def fake_llvip_jpeg(src, n=5, hw=(64, 80)):
    """LLVIP as released: visible/<split>/*.jpg and infrared/<split>/*.jpg (grey stored as 3-channel JPEG)."""
    rng = np.random.default_rng(7)
    for d in ("visible", "infrared"):
        (src / d / "train").mkdir(parents=True)
    for i in range(n):
        save(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), src / "visible" / "train" / f"{10001 + i:06d}.jpg",
             quality=90)
        _, g3 = grey_as_rgb(rng, hw)
        save(g3, src / "infrared" / "train" / f"{10001 + i:06d}.jpg", quality=90)
    return src


def folder_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_llvip_jpegs_are_copied_as_they_are_and_two_workers_write_what_one_writes(tmp_path):
    src = fake_llvip_jpeg(tmp_path / "LLVIP")
    assert importers.import_llvip(src, tmp_path / "one", workers=1) == 5
    importers.main(["llvip", str(src), str(tmp_path / "two"), "--workers", "2"])
    one = folder_bytes(tmp_path / "one")
    assert one == folder_bytes(tmp_path / "two") and len(one) == 10
    for name in ("010001", "010005"):
        for d, sub in (("visible", "rgb"), ("infrared", "ir")):
            assert one[f"{sub}/{name}.jpg"] == (src / d / "train" / f"{name}.jpg").read_bytes()
    rgb = data.load_rgb(tmp_path / "one" / "rgb" / "010001.jpg")        # the loader reads the copied JPEGs
    ir = data.load_ir(tmp_path / "one" / "ir" / "010001.jpg")
    assert rgb.shape == (3, 64, 80) and ir.shape == (1, 64, 80)
    expected = np.asarray(Image.open(src / "infrared" / "train" / "010001.jpg").convert("RGB"), np.float32).mean(2)
    assert np.allclose(ir[0].numpy() * 255, expected, atol=1e-3)


def test_a_bad_pair_stops_every_worker_and_leaves_nothing(tmp_path):
    src = fake_llvip_jpeg(tmp_path / "LLVIP")
    rng = np.random.default_rng(8)
    save(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), src / "infrared" / "train" / "010003.jpg")  # false colour
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"010003\.jpg: a colour infrared image"):
            importers.import_llvip(src, tmp_path / f"o{workers}", workers=workers)
        assert not (tmp_path / f"o{workers}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LLVIP"]
    with pytest.raises(DataError, match="--workers 0: at least 1"):
        importers.import_llvip(src, tmp_path / "o", workers=0)
