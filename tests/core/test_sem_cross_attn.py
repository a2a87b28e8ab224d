"""The default scheme B (sem_cross_attn.py, the core alone): identity at zero init, the base state dict untouched,
checkpoint key names, learning starts from the zero values, spatial awareness of the decoupled attention, attention
recording by hooks, batch independence, the per-sample strength, a bf16 stream kept bf16 by its fp32 scales, old run
configs, and clear errors.
The other schemes and options: tests/extras/test_schemes.py."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from einops import rearrange

from flow import image_ids, kontext_ids
from flux_model import Flux, apply_rope
from sem_cross_attn import (DEFAULT_B, SCHEMES, DecoupledSemanticAttention, SemanticConfig, SemanticContext,
                            SemanticModule, attach, attention_weights, overlay, semantic_input)
from conftest import check_recording, check_strength_per_sample
from tools.bench import acting  # every part of a semantic module acting


@pytest.fixture
def params(small_params):
    return small_params(mlp_ratio=2.0, single=3, guidance=False)  # 2 double + 3 single blocks


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_default_config_is_the_decoupled_scheme_b():
    assert DEFAULT_B == SemanticConfig() and DEFAULT_B.is_core and not DEFAULT_B.takes_pixels
    assert (DEFAULT_B.scheme, DEFAULT_B.attention, DEFAULT_B.token_dim, DEFAULT_B.shared_kv) == \
        ("xattn", "decoupled", 64, False)


@pytest.mark.parametrize("config", [DEFAULT_B, SemanticConfig(token_dim=16)], ids=["default", "token_dim16"])
def test_identity_at_init(config, params, kontext_inputs):
    torch.manual_seed(0)
    model = Flux(params).eval()
    x = kontext_inputs(params)
    sem = x.pop("semantic")
    base = model(**x)
    mod = attach(model, config)
    assert type(mod) is SemanticModule and model.semantic is mod
    assert torch.equal(model(**x, semantic=sem), base)


def test_base_state_dict_unchanged_by_the_module(params):
    keys = set(Flux(params).state_dict())
    model = Flux(params)
    attach(model, DEFAULT_B)
    assert {k for k in model.state_dict() if not k.startswith("semantic.")} == keys


def test_checkpoint_key_names(params):
    """The state dict names are what saved checkpoints (weights/demo/xattn.safetensors) hold."""
    model = Flux(params)
    attach(model, DEFAULT_B)
    keys = {k for k in model.state_dict() if k.startswith("semantic.")}
    expected = {f"semantic.encoder.net.{n}.{k}" for n in (0, 2) for k in ("weight", "bias")}
    for kind, n in (("double", params.depth), ("single", params.depth_single_blocks)):
        expected |= {f"semantic.{kind}_blocks.{i}.{k}" for i in range(n)
                     for k in ("to_kv.weight", "to_kv.bias", "k_norm.scale", "scale")}
    assert keys == expected


def test_decoupled_attention_adds_only_semantic_keys_and_values(params):
    """The IP-Adapter construction: per block only a K/V projection from the narrow semantic tokens, a key norm and
    a strength; queries and output projection are the block's own. The value half starts at zero, the scale at 1."""
    model = Flux(params)
    mod = attach(model, SemanticConfig(token_dim=16))
    D = params.hidden_size
    for block in mod.blocks().values():
        assert isinstance(block, DecoupledSemanticAttention)
        assert set(block.state_dict()) == {"to_kv.weight", "to_kv.bias", "k_norm.scale", "scale"}
        assert block.to_kv.weight.shape == (2 * D, 16)
        assert not block.to_kv.weight[D:].any() and not block.to_kv.bias[D:].any() and block.to_kv.weight[:D].any()
        assert torch.equal(block.scale.detach(), torch.ones(1))
    assert sorted(mod.blocks()) == ["double.0", "double.1", "single.0", "single.1", "single.2"]
    assert n_params(mod) < n_params(attach(Flux(params), DEFAULT_B))  # narrower tokens, fewer parameters


