"""pipeline.py: the trained-key predicate, strict loading of train.py outputs (every wrong key named), generation
of the right size independent of batching, and the committed demo weights."""

import json
from pathlib import Path

import pytest
import torch

import data
import pipeline
from checkpoint import CheckpointError, read_metadata, read_safetensors, save_atomic

ROOT = Path(__file__).resolve().parents[2]


def test_trained_keys_are_semantic_and_lora_only():
    assert pipeline.is_trained_key("semantic.double_blocks.0.scale")
    assert pipeline.is_trained_key("double_blocks.0.img_attn.qkv.lora_A.weight")
    assert not pipeline.is_trained_key("double_blocks.0.img_attn.qkv.weight")
    assert set(pipeline.SCHEMES) == {"xattn", "zeroconv", "adapter", "overlay", "none"}


@pytest.mark.parametrize("semantic,form", [
    ({"scheme": "xattn", "attention": "decoupled", "token_dim": 64}, "SemanticModule"),  # the default B: the core's
    ({"scheme": "xattn"}, "SchemeModule"),  # a run config from before the decoupled form: the separate B (extras)
    ({"scheme": "adapter", "attention": "separate", "token_dim": 0}, "SchemeModule")])
def test_a_run_config_builds_its_semantic_module(env, semantic, form):
    """build_model attaches the module the run config names (the default B from the core, another from
    extras/schemes.py); sampling goes through the model itself unless the run used the condition cache."""
    from sem_cross_attn import SemanticConfig
    setup = pipeline.find_setup()
    model = pipeline.build_model(setup, {"scheme": semantic["scheme"], "semantic": semantic}, "cpu", torch.float32)
    assert type(model.semantic).__name__ == form
    assert model.semantic.config == SemanticConfig.from_dict(semantic)
    assert pipeline.build_model(setup, {"scheme": "overlay"}, "cpu", torch.float32).semantic is None
    pipe = pipeline.load_pipeline(None, quiet=True)
    assert not pipe.condition_cache and pipe.sampler() is pipe.model  # the cache: tests/extras/test_condition_cache


def test_sampling_writes_the_right_size_whatever_the_batch(env):
    pipe = pipeline.load_pipeline(None, quiet=True)
    rgb = torch.zeros(2, 3, 48, 80)
    ir = pipeline.generate(pipe, rgb, rgb, steps=2, seed=[0, 1])
    assert ir.shape == (2, 1, 48, 80) and ir.min() >= 0 and ir.max() <= 1
    again = pipeline.generate(pipe, rgb[:1], rgb[:1], steps=2, seed=[1])
    torch.testing.assert_close(again[0], ir[1])  # a pair's result does not depend on its batch


def test_trained_weights_load_strictly(run_train, tmp_path):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    pipe = pipeline.load_pipeline(w / "final.safetensors", quiet=True)
    sd = read_safetensors(w / "final.safetensors")
    assert all(torch.equal(pipe.model.state_dict()[k], v) for k, v in sd.items())
    meta = read_metadata(w / "final.safetensors")
    dropped = sorted(sd)[0]
    broken = {k: v for k, v in sd.items() if k != dropped} | {"semantic.extra.weight": torch.zeros(1)}
    save_atomic(broken, tmp_path / "broken.safetensors", meta)
    with pytest.raises(CheckpointError) as e:
        pipeline.load_pipeline(tmp_path / "broken.safetensors", quiet=True)
    assert dropped in str(e.value) and "semantic.extra.weight" in str(e.value) and "--scheme" in str(e.value)
    cfg = json.loads(meta["config"]) | {"base_preset": "dev"}
    save_atomic(sd, tmp_path / "dev.safetensors", {"config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match="'dev' base"):
        pipeline.load_pipeline(tmp_path / "dev.safetensors", quiet=True)


def test_attention_maps_cover_every_block_at_the_token_grid(run_train, tmp_path):
    w = tmp_path / "w"
    assert run_train(w, "--stage", "warmup", "--steps", "1") == 0
    pipe = pipeline.load_pipeline(w / "final.safetensors", quiet=True)
    maps = pipeline.attention_maps(pipe, torch.zeros(1, 3, 32, 48), torch.zeros(1, 3, 32, 48), steps=4)
    p = pipe.model.params
    assert len(maps) == p.depth + p.depth_single_blocks
    assert all(m.shape == (2 * 2 * 3, 2 * 3) for m in maps.values())  # [L_img = x_t + x_cond tokens, N]
    torch.testing.assert_close(maps["double.0"].sum(-1), torch.ones(12))


def test_demo_weights_load_strictly_and_sample(monkeypatch):
    """weights/demo/ as shipped: the base, the autoencoder and the scheme B weights load strictly, and the example
    pair samples to an image of its own size."""
    monkeypatch.delenv("FLUX_IR_WEIGHTS", raising=False)
    setup = pipeline.find_setup()
    if setup.kind != "demo":
        pytest.skip("official weights are installed; the demo is not the default here")
    pipe = pipeline.load_pipeline(setup.flux.parent / "xattn.safetensors", quiet=True, setup=setup)
    assert pipe.scheme == "xattn" and pipe.model.semantic is not None
    classes = data.load_classes(None)
    rgb, sem, ids = data.load_pair(ROOT / "examples" / "rgb.png", ROOT / "examples" / "sem.png", classes, None)
    ir = pipeline.generate(pipe, rgb[None], sem[None], steps=4, seed=0)
    assert ir.shape == (1, 1) + tuple(rgb.shape[-2:])


@pytest.mark.parametrize("cfg", [{"scheme": "xattn", "semantic": {"scheme": "xattn", "bogus": 1}},
                                 {"scheme": "xattn"}, {"scheme": "magic"}, {"scheme": "none", "lora_rank": "8"}])
def test_crafted_run_configs_are_refused_in_one_line(env, tmp_path, cfg):
    save_atomic({"x": torch.zeros(1)}, tmp_path / "c.safetensors", {"config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match="run config"):
        pipeline.load_pipeline(tmp_path / "c.safetensors", quiet=True)


def test_flux_ir_base_names_another_checkpoint_form(env, tmp_path, monkeypatch):
    """$FLUX_IR_BASE points at any transformer file load_flux reads; the autoencoder and text encoders come from
    the weights folder; a path that does not exist is one error."""
    from pipeline import BASE_ENV, find_setup
    monkeypatch.setenv(BASE_ENV, str(tmp_path / "nothing.safetensors"))
    with pytest.raises(CheckpointError, match="no such file"):
        find_setup()
    weights = tmp_path / "w"
    (weights / "t5").mkdir(parents=True)
    (weights / "clip").mkdir()
    (weights / "ae.safetensors").write_bytes(b"")
    base = tmp_path / "my-flux1-kontext-fp8.safetensors"
    base.write_bytes(b"")
    monkeypatch.setenv(BASE_ENV, str(base))
    setup = find_setup(weights)
    assert (setup.kind, setup.flux, setup.preset, setup.ae) == ("official", base, "kontext", weights / "ae.safetensors")
