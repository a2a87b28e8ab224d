"""The other schemes and options (extras/schemes.py): zero-conv A, the separate form of B, adapter C, shared K/V,
the CNN encoder and a choice of blocks. Each is the identity at zero init and learns from step 1, keeps its
checkpoint key names, acts where it should (spatially aware cross-attention, per-sample strength, batch
independence), records its attention by hooks, gives the same gradients under checkpointing, keeps a bf16 stream
bf16 with its fp32 scales and gates, and fails with clear errors. The default scheme B alone: tests/core/test_sem_cross_attn.py."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from tools import bench
from conftest import (check_checkpointing_same_gradients, check_recording, check_strength_per_sample,
                      small_flux_params)
from flow import image_ids, kontext_ids
from flux_model import Flux
from sem_cross_attn import DEFAULT_B, SCHEMES, SemanticConfig, SemanticModule, semantic_input
from extras.schemes import (BASELINES, PRESETS, CNNEncoder, SchemeModule, SemanticCrossAttention,
                            SpatialContext, attach, chosen_blocks, parameter_count)
from tests.core.test_sem_cross_attn import bf16_inputs, bf16_model_with_fp32_strengths, stream_dtypes

SEPARATE_B = SemanticConfig(attention="separate", token_dim=0)  # scheme B's separate form, tokens of the model's width


def scheme_config(scheme: str, encoder: str = "vae", **kw) -> SemanticConfig:
    """scheme "xattn": the separate form of B (the decoupled one is the core's); A and C: their presets."""
    return replace(SEPARATE_B if scheme == "xattn" else PRESETS[scheme], encoder=encoder, **kw)


# every valid scheme x encoder (zeroconv adds to the latent tokens, so it takes the vae latents only)
COMBOS = [(s, e) for s in SCHEMES for e in ("vae", "cnn") if not (s == "zeroconv" and e == "cnn")]
# the decoupled B's options beyond the core's form, and the separate form on narrow tokens
LEAN = {"decoupled-shared": SemanticConfig(token_dim=16, shared_kv=True),
        "decoupled-double": SemanticConfig(token_dim=16, blocks="double"),
        "decoupled-cnn": SemanticConfig(token_dim=16, encoder="cnn"),
        "narrow-tokens": SemanticConfig(attention="separate", token_dim=16)}


@pytest.fixture
def params(small_params):
    return small_params(mlp_ratio=2.0, single=3, guidance=False)  # 2 double + 3 single blocks


def semantic_for(config, x, seed=0):
    """The `semantic=` input this config takes: the batch's packed latents, or a random semantic image."""
    if not config.takes_pixels:
        return x["semantic"]
    B, N = x["semantic"].shape[:2]
    h, w = 3, N // 3  # kontext_inputs' default grid
    return torch.randn(B, 3, 16 * h, 16 * w, generator=torch.Generator().manual_seed(seed))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_presets_and_baselines():
    """Every module scheme has a preset (B: the core's default); a baseline is no module scheme."""
    assert set(PRESETS) == set(SCHEMES) and PRESETS["xattn"] == DEFAULT_B
    assert all(PRESETS[s].scheme == s for s in SCHEMES)
    assert not set(SCHEMES) & set(BASELINES)


def test_module_schemes_and_baselines_are_apart(params):
    """Every module scheme attaches; a baseline name is no module scheme (the run's choices are both lists)."""
    for scheme in SCHEMES:
        assert attach(Flux(params), PRESETS[scheme]).config.scheme == scheme
    for name in BASELINES:
        with pytest.raises(ValueError, match="unknown scheme"):
            SemanticConfig(scheme=name).validate()
        with pytest.raises(ValueError, match="unknown scheme"):
            attach(Flux(params), SemanticConfig(scheme=name))


def test_the_default_is_the_cores_module_and_the_scheme_module_builds_it_alike(params, kontext_inputs):
    """extras.schemes.attach hands the default B to the core; SchemeModule keeps the core's construction order, so
    a decoupled config gets the same initial weights (and outputs) from either."""
    assert type(attach(Flux(params), DEFAULT_B)) is SemanticModule
    assert type(attach(Flux(params), SEPARATE_B)) is SchemeModule
    torch.manual_seed(0)
    core = SemanticModule(DEFAULT_B, params)
    torch.manual_seed(0)
    ours = SchemeModule(DEFAULT_B, params)
    a, b = core.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", [scheme_config(s, e) for s, e in COMBOS] + list(LEAN.values()),
                         ids=[f"{s}-{e}" for s, e in COMBOS] + list(LEAN))
