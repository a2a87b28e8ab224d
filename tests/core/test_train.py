"""train.py end to end on the tiny preset: every stage runs with the default scheme B (and the plain model) and
writes only what it trains, the defaults are the stage's and the scheme's, resume reproduces an uninterrupted run
(also after SIGTERM), a NaN stops with the last good weights intact, held-out pairs are sampled and scored as
tools.eval scores them, numbered checkpoints keep the newest K and load like final, TensorBoard is optional, and bad
options fail with one line before anything is written. The opt-in mechanisms' training tests are in
tests/extras/test_train_*.py."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from checkpoint import load_flux_official, read_metadata, read_safetensors, save_atomic
from conftest import check_lora_only_output, check_warmup_output, train_args
from data import PairedDataset
from flux_model import PRESETS, Flux
from pipeline import find_setup

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("scheme", ["xattn"])
def test_warmup_trains_only_semantic_modules(run_train, tmp_path, scheme):
    out = tmp_path / "w"
    assert run_train(out, "--stage", "warmup", "--scheme", scheme, "--steps", "3") == 0
    check_warmup_output(out, scheme)


def test_defaults_are_the_stage_and_scheme_values(env):
    """A flag left unset (None) takes its stage's value (the tiny demo's own learning rate) or the scheme's preset;
    a flag given wins; the filled-in config is what the outputs record."""
    setup = find_setup()
    assert setup.kind == "demo"
    resolve = lambda *a: train.resolve(train.parse_args(list(a)), setup)  # noqa: E731
    warm, joint, none = resolve(), resolve("--stage", "joint"), resolve("--stage", "joint", "--scheme", "none")
    assert (warm.steps, warm.lr, warm.sem_drop) == (1000, 3e-3, 0.0)
    assert (joint.steps, joint.lr, joint.sem_drop) == (1000, 1e-3, 0.1)
    assert none.sem_drop == 0.0  # no semantic module: nothing to drop
    assert (warm.sem_attention, warm.sem_token_dim, warm.sem_encoder, warm.sem_shared_kv) == ("decoupled", 64, "vae",
                                                                                               False)
    assert (none.sem_attention, none.sem_token_dim) == ("separate", 0)  # recorded as outputs always have
    separate = resolve("--sem-attention", "separate")
    assert (separate.sem_attention, separate.sem_token_dim) == ("separate", 0)  # the token width goes with the form
    assert resolve("--sem-attention", "separate", "--sem-token-dim", "32").sem_token_dim == 32
    given = resolve("--stage", "joint", "--steps", "7", "--lr", "2e-4", "--sem-drop", "0.3")
    assert (given.steps, given.lr, given.sem_drop) == (7, 2e-4, 0.3)
    assert warm.out.endswith("runs/warmup") and train.settings(warm)["base_dtype"] == ""
    assert train.STAGES["warmup"].lr == 1e-4 and train.STAGES["base"].steps == 4000  # FLUX.1-size values


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


def test_joint_then_finetune_moves_only_the_strengths(run_train, tmp_path):
    w, j, f = tmp_path / "w", tmp_path / "j", tmp_path / "f"
    assert run_train(w, "--stage", "warmup", "--steps", "2") == 0
    assert run_train(j, "--stage", "joint", "--steps", "2", "--lora-rank", "4", "--init", str(w / "final.safetensors")) == 0
    joint = read_safetensors(j / "final.safetensors")
    assert any(".lora_A" in k for k in joint) and any(k.startswith("semantic.") for k in joint)
    # the LoRA part for other tools, beside the run's own file; a warmup has none to export
    assert (j / "lora_kohya.safetensors").is_file() and (j / "lora_diffusers.safetensors").is_file()
    assert not list(w.glob("lora_*.safetensors"))
    warm = read_safetensors(w / "final.safetensors")
    assert any(not torch.equal(joint[k], warm[k]) for k in warm)  # started from the warmup weights, then trained
    assert run_train(f, "--stage", "finetune", "--steps", "2", "--lora-rank", "4", "--init", str(j / "final.safetensors")) == 0
    ft = read_safetensors(f / "final.safetensors")
    changed = [k for k in ft if not torch.equal(ft[k], joint[k])]
    assert changed and all(k.endswith("scale") for k in changed)  # only the strengths moved


def test_condition_dropout_and_misaligned_maps_train_and_are_recorded(run_train, env, tmp_path, capsys):
    """--sem-drop and --sem-jitter (joint, decoupled B) train; the run records them; the misaligned copies of the
    maps are cached once, V per map; --sem-drop outside the LoRA stage is refused in one line."""
    j = tmp_path / "j"
    assert run_train(j, "--stage", "joint", "--steps", "2", "--lora-rank", "2", "--sem-attention", "decoupled",
                     "--sem-token-dim", "16", "--sem-drop", "0.5", "--sem-jitter", "3") == 0
    args = json.loads(read_metadata(j / "final.safetensors")["train_args"])
    cfg = json.loads(read_metadata(j / "final.safetensors")["config"])
    assert (args["sem_drop"], args["sem_jitter"]) == (0.5, 3) and cfg["semantic"]["attention"] == "decoupled"
    cached = list((env / "cache" / "latents").glob("*-jitter3x4s0.safetensors"))
    assert len(cached) == 1
    jit = read_safetensors(cached[0])
    n = len(PairedDataset(env / "synth"))
    assert jit["64x64/sem"].shape[:2] == (4, n) and jit["64x64/sem_pixels"].shape[:2] == (4, n)  # one bucket
    capsys.readouterr()
    assert run_train(tmp_path / "w", "--stage", "warmup", "--steps", "1", "--sem-drop", "0.2") == 2
    err = capsys.readouterr().err
    assert "--sem-drop" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("scheme", ["none"])
def test_joint_baselines_train_only_lora(run_train, tmp_path, scheme):
    out = tmp_path / scheme
    assert run_train(out, "--stage", "joint", "--scheme", scheme, "--steps", "2", "--lora-rank", "2") == 0
    check_lora_only_output(out)


def test_base_stage_writes_a_loadable_transformer(run_train, tmp_path):
    out = tmp_path / "base"
    assert run_train(out, "--stage", "base", "--scheme", "none", "--steps", "2") == 0
    model = load_flux_official(out / "final.safetensors", "tiny", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in Flux(PRESETS["tiny"]).parameters())


def test_sample_grid_written_at_the_end(run_train, tmp_path):
    out = tmp_path / "grid"
    assert run_train(out, "--stage", "warmup", "--steps", "1", "--sample-steps", "2") == 0
    from PIL import Image
    (png,) = (out / "samples").glob("*.png")
    assert Image.open(png).size[0] == 4 * (64 + 2) + 2  # RGB | semantic | target | prediction


def test_a_bf16_base_trains_and_samples_on_the_cpu_too(run_train, tmp_path):
    """--base-dtype bf16 on the CPU: the fp32 trainable modules run under bf16 autocast, as on a GPU, through the
    step, the finite-loss check and the grid (without it the first matmul of fp32 and bf16 fails)."""
    out = tmp_path / "bf16"
    assert run_train(out, "--stage", "warmup", "--steps", "2", "--ckpt-every", "1", "--sample-steps", "2",
                     "--base-dtype", "bf16") == 0
    assert (out / "final.safetensors").is_file() and list((out / "samples").glob("*.png"))


# ------------------------------------------------------------------------------------------------------------------
# validation, numbered checkpoints, TensorBoard


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """3 synthetic pairs drawn apart from the world's training pairs."""
    from tools.synth import write_synth
    root = tmp_path_factory.mktemp("held_out") / "val"
    write_synth(root, count=3, size=64, seed=5)
    return root


