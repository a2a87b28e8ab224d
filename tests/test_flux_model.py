"""The transformer: parity with diffusers' FluxTransformer2DModel on the same checkpoint, official sizes and keys,
packing/ids helpers, and clear errors for wrong checkpoints."""

import inspect
import math

import pytest
import torch
from safetensors.torch import save_file

import flux_model
from flux_model import Flux, FluxParams, PRESETS, load_flux, pack, unpack, image_ids, text_ids, timestep_embedding
from checkpoint import CheckpointError


def small_params(hidden=64, heads=4, axes=(4, 6, 6), depth=2, single=2, guidance=True, in_ch=64, ctx=32, vec=24):
    return FluxParams(in_channels=in_ch, out_channels=64, vec_in_dim=vec, context_in_dim=ctx, hidden_size=hidden,
                      mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single, axes_dim=list(axes),
                      theta=10_000, qkv_bias=True, guidance_embed=guidance)


def random_checkpoint(params: FluxParams, seed=0) -> dict:
    """Every tensor random (norm scales near 1), so a swapped or dropped weight cannot hide."""
    g = torch.Generator().manual_seed(seed)
    model = Flux(params)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(".scale"):
            sd[k] = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[-1])
    return sd


def diffusers_from_original(sd: dict, params: FluxParams):
    """Convert with diffusers' OWN converter of the original format; its hidden width is hard-coded to 3072,
    so that one value is patched for small widths."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils as sfu
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    ns = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {params.hidden_size}"), ns)
    converted = ns["convert_flux_transformer_checkpoint_to_diffusers"](dict(sd))
    ref = FluxTransformer2DModel(
        patch_size=1, in_channels=params.in_channels, out_channels=params.out_channels, num_layers=params.depth,
        num_single_layers=params.depth_single_blocks, attention_head_dim=params.hidden_size // params.num_heads,
        num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim, guidance_embeds=params.guidance_embed,
        axes_dims_rope=tuple(params.axes_dim))
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


CONFIGS = [
    # (name, params, token grid h x w, text length, kontext)
    ("square-guidance", small_params(), (4, 4), 7, False),
    ("nonsquare-no-guidance", small_params(guidance=False), (3, 5), 5, False),
    ("kontext-cond-tokens", small_params(hidden=96, heads=3, axes=(8, 12, 12), depth=1, single=3), (4, 6), 6, True),
    ("wide-heads-schnell-like", small_params(hidden=128, heads=2, axes=(16, 24, 24), guidance=False), (2, 3), 4, True),
]


@pytest.mark.parametrize("name,params,grid,n_txt,kontext", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_parity_with_diffusers(tmp_path, name, params, grid, n_txt, kontext):
    sd = random_checkpoint(params)
    path = tmp_path / "flux.safetensors"
    save_file(sd, str(path))
    ours = load_flux(path, params, dtype=torch.float32).eval()
    ref = diffusers_from_original(sd, params)

    B, (h, w) = 2, grid
    g = torch.Generator().manual_seed(1)
    img = torch.randn(B, h * w, 64, generator=g)
    ids = image_ids(B, h, w)
    if kontext:  # Kontext: condition tokens after x_t, same grid, first id axis = 1
        img = torch.cat([img, torch.randn(B, h * w, 64, generator=g)], dim=1)
        ids = torch.cat([ids, image_ids(B, h, w, index=1)], dim=1)
    txt = torch.randn(B, n_txt, params.context_in_dim, generator=g)
    tids = text_ids(B, n_txt)
    t = torch.tensor([0.3, 0.9])
    y = torch.randn(B, params.vec_in_dim, generator=g)
    guidance = torch.tensor([3.5, 2.5]) if params.guidance_embed else None

    with torch.no_grad():
        out = ours(img, ids, txt, tids, t, y, guidance=guidance)
        # diffusers takes 2-D ids (shared across the batch)
        expected = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                       img_ids=ids[0], txt_ids=tids[0], guidance=guidance, return_dict=False)[0]
    assert out.shape == (B, img.shape[1], 64)
    scale = expected.abs().max().item()
    assert scale > 0.1, "reference output is degenerate: the test would prove nothing"
    err = (out - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"max abs diff {err:.3g} (output scale {scale:.3g})"


def test_parity_catches_a_swapped_weight(tmp_path):
    """The parity check above is sensitive: swapping two blocks' weights changes the output far past tolerance."""
    params = small_params()
    sd = random_checkpoint(params)
    ref = diffusers_from_original(sd, params)
    bad = dict(sd)
    bad["double_blocks.0.img_attn.proj.weight"], bad["double_blocks.1.img_attn.proj.weight"] = \
        sd["double_blocks.1.img_attn.proj.weight"], sd["double_blocks.0.img_attn.proj.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    ours = load_flux(path, params, dtype=torch.float32)
    img, ids = torch.randn(1, 16, 64), image_ids(1, 4, 4)
    txt, tids = torch.randn(1, 3, 32), text_ids(1, 3)
    t, y, gd = torch.tensor([0.5]), torch.randn(1, 24), torch.tensor([3.5])
    with torch.no_grad():
        a = ours(img, ids, txt, tids, t, y, gd)
        b = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=ids[0],
                txt_ids=tids[0], guidance=gd, return_dict=False)[0]
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Official sizes, keys and shapes (meta device: no memory)

