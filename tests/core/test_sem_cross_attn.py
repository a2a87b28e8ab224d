"""Semantic conditioning: identity at zero init, learning starts, checkpoint key names, spatial awareness of the
cross-attention, attention recording by hooks, batch independence, and clear errors."""

import pytest
import torch
import torch.nn.functional as F

from flow import image_ids, kontext_ids
from flux_model import Flux
from sem_cross_attn import (SCHEMES, BASELINES, SemanticConfig, SemanticCrossAttention, SemanticContext,
                            XAttnModule, attach, attention_weights, overlay, chosen_blocks, semantic_input)

# every valid scheme x encoder (zeroconv adds to the latent tokens, so it takes the vae latents only)
COMBOS = [(s, e) for s in SCHEMES for e in ("vae", "cnn") if not (s == "zeroconv" and e == "cnn")]


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


@pytest.mark.parametrize("scheme,encoder", COMBOS)
def test_identity_at_init(scheme, encoder, params, kontext_inputs):
    torch.manual_seed(0)
    model = Flux(params).eval()
    x = kontext_inputs(params)
    config = SemanticConfig(scheme=scheme, encoder=encoder)
    sem = semantic_for(config, x)
    del x["semantic"]
    base = model(**x)
    attach(model, config)
    assert torch.equal(model(**x, semantic=sem), base)


def test_base_state_dict_unchanged_by_the_module(params):
    keys = set(Flux(params).state_dict())
    model = Flux(params)
    attach(model, SemanticConfig())
    assert {k for k in model.state_dict() if not k.startswith("semantic.")} == keys


ATTN = ["to_q.weight", "to_q.bias", "to_kv.weight", "to_kv.bias", "q_norm.scale", "k_norm.scale", "proj.weight",
        "proj.bias"]
BLOCK_KEYS = {
    "xattn": [f"attn.{k}" for k in ATTN] + ["norm.weight", "norm.bias", "scale"],
    "adapter": [f"{a}.{k}" for a in ("self_attn", "cross_attn") for k in ATTN]
    + [f"{n}.{k}" for n in ("sem_norm", "ff_norm", "ff.0", "ff.2") for k in ("weight", "bias")] + ["gate"],
}
ENCODER_KEYS = {"vae": ["net.0", "net.2"], "cnn": ["net.0", "net.2", "net.4", "net.6"]}


@pytest.mark.parametrize("scheme,encoder", COMBOS)
def test_checkpoint_key_names(scheme, encoder, params):
    """The state dict names are what saved checkpoints (weights/demo/*.safetensors) hold."""
    model = Flux(params)
    attach(model, SemanticConfig(scheme=scheme, encoder=encoder, blocks="every:2"))
    keys = {k for k in model.state_dict() if k.startswith("semantic.")}
    if scheme == "zeroconv":
        expected = {f"semantic.zeroconv.{k}" for k in ("conv.weight", "conv.bias", "zero.weight", "zero.bias", "scale")}
    else:
        expected = {f"semantic.encoder.{n}.{k}" for n in ENCODER_KEYS[encoder] for k in ("weight", "bias")}
        for kind, ids in (("double", [0]), ("single", [0, 2])):
            expected |= {f"semantic.{kind}_blocks.{i}.{k}" for i in ids for k in BLOCK_KEYS[scheme]}
    assert keys == expected


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_init_does_not_stall_learning(scheme, params, kontext_inputs):
    """Step 1: the scales/gates (or the zero conv) move. Step 2: every semantic parameter gets a gradient."""
    torch.manual_seed(0)
    model = Flux(params)
    model.requires_grad_(False)
    sem_mod = attach(model, SemanticConfig(scheme=scheme))
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


def one_block_with_keys_equal_queries(dim, heads):
    """A scheme B module with one injection (double.0) whose keys are computed with the query weights, so
    q_i == k_j for equal content; recording on."""
    mod = XAttnModule(SemanticConfig(blocks="double"), dim, heads, 1, 0)
    block = mod.double_blocks["0"]
    assert isinstance(block, SemanticCrossAttention)
    with torch.no_grad():
        block.attn.to_kv.weight[:dim] = block.attn.to_q.weight
        block.attn.to_kv.bias[:dim] = block.attn.to_q.bias
    mod.record_attention(True)
    return mod