def test_identity_at_init(config, params, kontext_inputs):
    torch.manual_seed(0)
    model = Flux(params).eval()
    x = kontext_inputs(params)
    sem = semantic_for(config, x)
    del x["semantic"]
    base = model(**x)
    attach(model, config)
    assert torch.equal(model(**x, semantic=sem), base)


@pytest.mark.parametrize("config", [scheme_config(s) for s in SCHEMES], ids=list(SCHEMES))
def test_base_state_dict_unchanged_by_the_module(params, config):
    keys = set(Flux(params).state_dict())
    model = Flux(params)
    attach(model, config)
    assert {k for k in model.state_dict() if not k.startswith("semantic.")} == keys


ATTN = ["to_q.weight", "to_q.bias", "to_kv.weight", "to_kv.bias", "q_norm.scale", "k_norm.scale", "proj.weight",
        "proj.bias"]
BLOCK_KEYS = {
    "xattn": [f"attn.{k}" for k in ATTN] + ["norm.weight", "norm.bias", "scale"],
    "adapter": [f"{a}.{k}" for a in ("self_attn", "cross_attn") for k in ATTN]
    + [f"{n}.{k}" for n in ("sem_norm", "ff_norm", "ff.0", "ff.2") for k in ("weight", "bias")] + ["gate"],
    "decoupled": ["to_kv.weight", "to_kv.bias", "k_norm.scale", "scale"],
    "decoupled-shared": ["k_norm.scale", "scale"],
}
ENCODER_KEYS = {"vae": ["net.0", "net.2"], "cnn": ["net.0", "net.2", "net.4", "net.6"]}