def test_zero_init_does_not_stall_learning(params, kontext_inputs):
    """Step 1: exactly the zero value rows get gradient (with values 0 nothing else can affect the output). Step 2:
    every semantic parameter gets a gradient; the model has left the base."""
    torch.manual_seed(0)
    model = Flux(params)
    model.requires_grad_(False)
    sem_mod = attach(model, DEFAULT_B)
    opt = torch.optim.AdamW(list(sem_mod.parameters()), lr=1e-2, weight_decay=0.0)
    x = kontext_inputs(params)
    sem = x.pop("semantic")
    base = model(**x).detach()
    target = torch.randn_like(base)
    D = params.hidden_size
    for step in range(2):
        opt.zero_grad()
        (model(**x, semantic=sem) - target).square().mean().backward()
        grads = {n: p.grad for n, p in sem_mod.named_parameters()}
        if step == 0:
            for n, g in grads.items():
                if n.endswith(("to_kv.weight", "to_kv.bias")):
                    assert g[D:].abs().amax() > 0 and not g[:D].any(), n  # values learn, keys wait
                else:
                    assert g is None or not g.any(), n
        else:
            no_grad = [n for n, g in grads.items() if g is None or g.abs().max() == 0]
            assert no_grad == [], f"parameters with no gradient at step 2: {no_grad}"
        opt.step()
    assert not torch.allclose(model(**x, semantic=sem), base)


def keys_are_the_tokens(params):
    """The default B on `params` with tokens as wide as the model and block double.0's keys = the tokens themselves
    (then RMSNorm): a query and a key of equal content match. Recording on."""
    D = params.hidden_size
    mod = attach(Flux(params), SemanticConfig(token_dim=D))
    block = mod.double_blocks["0"]
    with torch.no_grad():
        block.to_kv.weight[:D] = torch.eye(D)
        block.to_kv.bias.zero_()
    mod.record_attention(True)
    return mod, block


def rotated_queries(block, content, ids, mod):
    """The block's rotated image queries for tokens of `content` [1, L, D] at `ids` (normed as the keys are)."""
    q = content.reshape(1, content.shape[1], block.num_heads, -1).transpose(1, 2)  # [1, H, L, Dh]
    return apply_rope(block.k_norm(q), mod.pe(ids))


def test_decoupled_attention_is_spatially_aware(params):
    """With content identical everywhere (queries = keys), the attention depends only on RoPE of the relative
    offset: every image token, target and condition alike, attends most to the semantic token at its own (row, col)
    (the condition tokens' first id axis shifts every key alike)."""
    torch.manual_seed(0)
    mod, block = keys_are_the_tokens(params)
    h, w, D = 5, 6, params.hidden_size
    u = torch.randn(1, 1, D)
    q = rotated_queries(block, u.expand(1, 2 * h * w, D), kontext_ids(1, h, w), mod)
    ctx = SemanticContext(mod, u.expand(1, h * w, D), (h, w), mod.pe(image_ids(1, h, w)))
    block(q, ctx)
    peaks = mod.record["double.0"][0][0].argmax(dim=-1)  # [L_img]
    assert torch.equal(peaks, torch.arange(h * w).repeat(2))


def test_shifting_the_semantic_map_shifts_the_decoupled_attention_peak(params):
    """The semantic keys carry RoPE from their own grid: a blob that matches the block's queries draws the
    attention, and moving the blob moves the peak."""
    torch.manual_seed(1)
    mod, block = keys_are_the_tokens(params)
    h = w = 6
    D = params.hidden_size
    u, b = torch.randn(D), torch.randn(D)
    ids = image_ids(1, h, w)
    q = rotated_queries(block, u.expand(1, h * w, D), ids, mod)
    for (r, c) in [(1, 1), (1, 4), (4, 2)]:
        sem = b.repeat(1, h * w, 1)
        sem[0, r * w + c] = u
        block(q, SemanticContext(mod, sem, (h, w), mod.pe(ids)))
    peaks = [int(m[0].sum(dim=0).argmax()) for m in mod.record["double.0"]]  # key that receives the most attention
    assert peaks == [1 * w + 1, 1 * w + 4, 4 * w + 2]


