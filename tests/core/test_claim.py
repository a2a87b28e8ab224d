"""The headline claim, on the shipped demo weights and the example pair (examples/: a person, a poster of a person,
two running cars), sampled exactly as the README's command does: every region hot in the ground truth comes out hot,
and the poster, which looks like a person in RGB, comes out cold. Read from the image: each region's mean
intensity against tools.metrics' threshold, regions as tools.metrics defines them."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import sample
from tools.metrics import HOT_THRESHOLD, region_stats

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DEMO = ROOT / "weights" / "demo"


def regions(out: Path) -> list[dict]:
    """Every region of the example's semantic map with its ground-truth and predicted mean intensity."""
    _, _, ids = data.load_pair(EXAMPLES / "rgb.png", EXAMPLES / "sem.png", data.DEFAULT_CLASSES, None)
    pred = np.asarray(Image.open(out), dtype=np.float32) / 255.0
    truth = np.asarray(Image.open(EXAMPLES / "ir.png"), dtype=np.float32) / 255.0
    return region_stats(pred, truth, ids)


@pytest.fixture(scope="module")
def names():
    return {c.id: c.name for c in data.DEFAULT_CLASSES}


def test_shipped_demo_makes_every_hot_region_hot_and_the_poster_cold(tmp_path, names, monkeypatch):
    monkeypatch.setenv("FLUX_IR_WEIGHTS", str(ROOT / "weights"))
    out = tmp_path / "ir.png"
    assert sample.main([str(EXAMPLES / "rgb.png"), str(EXAMPLES / "sem.png"), "-o", str(out),
                        "--ckpt", str(DEMO / "xattn.safetensors")]) == 0
    found = regions(out)
    hot = [r for r in found if r["gt_hot"]]
    posters = [r for r in found if names[r["class_id"]] == "poster"]
    assert {names[r["class_id"]] for r in hot} == {"person", "car_running"} and posters  # what the scene holds
    missed = [(names[r["class_id"]], round(r["pred_mean"], 3)) for r in hot if not r["pred_hot"]]
    assert not missed, f"hot regions that came out cold (threshold {HOT_THRESHOLD}): {missed}"
    hot_posters = [round(r["pred_mean"], 3) for r in posters if r["pred_hot"]]
    assert not hot_posters, f"the poster came out hot: {hot_posters}"


def test_the_base_alone_misses_what_the_semantic_map_adds(tmp_path, names, monkeypatch):
    """The same command without the semantic weights (--base): the RGB-only base leaves a hot target cold, so the
    claim above is the semantic module's doing."""
    monkeypatch.setenv("FLUX_IR_WEIGHTS", str(ROOT / "weights"))
    out = tmp_path / "base.png"
    assert sample.main([str(EXAMPLES / "rgb.png"), str(EXAMPLES / "sem.png"), "-o", str(out), "--base"]) == 0
    assert any(r["gt_hot"] and not r["pred_hot"] for r in regions(out))