def test_validation_samples_and_scores_the_held_out_pairs_at_sample_every(run_train, held_out, tmp_path, capsys):
    """At every --sample-every step the first --val-count held-out pairs are sampled into a grid and scored into
    log.jsonl (beside the loss lines, which stay one a step), one printed line each; the scores are tools.eval's on
    the same weights with the same settings."""
    from PIL import Image
    from tools.eval import Sampling, evaluate
    import pipeline
    out = tmp_path / "v"
    assert run_train(out, "--stage", "warmup", "--steps", "4", "--sample-every", "2", "--sample-steps", "2",
                     "--val-data", str(held_out), "--val-count", "2", "--ckpt-every", "2") == 0
    for step in (2, 4):  # 2 rows: RGB | semantic | ground truth | prediction
        assert Image.open(out / "samples" / f"val_step_{step:06d}.png").size == (4 * 66 + 2, 12 + 2 * 66 + 2)
    assert not list((out / "samples").glob("step_*.png"))  # the held-out grid replaces the training pairs' grid
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    val = [r for r in rows if "val_psnr" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val_pairs"] == 2 for r in val)
    assert set(val[0]) == {"step", "val_psnr", "val_ssim", "val_miss", "val_decoy", "val_hallucination", "val_pairs"}
    printed = [l for l in capsys.readouterr().out.splitlines() if "validation on 2 pairs" in l]
    assert [l.split(":")[0] for l in printed] == ["step 2", "step 4"] and "decoy hallucination" in printed[0]
    pipe = pipeline.load_pipeline(out / "checkpoints" / "step_000004.safetensors", quiet=True)
    s = evaluate(pipe, PairedDataset(held_out), Sampling(steps=2), limit=2, progress=False)
    assert val[1]["val_psnr"] == pytest.approx(s["psnr"], rel=1e-6)
    assert val[1]["val_ssim"] == pytest.approx(s["ssim"], rel=1e-6)
    assert (val[1]["val_miss"], val[1]["val_decoy"]) == (s["all"]["miss_rate"], s["decoy"]["hallucination_rate"])


def test_validation_at_the_end_without_sample_every(run_train, held_out, tmp_path):
    out = tmp_path / "v"
    assert run_train(out, "--stage", "warmup", "--steps", "2", "--sample-steps", "1", "--val-data", str(held_out)) == 0
    assert [p.name for p in (out / "samples").iterdir()] == ["val_step_000002.png"]
    val = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "val_psnr" in l]
    assert len(val) == 1 and val[0]["val_pairs"] == 3  # --val-count 8, of a folder of 3


