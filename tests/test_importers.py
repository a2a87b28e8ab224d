"""
Tests for importers.py on fake MFNet / FMB folders: the pairs and class tables written, bit depth kept, every
refusal naming the file, and a failed import leaving nothing behind.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import importers  # noqa: E402
from data import DataError  # noqa: E402
from test_data import make_root, save  # noqa: E402


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
