"""tools/eval.py: one model scored end to end, and the ablation trains and scores every scheme it is given (scheme B's
cheaper options with their settings), refusing unknown names before any training."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

import data
from conftest import make_dataset_root, save_image
from checkpoint import read_metadata, read_safetensors, save_atomic
from data import PairedDataset
from flux_model import PRESETS
from pipeline import generate, load_pipeline
from tools import eval as evaluation
from tools import synth


def test_eval_two_pairs_end_to_end(run_train, env, tmp_path, capsys):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    rc = evaluation.main(["--data", str(env / "synth"), "--ckpt", str(w / "final.safetensors"), "--steps", "2",
                          "--limit", "2", "--no-progress", "--save", str(tmp_path / "pred")])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n_images"] == 2 and 0 < line["ssim"] <= 1 and "hallucination_rate" in line and line["steps"] == 2
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2


@pytest.fixture
def in_process(monkeypatch):
    """The ablation's train.py runs called in this process, with the flags its subprocess gets (the subprocess
    itself: test_ablation_tiny_mode), so each costs a run, not an interpreter start."""
    import train
    monkeypatch.setattr(evaluation, "train_run", lambda config: train.main(evaluation.train_command(config)[2:]))


def ablation_args(env, out, *args):
    return ["--ablation", "--train-steps", "2", "--steps", "2", "--limit", "2", "--train-data", str(env / "synth"),
            "--data", str(env / "synth"), "--out", str(out), "--batch-size", "2", "--no-progress", "--seeds", "0",
            "--shifts", "", "--coarse", "", *args]


def test_ablation_tiny_mode(env, tmp_path):
    out = tmp_path / "abl"
    assert evaluation.main(ablation_args(env, out, "--schemes", "none,xattn")) == 0
    table = (out / "table.md").read_text()
    assert "B: separate cross-attention" in table and "none" in table
    assert (out / "comparison.png").is_file() and (out / "loss_curves.png").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["train_steps"] == 2 and res["protocol"]["eval_steps"] == 2


def test_ablation_runs_scheme_b_options_with_their_settings(env, in_process, tmp_path, capsys):
    """--schemes xattn-double / xattn-half train scheme B with --sem-blocks double / half the width and heads, so
    their quality can be set against what tools.bench says they save; an unknown name is refused before training."""
    out = tmp_path / "abl-b"
    assert evaluation.main(ablation_args(env, out, "--schemes", "xattn-quarter")) == 2
    assert "unknown scheme" in capsys.readouterr().err
    assert not out.exists()
    assert evaluation.main(ablation_args(env, out, "--schemes", "xattn-double,xattn-half", "--train-steps", "1")) == 0
    hidden, heads = PRESETS["tiny"].hidden_size, PRESETS["tiny"].num_heads
    double = load_pipeline(out / "xattn-double" / "seed0" / "final.safetensors", quiet=True).model.semantic
    half = load_pipeline(out / "xattn-half" / "seed0" / "final.safetensors", quiet=True).model.semantic
    assert double.config.blocks == "double" and len(double.single_blocks) == 0 and len(double.double_blocks) == 2
    assert half.config.inner_dim == hidden // 2 and half.config.num_heads == heads // 2
    table = (out / "table.md").read_text()
    assert "B, double blocks only" in table and "B, half width" in table


def test_ablation_reuses_a_finished_run_only_if_trained_with_these_settings(env, in_process, tmp_path, capsys):
    """A finished scheme is scored again only when its recorded train_args equal this invocation's; a changed
    setting is refused by name (results.json would describe models that were never trained), --retrain trains it."""
    out = tmp_path / "abl"
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", "--train-steps", "1")) == 0
    final = out / "none" / "seed0" / "final.safetensors"
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
    assert res["train_args"]["none (RGB only)"]["0"]["steps"] == 3


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
    def nan_for_pair_1(pipe, rgb, sem, steps, seed, **kw):
        pred = generate(pipe, rgb, sem, steps=steps, seed=seed, **kw)
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


def test_the_misaligned_split_moves_the_map_the_model_sees_and_scores_the_true_labels(env, monkeypatch):
    """Sampling(shift=s): pair i's conditioning map is its label map moved by s pixels along SHIFT_DIRS[i % 4]
    (then coarsened by `down`), rendered in the palette; the regions are still scored on the true labels."""
    ds = PairedDataset(env / "synth")
    how = evaluation.Sampling(steps=1, shift=3)
    item = ds[1]
    seen = how.conditioning_map(item, 1, ds.classes)
    dy, dx = (3 * d for d in evaluation.SHIFT_DIRS[1])
    moved = data.misalign(item["sem_ids"], dy, dx)
    assert torch.equal(seen, data.render_semantic(moved, ds.classes))
    assert not torch.equal(moved, item["sem_ids"])                       # the map really moved
    assert torch.equal(moved[:, dx:], item["sem_ids"][:, :-dx])          # by dx columns, content intact
    assert torch.equal(evaluation.Sampling().conditioning_map(item, 1, ds.classes), item["sem"])
    given, scored_on = [], []
    monkeypatch.setattr(evaluation, "generate", lambda pipe, rgb, sem, **kw: (given.append(sem), torch.rand(
        len(sem), 1, *sem.shape[-2:]))[1])
    monkeypatch.setattr(evaluation.metrics, "evaluate_image", lambda pred, target, ids, **kw: (
        scored_on.append(ids), {})[1])
    monkeypatch.setattr(evaluation.metrics, "summarize", lambda *a, **k: {})
    evaluation.evaluate(None, ds, how, limit=2, progress=False)
    assert torch.equal(given[0][1], seen)
    assert torch.equal(scored_on[1], item["sem_ids"])                    # true labels, not the moved ones


def test_the_ceiling_row_is_the_autoencoders_round_trip_of_the_ground_truth(env):
    ds = PairedDataset(env / "synth")
    pipe = load_pipeline(None, quiet=True)
    top = evaluation.ceiling(pipe, ds, limit=2, progress=False)
    rec = [evaluation.reconstruct(pipe.ae, ds[i]["ir"][None])[0] for i in range(2)]
    want = evaluation.score(ds, ((ds[i], rec[i]) for i in range(2)))
    assert top["psnr"] == want["psnr"] and top["n_images"] == 2
    direct = data.rgb_to_ir(pipe.ae.decode(pipe.ae.encode(data.ir_to_rgb(ds[0]["ir"][None]))).clamp(-1, 1))
    assert torch.equal(rec[0], direct[0])


def test_the_sampler_ceiling_rows_are_a_second_draw_and_the_mean_ir_through_the_autoencoder(env):
    """sampler_ceilings: pair i's second draw (synth.redraw with rng [seed, i, 1]) and mean IR (synth.mean_ir with
    rng [seed, i, 2]), each through `reconstruct`, scored like a model's output against the ground truth; the same
    seed gives the same rows."""
    ds = PairedDataset(env / "synth")
    pipe = load_pipeline(None, quiet=True)
    scenes = synth.set_scenes(env / "synth")
    rows = evaluation.sampler_ceilings(pipe, ds, scenes, limit=2, seed=3, draws=2, progress=False)
    assert list(rows) == [evaluation.SAMPLER_CEILING, evaluation.MEAN_CEILING]
    rec = lambda ir: evaluation.reconstruct(pipe.ae, torch.from_numpy(ir)[None, None])[0]  # noqa: E731  [1, H, W]
    second, mean = [], []
    for i in range(2):
        scene = scenes[ds[i]["name"]]
        drawn = synth.render_scene(synth.redraw(scene, np.random.default_rng([3, i, 1])))[2]
        second.append(rec(synth.ir_read_back(drawn)))
        mean.append(rec(synth.mean_ir(scene, 2, np.random.default_rng([3, i, 2]))))
        assert not torch.equal(second[-1], rec(ds[i]["ir"][0].numpy()))  # a second draw, not the ground truth
    for row, preds in ((evaluation.SAMPLER_CEILING, second), (evaluation.MEAN_CEILING, mean)):
        want = evaluation.score(ds, ((ds[i], preds[i]) for i in range(2)))
        assert evaluation.jsonable(rows[row]) == evaluation.jsonable(want) and rows[row]["n_images"] == 2
    again = evaluation.sampler_ceilings(pipe, ds, scenes, limit=2, seed=3, draws=2, progress=False)
    assert evaluation.jsonable(again) == evaluation.jsonable(rows)


def table_rows(out: str) -> list[str]:
    """The method names of the Markdown table printed in `out`."""
    return [l.split(" | ")[0][2:] for l in out.splitlines() if l.startswith("| ") and not l.startswith("| Method")]


def test_ceiling_adds_the_sampler_ceiling_on_a_synth_set_and_a_note_elsewhere(env, monkeypatch, tmp_path, capsys):
    """--ceiling on a tools.synth set: the autoencoder, second-draw and mean-IR rows above the model, each with a JSON
    line, the same on a second run. On a set without synth.json: one note and the autoencoder row only. A synth.json
    that does not match the files is refused in one line before the model loads."""
    common = ["--base", "--steps", "1", "--limit", "2", "--no-progress", "--ceiling"]
    assert evaluation.main(["--data", str(env / "synth")] + common) == 0
    out = capsys.readouterr().out
    ceilings = [evaluation.CEILING, evaluation.SAMPLER_CEILING, evaluation.MEAN_CEILING]
    assert table_rows(out) == ceilings + ["base"] and "note:" not in out
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    assert [l["name"] for l in lines] == ["ceiling"] + ceilings[1:] + ["base"]
    assert all(l["n_images"] == 2 for l in lines)
    assert evaluation.main(["--data", str(env / "synth")] + common) == 0
    assert [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")][:3] == lines[:3]
    plain = tmp_path / "plain"
    shutil.copytree(env / "synth", plain)
    (plain / "synth.json").unlink()
    assert evaluation.main(["--data", str(plain)] + common) == 0
    out = capsys.readouterr().out
    notes = [l for l in out.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "not a tools.synth set" in notes[0] and "only the autoencoder ceiling" in notes[0]
    assert table_rows(out) == [evaluation.CEILING, "base"]
    (plain / "synth.json").write_text(json.dumps({"seed": 7, "count": 12, "size": 64}))
    refused_before_loading(monkeypatch, capsys, [(["--data", str(plain), "--base", "--ceiling"],
                                                  "pair 000000 does not re-render from its scene")])


def test_the_seed_table_gives_mean_and_sample_sd_over_seeds():
    runs = [{"psnr": p, "ssim": 0.5, "all": {"miss_rate": m, "hallucination_rate": 0.0},
             "decoy": {"hallucination_rate": None}} for p, m in ((20.0, 0.1), (22.0, 0.3), (24.0, 0.2))]
    table = evaluation.seed_table({"B": runs, "one seed": runs[:1]}, {"B": {"params": 7}})
    rows = table.splitlines()
    assert "| B | 22.00 ± 2.00 |" in rows[2] and "20.0% ± 10.0" in rows[2] and "n/a" in rows[2] and "| 7 |" in rows[2]
    assert "| one seed | 20.00 |" in rows[3] and "±" not in rows[3]
    split = evaluation.seed_table({"B": [{"shift": r} for r in runs]}, {},
                                  {"shift: PSNR (dB)": lambda s: s["shift"]["psnr"]})
    assert "| B | 22.00 ± 2.00 |" in split  # a split's PSNR column is in dB, not a rate


def test_ablation_trains_each_seed_and_jittered_schemes_with_their_settings(env, in_process, tmp_path):
    out = tmp_path / "abl"
    assert evaluation.main(ablation_args(env, out, "--schemes", "zeroconv+jitter", "--seeds", "0,1",
                                         "--train-steps", "1", "--jitter", "2", "--shifts", "2")) == 0
    for seed in (0, 1):
        recorded = json.loads(read_metadata(out / "zeroconv+jitter" / f"seed{seed}" / "final.safetensors")["train_args"])
        assert recorded["seed"] == seed and recorded["sem_jitter"] == 2
    res = json.loads((out / "results.json").read_text())
    name = "A: zero-conv, trained on misaligned maps"
    assert set(res["per_seed"][name]) == {"0", "1"} and set(res["per_seed"][name]["0"]) == {"aligned", "shift 2 px"}
    assert res["ceiling"]["n_images"] == 2
    assert list(res["ceilings"]) == [evaluation.CEILING, evaluation.SAMPLER_CEILING, evaluation.MEAN_CEILING]
    table = (out / "table.md").read_text()
    assert "ceiling: autoencoder reconstruction" in table and "shift 2 px: PSNR (dB)" in table
    for row in (evaluation.SAMPLER_CEILING, evaluation.MEAN_CEILING):  # in the main table and the misaligned one
        assert table.count(f"| {row} |") == 2


def test_the_sweep_scores_each_setting_and_draws_the_figure(run_train, env, tmp_path, capsys):
    """--sweep guidance: one JSON line per value (w = 1 is the plain evaluation), the table, a figure and its
    numbers."""
    w = tmp_path / "j"
    assert run_train(w, "--stage", "joint", "--steps", "1", "--lora-rank", "2", "--sem-drop", "0.5") == 0
    common = ["--data", str(env / "synth"), "--ckpt", str(w / "final.safetensors"), "--steps", "1", "--limit", "2",
              "--no-progress"]
    assert evaluation.main(common) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "sweep.png"
    assert evaluation.main(common + ["--sweep", "guidance", "--values", "1,2", "--save", str(out)]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert [l["sem_guidance"] for l in lines] == [1.0, 2.0] and lines[0]["psnr"] == plain["psnr"]
    assert out.is_file() and len(json.loads(out.with_suffix(".json").read_text())) == 2
    assert evaluation.main(common + ["--sweep", "strength", "--values", "1,x"]) == 2


def test_the_thermalgen_protocol_fails_before_any_generation_when_a_piece_is_missing(env, monkeypatch, capsys):
    """--protocol thermalgen is set up before the model samples: a missing package or weight file is one line and
    nothing is generated (here: no torchvision, or no AlexNet weights at the given path)."""
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: pytest.fail("generated before the protocol check"))
    rc = evaluation.main(["--data", str(env / "synth"), "--base", "--steps", "1", "--limit", "2", "--no-progress",
                          "--protocol", "thermalgen", "--lpips-weights", str(env / "missing-alexnet.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and ("torchvision" in err or "alexnet" in err.lower())


def test_the_thermalgen_protocol_scores_psnr_and_ssim_without_torchvision(env, monkeypatch, capsys):
    """A CPU install (no torchvision, no weight files): --metrics psnr,ssim (also the default) scores the
    evaluation's own predictions as protocol.thermalgen_scores does; flags that would change nothing are refused."""
    from tools import protocol
    monkeypatch.setitem(sys.modules, "torchvision", None)
    seen = []
    update = protocol.ThermalGenProtocol.update
    monkeypatch.setattr(protocol.ThermalGenProtocol, "update",
                        lambda self, p, t: (seen.append((p.clone(), t.clone())), update(self, p, t))[1])
    common = ["--data", str(env / "synth"), "--base", "--steps", "1", "--limit", "2", "--no-progress"]
    assert evaluation.main(common + ["--protocol", "thermalgen", "--metrics", "psnr,ssim"]) == 0
    out = capsys.readouterr().out
    assert "--protocol thermalgen scores psnr,ssim (not lpips,fid: ask with --metrics)" in out
    got = json.loads(out.strip().splitlines()[-1])["thermalgen"]
    preds, targets = (torch.cat([pair[i] for pair in seen]) for i in (0, 1))
    want = protocol.thermalgen_scores(preds, targets, scores=("psnr", "ssim"))  # in one batch: rounding may differ
    assert got == pytest.approx(want, rel=1e-6) and got["n_images"] == 2
    for flags, message in ((["--metrics", "psnr"], "--metrics: no effect without --protocol thermalgen"),
                           (["--protocol", "thermalgen", "--metrics", "psnr,mse"], "unknown score(s) mse"),
                           (["--protocol", "thermalgen", "--metrics", "psnr", "--lpips-weights", "a.pth"],
                            "--lpips-weights is for LPIPS, which --metrics psnr leaves out")):
        assert evaluation.main(common + flags) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_a_run_recorded_before_a_setting_existed_is_reused_with_that_settings_default(env, in_process, tmp_path):
    """A field missing from a finished run's train_args was added to train.py later; the run behaved as its
    default, so it is reused (a field that differs from the default is still refused)."""
    out = tmp_path / "abl"
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", "--train-steps", "1")) == 0
    final = out / "none" / "seed0" / "final.safetensors"
    sd, meta = read_safetensors(final), read_metadata(final)
    recorded = json.loads(meta["train_args"])
    del recorded["fsdp"]
    save_atomic(sd, final, meta | {"train_args": json.dumps(recorded)})
    want = evaluation.train_config("none", evaluation_args(env, out), final.parent, 0)
    assert evaluation.check_reusable(final, want)["steps"] == 1
    recorded["lr"] = 0.5
    save_atomic(sd, final, meta | {"train_args": json.dumps(recorded)})
    with pytest.raises(ValueError, match="lr=0.5"):
        evaluation.check_reusable(final, want)