def test_validation_pairs_of_two_sizes_share_one_grid(run_train, held_out, tmp_path):
    import shutil
    from PIL import Image
    from tools.synth import write_synth
    mixed, small = tmp_path / "mixed", tmp_path / "small"
    shutil.copytree(held_out, mixed)
    write_synth(small, count=1, size=32, seed=9)
    for d in ("rgb", "sem", "ir"):
        for f in (small / d).iterdir():
            shutil.copy(f, mixed / d / f"small_{f.name}")
    out = tmp_path / "v"
    assert run_train(out, "--stage", "warmup", "--steps", "1", "--sample-steps", "1", "--val-data", str(mixed)) == 0
    assert Image.open(out / "samples" / "val_step_000001.png").size == (4 * 66 + 2, 12 + 4 * 66 + 2)  # cells of 64
    (val,) = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "val_psnr" in l]
    assert val["val_pairs"] == 4


@pytest.mark.parametrize("args, message", [
    (["--val-data", "nowhere"], "--val-data nowhere: no such folder"),
    (["--val-data", "TRAIN"], "is the training data"),
    (["--val-data", "HELD"], "--sample-steps"),  # the run's --sample-steps 0
    (["--val-data", "HELD", "--sample-steps", "1", "--val-count", "0"], "--val-count must be at least 1"),
    (["--keep-last", "-1"], "--keep-last must be 0"),
    (["--val-data", "PALETTE", "--sample-steps", "1"], "its classes differ"),
])
def test_bad_validation_and_checkpoint_flags_are_one_line(run_train, env, held_out, tmp_path, capsys, args, message):
    import shutil
    palette = tmp_path / "palette"
    shutil.copytree(held_out, palette)
    classes = json.loads((palette / "classes.json").read_text())
    classes["classes"][5]["hot"] = True  # a class the training data has cold
    (palette / "classes.json").write_text(json.dumps(classes))
    where = {"TRAIN": str(env / "synth"), "HELD": str(held_out), "PALETTE": str(palette)}
    out = tmp_path / "bad"
    assert run_train(out, "--stage", "warmup", "--steps", "1", *[where.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (out / "final.safetensors").exists()


def test_numbered_checkpoints_keep_the_last_k_and_load_like_final(run_train, tmp_path):
    """--ckpt-every writes checkpoints/step_N.safetensors beside latest (the same file), the newest --keep-last stay
    (0: all); each loads as sample.py and tools.eval load a run's output, with final's metadata."""
    import pipeline
    out = tmp_path / "k"
    assert run_train(out, "--stage", "warmup", "--steps", "5", "--ckpt-every", "1", "--keep-last", "2") == 0
    numbered = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert numbered == ["step_000004.safetensors", "step_000005.safetensors"]
    assert (out / "checkpoints" / numbered[-1]).read_bytes() == (out / "latest.safetensors").read_bytes()
    final = read_safetensors(out / "final.safetensors")
    for name in numbered:
        path = out / "checkpoints" / name
        assert read_metadata(path) == read_metadata(out / "final.safetensors")
        pipe = pipeline.load_pipeline(path, quiet=True)
        assert pipe.ckpt == path and pipe.scheme == "xattn"
    last = read_safetensors(out / "checkpoints" / numbered[-1])
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
    every = tmp_path / "all"
    assert run_train(every, "--stage", "warmup", "--steps", "3", "--ckpt-every", "1", "--keep-last", "0") == 0
    assert len(list((every / "checkpoints").iterdir())) == 3


def test_tensorboard_without_the_package_is_one_line_before_any_work(run_train, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "tb"
    assert run_train(out, "--stage", "warmup", "--steps", "1", "--tensorboard") == 2
    err = capsys.readouterr().err
    assert err == "error: --tensorboard needs the tensorboard package: pip install tensorboard\n"
    assert not out.exists()
    assert run_train(out, "--stage", "warmup", "--steps", "1") == 0  # without the flag nothing needs it
    assert not (out / "tb").exists()


def test_tensorboard_logs_the_loss_and_the_validation(run_train, held_out, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    assert run_train(out, "--stage", "warmup", "--steps", "2", "--sample-every", "2", "--sample-steps", "1",
                     "--val-data", str(held_out), "--val-count", "1", "--tensorboard") == 0
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/loss", "train/lr", "val/psnr", "val/miss", "val/decoy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Images("val/grid")] == [2]


# ------------------------------------------------------------------------------------------------------------------
# resume, signals, NaN


def test_resume_equals_uninterrupted(run_train, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(full, "--stage", "warmup", "--steps", "6", "--ckpt-every", "3") == 0
    assert run_train(part, "--stage", "warmup", "--steps", "6", "--ckpt-every", "3", "--steps", "3") == 0
    assert run_train(part, "--stage", "warmup", "--steps", "6", "--ckpt-every", "3", "--resume") == 0
    a, b = read_safetensors(full / "final.safetensors"), read_safetensors(part / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_writes_resume_state_and_resume_reproduces(env, run_train, tmp_path):
    """Kill a run mid-way from the test (SIGTERM), resume, compare with an uninterrupted run."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = "40"
    assert run_train(full, "--stage", "warmup", "--steps", steps, "--ckpt-every", "1000") == 0
    cmd = [sys.executable, str(ROOT / "train.py"),
           *train_args(env, killed, "--stage", "warmup", "--steps", steps, "--ckpt-every", "1000")]
    # same thread count as this process, so the float reductions (and so the weights) are bit-identical
    proc = subprocess.Popen(cmd, env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = killed / "log.jsonl"
    deadline = time.time() + 300  # a busy machine starts the subprocess slowly
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by signal" in output and (killed / "resume.pt").is_file()
    assert not (killed / "final.safetensors").exists()
    assert run_train(killed, "--stage", "warmup", "--steps", steps, "--ckpt-every", "1000", "--resume") == 0
    a, b = read_safetensors(full / "final.safetensors"), read_safetensors(killed / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run_train, tmp_path, capsys, monkeypatch):
    """A run that diverges after 3 good steps: it stops with exit 1, and what it calls the last good weights are the
    step-3 weights, which sample a finite image (never the first diverged ones)."""
    real_lr = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, cfg: real_lr(step, cfg) if step < 3 else 1e30)
    out = tmp_path / "nan"
    rc = run_train(out, "--stage", "warmup", "--steps", "30", "--ckpt-every", "1", "--grad-clip", "1e30")
    assert rc == 1
    err = capsys.readouterr().err
    assert "after step 4 give a non-finite loss" in err
    assert f"last good weights are {out / 'latest.safetensors'}" in err
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 3
    import pipeline
    pipe = pipeline.load_pipeline(out / "latest.safetensors", quiet=True)
    assert torch.isfinite(pipeline.generate(pipe, torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), steps=2)).all()
    assert not (out / "final.safetensors").exists()


@pytest.mark.parametrize("steps", ["1", "6"])
def test_diverged_weights_are_never_written(run_train, tmp_path, capsys, steps):
    """lr 1e30 diverges at the first update: nothing is written as good, not even for a 1-step run."""
    out = tmp_path / "nan"
    assert run_train(out, "--stage", "warmup", "--steps", steps, "--ckpt-every", "1", "--lr", "1e30") == 1
    assert "non-finite" in capsys.readouterr().err
    assert not (out / "final.safetensors").exists() and not (out / "latest.safetensors").exists()


# ------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_init_and_options_fail_before_work(run_train, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--scheme", "zeroconv", "--steps", "1") == 0
    capsys.readouterr()
    for args, message in [
        (["--stage", "joint", "--scheme", "xattn", "--init", str(w / "final.safetensors")], "scheme"),
        (["--stage", "finetune", "--scheme", "xattn"], "--init"),
        (["--stage", "warmup", "--scheme", "overlay"], "use --stage joint"),
        (["--stage", "base", "--scheme", "xattn"], "--scheme none"),
        (["--stage", "warmup", "--resume"], "no "),
        (["--stage", "warmup", "--scheme", "zeroconv", "--sem-encoder", "cnn"], "encoder vae"),
    ]:
        out = tmp_path / ("bad" + str(len(message)))
        assert run_train(out, *args, "--steps", "1") == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
        assert not (out / "final.safetensors").exists()


def test_init_from_another_base_is_refused(run_train, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    cfg = json.loads(read_metadata(w / "final.safetensors")["config"])
    sd = read_safetensors(w / "final.safetensors")
    save_atomic(sd, tmp_path / "other.safetensors", {"config": json.dumps(cfg | {"base_id": "0123456789abcdef"})})
    assert run_train(tmp_path / "x", "--stage", "joint", "--init", str(tmp_path / "other.safetensors"), "--steps", "1") == 2
    assert "trained on another base" in capsys.readouterr().err


def test_init_with_missing_semantic_weights_is_refused_by_name(run_train, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    sd = read_safetensors(w / "final.safetensors")
    dropped = sorted(sd)[0]
    del sd[dropped]
    save_atomic(sd, tmp_path / "cut.safetensors", read_metadata(w / "final.safetensors"))
    assert run_train(tmp_path / "x", "--stage", "joint", "--init", str(tmp_path / "cut.safetensors"),
                     "--steps", "1") == 2
    err = capsys.readouterr().err
    assert dropped in err and "missing" in err


def test_run_takes_a_config(env, tmp_path):
    """The documented entry point: the same run as the command line, from a TrainConfig."""
    cfg = train.parse_args(train_args(env, tmp_path / "a", "--stage", "warmup", "--steps", "2"))
    assert train.run(cfg) == 0
    assert train.main(train_args(env, tmp_path / "b", "--stage", "warmup", "--steps", "2")) == 0
    a, b = read_safetensors(tmp_path / "a" / "final.safetensors"), read_safetensors(tmp_path / "b" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cfg.steps == 2 and cfg.lr is None  # run() fills the defaults in on a copy


# ------------------------------------------------------------------------------------------------------------------
# nothing of an earlier run lost, nothing silently different


def test_a_new_run_over_a_stopped_run_is_refused_until_resume_or_overwrite(run_train, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_train(out, "--stage", "warmup", "--steps", "2") == 0
    before = (out / "final.safetensors").read_bytes()
    capsys.readouterr()
    assert run_train(out, "--stage", "warmup", "--steps", "4") == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "final.safetensors").read_bytes() == before  # untouched
    assert run_train(out, "--stage", "warmup", "--steps", "4", "--overwrite") == 0
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the new run's log alone


def test_resume_refuses_changed_settings_and_records_a_longer_run(run_train, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_train(out, "--stage", "warmup", "--steps", "2") == 0
    capsys.readouterr()
    for flag, value in [("--lr", "5e-4"), ("--batch-size", "3"), ("--seed", "7"), ("--grad-accum", "2")]:
        assert run_train(out, "--stage", "warmup", "--steps", "2", "--resume", flag, value) == 2
        assert flag in capsys.readouterr().err
    assert run_train(out, "--stage", "warmup", "--steps", "1", "--resume") == 2  # shorter than done
    assert run_train(out, "--stage", "warmup", "--steps", "3", "--resume") == 0
    meta = read_metadata(out / "final.safetensors")
    assert json.loads(meta["resume_overrides"]) == {"steps": [2, 3], "at_step": 2}
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_trims_log_lines_written_after_its_state(run_train, tmp_path):
    """A kill after a log line but before the next resume state must not leave duplicate steps in log.jsonl."""
    out = tmp_path / "r"
    assert run_train(out, "--stage", "warmup", "--steps", "4", "--ckpt-every", "2") == 0
    full = (out / "log.jsonl").read_text()
    state = torch.load(out / "resume.pt", weights_only=True)
    state["step"] = 2  # as if the run had died after logging steps 3 and 4 but before their resume state
    torch.save(state, out / "resume.pt")
    assert run_train(out, "--stage", "warmup", "--steps", "4", "--ckpt-every", "2", "--resume") == 0
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and full.splitlines()[:2] == (out / "log.jsonl").read_text().splitlines()[:2]


def test_a_corrupt_resume_state_is_one_line(run_train, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_train(out, "--stage", "warmup", "--steps", "1") == 0
    (out / "resume.pt").write_bytes((out / "resume.pt").read_bytes()[:100])
    capsys.readouterr()
    assert run_train(out, "--stage", "warmup", "--steps", "1", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "resume.pt" in err and len(err.strip().splitlines()) == 1


def test_a_live_run_locks_its_out_folder(run_train, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(f"{other.pid}\n")
        assert run_train(out, "--stage", "warmup", "--steps", "1") == 2
        assert f"another run (pid {other.pid})" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    assert run_train(out, "--stage", "warmup", "--steps", "1") == 0  # a dead owner's lock is stale
    assert not (out / "run.lock").exists()  # released at the end


def test_an_unwritable_out_fails_in_one_line_before_any_work(run_train, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_train(blocker / "out", "--stage", "warmup", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "encoding" not in err


@pytest.mark.parametrize("args, flag", [
    (["--steps", "-3"], "--steps"), (["--grad-accum", "0"], "--grad-accum"), (["--batch-size", "0"], "--batch-size"),
    (["--ckpt-every", "0"], "--ckpt-every"), (["--log-every", "0"], "--log-every"), (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"), (["--lr", "1e40"], "--lr"), (["--sem-blocks", "every:0"], "--sem"),
    (["--sem-heads", "3"], "--sem-heads"), (["--size", "8"], "--size"),
    (["--stage", "joint", "--lora-rank", "0"], "--lora-rank"), (["--device", "cuda:7"], "--device"),
])
def test_bad_numbers_fail_naming_the_flag(run_train, tmp_path, capsys, args, flag):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "bad"
    assert run_train(out, "--stage", "warmup", *args) == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1
    assert not (out / "final.safetensors").exists()


def test_init_with_another_lora_alpha_is_refused(run_train, tmp_path, capsys):
    j = tmp_path / "j"
    assert run_train(j, "--stage", "joint", "--steps", "1", "--lora-rank", "2", "--lora-alpha", "4") == 0
    capsys.readouterr()
    assert run_train(tmp_path / "f", "--stage", "finetune", "--steps", "1", "--lora-rank", "2",
                     "--init", str(j / "final.safetensors")) == 2
    assert "--lora-alpha" in capsys.readouterr().err


def test_outputs_carry_the_class_palette_and_the_latent_cache_follows_it(run_train, env, tmp_path):
    out = tmp_path / "w"
    assert run_train(out, "--stage", "warmup", "--steps", "1") == 0
    cfg = json.loads(read_metadata(out / "final.safetensors")["config"])
    import data
    import latents
    classes = data.PairedDataset(env / "synth").classes
    assert [tuple(c["color"]) for c in cfg["classes"]] == [c.color for c in classes]
    ds = data.PairedDataset(env / "synth")
    key = latents.cache_key(ds, env / "weights" / "demo" / "ae.safetensors")
    swapped = list(ds.classes)
    swapped[0], swapped[1] = (data.SemClass(swapped[0].id, swapped[0].name, swapped[1].color),
                              data.SemClass(swapped[1].id, swapped[1].name, swapped[0].color))
    ds.classes = tuple(swapped)
    assert latents.cache_key(ds, env / "weights" / "demo" / "ae.safetensors") != key


def test_a_mixed_size_set_trains_in_buckets_as_check_says_and_resumes_exactly(env, run_train, tmp_path, capsys,
                                                                               monkeypatch):
    """MSRS, PST900 and LLVIP frames (640x480, 1280x720, 1280x1024) in one folder at --size 128: data.py check and
    train.py name the same two buckets, each batch is drawn from one and both are drawn, the crop is one line, the
    run config records the sizes; stopped and resumed, the run equals an uninterrupted one (the bucket draws come
    from the resumed generator)."""
    import data
    from conftest import make_real_size_set
    root = make_real_size_set(tmp_path / "mixed", per_set=2)
    data.main(["check", str(root), "--size", "128"])
    checked = capsys.readouterr().out
    shapes, real = [], train.get_batch

    def recording(*args):
        batch = real(*args)
        shapes.append(tuple(batch[0].shape))  # x0 [B, L, 64]: one tensor, so one token grid a batch
        return batch
    monkeypatch.setattr(train, "get_batch", recording)
    full, part = tmp_path / "full", tmp_path / "part"
    flags = ("--stage", "warmup", "--data", str(root), "--size", "128", "--ckpt-every", "3", "--sample-steps", "1")
    assert run_train(full, *flags, "--steps", "6") == 0
    out = capsys.readouterr().out
    buckets = "144x112 (4 pairs), 176x96 (2 pairs)"  # 5:4 and 4:3 round to one shape at this size
    assert f"2 bucket(s), each training batch from one: {buckets}" in checked
    assert f"6 pairs in 2 buckets, each batch from one (drawn in proportion to its pairs): {buckets}" in out
    assert len([line for line in out.splitlines() if "--size 128 crops the centre" in line]) == 1
    assert "6 training pairs of 63 or 66 tokens" in out  # 9x7 and 11x6 token grids
    assert set(shapes) == {(2, 63, 64), (2, 66, 64)}
    assert json.loads(read_metadata(full / "final.safetensors")["config"])["train_sizes"] == [[144, 112], [176, 96]]
    assert run_train(part, *flags, "--steps", "3") == 0
    assert run_train(part, *flags, "--steps", "6", "--resume") == 0
    a, b = read_safetensors(full / "final.safetensors"), read_safetensors(part / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------------------
# --overwrite, the dataset, signals and caches: nothing lost, nothing silently wrong


def run_files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_a_failing_overwrite_leaves_the_earlier_run_whole(run_train, env, tmp_path, capsys):
    """--overwrite with a typo'd --data, with bad dataset content (an unknown colour in the last two pairs),
    or its own --init: one line, and the earlier run is as it was (no lock, nothing set aside)."""
    import shutil
    from conftest import save_image
    out = tmp_path / "r"
    assert run_train(out, "--stage", "warmup", "--steps", "2") == 0
    before = run_files(out)
    bad = tmp_path / "bad"
    shutil.copytree(env / "synth", bad)
    names = sorted(p.name for p in (bad / "sem").iterdir())
    import numpy as np
    for stem in (names[-1], names[-2]):
        save_image(np.full((64, 64, 3), 7, np.uint8), bad / "sem" / stem)  # a colour in no class
    capsys.readouterr()
    for args in (["--data", str(tmp_path / "typo")], ["--data", str(bad)],
                 ["--init", str(out / "final.safetensors")]):
        assert run_train(out, "--stage", "warmup", "--steps", "2", "--overwrite", *args) == 2
        assert run_files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    err = capsys.readouterr().err.splitlines()
    assert "no such" in err[0]
    assert "2 problem(s) with its 12 pairs" in err[1] and names[-1] in err[2] + err[3] and names[-2] in err[2] + err[3]
    assert "--overwrite would replace" in err[-1]


def test_an_overwrite_that_fails_before_its_first_checkpoint_puts_the_earlier_run_back(run_train, tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "r"
    assert run_train(out, "--stage", "warmup", "--steps", "2") == 0
    before = run_files(out)
    calls = []

    def fails_at_step_2(*args):  # the new run's second step breaks (after a log line was written)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args)
    real = train.flow_loss
    monkeypatch.setattr(train, "flow_loss", fails_at_step_2)
    with pytest.raises(RuntimeError, match="boom"):
        run_train(out, "--stage", "warmup", "--steps", "4", "--ckpt-every", "3", "--overwrite")
    assert run_files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    monkeypatch.setattr(train, "flow_loss", real)
    assert run_train(out, "--stage", "warmup", "--steps", "4", "--overwrite") == 0  # succeeds: the new run only
    assert [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_refuses_a_changed_dataset(run_train, env, tmp_path, capsys):
    import shutil
    d = tmp_path / "d"
    shutil.copytree(env / "synth", d)
    out = tmp_path / "r"
    assert run_train(out, "--stage", "warmup", "--steps", "2", "--data", str(d)) == 0
    for sub in ("rgb", "sem", "ir"):
        shutil.copy(d / sub / "000000.png", d / sub / "extra.png")
    capsys.readouterr()
    assert run_train(out, "--stage", "warmup", "--steps", "4", "--data", str(d), "--resume") == 2
    assert "changed since this run started (12 -> 13 pairs)" in capsys.readouterr().err
    for sub in ("rgb", "sem", "ir"):
        (d / sub / "extra.png").unlink()
    classes = json.loads((d / "classes.json").read_text())
    classes["classes"][5]["hot"] = True  # the poster becomes a hot class: the maps still read
    (d / "classes.json").write_text(json.dumps(classes))
    assert run_train(out, "--stage", "warmup", "--steps", "4", "--data", str(d), "--resume") == 2
    assert "the class palette (classes.json) differs" in capsys.readouterr().err


def test_init_from_a_condition_cache_run_needs_the_condition_cache(run_train, tmp_path, capsys):
    out = tmp_path / "w"
    assert run_train(out, "--stage", "warmup", "--steps", "1", "--condition-cache") == 0
    capsys.readouterr()
    assert run_train(tmp_path / "j", "--stage", "joint", "--steps", "1", "--init", str(out)) == 2  # a run folder
    assert "trained with --condition-cache" in capsys.readouterr().err


def test_a_signal_while_latents_are_encoded_is_one_line_and_releases_the_lock(run_train, tmp_path, capsys,
                                                                              monkeypatch):
    import latents
    from tools.synth import write_synth
    d = tmp_path / "fresh"
    write_synth(d, count=2, size=32, seed=7)  # new content: its latents are not cached yet
    real = latents.pack

    def ctrl_c(*args):
        os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends; the handler raises at once
        return real(*args)
    monkeypatch.setattr(latents, "pack", ctrl_c)
    out = tmp_path / "r"
    before = signal.getsignal(signal.SIGINT)  # the default; SIG_IGN where a shell started the tests in the background
    assert run_train(out, "--stage", "warmup", "--steps", "2", "--data", str(d)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by signal 2 before training began" in err and "Traceback" not in err
    assert not (out / "run.lock").exists() and not list(out.glob("*.safetensors"))
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back


def test_an_unreadable_latent_cache_is_encoded_again(run_train, tmp_path, capsys):
    import latents
    from tools.synth import write_synth
    d = tmp_path / "d"
    write_synth(d, count=2, size=32, seed=8)
    assert run_train(tmp_path / "a", "--stage", "warmup", "--steps", "1", "--data", str(d)) == 0
    cache = latents.tokens_path(PairedDataset(d), find_setup().ae, 0.5)
    tokens = read_safetensors(cache)
    for broken in ("truncated", "nan"):
        if broken == "truncated":
            cache.write_bytes(cache.read_bytes()[:-100])
        else:
            save_atomic(tokens | {"32x32/ir": tokens["32x32/ir"] * float("nan")}, cache)
        capsys.readouterr()
        assert run_train(tmp_path / broken, "--stage", "warmup", "--steps", "1", "--data", str(d)) == 0
        assert "cannot be used" in capsys.readouterr().out
        assert torch.equal(read_safetensors(cache)["32x32/ir"], tokens["32x32/ir"])


def test_on_a_gpu_with_an_official_base_the_batch_comes_from_the_memory_plan(env, monkeypatch, capsys):
    """memory_defaults with a stand-in card and plan (the real plan of FLUX.1-dev is tests/tools/test_memory_plan.py's):
    the largest batch that fits is chosen and said; nothing fitting is one error naming the settings that would."""
    from types import SimpleNamespace
    from pipeline import Setup
    from tools import memory_plan
    gib = memory_plan.GIB

    def plan_for(params, stage, semantic, base, side, lora_rank):  # bf16: 20 GiB resident, fp8: 10; 2 GiB a sample
        resident = {"bf16": 20, "fp8": 10}[base]
        return lambda b: {ck: {"resident": resident * gib, "total": (resident + b * (2 if not ck else 0.5)) * gib}
                          for ck in (False, True)}
    monkeypatch.setattr(memory_plan, "plan_for", plan_for)
    card = SimpleNamespace(total_memory=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    setup = Setup("official", Path("flux1-dev.safetensors"), "dev", Path("ae.safetensors"), guidance=2.5)
    cfg = train.resolve(train.TrainConfig(stage="warmup", data=str(env / "synth")), find_setup())
    card.total_memory = 48 * gib
    chosen = train.memory_defaults(cfg, setup, torch.device("cuda"))
    assert (chosen.batch_size, chosen.gradient_checkpointing) == (8, False)  # 20 + 16 GiB, +10% + 1 GiB <= 48
    assert "chose --batch-size 8 --no-gradient-checkpointing: the largest batch" in capsys.readouterr().out
    for flag, value, expected in (("batch_size", 2, (2, False)), ("gradient_checkpointing", True, (8, True))):
        given = train.memory_defaults(dataclasses.replace(cfg, **{flag: value}), setup, torch.device("cuda"))
        assert (given.batch_size, given.gradient_checkpointing) == expected  # a flag given: the plan picks the other
    card.total_memory = 24 * gib
    chosen = train.memory_defaults(cfg, setup, torch.device("cuda"))
    assert (chosen.batch_size, chosen.gradient_checkpointing) == (1, True)  # 20.5 GiB only with checkpointing
    card.total_memory = 16 * gib
    with pytest.raises(ValueError, match="nothing fits: batch 1 with gradient checkpointing needs 20.5 GiB .*"
                                         "--base-dtype fp8 fits \\(batch 4, gradient checkpointing\\)"):
        train.memory_defaults(cfg, setup, torch.device("cuda"))
    demo = train.memory_defaults(cfg, find_setup(), torch.device("cpu"))
    assert (demo.batch_size, demo.gradient_checkpointing) == (8, False)