def meta_model(name):
    with torch.device("meta"):
        return Flux(PRESETS[name])


@pytest.mark.parametrize("name,count", [("dev", 11_901_408_320), ("kontext", 11_901_408_320),
                                        ("schnell", 11_891_178_560)])
def test_official_parameter_counts(name, count):
    assert sum(p.numel() for p in meta_model(name).parameters()) == count


def test_official_keys_and_shapes():
    sd = meta_model("dev").state_dict()
    assert len(sd) == 780
    assert len(meta_model("schnell").state_dict()) == 776
    expected = {
        "img_in.weight": (3072, 64), "img_in.bias": (3072,),
        "time_in.in_layer.weight": (3072, 256), "time_in.out_layer.weight": (3072, 3072),
        "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256),
        "txt_in.weight": (3072, 4096),
        "double_blocks.0.img_mod.lin.weight": (18432, 3072), "double_blocks.18.txt_mod.lin.bias": (18432,),
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072), "double_blocks.0.txt_attn.qkv.bias": (9216,),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "double_blocks.0.txt_attn.norm.key_norm.scale": (128,),
        "double_blocks.0.img_attn.proj.weight": (3072, 3072),
        "double_blocks.0.img_mlp.0.weight": (12288, 3072), "double_blocks.0.txt_mlp.2.weight": (3072, 12288),
        "single_blocks.0.linear1.weight": (21504, 3072), "single_blocks.37.linear2.weight": (3072, 15360),
        "single_blocks.0.norm.query_norm.scale": (128,), "single_blocks.0.modulation.lin.weight": (9216, 3072),
        "final_layer.linear.weight": (64, 3072), "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    per_double = sum(v.numel() for k, v in sd.items() if k.startswith("double_blocks.0."))
    per_single = sum(v.numel() for k, v in sd.items() if k.startswith("single_blocks.0."))
    assert (per_double, per_single) == (339_831_296, 141_591_808)


def test_invalid_params_rejected():
    with pytest.raises(ValueError, match="axes_dim"):
        Flux(small_params(axes=(4, 6, 8)))
    with pytest.raises(ValueError, match="divisible"):
        Flux(small_params(hidden=63))


# ---------------------------------------------------------------------------------------------------------------
# Helpers

def test_timestep_embedding_reference_values():
    emb = timestep_embedding(torch.tensor([0.5]), 256)
    torch.testing.assert_close(emb[0, :4], torch.tensor([-0.88385, 0.94594, 0.84851, 0.69869]), atol=1e-5, rtol=0)


def test_pack_unpack_roundtrip_and_layout():
    z = torch.randn(2, 16, 6, 10)  # a 48 x 80 pixel image
    tokens = pack(z)
    assert tokens.shape == (2, 15, 64)
    # channel index inside a token is c*4 + ph*2 + pw; tokens run row-major over the 3 x 5 grid
    assert tokens[1, 1 * 5 + 2, 3 * 4 + 1 * 2 + 0] == z[1, 3, 2 * 1 + 1, 2 * 2 + 0]
    assert torch.equal(unpack(tokens, 48, 80), z)
    with pytest.raises(ValueError, match="multiples of 16"):
        pack(torch.randn(1, 16, 5, 8))
    with pytest.raises(ValueError, match="grid"):
        unpack(tokens, 64, 64)


def test_ids_kontext_condition_grid():
    ids = image_ids(2, 2, 3, index=1)
    assert ids.shape == (2, 6, 3)
    assert torch.equal(ids[0, :, 0], torch.ones(6))
    assert ids[0, 4].tolist() == [1, 1, 1]  # row 1, column 1
    assert torch.equal(text_ids(2, 5), torch.zeros(2, 5, 3))