def test_recording_keeps_the_output_and_off_removes_the_hooks(params, kontext_inputs):
    """Recording is a forward hook: the output is the same, one heads-averaged [B, L_img, N] map (rows sum to 1) per
    block and forward call; switching it on twice does not double the hooks; off removes them."""
    torch.manual_seed(0)
    model = Flux(params)
    sem_mod = acting(attach(model, DEFAULT_B))
    x = kontext_inputs(params)
    check_recording(model, sem_mod, x, ["double.0", "double.1", "single.0", "single.1", "single.2"])


def test_recorded_weights_are_the_fused_attention():
    """The softmax the hook records is the one the fused attention applies: weights @ v == sdpa(q, k, v)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 24, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    torch.testing.assert_close(attention_weights(q, k) @ v, F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_recorded_map_is_what_the_block_adds(params):
    """The recorded weights, applied to the semantic values, give (scale aside) the term the block adds."""
    torch.manual_seed(0)
    mod = acting(attach(Flux(params), DEFAULT_B))
    block = mod.double_blocks["1"]
    ids = image_ids(1, 3, 4)
    tokens = torch.randn(1, 12, 64)
    ctx = SemanticContext(mod, mod.encoder(tokens)[0], (3, 4), mod.pe(ids), 1.0)
    q = apply_rope(torch.randn(1, params.num_heads, 12, params.hidden_size // params.num_heads), mod.pe(ids))
    mod.record_attention(True)
    with torch.no_grad():
        added = block(q, ctx)
        _, v = block.kv(ctx)
    weights = attention_weights(q, block.kv(ctx)[0])  # per head, [1, H, L, N]
    out = (weights @ v).transpose(1, 2).reshape(1, 12, -1)
    torch.testing.assert_close(added, block.scale.detach() * out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.record["double.1"][0], weights.mean(dim=1))


def test_batch_elements_are_independent(params, kontext_inputs):
    """Changing one sample's semantic map changes only that sample's output."""
    torch.manual_seed(0)
    model = Flux(params)
    acting(attach(model, DEFAULT_B))
    x = kontext_inputs(params)
    out = model(**x)
    x["semantic"] = x["semantic"].clone()
    x["semantic"][1] = torch.randn_like(x["semantic"][1])
    out2 = model(**x)
    assert torch.equal(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


def test_semantic_strength_scales_the_update_per_sample(params, kontext_inputs):
    """strength 0 is the base model; a per-sample strength [1, 0] gives sample 0 the full update and sample 1 the
    base."""
    torch.manual_seed(0)
    model = Flux(params).eval()
    x = kontext_inputs(params)
    sem = x.pop("semantic")
    base = model(**x)
    acting(attach(model, DEFAULT_B))
    check_strength_per_sample(model, x, sem, base)


def test_config_from_an_old_run_means_the_separate_form():
    """A run config written before attention / token_dim / shared_kv existed meant the separate attention on tokens
    of the transformer's width; a config written now reads back as itself."""
    old = {"scheme": "xattn", "encoder": "vae", "blocks": "all", "num_heads": 0, "inner_dim": 0, "mlp_ratio": 2.0}
    cfg = SemanticConfig.from_dict(old)
    assert (cfg.attention, cfg.token_dim, cfg.shared_kv) == ("separate", 0, False)
    assert cfg == SemanticConfig(attention="separate", token_dim=0) and not cfg.is_core
    assert SemanticConfig.from_dict(DEFAULT_B.to_dict()) == DEFAULT_B
    assert SemanticConfig.from_dict({"attention": "decoupled", "token_dim": 16}) == SemanticConfig(token_dim=16)