def test_cross_attention_is_spatially_aware():
    """With content made identical everywhere (queries = keys), attention depends only on the RoPE of the relative
    (row, col) offset: every image token, target and condition alike, attends most to the semantic token at its own
    location."""
    torch.manual_seed(0)
    dim, heads, h, w = 32, 2, 5, 6
    mod = one_block_with_keys_equal_queries(dim, heads)
    tok = torch.randn(1, 1, dim).expand(1, h * w, dim)
    ctx = SemanticContext(tokens=tok, grid=(h, w), q_pe=mod.pe(kontext_ids(1, h, w)[..., 1:]),
                          k_pe=mod.pe(image_ids(1, h, w)[..., 1:]))
    mod.after_double(0, torch.cat([tok, tok], dim=1), ctx)
    peaks = mod.record["double.0"][0][0].argmax(dim=-1)  # [L_img]
    assert torch.equal(peaks, torch.arange(h * w).repeat(2))


def test_shifting_the_semantic_map_shifts_the_attention_peak():
    """A blob whose content matches the queries draws the attention; move the blob, the peak moves with it."""
    torch.manual_seed(1)
    dim, heads, h, w = 32, 2, 6, 6
    mod = one_block_with_keys_equal_queries(dim, heads)
    u, b = torch.randn(dim), torch.randn(dim)
    img = u.expand(1, h * w, dim)
    pe = mod.pe(image_ids(1, h, w)[..., 1:])
    for (r, c) in [(1, 1), (1, 4), (4, 2)]:
        sem = b.repeat(1, h * w, 1)
        sem[0, r * w + c] = u
        mod.after_double(0, img, SemanticContext(tokens=sem, grid=(h, w), q_pe=pe, k_pe=pe))
    peaks = [int(m[0].sum(dim=0).argmax()) for m in mod.record["double.0"]]  # key that receives the most attention
    assert peaks == [1 * w + 1, 1 * w + 4, 4 * w + 2]


@pytest.mark.parametrize("scheme", ["xattn", "adapter"])
def test_recording_keeps_the_output_and_off_removes_the_hooks(scheme, params, kontext_inputs):
    """Recording is a forward hook: the output is the same, one heads-averaged [B, L_img, N] map (rows sum to 1)
    per chosen block and forward call (the adapter's semantic self-attention is not recorded); switching it on
    twice does not double the hooks; off removes them."""
    torch.manual_seed(0)
    model = Flux(params)
    sem_mod = attach(model, SemanticConfig(scheme=scheme, blocks="every:2"))
    for p in sem_mod.strength_parameters():
        p.data.fill_(0.5)
    x = kontext_inputs(params)
    fused = model(**x)
    sem_mod.record_attention(True)
    sem_mod.record_attention(True)
    assert torch.equal(model(**x), fused)
    model(**x)
    assert sorted(sem_mod.record) == ["double.0", "single.0", "single.2"]
    L_img, N = x["img"].shape[1], x["semantic"].shape[1]
    for maps in sem_mod.record.values():
        assert len(maps) == 2 and maps[0].shape == (2, L_img, N)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, L_img))
    sem_mod.record_attention(False)
    assert sem_mod.record is None
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert torch.equal(model(**x), fused)


