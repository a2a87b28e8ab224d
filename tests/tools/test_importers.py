"""
Tests for tools/importers.py on fake MFNet / FMB folders: the pairs and class tables written, bit depth kept, every
refusal naming the file, and a failed import leaving nothing behind.
"""


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
    assert ir.mode == "L" and np.array_equal(np.asarray(ir), irs["test"]["00100D"])
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
    assert sorted(p.name for p in (tmp_path / "llvip" / "rgb").iterdir()) == ["190001.png"]

    fake_flir(tmp_path / "align")
    importers.main(["flir", str(tmp_path / "align"), str(tmp_path / "flir")])  # --split train: align_train.txt
    out = capsys.readouterr().out
    assert f"python -m tools.labels {tmp_path / 'flir'} {tmp_path / 'flir'} --model DIR" in out
    assert sorted(p.name for p in (tmp_path / "flir" / "ir").iterdir()) == ["FLIR_00002.png", "FLIR_00005.png"]
    assert importers.import_flir(tmp_path / "align", tmp_path / "flir-test", split="test") == 1
    assert (tmp_path / "flir-test" / "rgb" / "FLIR_08863.png").is_file()


def test_rgb_ir_set_errors_name_the_file(tmp_path):
    fake_flir(tmp_path / "align")
    (tmp_path / "align" / "JPEGImages" / "FLIR_00005_RGB.jpg").unlink()
    with pytest.raises(DataError, match=r"align_train.txt: 1 listed file\(s\) are not in .*FLIR_00005_RGB.jpg"):
        importers.import_flir(tmp_path / "align", tmp_path / "o1")
    (tmp_path / "align" / "align_validation.txt").unlink()
    with pytest.raises(DataError, match="align_validation.txt: no such split file"):
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