def evaluation_args(env, out):
    import argparse
    return argparse.Namespace(train_data=str(env / "synth"), train_steps=1, batch_size=2, lr=3e-4, lora_rank=8,
                              progress=False, jitter=4)


def test_score_only_trains_nothing_and_leaves_missing_seeds_out(env, in_process, tmp_path, capsys):
    out = tmp_path / "abl"
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", "--train-steps", "1")) == 0
    capsys.readouterr()
    assert evaluation.main(ablation_args(env, out, "--schemes", "none", "--train-steps", "1", "--seeds", "0,1",
                                         "--score-only")) == 0
    assert "none seed 1: not trained, left out" in capsys.readouterr().out
    assert not (out / "none" / "seed1").exists()
    assert set(json.loads((out / "results.json").read_text())["per_seed"]["none (RGB only)"]) == {"0"}


# ----------------------------------------------------------------------------------------------------------------
# Options checked before the first sample; scores that outlive a later failure; the test set's classes


class MeanFeatures(torch.nn.Module):
    """A tiny FID feature network: per-image mean, spread, maximum and minimum."""

    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x.amax((1, 2, 3)), x.amin((1, 2, 3))], 1)


class Needs299(torch.nn.Module):
    """An Inception that does not resize: refuses the 64-pixel test images."""

    def forward(self, x):
        assert x.shape[-1] == 299, "expects 299x299 inputs"
        return x.mean((2, 3))


