"""train.py --condition-cache (extras/condition_cache.py): a run choice that the outputs record and that models
rebuilt from them, and later stages on such a base, follow."""

import json

from checkpoint import read_metadata


def test_condition_cache_is_a_run_choice_that_models_and_later_stages_follow(run_train, env, tmp_path, capsys,
                                                                             monkeypatch):
    """--condition-cache trains the base in that mode and records it; a model rebuilt from the file (and the base
    sampled alone) runs in it; a later stage on that base without the flag is refused in one line; a LoRA on a
    Kontext-trained base may adopt it."""
    import pipeline
    out = tmp_path / "base"
    assert run_train(out, "--stage", "base", "--scheme", "none", "--steps", "2", "--condition-cache") == 0
    assert json.loads(read_metadata(out / "final.safetensors")["config"])["condition_cache"] is True
    lora = tmp_path / "lora"
    assert run_train(lora, "--stage", "joint", "--scheme", "none", "--steps", "1", "--condition-cache") == 0
    assert pipeline.load_pipeline(lora / "final.safetensors", quiet=True).condition_cache
    assert not pipeline.load_pipeline(None, quiet=True).condition_cache  # the world's Kontext base
    weights = tmp_path / "weights"
    (weights / "demo").mkdir(parents=True)
    (weights / "demo" / "ae.safetensors").write_bytes((env / "weights" / "demo" / "ae.safetensors").read_bytes())
    (weights / "demo" / "flux.safetensors").write_bytes((out / "final.safetensors").read_bytes())
    monkeypatch.setenv("FLUX_IR_WEIGHTS", str(weights))
    assert pipeline.load_pipeline(None, quiet=True).condition_cache  # the base alone, in its own mode
    capsys.readouterr()
    assert run_train(tmp_path / "w", "--stage", "warmup", "--steps", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--condition-cache" in err[0]
    assert run_train(tmp_path / "w", "--stage", "warmup", "--steps", "1", "--condition-cache") == 0