def test_recorded_weights_are_the_fused_attention():
    """The softmax the hook records is the one the fused attention applies: weights @ v == sdpa(q, k, v)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 24, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    torch.testing.assert_close(attention_weights(q, k) @ v, F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_batch_elements_are_independent(params, kontext_inputs):
    """The design note's nn.MultiheadAttention without batch_first would mix samples; ours must not."""
    torch.manual_seed(0)
    model = Flux(params)
    sem_mod = attach(model, SemanticConfig())
    for p in sem_mod.strength_parameters():
        p.data.fill_(1.0)
    x = kontext_inputs(params)
    out = model(**x)
    x["semantic"] = x["semantic"].clone()
    x["semantic"][1] = torch.randn_like(x["semantic"][1])
    out2 = model(**x)
    assert torch.equal(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


def test_block_selection_and_parameter_savings(params):
    assert chosen_blocks("every:2", 5, 4) == ([0, 2, 4], [0, 2])
    counts = {blocks: n_params(attach(Flux(params), SemanticConfig(blocks=blocks)))
              for blocks in ["all", "double", "every:2"]}
    assert counts["all"] > counts["every:2"] > counts["double"] > 0
    narrow = n_params(attach(Flux(params), SemanticConfig(inner_dim=32, num_heads=2)))
    assert narrow < counts["all"]


def test_bad_inputs_get_clear_errors(params, kontext_inputs):
    model = Flux(params)
    attach(model, SemanticConfig())
    x = kontext_inputs(params, h=3, w=4)
    sem = x.pop("semantic")
    with pytest.raises(ValueError, match="semantic_ids"):
        model(**x, semantic=sem[:, :6], semantic_ids=image_ids(2, 3, 4))
    with pytest.raises(ValueError, match="batch"):
        model(**x, semantic=sem[:1])
    with pytest.raises(ValueError, match="already attached"):
        attach(model, SemanticConfig())
    with pytest.raises(ValueError, match="unknown scheme"):
        SemanticConfig(scheme="xatn").validate()
    with pytest.raises(ValueError, match="unknown scheme"):
        attach(Flux(params), SemanticConfig(scheme="overlay"))  # a baseline: no module
    with pytest.raises(ValueError, match="encoder vae"):
        SemanticConfig(scheme="zeroconv", encoder="cnn").validate()
    with pytest.raises(ValueError, match="blocks"):
        SemanticConfig(blocks="every:0").validate()
    with pytest.raises(ValueError, match="one size"):
        overlay(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 48))
    cnn = Flux(params)
    attach(cnn, SemanticConfig(encoder="cnn"))
    with pytest.raises(ValueError, match="multiples of 16"):
        cnn(**x, semantic=torch.zeros(2, 3, 40, 64))


def test_module_schemes_and_baselines_are_apart(params):
    """Every module scheme attaches; a baseline name is no module scheme (the run's choices are both lists)."""
    assert not set(SCHEMES) & set(BASELINES)
    for scheme in SCHEMES:
        assert attach(Flux(params), SemanticConfig(scheme=scheme)).config.scheme == scheme
    for name in BASELINES:
        with pytest.raises(ValueError, match="unknown scheme"):
            SemanticConfig(scheme=name).validate()


