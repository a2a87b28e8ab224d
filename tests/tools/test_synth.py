"""
Tests for tools/synth.py: determinism (same seed, same bytes), the decoy property (RGB cannot tell a poster from a
person or a parked car from a running one, the IR and the evaluation threshold can), valid scenes at full size,
the committed examples, the command line, and the sampler's ceiling: second draws, mean IRs, and sets that record
their scenes (synth.json).
"""

import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data
from conftest import make_dataset_root
from tools import metrics, synth

REPO = Path(__file__).resolve().parents[2]
ID = {c.name: c.id for c in data.DEFAULT_CLASSES}
T = metrics.HOT_THRESHOLD  # the scenes are made so that this one threshold separates hot from cold
SWAP = {"person": "poster", "poster": "person", "car_running": "car_parked", "car_parked": "car_running"}


def files_of(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_synth_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 5), (b, 5), (c, 6)):
        synth.write_synth(root, 4, 32, seed=seed)
    files = files_of(a)
    assert len(files) == 14  # 4 pairs x 3 + classes.json + synth.json
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")
    assert data.load_classes(a / "classes.json") == data.DEFAULT_CLASSES
    r1, r2 = synth.make_scene(np.random.default_rng(3), 48), synth.make_scene(np.random.default_rng(3), 48)
    assert all(np.array_equal(x, y) for x, y in zip(r1, r2))
    assert [x.dtype for x in r1] == [np.uint8, np.uint8, np.uint16] and r1[0].shape == (48, 48, 3)


def test_decoys_rgb_is_identical_whatever_the_heat():
    """Swapping person<->poster and running<->parked changes the labels and the IR, never one RGB byte."""
    checked = set()
    for seed in range(25):
        scene = synth.sample_scene(np.random.default_rng(seed), 64)
        swapped = copy.deepcopy(scene)
        for o in swapped["objects"]:
            o["kind"] = SWAP[o["kind"]]
        (rgb, ids, ir), (rgb2, ids2, ir2) = synth.render_scene(scene), synth.render_scene(swapped)
        assert np.array_equal(rgb, rgb2)
        for name in ("person", "car_running"):
            now_cold = ids == ID[name]  # these pixels become poster / car_parked
            if now_cold.sum() > 20:
                assert (ids2[now_cold] == ID[SWAP[name]]).all()
                assert ir[now_cold].mean() / 65535 > T > ir2[now_cold].mean() / 65535
                checked.add(name)
    assert checked == {"person", "car_running"}


def test_decoys_ir_separates_while_rgb_statistics_match():
    region_ir = {k: [] for k in SWAP}
    colours = {k: [] for k in SWAP}
    hot_px, cold_px = [], []
    hot = np.isin(np.arange(8), data.hot_ids(data.DEFAULT_CLASSES))
    for i in range(150):
        rgb, ids, ir = synth.make_scene(np.random.default_rng([7, i]), 64)
        x = ir / 65535
        hot_px.append(x[hot[ids]])
        cold_px.append(x[~hot[ids]])
        for k in SWAP:
            m = ids == ID[k]
            if m.sum() > 20:
                region_ir[k].append(x[m].mean())
                colours[k].append(rgb[m].mean(0))
    assert max(region_ir["poster"]) < 0.5 < T < min(region_ir["person"])
    assert max(region_ir["car_parked"]) < 0.5 < T < min(region_ir["car_running"])
    assert (np.concatenate(hot_px) > T).mean() > 0.99 and (np.concatenate(cold_px) < T).mean() > 0.999
    for a, b in (("person", "poster"), ("car_running", "car_parked")):
        assert len(colours[a]) > 20 and len(colours[b]) > 20
        assert np.abs(np.mean(colours[a], 0) - np.mean(colours[b], 0)).max() < 20  # same drawing distribution


