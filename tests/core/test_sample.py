"""sample.py: the command writes an IR image of the pair's size and the attention picture, with the palette the
checkpoint was trained with; bad pairs, bad flags and broken weights fail with one line and write nothing; a failed
write never damages an existing file."""

import errno
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import sample
from checkpoint import read_metadata, read_safetensors, save_atomic

ROOT = Path(__file__).resolve().parents[2]


def test_sample_writes_the_image_and_the_attention_picture(run_train, tmp_path):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    out, attn, ex = tmp_path / "ir.png", tmp_path / "attn.png", ROOT / "examples"
    rc = sample.main([str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(out), "--ckpt", str(w / "final.safetensors"),
                      "--steps", "2", "--size", "64", "--attn", str(attn)])
    assert rc == 0
    assert Image.open(out).size == (64, 64) and Image.open(out).mode == "L"
    assert Image.open(attn).size[0] > 64


def test_sample_rejects_bad_pairs(env, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "rgb.png")
    Image.new("RGB", (64, 48), (70, 130, 180)).save(tmp_path / "sem.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "bad_colour.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for rgb, sem, message in [("rgb.png", "sem.png", "must match"), ("rgb.png", "bad_colour.png", "colour"),
                              ("junk.png", "sem.png", "junk.png"), ("missing.png", "sem.png", "missing.png")]:
        rc = sample.main([str(tmp_path / rgb), str(tmp_path / sem), "-o", str(tmp_path / "out.png"), "--base"])
        assert rc == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out.png").exists()


def test_attention_picture_needs_an_attention_scheme(run_train, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--scheme", "zeroconv", "--steps", "1") == 0
    ex = ROOT / "examples"
    rc = sample.main([str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(tmp_path / "ir.png"), "--steps", "1",
                      "--ckpt", str(w / "final.safetensors"), "--size", "64", "--attn", str(tmp_path / "a.png")])
    assert rc == 2 and "xattn and adapter" in capsys.readouterr().err


def test_bad_flags_fail_with_one_line_naming_the_flag_before_loading(env, tmp_path, capsys):
    """The pair does not exist: an error about the flag (not the pair, not the weights) proves it came first."""
    (tmp_path / "folder").mkdir()
    no_gpu = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    for args, message in [(["--steps", "0"], "--steps 0"), (["--steps", "-1"], "--steps -1"),
                          (["--size", "-16"], "--size -16"), (["--size", "8"], "--size 8"),
                          (["--size", "0"], "--size 0"), (["--seed", "-1"], "--seed -1"),
                          (["--guidance", "nan"], "--guidance nan"), (["--device", "foo"], "--device 'foo'"),
                          (["--sem-strength", "-1"], "--sem-strength -1"),
                          (["--sem-guidance", "inf"], "--sem-guidance inf"),
                          (["--device", no_gpu], "GPU"), (["-o", str(tmp_path / "folder")], "is a folder"),
                          (["-o", str(tmp_path / "ir.xyz")], "unknown image extension '.xyz'"),
                          (["--attn", str(tmp_path / "attn.txt")], "--attn"),
                          (["-o", str(tmp_path / "ir.png" / "x.png")], "not a folder")]:
        (tmp_path / "ir.png").write_bytes(b"a file")
        rc = sample.main([str(tmp_path / "missing_rgb.png"), str(tmp_path / "missing_sem.png"), "--base",
                          "-o", str(tmp_path / "out.png"), *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (args, err)
        assert message in err and "missing_rgb" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "ir.png"]


def test_non_finite_weights_are_an_error_never_a_black_image(run_train, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    sd = {k: torch.full_like(v, float("nan")) for k, v in read_safetensors(w / "final.safetensors").items()}
    save_atomic(sd, tmp_path / "nan.safetensors", read_metadata(w / "final.safetensors"))
    ex, out = ROOT / "examples", tmp_path / "ir.png"
    rc = sample.main([str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(out), "--ckpt",
                      str(tmp_path / "nan.safetensors"), "--steps", "2", "--size", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "not finite" in err and "nan.safetensors" in err
    assert not out.exists()


def test_a_failed_write_leaves_the_existing_image_intact(env, tmp_path, capsys, monkeypatch):
    """A full disk mid-write: the old image keeps its bytes, and no temporary file is left behind."""
    out = tmp_path / "ir.png"
    Image.new("L", (8, 8), 77).save(out)
    before = out.read_bytes()

    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    ex = ROOT / "examples"
    rc = sample.main([str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(out), "--base", "--steps", "1",
                      "--size", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err.splitlines()[-1]  # (the progress bar is on stderr too)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ir.png"]


@pytest.mark.parametrize("recorded", [True, False])
def test_sampling_reads_the_map_with_the_checkpoints_classes(run_train, tmp_path, capsys, recorded):
    """A map drawn in the training palette (here: sky recoloured) samples without --classes when the run config
    records that palette; a file that records none falls back to the synthetic palette, which refuses the colour."""
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    meta = read_metadata(w / "final.safetensors")
    cfg = json.loads(meta["config"])
    cfg.pop("classes", None)
    sky = (1, 2, 3)
    if recorded:
        cfg["classes"] = [{"id": c.id, "name": c.name, "color": list(sky if c.name == "sky" else c.color),
                           "hot": c.hot} for c in data.DEFAULT_CLASSES]
    ckpt = tmp_path / "ckpt.safetensors"
    save_atomic(read_safetensors(w / "final.safetensors"), ckpt, meta | {"config": json.dumps(cfg)})
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "rgb.png")
    Image.new("RGB", (64, 64), sky).save(tmp_path / "sem.png")
    rc = sample.main([str(tmp_path / "rgb.png"), str(tmp_path / "sem.png"), "-o", str(tmp_path / "ir.png"),
                      "--ckpt", str(ckpt), "--steps", "1"])
    if recorded:
        assert rc == 0 and (tmp_path / "ir.png").is_file()
        assert "its training classes" in capsys.readouterr().out
    else:
        assert rc == 2 and "not in the class palette" in capsys.readouterr().err


def test_sampling_says_what_size_crops_and_when_it_is_far_from_the_training_size(run_train, tmp_path, capsys):
    """A run on the world's 64x64 pairs records its size; the 128x128 example (4x the pixels) gets one note saying
    so and which --size samples near it; an MSRS-sized 640x480 pair at --size 64 comes out 80x48 (its aspect, at
    sides of 16) with one note on the rows cut, and no note on the size."""
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    assert json.loads(read_metadata(w / "final.safetensors")["config"])["train_sizes"] == [[64, 64]]
    ex = ROOT / "examples"
    capsys.readouterr()
    assert sample.main([str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(tmp_path / "a.png"), "--ckpt", str(w),
                        "--steps", "1"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: the image is sampled far from the training size: 128x128 is 4.0x the pixels of the "
                     "nearest training size (64x64); the model has not seen that scale: --size 64 samples at about "
                     "the training size"]
    Image.new("RGB", (640, 480), (90, 90, 90)).save(tmp_path / "rgb.png")
    Image.new("L", (640, 480), 0).save(tmp_path / "sem.png")  # label ids: all sky
    assert sample.main([str(tmp_path / "rgb.png"), str(tmp_path / "sem.png"), "-o", str(tmp_path / "b.png"),
                        "--ckpt", str(w), "--steps", "1", "--size", "64"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert Image.open(tmp_path / "b.png").size == (80, 48)
    assert notes == ["note: --size 64 crops the centre to sides that are multiples of 16: 640x480 -> 80x48 keeps "
                     "80.0% of its height (1 pair)"]


def test_ckpt_takes_a_run_folder_and_points_from_a_resume_state_to_the_weights(run_train, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    ex = ROOT / "examples"
    args = [str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(tmp_path / "ir.png"), "--steps", "1"]
    assert sample.main([*args, "--ckpt", str(w)]) == 0
    assert f"semantic weights: {w / 'final.safetensors'}" in capsys.readouterr().out
    assert sample.main([*args, "--ckpt", str(w / "resume.pt")]) == 2
    assert f"a resume state (read by --resume), not weights; pass {w / 'final.safetensors'}" in capsys.readouterr().err
    assert sample.main([*args, "--ckpt", str(w), "--base"]) == 2
    assert "pick one" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,says", [("lora_rank", 1000000, "rank"), ("lora_rank", True, "lora_rank=True"),
                                              ("condition_cache", "no", "condition_cache='no'"),
                                              ("semantic", {"token_dim": -1}, "semantic options")])
def test_a_crafted_run_config_is_refused_before_anything_is_built(run_train, tmp_path, capsys, field, value, says):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "joint", "--steps", "1", "--lora-rank", "2") == 0
    meta = read_metadata(w / "final.safetensors")
    cfg = json.loads(meta["config"]) | {field: value}
    save_atomic(read_safetensors(w / "final.safetensors"), tmp_path / "crafted.safetensors",
                meta | {"config": json.dumps(cfg)})
    ex = ROOT / "examples"
    assert sample.main([str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(tmp_path / "ir.png"), "--steps", "1",
                        "--ckpt", str(tmp_path / "crafted.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err


def test_deeply_nested_json_in_a_header_or_the_config_is_one_line(run_train, tmp_path, capsys):
    import struct
    header = b"[" * 100000
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    save_atomic(read_safetensors(w / "final.safetensors"), tmp_path / "deep_config.safetensors",
                read_metadata(w / "final.safetensors") | {"config": "[" * 100000})
    ex = ROOT / "examples"
    for name, says in (("deep.safetensors", "corrupt safetensors header"), ("deep_config.safetensors", "corrupt config")):
        capsys.readouterr()
        assert sample.main([str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(tmp_path / "ir.png"),
                            "--ckpt", str(tmp_path / name)]) == 2
        assert says in capsys.readouterr().err