def test_semantic_input_matches_encoder():
    class FakeVAE:
        def encode(self, x):
            return torch.ones(x.shape[0], 16, x.shape[2] // 8, x.shape[3] // 8)
    assert [SemanticConfig(scheme=s, encoder=e).takes_pixels for s, e in COMBOS] == \
        [e == "cnn" for _, e in COMBOS]
    img = torch.zeros(1, 3, 32, 48)
    assert semantic_input(SemanticConfig(encoder="cnn"), img) is img
    assert semantic_input(SemanticConfig(scheme="adapter", encoder="cnn"), img) is img
    assert semantic_input(SemanticConfig(), img, FakeVAE()).shape == (1, 6, 64)
    assert semantic_input(SemanticConfig(scheme="zeroconv"), img, FakeVAE()).shape == (1, 6, 64)
    with pytest.raises(ValueError, match="autoencoder"):
        semantic_input(SemanticConfig(), img)


LEAN = {"decoupled": SemanticConfig(attention="decoupled", token_dim=16),
        "decoupled-shared": SemanticConfig(attention="decoupled", token_dim=16, shared_kv=True),
        "decoupled-double": SemanticConfig(attention="decoupled", token_dim=16, blocks="double"),
        "narrow-tokens": SemanticConfig(token_dim=16)}


@pytest.mark.parametrize("form", list(LEAN))
def test_lean_variants_are_the_identity_at_init_and_every_weight_learns_after_one_step(form, params, kontext_inputs):
    torch.manual_seed(0)
    model = Flux(params)
    model.requires_grad_(False)
    x = kontext_inputs(params)
    sem = x.pop("semantic")
    base = model(**x)
    sem_mod = attach(model, LEAN[form])
    assert torch.equal(model(**x, semantic=sem), base)
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


def test_decoupled_attention_adds_only_semantic_keys_and_values(params):
    """The IP-Adapter construction: per block only a K/V projection from the (narrow) semantic tokens, a key norm
    and a strength; queries and output projection are the block's own. Shared K/V: one projection for all."""
    model = Flux(params)
    mod = attach(model, SemanticConfig(attention="decoupled", token_dim=16))
    D = params.hidden_size
    assert set(model.semantic.double_blocks["0"].state_dict()) == {"to_kv.weight", "to_kv.bias", "k_norm.scale",
                                                                    "scale"}
    assert mod.double_blocks["0"].to_kv.weight.shape == (2 * D, 16)
    shared = attach(Flux(params), SemanticConfig(attention="decoupled", token_dim=16, shared_kv=True))
    assert set(shared.single_blocks["1"].state_dict()) == {"k_norm.scale", "scale"}
    assert shared.shared.weight.shape == (2 * D, 16)
    assert n_params(shared) < n_params(mod) < n_params(attach(Flux(params), SemanticConfig()))


def test_shifting_the_semantic_map_shifts_the_decoupled_attention_peak(params):
    """The semantic keys carry RoPE from their own grid: a blob that matches the block's queries draws the
    attention, and moving the blob moves the peak."""
    torch.manual_seed(1)
    D, H = params.hidden_size, params.num_heads
    mod = attach(Flux(params), SemanticConfig(attention="decoupled", token_dim=D, blocks="double"))
    block = mod.double_blocks["0"]
    with torch.no_grad():  # keys = the tokens themselves
        block.to_kv.weight[:D] = torch.eye(D)
        block.to_kv.bias.zero_()
    mod.record_attention(True)
    h = w = 6
    u, b = torch.randn(D), torch.randn(D)
    q = rearrange_heads(u.expand(1, h * w, D), H)
    ids = image_ids(1, h, w)
    for (r, c) in [(1, 1), (1, 4), (4, 2)]:
        sem = b.repeat(1, h * w, 1)
        sem[0, r * w + c] = u
        ctx = SemanticContext(tokens=sem, grid=(h, w), q_pe=None, k_pe=mod.pe(ids))
        block(block.k_norm(q), mod.pe(ids), ctx)
    peaks = [int(m[0].sum(dim=0).argmax()) for m in mod.record["double.0"]]
    assert peaks == [1 * w + 1, 1 * w + 4, 4 * w + 2]


def rearrange_heads(x, heads):
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # [B, L, D] -> [B, H, L, Dh]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_semantic_strength_scales_the_update_per_sample(scheme, params, kontext_inputs):
    """strength 0 is the base model; a per-sample strength [1, 0] gives sample 0 the full update and sample 1
    the base."""
    torch.manual_seed(0)
    model = Flux(params).eval()
    x = kontext_inputs(params)
    sem = x.pop("semantic")
    base = model(**x)
    mod = attach(model, SemanticConfig(scheme=scheme))
    with torch.no_grad():
        for p in mod.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.5)
    full = model(**x, semantic=sem)
    assert not torch.allclose(full, base)
    assert torch.equal(model(**x, semantic=sem, semantic_strength=0.0), base)
    mixed = model(**x, semantic=sem, semantic_strength=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(mixed[0], full[0])
    torch.testing.assert_close(mixed[1], base[1])
    with pytest.raises(ValueError, match="one per sample"):
        model(**x, semantic=sem, semantic_strength=torch.ones(3))


def test_lean_options_are_checked():
    for bad, match in [(dict(attention="sideways"), "unknown semantic attention"),
                       (dict(attention="decoupled", scheme="adapter"), "needs scheme xattn"),
                       (dict(attention="decoupled", inner_dim=64), "own heads and width"),
                       (dict(shared_kv=True), "option of the decoupled"),
                       (dict(scheme="zeroconv", token_dim=8), "scheme xattn only")]:
        with pytest.raises(ValueError, match=match):
            SemanticConfig(**bad).validate()
