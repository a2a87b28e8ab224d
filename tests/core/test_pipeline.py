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
    cfg = json.loads(meta["config"])
    save_atomic(sd, tmp_path / "other.safetensors", {"config": json.dumps(cfg | {"base_id": "0123456789abcdef"})})
    with pytest.raises(CheckpointError, match="trained on another base .* holds other weights"):
        pipeline.load_pipeline(tmp_path / "other.safetensors", quiet=True)
    old = {k: v for k, v in cfg.items() if k != "base_id"} | {"base_preset": "dev"}  # from before ids were recorded
    save_atomic(sd, tmp_path / "dev.safetensors", {"config": json.dumps(old)})
    with pytest.raises(CheckpointError, match="'dev' layout, but this run's base .* has the 'tiny' layout"):
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


def official_weights(folder: Path, base_name: str | None, params) -> Path:
    """A weights/ folder as users have it: the autoencoder and text encoder folders (empty stand-ins: finding the
    base reads only the transformer's header) and, if named, a small transformer of the official layout."""
    from flux_model import Flux
    (folder / "t5").mkdir(parents=True)
    (folder / "clip").mkdir()
    (folder / "ae.safetensors").write_bytes(b"")
    if base_name:
        torch.manual_seed(0)
        save_atomic(Flux(params).state_dict(), folder / base_name)
    return folder


def test_the_base_is_found_by_what_it_holds_whatever_its_name(tmp_path, monkeypatch, small_params):
    from pipeline import BASE_ENV, find_setup
    monkeypatch.delenv(BASE_ENV, raising=False)
    weights = official_weights(tmp_path / "w", "flux1-dev-fp8.safetensors", small_params())  # Kijai's name
    save_atomic({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, weights / "my_lora.safetensors")  # not a base
    setup = find_setup(weights)
    assert (setup.kind, setup.flux.name, setup.preset, setup.guidance) == ("official", "flux1-dev-fp8.safetensors",
                                                                           "dev", 2.5)
    assert "found by its keys" in setup.describe()
    official_weights(tmp_path / "s", "anything.safetensors", small_params(guidance=False))
    assert find_setup(tmp_path / "s").preset == "schnell"
    torch.manual_seed(1)
    from flux_model import Flux
    save_atomic(Flux(small_params()).state_dict(), weights / "flux1-kontext-dev.safetensors")
    with pytest.raises(CheckpointError, match=f"2 FLUX transformer checkpoints .*set {BASE_ENV}"):
        find_setup(weights)
    monkeypatch.setenv(BASE_ENV, str(weights / "flux1-kontext-dev.safetensors"))  # names the one to use
    assert find_setup(weights).flux.name == "flux1-kontext-dev.safetensors"
    monkeypatch.setenv(BASE_ENV, str(weights / "my_lora.safetensors"))
    with pytest.raises(CheckpointError, match="not a FLUX base transformer"):
        find_setup(weights)
    monkeypatch.setenv(BASE_ENV, str(tmp_path / "nothing.safetensors"))
    with pytest.raises(CheckpointError, match="no such file"):
        find_setup(weights)


def test_a_fill_checkpoint_is_not_taken_for_a_base(tmp_path, monkeypatch, small_params):
    from pipeline import BASE_ENV, find_setup
    monkeypatch.delenv(BASE_ENV, raising=False)
    weights = official_weights(tmp_path / "w", "flux1-fill-dev.safetensors", small_params(in_ch=384))
    with pytest.raises(CheckpointError, match="flux1-fill-dev.safetensors: a Fill checkpoint, not a text-to-image"):
        find_setup(weights)


def test_a_renamed_linked_or_fp8_cast_base_is_the_same_base(tmp_path, monkeypatch, small_params):
    from pipeline import BASE_ENV, base_id, check_same_base, find_setup
    monkeypatch.delenv(BASE_ENV, raising=False)
    weights = official_weights(tmp_path / "w", "flux1-dev.safetensors", small_params())
    base = weights / "flux1-dev.safetensors"
    trained = {"base_id": find_setup(weights).base_id(), "base_preset": "dev", "base_file": base.name}
    snapshot = tmp_path / "hub" / "snapshots" / "0123abcd"  # a Hugging Face cache: a link under a hash
    snapshot.mkdir(parents=True)
    (snapshot / "flux1-dev.safetensors").symlink_to(base)
    sd = read_safetensors(base)
    save_atomic({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}, tmp_path / "fp8.safetensors")
    for other in (snapshot / "flux1-dev.safetensors", tmp_path / "fp8.safetensors"):
        monkeypatch.setenv(BASE_ENV, str(other))
        check_same_base(trained, "run/final.safetensors", find_setup(weights))  # the same weights: accepted
    sd["double_blocks.0.img_attn.norm.query_norm.scale"] = sd["double_blocks.0.img_attn.norm.query_norm.scale"] * 2
    save_atomic(sd, tmp_path / "retrained.safetensors")
    assert base_id(tmp_path / "retrained.safetensors") != trained["base_id"]
    monkeypatch.setenv(BASE_ENV, str(tmp_path / "retrained.safetensors"))
    with pytest.raises(CheckpointError, match="trained on another base"):
        check_same_base(trained, "run/final.safetensors", find_setup(weights))


def test_sampling_takes_the_bases_guidance_and_encodes_the_prompt_before_the_transformer(tmp_path, monkeypatch,
                                                                                          small_params):
    """A run trained at guidance 1.0 samples at the base's 2.5 (training and sampling guidance are two settings);
    the prompt is encoded (and its encoders freed) before the transformer is built."""
    import flux_model
    from pipeline import BASE_ENV, find_setup, load_pipeline
    from vae import AE_PRESETS, AutoEncoder, save_ae
    monkeypatch.delenv(BASE_ENV, raising=False)
    params = small_params()
    monkeypatch.setitem(flux_model.PRESETS, "dev", params)  # a dev-layout base at test size
    weights = official_weights(tmp_path / "w", "flux1-dev.safetensors", params)
    save_ae(AutoEncoder(AE_PRESETS["tiny"]), weights / "ae.safetensors")
    order = []
    real_build = pipeline.build_model

    def text(setup, p, batch, prompt, device, dtype, prompt_cache=None):  # stands in for T5 + CLIP
        order.append("text")
        return torch.zeros(1, 3, p.context_in_dim), torch.zeros(1, 3, 3), torch.zeros(1, p.vec_in_dim)
    monkeypatch.setattr(pipeline, "text_condition", text)
    monkeypatch.setattr(pipeline, "build_model", lambda *a, **k: order.append("model") or real_build(*a, **k))
    setup = find_setup(weights)
    run = {"stage": "joint", "scheme": "none", "guidance": 1.0, "base_preset": "dev", "base_id": setup.base_id(),
           "sample_guidance": 2.5}
    save_atomic({}, tmp_path / "run.safetensors", {"config": json.dumps(run)})
    for ckpt in (None, tmp_path / "run.safetensors"):
        order.clear()
        pipe = load_pipeline(ckpt, "cpu", torch.float32, setup=setup, quiet=True)
        assert pipe.guidance == 2.5 and order == ["text", "model"]