@pytest.mark.parametrize("config", [SemanticConfig(attention="separate", token_dim=0),
                                    SemanticConfig(scheme="adapter", attention="separate", token_dim=0),
                                    SemanticConfig(scheme="zeroconv", attention="separate", token_dim=0),
                                    SemanticConfig(shared_kv=True), SemanticConfig(encoder="cnn"),
                                    SemanticConfig(blocks="double")],
                         ids=["separate", "adapter", "zeroconv", "shared_kv", "cnn", "double"])
def test_core_attach_refuses_the_other_schemes(params, config):
    model = Flux(params)
    with pytest.raises(ValueError, match=r"extras\.schemes\.attach"):
        attach(model, config)
    assert model.semantic is None


def test_bad_inputs_get_clear_errors(params, kontext_inputs):
    model = Flux(params)
    attach(model, DEFAULT_B)
    x = kontext_inputs(params, h=3, w=4)
    sem = x.pop("semantic")
    with pytest.raises(ValueError, match="semantic_ids"):
        model(**x, semantic=sem[:, :6], semantic_ids=image_ids(2, 3, 4))
    with pytest.raises(ValueError, match="do not fill"):
        model(**x, semantic=sem[:, :6], semantic_ids=image_ids(2, 3, 4)[:, :6] * 2)
    with pytest.raises(ValueError, match="batch"):
        model(**x, semantic=sem[:1])
    with pytest.raises(ValueError, match=r"packed latents \[B, N, 64\]"):
        model(**x, semantic=torch.zeros(2, 3, 48, 64))
    with pytest.raises(ValueError, match="already attached"):
        attach(model, DEFAULT_B)
    with pytest.raises(ValueError, match="one size"):
        overlay(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 48))
    with pytest.raises(ValueError, match="no semantic module"):
        Flux(params)(**x, semantic=sem)


@pytest.mark.parametrize("bad,match", [
    (dict(scheme="xatn"), "unknown scheme"), (dict(scheme="overlay"), "unknown scheme"),  # a baseline: no module
    (dict(encoder="clip"), "unknown semantic encoder"),
    (dict(scheme="zeroconv", encoder="cnn", attention="separate", token_dim=0), "encoder vae"),
    (dict(blocks="every:0"), "blocks"), (dict(attention="sideways"), "unknown semantic attention"),
    (dict(attention="decoupled", scheme="adapter"), "needs scheme xattn"),
    (dict(attention="decoupled", inner_dim=64), "own heads and width"),
    (dict(attention="separate", shared_kv=True), "option of the decoupled"),
    (dict(scheme="zeroconv", attention="separate", token_dim=8), "scheme xattn only"),
    (dict(token_dim=-1), "positive width")])
def test_config_options_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        SemanticConfig(**bad).validate()
    assert set(SCHEMES) == {"xattn", "zeroconv", "adapter"}


def test_attention_shape_is_checked(params):
    """A head dim that RoPE cannot rotate on 2 spatial axes is refused with the transformer's sizes."""
    with pytest.raises(ValueError, match="multiple of 4"):
        SemanticConfig(attention="separate", token_dim=0, num_heads=3).validate(params.hidden_size, params.num_heads)
    DEFAULT_B.validate(params.hidden_size, params.num_heads)