def refused_before_loading(monkeypatch, capsys, cases) -> None:
    """Each (flags, message) of `cases` is exit status 2 with one line holding `message`, before any weights load."""
    monkeypatch.setattr(evaluation, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the checks"))
    for flags, message in cases:
        assert evaluation.main(flags + ["--steps", "1", "--limit", "2", "--no-progress"]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err


def test_eval_options_are_checked_before_the_model_loads(env, monkeypatch, tmp_path, capsys):
    """A --fid-model that is not TorchScript (a state dict), a --save that is a file, a sweep's --save that is not a
    picture name: one line each, before any weights load or sample."""
    state_dict = tmp_path / "inception.pt"
    torch.save({"w": torch.zeros(2)}, state_dict)
    (tmp_path / "taken").write_text("a file")
    synth = ["--data", str(env / "synth")]
    refused_before_loading(monkeypatch, capsys, [
        (synth + ["--base", "--fid-model", str(state_dict)], f"--fid-model {state_dict}: not a TorchScript file"),
        (synth + ["--base", "--save", str(tmp_path / "taken")], f"--save {tmp_path / 'taken'}: is a file"),
        (synth + ["--ckpt", str(tmp_path / "x.safetensors"), "--sweep", "guidance", "--save",
                  str(tmp_path / "sweep.txt")], f"--save {tmp_path / 'sweep.txt'}: unknown image extension")])


def test_ckpt_with_base_and_a_resume_state_as_ckpt_are_refused(env, monkeypatch, tmp_path, capsys):
    """--ckpt X --base would score the base under X's name; a resume.pt is not weights: each is one line."""
    synth = ["--data", str(env / "synth")]
    refused_before_loading(monkeypatch, capsys, [
        (synth + ["--ckpt", str(tmp_path / "x.safetensors"), "--base"], "--ckpt and --base: pick one"),
        (synth + ["--ckpt", str(tmp_path / "run" / "resume.pt")], "a resume state (read by --resume)")])


def test_fid_uses_the_evaluations_own_predictions_and_a_failing_network_keeps_the_scores(env, monkeypatch,
                                                                                          tmp_path, capsys):
    """FID is computed from the predictions that were scored (each pair sampled once), and a network that fails on
    them is one line after the table and the JSON line of the scores that were computed."""
    calls, preds = [], []

    def recording(pipe, rgb, sem, **kw):
        calls.append(len(rgb))
        pred = generate(pipe, rgb, sem, **kw)
        preds.extend(pred.cpu())
        return pred
    monkeypatch.setattr(evaluation, "generate", recording)
    good, bad = tmp_path / "feats.pt", tmp_path / "needs299.pt"
    torch.jit.script(MeanFeatures()).save(str(good))
    torch.jit.script(Needs299()).save(str(bad))
    common = ["--data", str(env / "synth"), "--base", "--steps", "1", "--limit", "2", "--no-progress"]
    assert evaluation.main(common + ["--fid-model", str(good)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(calls) == 2                                               # no second sampling pass for FID
    ds = PairedDataset(env / "synth")
    features = lambda images: evaluation.metrics.fid_features_from_model(torch.jit.load(str(good)), images)  # noqa
    want = evaluation.metrics.fid(features(torch.stack([ds[0]["ir"], ds[1]["ir"]])), features(torch.stack(preds)))
    assert line["fid"] == pytest.approx(want)
    assert evaluation.main(common + ["--fid-model", str(bad)]) == 2
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert any(l.startswith("| base") for l in out)                      # the table
    scores = json.loads(out[-1])
    assert scores["n_images"] == 2 and scores["psnr"] == line["psnr"] and "fid" not in scores
    assert "the network failed on pair" in captured.err and len(captured.err.splitlines()) == 1


def test_eval_reads_label_ids_with_the_checkpoints_classes_and_refuses_a_different_table(run_train, env, monkeypatch,
                                                                                         tmp_path, capsys):
    """A test set of label-id maps without classes.json is rendered in the palette the checkpoint was trained with
    (as sample.py does); one whose classes.json differs from it is refused naming both. --ckpt may be the run
    folder."""
    run = tmp_path / "w"
    assert run_train(run, "--stage", "warmup", "--steps", "1") == 0
    final = run / "final.safetensors"
    own = data.class_table([(0, "ground", (10, 20, 30), False), (1, "walker", (200, 0, 0), True),
                            (2, "cart", (0, 200, 0), False)])
    meta = read_metadata(final)
    cfg = json.loads(meta["config"]) | {"classes": [{"id": c.id, "name": c.name, "color": list(c.color),
                                                      "hot": c.hot} for c in own]}
    save_atomic(read_safetensors(final), final, meta | {"config": json.dumps(cfg)})
    root = make_dataset_root(tmp_path / "ids", names=("a", "b"), hw=(64, 64))
    ids = np.zeros((64, 64), np.uint8)
    ids[:, 20:40], ids[:, 40:] = 1, 2
    for n in ("a", "b"):
        save_image(ids, root / "sem" / f"{n}.png")
    seen = []
    monkeypatch.setattr(evaluation, "generate", lambda pipe, rgb, sem, **kw: (
        seen.append(sem), torch.rand(len(sem), 1, *sem.shape[-2:]))[1])
    common = ["--data", str(root), "--ckpt", str(run), "--steps", "1", "--no-progress"]
    assert evaluation.main(common) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ckpt"] == str(final)
    assert torch.equal(seen[0][0], data.render_semantic(torch.from_numpy(ids).long(), own))
    assert seen[0][0][:, 0, 30].tolist() == pytest.approx([200 / 127.5 - 1, -1, -1])  # walker's red, not synthetic
    data.save_classes(data.DEFAULT_CLASSES, root / "classes.json")
    assert evaluation.main(common) == 2
    err = capsys.readouterr().err
    assert str(root / "classes.json") in err and str(final) in err and len(err.splitlines()) == 1
    assert "first difference: (0, 'sky', (70, 130, 180), False) in the test set, (0, 'ground'" in err
