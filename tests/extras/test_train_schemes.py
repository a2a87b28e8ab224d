"""train.py with the other schemes of the ablation (extras/schemes.py): scheme A (zeroconv) and C (adapter) warm up
training only their semantic modules and start from their presets; the overlay baseline trains only LoRA."""

import dataclasses

import pytest

import train
from pipeline import find_setup
from conftest import check_warmup_output, check_lora_only_output


@pytest.mark.parametrize("scheme", ["zeroconv", "adapter"])
def test_warmup_trains_only_semantic_modules(run_train, tmp_path, scheme):
    out = tmp_path / "w"
    assert run_train(out, "--stage", "warmup", "--scheme", scheme, "--steps", "3") == 0
    check_warmup_output(out, scheme)


@pytest.mark.parametrize("scheme", ["overlay"])
def test_joint_baselines_train_only_lora(run_train, tmp_path, scheme):
    out = tmp_path / scheme
    assert run_train(out, "--stage", "joint", "--scheme", scheme, "--steps", "2", "--lora-rank", "2") == 0
    check_lora_only_output(out)


@pytest.mark.parametrize("scheme", ["zeroconv", "adapter"])
def test_scheme_presets_fill_the_unset_semantic_flags(env, scheme):
    """Schemes A and C start from extras.schemes.PRESETS (the separate attention on tokens of the hidden size); a
    --sem-* flag given wins; the joint stage's condition dropout applies to them."""
    from extras.schemes import PRESETS
    setup = find_setup()
    cfg = train.resolve(train.parse_args(["--stage", "joint", "--scheme", scheme]), setup)
    assert (cfg.sem_attention, cfg.sem_token_dim, cfg.sem_drop) == ("separate", 0, 0.1)
    assert train.semantic_config(cfg) == PRESETS[scheme]
    cfg = train.resolve(train.parse_args(["--scheme", scheme, "--sem-blocks", "double"]), setup)
    assert train.semantic_config(cfg) == dataclasses.replace(PRESETS[scheme], blocks="double")
