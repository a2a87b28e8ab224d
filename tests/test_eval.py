"""eval.py: one model scored end to end, and the ablation trains and scores every scheme it is given (scheme B's
cheaper options with their settings), refusing unknown names before any training."""

import json

import pytest

import eval as evaluation
from checkpoint import read_metadata
from data import PairedDataset
from flux_model import PRESETS
from pipeline import generate, load_pipeline


def test_eval_two_pairs_end_to_end(run_train, env, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    rc = evaluation.main(["--data", str(env / "synth"), "--ckpt", str(w / "final.safetensors"), "--steps", "2",
                          "--limit", "2", "--no-progress", "--save", str(tmp_path / "pred")])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n_images"] == 2 and 0 < line["ssim"] <= 1 and "hallucination_rate" in line and line["steps"] == 2
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2


def ablation_args(env, out, *args):
    return ["--ablation", "--train-steps", "2", "--steps", "2", "--limit", "2", "--train-data", str(env / "synth"),
            "--data", str(env / "synth"), "--out", str(out), "--batch-size", "2", "--no-progress", *args]


def test_ablation_tiny_mode(env, tmp_path):
    out = tmp_path / "abl"
    assert evaluation.main(ablation_args(env, out, "--schemes", "none,xattn")) == 0
    table = (out / "table.md").read_text()
    assert "B: cross-attention" in table and "none" in table
    assert (out / "comparison.png").is_file() and (out / "loss_curves.png").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["train_steps"] == 2 and res["protocol"]["eval_steps"] == 2


def test_ablation_runs_scheme_b_options_with_their_settings(env, tmp_path, capsys):
    """--schemes xattn-double / xattn-half train scheme B with --sem-blocks double / half the width and heads, so
    their quality can be set against what bench.py says they save; an unknown name is refused before training."""
    out = tmp_path / "abl-b"
    assert evaluation.main(ablation_args(env, out, "--schemes", "xattn-quarter")) == 2
    assert "unknown scheme" in capsys.readouterr().err
    assert not out.exists()
    assert evaluation.main(ablation_args(env, out, "--schemes", "xattn-double,xattn-half", "--train-steps", "1")) == 0
    hidden, heads = PRESETS["tiny"].hidden_size, PRESETS["tiny"].num_heads
    double = load_pipeline(out / "xattn-double" / "final.safetensors", quiet=True).model.semantic
    half = load_pipeline(out / "xattn-half" / "final.safetensors", quiet=True).model.semantic
    assert double.config.blocks == "double" and len(double.single_blocks) == 0 and len(double.double_blocks) == 2
    assert half.config.inner_dim == hidden // 2 and half.config.num_heads == heads // 2
    table = (out / "table.md").read_text()
    assert "B, double blocks only" in table and "B, half width" in table


def test_ablation_reuses_a_finished_run_only_if_trained_with_these_settings(env, tmp_path, capsys):
    """A finished scheme is scored again only when its recorded train_args equal this invocation's; a changed
    setting is refused by name (results.json would describe models that were never trained), --retrain trains it."""
    out = tmp_path / "abl"
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", "--train-steps", "1")) == 0
    final = out / "none" / "final.safetensors"
    before = final.read_bytes()
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", "--train-steps", "1")) == 0
    assert final.read_bytes() == before                                  # same settings: reused, not retrained
    capsys.readouterr()
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", "--train-steps", "3", "--lr", "1e-2")) == 2
    err = capsys.readouterr().err
    assert "steps=1" in err and "--train-steps" in err and "--retrain" in err and len(err.splitlines()) == 1
    assert json.loads((out / "results.json").read_text())["protocol"]["train_steps"] == 1
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", "--train-steps", "3", "--lr", "1e-2",
                                         "--retrain")) == 0
    res = json.loads((out / "results.json").read_text())
    recorded = json.loads(read_metadata(final)["train_args"])
    assert (recorded["steps"], recorded["lr"]) == (3, 1e-2) == (res["protocol"]["train_steps"], res["protocol"]["lr"])
    assert res["train_args"]["none (RGB only)"]["steps"] == 3


@pytest.mark.parametrize("flag", ["--steps", "--train-steps", "--limit", "--batch-size", "--lora-rank"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_counts_are_refused_naming_the_flag(env, tmp_path, capsys, flag, value):
    out = tmp_path / "abl"
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", flag, value)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {flag} must be a positive integer, got {value}\n"
    assert not out.exists()


def test_a_non_finite_prediction_is_an_error_never_a_score(env, monkeypatch, capsys):
    """A NaN image is "cold" everywhere: scored, it would read as 0% hallucination. Pair 1 comes out NaN here."""
    def nan_for_pair_1(pipe, rgb, sem, steps, seed):
        pred = generate(pipe, rgb, sem, steps=steps, seed=seed)
        pred[[k for k, s in enumerate(seed) if s == 1]] = float("nan")  # pair i is sampled with seed i
        return pred
    monkeypatch.setattr(evaluation, "generate", nan_for_pair_1)
    monkeypatch.setattr(evaluation.metrics, "summarize", lambda *a, **k: pytest.fail("a NaN prediction was scored"))
    rc = evaluation.main(["--data", str(env / "synth"), "--base", "--steps", "1", "--limit", "2", "--no-progress"])
    err = capsys.readouterr().err
    name = PairedDataset(env / "synth").names[1]
    assert rc == 2 and f"pair 1 ({name}) is not finite" in err and len(err.splitlines()) == 1


def test_a_misspelt_decoy_class_is_refused_listing_the_dataset_classes(env, capsys):
    rc = evaluation.main(["--data", str(env / "synth"), "--base", "--decoys", "poster,car_parkd", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--decoys car_parkd: not a class" in err and "car_parked" in err and "person" in err