@pytest.mark.parametrize("form,encoder", COMBOS + [("decoupled", "cnn"), ("decoupled-shared", "vae")])
def test_checkpoint_key_names(form, encoder, params):
    """The state dict names are what saved checkpoints hold (blocks every:2 of 2 double + 3 single)."""
    model = Flux(params)
    if form.startswith("decoupled"):
        config = SemanticConfig(encoder=encoder, blocks="every:2", shared_kv=form == "decoupled-shared")
    else:
        config = scheme_config(form, encoder, blocks="every:2")
    attach(model, config)
    keys = {k for k in model.state_dict() if k.startswith("semantic.")}
    if form == "zeroconv":
        expected = {f"semantic.zeroconv.{k}" for k in ("conv.weight", "conv.bias", "zero.weight", "zero.bias", "scale")}
    else:
        expected = {f"semantic.encoder.{n}.{k}" for n in ENCODER_KEYS[encoder] for k in ("weight", "bias")}
        for kind, ids in (("double", [0]), ("single", [0, 2])):
            expected |= {f"semantic.{kind}_blocks.{i}.{k}" for i in ids for k in BLOCK_KEYS[form]}
        if form == "decoupled-shared":
            expected |= {"semantic.shared.weight", "semantic.shared.bias"}
    assert keys == expected


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_init_does_not_stall_learning(scheme, params, kontext_inputs):
    """Step 1: the scales/gates (or the zero conv) move. Step 2: every semantic parameter gets a gradient."""
    torch.manual_seed(0)
    model = Flux(params)
    model.requires_grad_(False)
    sem_mod = attach(model, scheme_config(scheme))
    opt = torch.optim.AdamW(list(sem_mod.parameters()), lr=1e-2, weight_decay=0.0)
    x = kontext_inputs(params)
    target = torch.randn(2, x["img"].shape[1], 64)
    before = {n: p.detach().clone() for n, p in sem_mod.named_parameters()}
    for step in range(2):
        opt.zero_grad()
        loss = (model(**x) - target).square().mean()
        loss.backward()
        if step == 1:
            no_grad = [n for n, p in sem_mod.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
            assert no_grad == [], f"parameters with no gradient at step 2: {no_grad}"
        opt.step()
        if step == 0:
            if scheme == "zeroconv":
                moved = not torch.equal(sem_mod.zeroconv.zero.weight, before["zeroconv.zero.weight"])
            else:
                strengths = sem_mod.strength_parameters()
                assert len(strengths) == 5  # one per block of the small model (2 double + 3 single)
                moved = all(float(p.detach()) != 0.0 for p in strengths)
            assert moved


@pytest.mark.parametrize("form", list(LEAN))
def test_lean_variants_learn_every_weight_after_one_step(form, params, kontext_inputs):
    torch.manual_seed(0)
    model = Flux(params)
    model.requires_grad_(False)
    x = kontext_inputs(params)
    sem = semantic_for(LEAN[form], x)
    del x["semantic"]
    base = model(**x)
    sem_mod = attach(model, LEAN[form])
    opt = torch.optim.AdamW(list(sem_mod.parameters()), lr=1e-2, weight_decay=0.0)
    target = torch.randn_like(base)
    for step in range(2):
        opt.zero_grad()
        (model(**x, semantic=sem) - target).square().mean().backward()
        if step == 1:
            no_grad = [n for n, p in sem_mod.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
            assert no_grad == [], f"parameters with no gradient at step 2: {no_grad}"
        opt.step()
    assert not torch.equal(model(**x, semantic=sem), base)


def test_shared_keys_and_values_are_one_projection_run_once_per_forward(params, kontext_inputs):
    """Shared K/V: one projection for every block (blocks keep only a key norm and a scale), run once per forward,
    not once per block; fewer parameters than one projection per block, which has fewer than the separate form."""
    D = params.hidden_size
    model = Flux(params)
    shared = bench.acting(attach(model, LEAN["decoupled-shared"]))
    assert set(shared.single_blocks["1"].state_dict()) == {"k_norm.scale", "scale"}
    assert shared.shared.weight.shape == (2 * D, 16)
    calls = []
    shared.shared.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(**kontext_inputs(params))
    assert len(calls) == 1
    own = attach(Flux(params), SemanticConfig(token_dim=16))
    assert n_params(shared) < n_params(own) < n_params(attach(Flux(params), SEPARATE_B))


def separate_module(blocks="double", dim=32, heads=2):
    """The separate B on a small transformer (hidden `dim`), one module per chosen block."""
    return SchemeModule(replace(SEPARATE_B, blocks=blocks), small_flux_params(hidden=dim, heads=heads, depth=1,
                                                                              single=0))


def one_block_with_keys_equal_queries(dim, heads):
    """A separate-B module with one injection (double.0) whose keys are computed with the query weights, so
    q_i == k_j for equal content; recording on."""
    mod = separate_module(dim=dim, heads=heads)
    block = mod.double_blocks["0"]
    assert isinstance(block, SemanticCrossAttention)
    with torch.no_grad():
        block.attn.to_kv.weight[:dim] = block.attn.to_q.weight
        block.attn.to_kv.bias[:dim] = block.attn.to_q.bias
    mod.record_attention(True)
    return mod


def spatial_context(mod, tokens, grid, q_ids, k_ids):
    """The separate form's context: its own RoPE over (row, col) for both sides."""
    return SpatialContext(mod, tokens, grid, mod.pe(k_ids[..., 1:]), 1.0, q_pe=mod.pe(q_ids[..., 1:]))


def test_cross_attention_is_spatially_aware():
    """With content made identical everywhere (queries = keys), attention depends only on the RoPE of the relative
    (row, col) offset: every image token, target and condition alike, attends most to the semantic token at its own
    location."""
    torch.manual_seed(0)
    dim, heads, h, w = 32, 2, 5, 6
    mod = one_block_with_keys_equal_queries(dim, heads)
    tok = torch.randn(1, 1, dim).expand(1, h * w, dim)
    ctx = spatial_context(mod, tok, (h, w), kontext_ids(1, h, w), image_ids(1, h, w))
    ctx.after_block("double.0", torch.cat([tok, tok], dim=1))
    peaks = mod.record["double.0"][0][0].argmax(dim=-1)  # [L_img]
    assert torch.equal(peaks, torch.arange(h * w).repeat(2))


def test_shifting_the_semantic_map_shifts_the_attention_peak():
    """A blob whose content matches the queries draws the attention; move the blob, the peak moves with it."""
    torch.manual_seed(1)
    dim, heads, h, w = 32, 2, 6, 6
    mod = one_block_with_keys_equal_queries(dim, heads)
    u, b = torch.randn(dim), torch.randn(dim)
    img = u.expand(1, h * w, dim)
    ids = image_ids(1, h, w)
    for (r, c) in [(1, 1), (1, 4), (4, 2)]:
        sem = b.repeat(1, h * w, 1)
        sem[0, r * w + c] = u
        spatial_context(mod, sem, (h, w), ids, ids).after_block("double.0", img)
    peaks = [int(m[0].sum(dim=0).argmax()) for m in mod.record["double.0"]]  # key that receives the most attention
    assert peaks == [1 * w + 1, 1 * w + 4, 4 * w + 2]


def test_separate_blocks_act_after_their_block_only():
    """The separate form's context changes only the chosen blocks' image tokens (after the block), and nothing
    inside the attention."""
    torch.manual_seed(0)
    mod = bench.acting(separate_module(blocks="double"))
    ids = image_ids(1, 2, 3)
    img, tok = torch.randn(1, 6, 32), torch.randn(1, 6, 32)
    ctx = spatial_context(mod, tok, (2, 3), ids, ids)
    assert not torch.equal(ctx.after_block("double.0", img), img)
    assert ctx.after_block("single.0", img) is img and ctx.after_block("double.1", img) is img
    assert ctx.image_attention("double.0", torch.randn(1, 2, 6, 16)) is None


@pytest.mark.parametrize("scheme", ["xattn", "adapter"])
def test_recording_keeps_the_output_and_off_removes_the_hooks(scheme, params, kontext_inputs):
    """Recording is a forward hook: the output is the same, one heads-averaged [B, L_img, N] map (rows sum to 1)
    per chosen block and forward call (the adapter's semantic self-attention is not recorded); switching it on
    twice does not double the hooks; off removes them."""
    torch.manual_seed(0)
    model = Flux(params)
    sem_mod = attach(model, scheme_config(scheme, blocks="every:2"))
    for p in sem_mod.strength_parameters():
        p.data.fill_(0.5)
    x = kontext_inputs(params)
    check_recording(model, sem_mod, x, ["double.0", "single.0", "single.2"])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_batch_elements_are_independent(scheme, params, kontext_inputs):
    """The design note's nn.MultiheadAttention without batch_first would mix samples; ours must not."""
    torch.manual_seed(0)
    model = Flux(params)
    bench.acting(attach(model, scheme_config(scheme)))
    x = kontext_inputs(params)
    out = model(**x)
    x["semantic"] = x["semantic"].clone()
    x["semantic"][1] = torch.randn_like(x["semantic"][1])
    out2 = model(**x)
    assert torch.equal(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


def test_block_selection_and_parameter_savings(params):
    assert chosen_blocks("every:2", 5, 4) == ([0, 2, 4], [0, 2])
    assert chosen_blocks("double", 2, 3) == ([0, 1], []) and chosen_blocks("single", 2, 3) == ([], [0, 1, 2])
    assert chosen_blocks("all", 2, 3) == ([0, 1], [0, 1, 2])
    counts = {blocks: n_params(attach(Flux(params), replace(SEPARATE_B, blocks=blocks)))
              for blocks in ["all", "double", "every:2"]}
    assert counts["all"] > counts["every:2"] > counts["double"] > 0
    narrow = n_params(attach(Flux(params), replace(SEPARATE_B, inner_dim=32, num_heads=2)))
    assert narrow < counts["all"]
    for config in (SEPARATE_B, DEFAULT_B, PRESETS["adapter"], LEAN["decoupled-shared"]):
        assert parameter_count(config, params) == n_params(attach(Flux(params), config))  # counted on meta


@pytest.mark.parametrize("scheme", SCHEMES)
def test_semantic_strength_scales_the_update_per_sample(scheme, params, kontext_inputs):
    """strength 0 is the base model; a per-sample strength [1, 0] gives sample 0 the full update and sample 1
    the base."""
    torch.manual_seed(0)
    model = Flux(params).eval()
    x = kontext_inputs(params)
    sem = x.pop("semantic")
    base = model(**x)
    mod = attach(model, scheme_config(scheme))
    with torch.no_grad():
        for p in mod.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.5)
    check_strength_per_sample(model, x, sem, base)


def test_zeroconv_adds_to_the_condition_tokens_only(params, kontext_inputs):
    """Scheme A changes the input of the x_cond tokens (the last N) by strength * zeroconv(sem), nothing else."""
    torch.manual_seed(0)
    model = Flux(params)
    mod = bench.acting(attach(model, PRESETS["zeroconv"]))
    x = kontext_inputs(params)
    seen = []
    model.img_in.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**x, semantic_strength=0.5)
        delta = mod.zeroconv(x["semantic"], (3, 4))
    N = x["semantic"].shape[1]
    assert torch.equal(seen[0][:, :-N], x["img"][:, :-N])
    torch.testing.assert_close(seen[0][:, -N:], x["img"][:, -N:] + 0.5 * delta)
    assert delta.abs().amax() > 0


FORMS = {"separate": SEPARATE_B, "decoupled-shared": SemanticConfig(token_dim=32, shared_kv=True),
         "decoupled-cnn": SemanticConfig(token_dim=32, encoder="cnn"), "adapter": PRESETS["adapter"],
         "zeroconv": PRESETS["zeroconv"]}


@pytest.mark.parametrize("form", list(FORMS))
def test_gradient_checkpointing_same_gradients(small_params, kontext_inputs, form):
    """Checkpointing recomputes each block together with its semantic module (one unit): the gradients of every
    parameter, the semantic module's included, equal the uncheckpointed ones (the default B:
    tests/core/test_flux_model.py)."""
    torch.manual_seed(0)
    params = small_params()
    model = Flux(params)
    x = kontext_inputs(params)
    x["semantic"] = semantic_for(FORMS[form], x)
    bench.acting(attach(model, FORMS[form]))
    model.train()
    check_checkpointing_same_gradients(model, lambda: model(**x).square().mean())


def test_bad_inputs_get_clear_errors(params, kontext_inputs):
    x = kontext_inputs(params, h=3, w=4)
    sem = x.pop("semantic")
    with pytest.raises(ValueError, match="encoder vae"):
        attach(Flux(params), scheme_config("zeroconv", "cnn"))
    cnn = Flux(params)
    attach(cnn, SemanticConfig(encoder="cnn"))
    with pytest.raises(ValueError, match="multiples of 16"):
        cnn(**x, semantic=torch.zeros(2, 3, 40, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        CNNEncoder(8)(torch.zeros(2, 12, 64))  # packed latents given to the pixel encoder
    zc = Flux(params)
    attach(zc, PRESETS["zeroconv"])
    with pytest.raises(ValueError, match="Kontext order"):  # fewer image tokens than semantic tokens
        zc(**(x | {"img": x["img"][:, :6], "img_ids": x["img_ids"][:, :6]}), semantic=sem,
           semantic_ids=image_ids(2, 3, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        attach(Flux(params), replace(SEPARATE_B, num_heads=3))
    model = Flux(params)
    attach(model, SEPARATE_B)
    with pytest.raises(ValueError, match="already attached"):
        attach(model, PRESETS["adapter"])


def test_semantic_input_matches_encoder():
    class FakeVAE:
        def encode(self, x):
            return torch.ones(x.shape[0], 16, x.shape[2] // 8, x.shape[3] // 8)
    configs = [scheme_config(s, e) for s, e in COMBOS]
    assert [c.takes_pixels for c in configs] == [e == "cnn" for _, e in COMBOS]
    img = torch.zeros(1, 3, 32, 48)
    assert semantic_input(scheme_config("xattn", "cnn"), img) is img
    assert semantic_input(scheme_config("adapter", "cnn"), img) is img
    assert semantic_input(SEPARATE_B, img, FakeVAE()).shape == (1, 6, 64)
    assert semantic_input(PRESETS["zeroconv"], img, FakeVAE()).shape == (1, 6, 64)
    assert CNNEncoder(8)(img)[0].shape == (1, 6, 8) and CNNEncoder(8)(img)[1] == (2, 3)  # the VAE path's /16 grid


# ---------------------------------------------------------------------------------------------------------------
# The compute dtype: fp32 scales and gates do not promote a bf16 stream

STRENGTH_SCHEMES = {"zeroconv": PRESETS["zeroconv"], "separate": SEPARATE_B, "adapter": PRESETS["adapter"]}


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
@pytest.mark.parametrize("scheme", list(STRENGTH_SCHEMES))
def test_fp32_scales_and_gates_keep_a_bf16_stream_in_bf16(params, kontext_inputs, scheme, mode):
    """A's strength, separate B's scale and C's gate are fp32 (1,) parameters. Multiplied as they were, they turned
    the stream fp32 after the first block (separate B, C: every later block then ran its elementwise work in fp32)
    or the tokens img_in takes (A). Cast where they multiply, every block's output, the semantic modules' and
    img_in's input stay bf16, under CPU autocast over an fp32 module and in plain bf16 alike."""
    model = bf16_model_with_fp32_strengths(params, STRENGTH_SCHEMES[scheme], attach, mode)
    assert all(p.dtype == torch.float32 for p in model.semantic.strength_parameters())
    dtypes = stream_dtypes(model, bf16_inputs(kontext_inputs(params)), autocast=mode == "autocast")
    n_blocks = params.depth + params.depth_single_blocks
    assert len(dtypes) == (n_blocks + 3 if scheme == "zeroconv" else 2 * n_blocks + 2)
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes


def test_in_fp32_every_scheme_computes_exactly_what_it_did(params, kontext_inputs):
    """In fp32 the casts are no-ops: each module's output is, bit for bit, its formula as written before them (a
    per-sample strength included): A  strength * scale * zeroconv(sem) added to the x_cond tokens; separate B
    img + strength * scale * LN(CrossAttn(img, sem)); C  img + strength * gate * adapter(img, sem)."""
    strength = torch.tensor([0.5, 1.0])
    for scheme, config in STRENGTH_SCHEMES.items():
        torch.manual_seed(0)
        model = Flux(params)
        mod = bench.acting(attach(model, config))
        calls, inputs = [], []
        watched = [mod.zeroconv] if scheme == "zeroconv" else list(mod.blocks().values())
        for m in watched:
            m.register_forward_hook(lambda m, a, out: calls.append((m, *a, out)))
        model.img_in.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
        x = kontext_inputs(params)
        with torch.no_grad():
            assert model(**x, semantic_strength=strength).dtype == torch.float32
            assert len(calls) == (1 if scheme == "zeroconv" else params.depth + params.depth_single_blocks)
            for block, a, ctx, out in calls:
                if scheme == "zeroconv":  # a: the packed latents, ctx: their grid
                    h = block.zero(F.silu(block.conv(rearrange(a, "b (h w) c -> b c h w", h=ctx[0], w=ctx[1]))))
                    before = block.scale * rearrange(h, "b c h w -> b (h w) c")
                    N = a.shape[1]
                    img = torch.cat((x["img"][:, :-N], x["img"][:, -N:] + strength[:, None, None] * out), dim=1)
                    assert torch.equal(inputs[0], img)
                elif scheme == "separate":
                    before = a + ctx.strength * block.scale * block.norm(block.attn(a, ctx.tokens, ctx.q_pe, ctx.k_pe))
                else:
                    t = block.sem_norm(ctx.tokens)
                    t = ctx.tokens + block.self_attn(t, t, ctx.k_pe, ctx.k_pe)
                    h = block.cross_attn(block.img_norm(a), t, ctx.q_pe, ctx.k_pe)
                    before = a + ctx.strength * block.gate * (h + block.ff(block.ff_norm(h)))
                assert out.dtype == torch.float32 and torch.equal(out, before), scheme
