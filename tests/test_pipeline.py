"""train.py / sample.py / eval.py end to end on the tiny preset: every stage and scheme runs, resume reproduces an
uninterrupted run, 2-process DDP equals 1 process, the schedule matches FLUX's reference values, outputs have the
right size, and bad input fails clearly before anything is written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import train
import sample
import eval as evaluation
from checkpoint import read_safetensors, read_metadata
from flux_model import Flux, PRESETS
from vae import AutoEncoder, AE_PRESETS, save_ae
from checkpoint import save_atomic

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A scratch weights/ folder with a random tiny demo base + autoencoder, and 12 synthetic 64px pairs."""
    base = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    (base / "weights" / "demo").mkdir(parents=True)
    save_ae(AutoEncoder(AE_PRESETS["tiny"]), base / "weights" / "demo" / "ae.safetensors")
    save_atomic(Flux(PRESETS["tiny"]).state_dict(), base / "weights" / "demo" / "flux.safetensors")
    data.write_synth(base / "synth", count=12, size=64, seed=0)
    return base


@pytest.fixture
def env(world, monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_IR_WEIGHTS", str(world / "weights"))
    monkeypatch.setenv("FLUX_IR_CACHE", str(world / "cache"))
    return world


def run_train(env, out, *args):
    argv = ["--data", str(env / "synth"), "--out", str(out), "--batch-size", "2", "--no-progress",
            "--sample-steps", "0", "--log-every", "1", "--warmup-steps", "2", *args]
    return train.main(argv)


# ------------------------------------------------------------------------------------------------------------------
# schedule


def test_schedule_matches_reference_values():
    shifted = sample.get_schedule(4, 4096)
    assert shifted == pytest.approx([1.0, 0.904531, 0.759511, 0.512844, 0.0], abs=1e-6)
    assert sample.get_schedule(4, 4096, shift=False) == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    mu = sample.get_lin_function()
    assert mu(256) == pytest.approx(0.5) and mu(4096) == pytest.approx(1.15)


def test_noise_is_seeded_and_device_independent():
    a = sample.get_noise(1, 48, 80, seed=3)
    assert a.shape == (1, 16, 6, 10)
    assert torch.equal(a, sample.get_noise(1, 48, 80, seed=3))
    assert not torch.equal(a, sample.get_noise(1, 48, 80, seed=4))


# ------------------------------------------------------------------------------------------------------------------
# every stage and scheme


@pytest.mark.parametrize("scheme", ["xattn", "zeroconv", "adapter"])
def test_warmup_trains_only_semantic_modules(env, tmp_path, scheme):
    out = tmp_path / "w"
    assert run_train(env, out, "--stage", "warmup", "--scheme", scheme, "--steps", "3") == 0
    sd = read_safetensors(out / "final.safetensors")
    assert sd and all(k.startswith("semantic.") for k in sd)
    cfg = json.loads(read_metadata(out / "final.safetensors")["config"])
    assert cfg["scheme"] == scheme and cfg["base_preset"] == "tiny" and cfg["stage"] == "warmup"
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(len(r["loss_by_t"]) == 10 for r in log)


def test_stage_parameter_selection_counts():
    """warmup: semantic only; joint: semantic + LoRA; finetune: only the strength scalars; nothing else trains."""
    from sem_cross_attn import attach, SemanticConfig
    from lora import inject_lora
    model = Flux(PRESETS["tiny"])
    sem = attach(model, SemanticConfig())
    inject_lora(model, rank=4)
    n_sem = sum(p.numel() for p in sem.parameters())
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    p = PRESETS["tiny"]
    for stage, expected in [("warmup", n_sem), ("joint", n_sem + n_lora), ("finetune", p.depth + p.depth_single_blocks)]:
        chosen = train.select_trainable(model, stage)
        assert sum(q.numel() for _, q in chosen) == expected, stage
        assert {n for n, q in model.named_parameters() if q.requires_grad} == {n for n, _ in chosen}
    assert all(n.endswith("scale") for n, _ in train.select_trainable(model, "finetune"))


def test_joint_then_finetune_then_sample(env, tmp_path):
    w, j, f = tmp_path / "w", tmp_path / "j", tmp_path / "f"
    assert run_train(env, w, "--stage", "warmup", "--steps", "2") == 0
    assert run_train(env, j, "--stage", "joint", "--steps", "2", "--lora-rank", "4",
                     "--init", str(w / "final.safetensors")) == 0
    joint = read_safetensors(j / "final.safetensors")
    assert any(".lora_A" in k for k in joint) and any(k.startswith("semantic.") for k in joint)
    assert run_train(env, f, "--stage", "finetune", "--steps", "2", "--lora-rank", "4",
                     "--init", str(j / "final.safetensors")) == 0
    ft = read_safetensors(f / "final.safetensors")
    changed = [k for k in ft if not torch.equal(ft[k], joint[k])]
    assert changed and all(k.endswith("scale") for k in changed)  # only the strengths moved
    out = tmp_path / "ir.png"
    attn = tmp_path / "attn.png"
    ex = ROOT / "examples"
    rc = sample.main([str(ex / "rgb.png"), str(ex / "sem.png"), "-o", str(out), "--ckpt", str(f / "final.safetensors"),
                      "--steps", "2", "--size", "64", "--attn", str(attn)])
    assert rc == 0
    from PIL import Image
    assert Image.open(out).size == (64, 64) and Image.open(out).mode == "L"
    assert Image.open(attn).size[0] > 64


@pytest.mark.parametrize("scheme", ["overlay", "none"])
def test_joint_baselines(env, tmp_path, scheme):
    out = tmp_path / scheme
    assert run_train(env, out, "--stage", "joint", "--scheme", scheme, "--steps", "2", "--lora-rank", "2") == 0
    sd = read_safetensors(out / "final.safetensors")
    assert sd and all(".lora_" in k for k in sd)


def test_base_stage_writes_a_loadable_transformer(env, tmp_path):
    out = tmp_path / "base"
    assert run_train(env, out, "--stage", "base", "--scheme", "none", "--steps", "2") == 0
    from flux_model import load_flux
    model = load_flux(out / "final.safetensors", "tiny", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in Flux(PRESETS["tiny"]).parameters())


def test_sampling_writes_the_right_size(env, tmp_path):
    pipe = sample.load_pipeline(None, quiet=True)
    rgb = torch.zeros(2, 3, 48, 80)
    ir = sample.generate(pipe, rgb, rgb, steps=2, seed=[0, 1])
    assert ir.shape == (2, 1, 48, 80) and ir.min() >= 0 and ir.max() <= 1
    again = sample.generate(pipe, rgb[:1], rgb[:1], steps=2, seed=[1])
    torch.testing.assert_close(again[0], ir[1])  # a pair's result does not depend on its batch


# ------------------------------------------------------------------------------------------------------------------
# resume, signals, NaN


def test_resume_equals_uninterrupted(env, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(env, full, "--stage", "warmup", "--steps", "6", "--ckpt-every", "3") == 0
    assert run_train(env, part, "--stage", "warmup", "--steps", "6", "--ckpt-every", "3", "--steps", "3") == 0
    assert run_train(env, part, "--stage", "warmup", "--steps", "6", "--ckpt-every", "3", "--resume") == 0
    a, b = read_safetensors(full / "final.safetensors"), read_safetensors(part / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_writes_resume_state_and_resume_reproduces(env, tmp_path):
    """Kill a run mid-way from the test (SIGTERM), resume, compare with an uninterrupted run."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = "40"
    assert run_train(env, full, "--stage", "warmup", "--steps", steps, "--ckpt-every", "1000") == 0
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "warmup", "--data", str(env / "synth"), "--out",
           str(killed), "--batch-size", "2", "--no-progress", "--sample-steps", "0", "--log-every", "1",
           "--warmup-steps", "2", "--steps", steps, "--ckpt-every", "1000"]
    # same thread count as this process, so the float reductions (and so the weights) are bit-identical
    proc = subprocess.Popen(cmd, env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = killed / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by signal" in output and (killed / "resume.pt").is_file()
    assert not (killed / "final.safetensors").exists()
    assert run_train(env, killed, "--stage", "warmup", "--steps", steps, "--ckpt-every", "1000", "--resume") == 0
    a, b = read_safetensors(full / "final.safetensors"), read_safetensors(killed / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = run_train(env, out, "--stage", "warmup", "--steps", "30", "--ckpt-every", "1", "--lr", "1e30",
                   "--warmup-steps", "1", "--grad-clip", "1e30")
    assert rc == 1
    err = capsys.readouterr().err
    assert "loss is" in err and "at step" in err
    good = read_safetensors(out / "latest.safetensors")  # the last good weights are intact and finite
    assert all(torch.isfinite(v).all() for v in good.values())


# ------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_init_and_options_fail_before_work(env, tmp_path):
    w = tmp_path / "w"
    assert run_train(env, w, "--stage", "warmup", "--scheme", "zeroconv", "--steps", "1") == 0
    for args, message in [
        (["--stage", "joint", "--scheme", "xattn", "--init", str(w / "final.safetensors")], "scheme"),
        (["--stage", "finetune", "--scheme", "xattn"], "--init"),
        (["--stage", "warmup", "--scheme", "overlay"], "use --stage joint"),
        (["--stage", "base", "--scheme", "xattn"], "--scheme none"),
        (["--stage", "warmup", "--resume"], "no "),
    ]:
        out = tmp_path / ("bad" + str(len(message)))
        with pytest.raises(SystemExit, match=message):
            run_train(env, out, *args, "--steps", "1")
        assert not (out / "final.safetensors").exists()


def test_sample_rejects_bad_pairs(env, tmp_path, capsys):
    from PIL import Image
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


def test_init_from_another_preset_is_refused(env, tmp_path):
    w = tmp_path / "w"
    assert run_train(env, w, "--stage", "warmup", "--steps", "1") == 0
    cfg = json.loads(read_metadata(w / "final.safetensors")["config"])
    cfg["base_preset"] = "dev"
    sd = read_safetensors(w / "final.safetensors")
    save_atomic(sd, tmp_path / "dev.safetensors", {"config": json.dumps(cfg)})
    with pytest.raises(SystemExit, match="base_preset"):
        run_train(env, tmp_path / "x", "--stage", "joint", "--init", str(tmp_path / "dev.safetensors"), "--steps", "1")


# ------------------------------------------------------------------------------------------------------------------
# eval


def test_eval_two_pairs_end_to_end(env, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(env, w, "--stage", "warmup", "--steps", "1") == 0
    rc = evaluation.main(["--data", str(env / "synth"), "--ckpt", str(w / "final.safetensors"), "--steps", "2",
                          "--limit", "2", "--no-progress", "--save", str(tmp_path / "pred")])
    assert rc == 0
    out = capsys.readouterr().out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["n_images"] == 2 and 0 < line["ssim"] <= 1 and "hallucination_rate" in line
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2


def test_ablation_tiny_mode(env, tmp_path):
    out = tmp_path / "abl"
    rc = evaluation.main(["--ablation", "--schemes", "none,xattn", "--steps", "2", "--eval-steps", "2", "--limit", "2",
                          "--train-data", str(env / "synth"), "--data", str(env / "synth"), "--out", str(out),
                          "--batch-size", "2", "--no-progress"])
    assert rc == 0
    table = (out / "table.md").read_text()
    assert "B: cross-attention" in table and "none" in table
    assert (out / "comparison.png").is_file() and (out / "loss_curves.png").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["train_steps"] == 2


def test_ablation_runs_scheme_b_options_with_their_flags(env, tmp_path):
    """--schemes xattn-double / xattn-half train scheme B with --sem-blocks double / half the width and heads, so
    their quality can be set against what bench.py says they save; an unknown name is refused before training."""
    out = tmp_path / "abl-b"
    common = ["--ablation", "--steps", "1", "--eval-steps", "1", "--limit", "1", "--train-data", str(env / "synth"),
              "--data", str(env / "synth"), "--out", str(out), "--batch-size", "2", "--no-progress"]
    with pytest.raises(SystemExit, match="unknown scheme"):
        evaluation.main(common + ["--schemes", "xattn-quarter"])
    assert not out.exists() or not any(out.iterdir())
    assert evaluation.main(common + ["--schemes", "xattn-double,xattn-half"]) == 0
    hidden, heads = PRESETS["tiny"].hidden_size, PRESETS["tiny"].num_heads
    double = sample.load_pipeline(out / "xattn-double" / "final.safetensors", quiet=True).model.semantic
    half = sample.load_pipeline(out / "xattn-half" / "final.safetensors", quiet=True).model.semantic
    assert double.config.blocks == "double" and len(double.single_blocks) == 0 and len(double.double_blocks) == 2
    assert half.config.inner_dim == hidden // 2 and half.config.num_heads == heads // 2
    table = (out / "table.md").read_text()
    assert "B, double blocks only" in table and "B, half width" in table


# ------------------------------------------------------------------------------------------------------------------
# DDP


def test_two_process_ddp_equals_one_process(env, tmp_path):
    """torchrun with 2 gloo processes and batch 2 each == 1 process with batch 4 (same global batch)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--stage", "warmup", "--data", str(env / "synth"), "--no-progress", "--sample-steps", "0",
              "--steps", "3", "--warmup-steps", "1", "--device", "cpu"]
    assert train.main(common + ["--out", str(one), "--batch-size", "4"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *common, "--out", str(two), "--batch-size", "2"]
    res = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    a, b = read_safetensors(one / "final.safetensors"), read_safetensors(two / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# the committed demo weights


def test_demo_weights_load_strictly_and_sample(monkeypatch):
    """weights/demo/ as shipped: the base, the autoencoder and the scheme B weights load strictly, and the example
    pair samples to an image of its own size."""
    monkeypatch.delenv("FLUX_IR_WEIGHTS", raising=False)
    setup = sample.find_setup()
    if setup.kind != "demo":
        pytest.skip("official weights are installed; the demo is not the default here")
    pipe = sample.load_pipeline(setup.flux.parent / "xattn.safetensors", quiet=True, setup=setup)
    assert pipe.scheme == "xattn" and pipe.model.semantic is not None
    classes = data.load_classes(None)
    rgb, sem, ids = sample.load_pair(ROOT / "examples" / "rgb.png", ROOT / "examples" / "sem.png", classes, None)
    ir = sample.generate(pipe, rgb[None], sem[None], steps=4, seed=0)
    assert ir.shape == (1, 1) + tuple(rgb.shape[-2:])