def test_scenes_have_frequent_decoys_and_day_night():
    scenes = [synth.sample_scene(np.random.default_rng([0, i]), 64) for i in range(300)]
    kinds = [{o["kind"] for o in s["objects"]} for s in scenes]
    assert all(1 <= len(s["objects"]) <= 4 for s in scenes)
    for k in ("poster", "car_parked", "person", "car_running"):
        assert 0.35 < np.mean([k in ks for ks in kinds]) < 0.65, k
    night = [s["night"] for s in scenes]
    assert 0.25 < np.mean(night) < 0.55
    day_rgb = [synth.render_scene(s)[0] for s, n in zip(scenes[:40], night) if not n]
    night_rgb = [synth.render_scene(s)[0] for s, n in zip(scenes[:40], night) if n]
    assert np.mean([r.mean() for r in night_rgb]) < 0.4 * np.mean([r.mean() for r in day_rgb])
    assert np.mean([r.std() for r in night_rgb]) < 0.5 * np.mean([r.std() for r in day_rgb])


def test_full_size_scenes_are_valid_and_rendering_is_pure():
    """200 scenes at the training size (128): shapes and dtypes, only class ids, sky and road always present;
    rendering one scene description twice gives the same arrays, and make_scene is exactly that rendering."""
    known = {c.id for c in data.DEFAULT_CLASSES}
    for i in range(200):
        rgb, ids, ir = synth.make_scene(np.random.default_rng(i), 128)
        assert rgb.shape == (128, 128, 3) and ids.shape == ir.shape == (128, 128)
        assert (rgb.dtype, ids.dtype, ir.dtype) == (np.uint8, np.uint8, np.uint16)
        present = set(np.unique(ids).tolist())
        assert present <= known and {ID["sky"], ID["road"]} <= present, i
    scene = synth.sample_scene(np.random.default_rng(11), 128)
    once, twice = synth.render_scene(scene), synth.render_scene(copy.deepcopy(scene))
    direct = synth.make_scene(np.random.default_rng(11), 128)
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(once, twice, direct))


def test_examples_are_reproducible_and_show_the_decoy(tmp_path):
    readme = (REPO / "examples" / "README.md").read_text()
    cmd = re.search(r"python -m tools\.synth examples --example --seed (\d+)", readme)
    assert cmd, "examples/README.md must give the command that remakes the examples"
    synth.main([str(tmp_path), "--example", "--seed", cmd.group(1)])
    for n in ("rgb.png", "sem.png", "ir.png"):
        committed = (REPO / "examples" / n).read_bytes()
        assert committed == (tmp_path / n).read_bytes() and len(committed) < 16_000, n
    ids, _ = data.load_semantic(REPO / "examples" / "sem.png", data.DEFAULT_CLASSES)
    present = set(ids.unique().tolist())
    assert {ID["person"], ID["poster"]} <= present and present & {ID["car_running"], ID["car_parked"]}
    ir = data.load_ir(REPO / "examples" / "ir.png")[0]
    assert ir[ids == ID["person"]].mean() > T > ir[ids == ID["poster"]].mean()


def test_cli_writes_what_write_synth_writes_and_refuses_bad_input(tmp_path, capsys):
    synth.main([str(tmp_path / "cli"), "--count", "3", "--size", "32", "--seed", "2"])
    assert "wrote 3 scenes" in capsys.readouterr().out
    synth.write_synth(tmp_path / "api", 3, 32, seed=2)
    files = files_of(tmp_path / "api")
    assert files == files_of(tmp_path / "cli") and len(files) == 11
    assert all((tmp_path / "cli" / f).read_bytes() == (tmp_path / "api" / f).read_bytes() for f in files)
    for argv, problem in (([str(tmp_path / "bad"), "--size", "20"], "positive multiple of 16"),
                          ([str(tmp_path / "cli"), "--count", "1", "--size", "32"], "not empty")):
        with pytest.raises(SystemExit) as e:
            synth.main(argv)
        assert e.value.code == 2 and problem in capsys.readouterr().err


