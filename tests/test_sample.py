"""sample.py: the command writes an IR image of the pair's size and the attention picture; bad pairs fail with
one line and write nothing."""

from pathlib import Path

from PIL import Image

import sample

ROOT = Path(__file__).resolve().parent.parent


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