def test_forward_rejects_missing_guidance_and_bad_ids():
    model = Flux(small_params())
    img, ids, txt, tids = torch.randn(1, 4, 64), image_ids(1, 2, 2), torch.randn(1, 3, 32), text_ids(1, 3)
    with pytest.raises(ValueError, match="guidance"):
        model(img, ids, txt, tids, torch.tensor([0.5]), torch.randn(1, 24))
    with pytest.raises(ValueError, match="ids"):
        model(img, image_ids(1, 1, 2), txt, tids, torch.tensor([0.5]), torch.randn(1, 24), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="no semantic module"):
        model(img, ids, txt, tids, torch.tensor([0.5]), torch.randn(1, 24), torch.tensor([3.0]),
              semantic=torch.randn(1, 4, 64))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = Flux(small_params(guidance=False))
    img, ids, txt, tids = torch.randn(1, 4, 64), image_ids(1, 2, 2), torch.randn(1, 3, 32), text_ids(1, 3)
    t, y = torch.tensor([0.5]), torch.randn(1, 24)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(img, ids, txt, tids, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_rmsnorm_handwritten_backward_is_exact_and_keeps_only_its_input():
    """RMSNorm's custom backward (it recomputes the normalised x instead of keeping it) must give autograd's
    gradients: gradcheck in float64, the plain expression's autograd in fp32 and from bf16; and it must keep
    only x (by storage) and the [..., 1] statistics, not a second x-sized tensor."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    scale = (1 + 0.2 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(flux_model._RMSNormFn.apply, (x, scale))

    def plain(x, scale):  # BFL's RMSNorm, differentiated by autograd
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * scale

    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        x = torch.randn(2, 3, 5, 8).to(dtype).requires_grad_()
        scale = (1 + 0.2 * torch.randn(8)).to(dtype).requires_grad_()
        norm = flux_model.RMSNorm(8).to(dtype)
        norm.scale.data.copy_(scale)
        g = torch.randn(2, 3, 5, 8).to(dtype)
        ours = norm(x)
        ref = plain(x, scale)
        assert ours.dtype == ref.dtype and torch.equal(ours, ref)
        for a, b in zip(torch.autograd.grad(ours, (x, norm.scale), g), torch.autograd.grad(ref, (x, scale), g)):
            assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < tol, dtype

    kept = []
    x = torch.randn(4, 16, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        flux_model.RMSNorm(64)(x)
    big = {t.untyped_storage().data_ptr() for t in kept if t.numel() == x.numel()}
    assert big == {x.untyped_storage().data_ptr()}, "the normalised x is kept as well as x"


# ---------------------------------------------------------------------------------------------------------------
# Loading: prefixes and clear errors

def test_load_accepts_comfy_prefix(tmp_path):
    params = small_params()
    sd = random_checkpoint(params)
    path = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(path))
    model = load_flux(path, params, dtype=torch.float32)
    assert torch.equal(model.img_in.weight, sd["img_in.weight"])


def test_schnell_file_loaded_as_dev_gets_a_hint(tmp_path):
    sd = random_checkpoint(small_params(guidance=False))
    path = tmp_path / "schnell.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="schnell") as e:
        load_flux(path, small_params(guidance=True), dtype=torch.float32)
    assert "guidance_in.in_layer.weight" in str(e.value)


def test_wrong_size_and_diffusers_format_named(tmp_path):
    sd = random_checkpoint(small_params())
    path = tmp_path / "a.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="(?s)mis-shaped.*hidden size is 64, the preset's 96"):
        load_flux(path, small_params(hidden=96, heads=4, axes=(8, 8, 8)), dtype=torch.float32)
    fill = dict(sd, **{"img_in.weight": torch.zeros(64, 384)})
    save_file(fill, str(tmp_path / "fill.safetensors"))
    with pytest.raises(CheckpointError, match="Fill"):
        load_flux(tmp_path / "fill.safetensors", small_params(), dtype=torch.float32)
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(CheckpointError, match="diffusers-format"):
        load_flux(tmp_path / "d.safetensors", small_params(), dtype=torch.float32)


def test_truncated_and_garbage_files(tmp_path):
    sd = random_checkpoint(small_params())
    path = tmp_path / "full.safetensors"
    save_file(sd, str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_flux(tmp_path / "cut.safetensors", small_params(), dtype=torch.float32)
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04PK" + bytes(100))
    with pytest.raises(CheckpointError):
        load_flux(tmp_path / "junk.safetensors", small_params(), dtype=torch.float32)
    with pytest.raises(CheckpointError, match="no such file"):
        load_flux(tmp_path / "missing.safetensors", small_params())