def test_semantic_input_matches_encoder():
    class FakeVAE:
        def encode(self, x):
            return torch.ones(x.shape[0], 16, x.shape[2] // 8, x.shape[3] // 8)
    img = torch.zeros(1, 3, 32, 48)
    assert semantic_input(DEFAULT_B, img, FakeVAE()).shape == (1, 6, 64)  # packed latents on the /16 grid
    cnn = dataclasses.replace(DEFAULT_B, encoder="cnn")
    assert cnn.takes_pixels and semantic_input(cnn, img) is img  # the pixels themselves
    with pytest.raises(ValueError, match="autoencoder"):
        semantic_input(DEFAULT_B, img)


def test_overlay_blends_the_semantic_image():
    rgb, sem = torch.full((1, 3, 16, 16), -1.0), torch.ones(1, 3, 16, 16)
    torch.testing.assert_close(overlay(rgb, sem, 0.25), torch.full((1, 3, 16, 16), -0.5))


# ---------------------------------------------------------------------------------------------------------------
# The compute dtype: fp32 scales do not promote a bf16 stream

def stream_dtypes(model, x: dict, autocast: bool) -> dict[str, torch.dtype]:
    """One forward (under CPU bf16 autocast or not): the dtype of every transformer block's output, every semantic
    block's (and scheme A's zero conv's), the tokens img_in takes (scheme A adds to them) and the model's output."""
    seen = {}

    def note(name: str, t: torch.Tensor | tuple) -> None:  # (a hook returning a value would replace the call's)
        seen.setdefault(name, (t[0] if isinstance(t, tuple) else t).dtype)
    hooks = [model.img_in.register_forward_pre_hook(lambda m, args: note("img_in", args))]
    for name, m in model.named_modules():
        if re.fullmatch(r"(semantic\.)?(double|single)_blocks\.\d+|semantic\.zeroconv", name):
            hooks.append(m.register_forward_hook(lambda m, args, out, name=name: note(name, out)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        seen["output"] = model(**x).dtype
    for h in hooks:
        h.remove()
    return seen


def bf16_model_with_fp32_strengths(params, config, attach, mode: str):
    """A bf16 transformer with an acting semantic module whose strength parameters are fp32:
      autocast  the whole module fp32 (as training keeps it), run under bf16 autocast
      bf16      the module in bf16 but its scales / gates fp32 (1,) tensors, run in plain bf16"""
    torch.manual_seed(0)
    model = Flux(params)
    acting(attach(model, config))
    model.to(torch.bfloat16)
    if mode == "autocast":
        model.semantic.float()
    for p in model.semantic.strength_parameters():
        p.data = p.data.float()
    return model


def bf16_inputs(x: dict) -> dict:
    """The batch in bf16, with a per-sample fp32 strength [B] (a tensor strength is cast where it multiplies too)."""
    x = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    return x | {"semantic_strength": torch.tensor([0.5, 1.0])}


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_fp32_scales_keep_a_bf16_stream_in_bf16(params, kontext_inputs, mode):
    """The default B's scales are fp32 (1,) parameters; `strength * scale * out` promoted every block's semantic
    attention to fp32 (a [B, L_img, D] fp32 tensor per block, added into the bf16 one). Cast where they multiply,
    every semantic and transformer block's output stays bf16, under CPU autocast over an fp32 module and in plain
    bf16 alike."""
    model = bf16_model_with_fp32_strengths(params, DEFAULT_B, attach, mode)
    assert all(p.dtype == torch.float32 for p in model.semantic.strength_parameters())
    dtypes = stream_dtypes(model, bf16_inputs(kontext_inputs(params)), autocast=mode == "autocast")
    assert len(dtypes) == 2 * (params.depth + params.depth_single_blocks) + 2
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes


def test_in_fp32_the_semantic_attention_is_exactly_what_it_was(params, kontext_inputs):
    """In fp32 the casts are no-ops: every block's semantic term is, bit for bit, the formula as written before them,
    strength * scale * SDPA(q, k, v) (a per-sample strength included)."""
    torch.manual_seed(0)
    model = Flux(params)
    acting(attach(model, DEFAULT_B))
    calls = []
    for block in model.semantic.blocks().values():
        block.register_forward_hook(lambda m, a, out: calls.append((m, *a, out)))
    x = kontext_inputs(params) | {"semantic_strength": torch.tensor([0.5, 1.0])}
    with torch.no_grad():
        assert model(**x).dtype == torch.float32
        assert len(calls) == params.depth + params.depth_single_blocks
        for block, q, ctx, out in calls:
            before = ctx.strength * block.scale * rearrange(F.scaled_dot_product_attention(q, *block.kv(ctx)),
                                                            "B H L D -> B L (H D)")
            assert out.dtype == torch.float32 and torch.equal(out, before)
