"""eval.py: one model scored end to end, and the ablation trains and scores every scheme it is given (scheme B's
cheaper options with their settings), refusing unknown names before any training."""

import json

import eval as evaluation
from flux_model import PRESETS
from pipeline import load_pipeline


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