def test_killed_generation_leaves_no_set_and_the_rerun_writes_a_complete_one(tmp_path):
    """A first-run generation killed midway (as train.py does when data/synth is missing) must not look done."""
    out = tmp_path / "synth"
    proc = subprocess.Popen([sys.executable, "-m", "tools.synth", str(out), "--count", "100000", "--size", "32"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(3000):  # until a few scenes are on disk (a guard against hanging, not a timing check)
            if proc.poll() is not None or len(list(tmp_path.rglob("*.png"))) >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(list(tmp_path.rglob("*.png"))) >= 6, "generation did not start"
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    synth.write_synth(out, 4, 32, seed=0)
    synth.write_synth(tmp_path / "fresh", 4, 32, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "synth"]  # the killed run's files are gone
    files = files_of(out)
    assert files == files_of(tmp_path / "fresh") and len(files) == 14
    assert all((out / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes() for f in files)


# ----------------------------------------------------------------------------------------------------------------
# The sampler's ceiling: second draws of a scene, its mean IR, and sets that record their scenes


def unseen_parts(scene) -> tuple:
    """What redraw draws again: region offsets, object offsets, blur, noise level, the IR noise seed."""
    return (dict(scene["offset"]), [o["offset"] for o in scene["objects"]], scene["blur"], scene["noise"],
            int(scene["seeds"][1]))


def test_a_second_draw_keeps_rgb_and_labels_and_changes_the_ir_only_through_the_unseen_parts():
    """render(redraw(scene)) has the first render's RGB and labels and another IR; with the redrawn parts set back
    to the first draw's values it renders the first IR exactly, so nothing else was changed. The scene itself is left
    as it was, and the redrawn values lie in sample_scene's ranges."""
    nights = set()
    for seed in range(6):
        scene = synth.sample_scene(np.random.default_rng([3, seed]), 64)
        first = synth.render_scene(scene)
        second_scene = synth.redraw(scene, np.random.default_rng(seed))
        rgb, ids, ir = synth.render_scene(second_scene)
        assert np.array_equal(rgb, first[0]) and np.array_equal(ids, first[1])
        assert not np.array_equal(ir, first[2])
        old, new = unseen_parts(scene), unseen_parts(second_scene)
        assert all(a != b for a, b in zip(old, new))                      # every unseen part was drawn again
        assert all(a != b for a, b in zip(old[0].values(), new[0].values()))
        assert all(abs(v) <= synth.OFFSET for v in [*new[0].values(), *new[1]])
        lo, hi = (b * 64 / 128 for b in synth.BLUR)
        assert lo <= new[2] <= hi and synth.NOISE[0] <= new[3] <= synth.NOISE[1]
        back = copy.deepcopy(second_scene)
        back["offset"], back["blur"], back["noise"], back["seeds"] = (scene["offset"], scene["blur"],
                                                                      scene["noise"], scene["seeds"])
        for o, offset in zip(back["objects"], old[1]):
            o["offset"] = offset
        assert np.array_equal(synth.render_scene(back)[2], first[2])
        assert all(np.array_equal(x, y) for x, y in zip(synth.render_scene(scene), first))  # scene untouched
        nights.add(scene["night"])
    assert nights == {False, True}  # the RGB noise seed is kept at night, where the RGB has noise


def test_mean_ir_is_the_seeded_mean_of_redraws_and_closer_to_a_draw_than_another_draw_is():
    """mean_ir(scene, k, rng) is the mean of the IRs of k redraws from rng (float32 in [0, 1], reproducible); as the
    best MSE guess it is closer to a fresh draw than a second draw is (about half the squared error)."""
    scene = synth.sample_scene(np.random.default_rng(8), 64)
    mean = synth.mean_ir(scene, 4, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    want = np.mean([synth.render_scene(synth.redraw(scene, rng))[2] / 65535.0 for _ in range(4)], axis=0)
    assert mean.dtype == np.float32 and mean.shape == (64, 64) and 0 <= mean.min() and mean.max() <= 1
    np.testing.assert_allclose(mean, want, atol=1e-6)
    assert np.array_equal(synth.mean_ir(scene, 3), synth.mean_ir(scene, 3))
    mse_mean, mse_draw = [], []
    for k in range(8):
        scene = synth.sample_scene(np.random.default_rng([9, k]), 64)
        truth = synth.render_scene(scene)[2] / 65535.0
        second = synth.render_scene(synth.redraw(scene, np.random.default_rng([9, k, 1])))[2] / 65535.0
        mse_mean.append(((synth.mean_ir(scene, 16, np.random.default_rng([9, k, 2])) - truth) ** 2).mean())
        mse_draw.append(((second - truth) ** 2).mean())
    assert np.mean(mse_mean) < 0.75 * np.mean(mse_draw)
    with pytest.raises(ValueError, match="at least 1"):
        synth.mean_ir(scene, 0)


def test_a_set_records_its_scenes_and_set_scenes_re_creates_every_pair(tmp_path):
    """write_synth writes synth.json (seed, count, size); set_scenes turns it back into the scene of each pair,
    which renders to that pair's stored files byte for byte."""
    out = tmp_path / "s"
    synth.write_synth(out, 3, 32, seed=4)
    assert json.loads((out / "synth.json").read_text()) == {"seed": 4, "count": 3, "size": 32}
    scenes = synth.set_scenes(out)
    assert list(scenes) == ["000000", "000001", "000002"]
    ds = data.PairedDataset(out)
    for i, (name, scene) in enumerate(scenes.items()):
        rgb, ids, ir = synth.render_scene(scene)
        item = ds[i]
        assert item["name"] == name and np.array_equal(item["sem_ids"].numpy(), ids)
        assert np.array_equal(((item["rgb"].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8), rgb)
        assert np.array_equal(item["ir"][0].numpy(), synth.ir_read_back(ir))


def test_a_folder_that_cannot_give_its_scenes_is_refused_in_one_line(tmp_path):
    """No synth.json: NotSynthSet, one line naming the folder. A synth.json that does not match the files (another
    seed, as a set written by another version of tools.synth would be) or that does not list a pair: DataError."""
    plain = make_dataset_root(tmp_path / "plain", names=("a", "b"), hw=(32, 32))
    with pytest.raises(synth.NotSynthSet) as e:
        synth.set_scenes(plain)
    assert str(e.value).startswith(f"{plain}: not a tools.synth set: the sampler's ceiling needs the scenes")
    assert "\n" not in str(e.value)
    out = tmp_path / "s"
    synth.write_synth(out, 2, 32, seed=4)
    (out / "synth.json").write_text(json.dumps({"seed": 5, "count": 2, "size": 32}))
    with pytest.raises(data.DataError, match=r"pair 000000 does not re-render from its scene \(rgb, sem, ir differ\)"):
        synth.set_scenes(out)
    (out / "synth.json").write_text(json.dumps({"seed": 4, "count": 1, "size": 32}))
    with pytest.raises(data.DataError, match="pair 000001 is not one of the 1 scenes"):
        synth.set_scenes(out)
    (out / "synth.json").write_text(json.dumps({"seed": 4, "count": 2}))
    with pytest.raises(data.DataError, match="unreadable"):
        synth.set_scenes(out)


def test_ensure_set_regenerates_nothing_and_records_only_a_set_it_recognises(tmp_path, capsys):
    """A set already on disk is never rewritten. One without synth.json (written before sets recorded their scenes)
    gets one only for the expected (count, seed): same pair names, scene 0 re-rendering exactly."""
    out = tmp_path / "old"
    synth.write_synth(out, 3, synth.SET_SIZE, seed=9)
    (out / "synth.json").unlink()
    before = {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in files_of(out)}
    for count, seed in ((3, 8), (4, 9), (2, 9)):  # another seed, more or fewer scenes: left as it is
        synth.ensure_set(out, (count, seed))
        assert not (out / "synth.json").exists()
    synth.ensure_set(out, (3, 9))
    assert json.loads((out / "synth.json").read_text()) == {"seed": 9, "count": 3, "size": synth.SET_SIZE}
    assert "recorded its scenes in synth.json" in capsys.readouterr().out
    assert {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in before} == before
    assert len(synth.set_scenes(out)) == 3
