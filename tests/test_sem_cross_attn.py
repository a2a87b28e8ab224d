"""Semantic conditioning: identity at zero init, learning starts, spatial awareness of the cross-attention,
attention recording, batch independence, and clear errors."""

import pytest
import torch

from flux_model import Flux, FluxParams, image_ids, text_ids, pack
from sem_cross_attn import (SemanticConfig, SemanticCrossAttention, SemanticContext, attach, detach, overlay,
                            count_parameters, chosen_blocks, semantic_input)


def tiny(guidance=False):
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=64,
                      mlp_ratio=2.0, num_heads=4, depth=2, depth_single_blocks=3, axes_dim=[4, 6, 6], theta=10_000,
                      qkv_bias=True, guidance_embed=guidance)


def inputs(B=2, h=3, w=4, seed=0):
    """Kontext layout: [x_t | x_cond] image tokens, semantic tokens on the target grid."""
    g = torch.Generator().manual_seed(seed)
    n = h * w
    img = torch.randn(B, 2 * n, 64, generator=g)
    ids = torch.cat([image_ids(B, h, w), image_ids(B, h, w, index=1)], dim=1)
    return dict(img=img, img_ids=ids, txt=torch.randn(B, 5, 32, generator=g), txt_ids=text_ids(B, 5),
                timesteps=torch.rand(B, generator=g), y=torch.randn(B, 16, generator=g)), \
        torch.randn(B, n, 64, generator=g), torch.randn(B, 3, 16 * h, 16 * w, generator=g)


SCHEMES = [("xattn", "vae"), ("xattn", "cnn"), ("adapter", "vae"), ("adapter", "cnn"), ("zeroconv", "vae")]


@pytest.mark.parametrize("scheme,encoder", SCHEMES)
def test_identity_at_init(scheme, encoder):
    torch.manual_seed(0)
    model = Flux(tiny()).eval()
    x, sem_latents, sem_image = inputs()
    base = model(**x)
    attach(model, SemanticConfig(scheme=scheme, encoder=encoder))
    sem = sem_image if encoder == "cnn" else sem_latents
    assert torch.equal(model(**x, semantic=sem), base)


def test_base_state_dict_unchanged_without_module():
    model = Flux(tiny())
    keys = set(model.state_dict())
    attach(model, SemanticConfig())
    assert {k for k in model.state_dict() if not k.startswith("semantic.")} == keys
    detach(model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("scheme", ["xattn", "adapter", "zeroconv"])
def test_zero_init_does_not_stall_learning(scheme):
    """Step 1: the scales/gates (or the zero conv) move. Step 2: every semantic parameter gets a gradient."""
    torch.manual_seed(0)
    model = Flux(tiny())
    model.requires_grad_(False)
    sem_mod = attach(model, SemanticConfig(scheme=scheme))
    params = list(sem_mod.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    x, sem, _ = inputs()
    target = torch.randn(2, x["img"].shape[1], 64)
    before = {n: p.detach().clone() for n, p in sem_mod.named_parameters()}
    for step in range(2):
        opt.zero_grad()
        loss = (model(**x, semantic=sem) - target).square().mean()
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
                assert len(strengths) == 5  # one per block of the tiny model (2 double + 3 single)
                moved = all(float(p.detach()) != 0.0 for p in strengths)
            assert moved


def test_cross_attention_is_spatially_aware():
    """With content made identical everywhere (queries = keys), attention depends only on the RoPE of the relative
    (row, col) offset: every image token, target and condition alike, attends most to the semantic token at its own
    location."""
    torch.manual_seed(0)
    dim, heads, h, w = 32, 2, 5, 6
    m = SemanticCrossAttention(dim, dim, heads)
    with torch.no_grad():  # keys computed with the query weights, so q_i == k_j for equal content
        m.attn.to_kv.weight[:dim] = m.attn.to_q.weight
        m.attn.to_kv.bias[:dim] = m.attn.to_q.bias
    from sem_cross_attn import SemanticModule
    pe = SemanticModule(SemanticConfig(), dim, heads, 1, 1).pe
    tok = torch.randn(1, 1, dim).expand(1, h * w, dim)
    img_ids = torch.cat([image_ids(1, h, w), image_ids(1, h, w, index=1)], dim=1)
    ctx = SemanticContext(tokens=tok, raw=None, grid=(h, w), q_pe=pe(img_ids[..., 1:]),
                          k_pe=pe(image_ids(1, h, w)[..., 1:]))
    record = []
    m(torch.cat([tok, tok], dim=1), ctx, record)
    peaks = record[0][0].argmax(dim=-1)  # [L_img]
    assert torch.equal(peaks, torch.arange(h * w).repeat(2))


def test_shifting_the_semantic_map_shifts_the_attention_peak():
    """A blob whose content matches the queries draws the attention; move the blob, the peak moves with it."""
    torch.manual_seed(1)
    dim, heads, h, w = 32, 2, 6, 6
    m = SemanticCrossAttention(dim, dim, heads)
    with torch.no_grad():
        m.attn.to_kv.weight[:dim] = m.attn.to_q.weight
        m.attn.to_kv.bias[:dim] = m.attn.to_q.bias
    from sem_cross_attn import SemanticModule
    pe = SemanticModule(SemanticConfig(), dim, heads, 1, 1).pe
    u, b = torch.randn(dim), torch.randn(dim)
    img = u.expand(1, h * w, dim)
    peaks = []
    for (r, c) in [(1, 1), (1, 4), (4, 2)]:
        sem = b.repeat(1, h * w, 1)
        sem[0, r * w + c] = u
        ctx = SemanticContext(tokens=sem, raw=None, grid=(h, w), q_pe=pe(image_ids(1, h, w)[..., 1:]),
                              k_pe=pe(image_ids(1, h, w)[..., 1:]))
        record = []
        m(img, ctx, record)
        peaks.append(int(record[0][0].sum(dim=0).argmax()))  # key that receives the most attention
    assert peaks == [1 * w + 1, 1 * w + 4, 4 * w + 2]


def test_attention_recorder_and_fused_path_agree():
    torch.manual_seed(0)
    model = Flux(tiny())
    sem_mod = attach(model, SemanticConfig(blocks="every:2"))
    for p in sem_mod.strength_parameters():
        p.data.fill_(0.5)
    x, sem, _ = inputs()
    fused = model(**x, semantic=sem)
    sem_mod.record_attention(True)
    recorded = model(**x, semantic=sem)
    torch.testing.assert_close(recorded, fused, atol=1e-5, rtol=1e-5)
    assert sorted(sem_mod.record) == ["double.0", "single.0", "single.2"]
    maps = sem_mod.record["single.2"][0]
    assert maps.shape == (2, x["img"].shape[1], sem.shape[1])
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, x["img"].shape[1]))


def test_batch_elements_are_independent():
    """The design note's nn.MultiheadAttention without batch_first would mix samples; ours must not."""
    torch.manual_seed(0)
    model = Flux(tiny())
    sem_mod = attach(model, SemanticConfig())
    for p in sem_mod.strength_parameters():
        p.data.fill_(1.0)
    x, sem, _ = inputs()
    out = model(**x, semantic=sem)
    sem2 = sem.clone()
    sem2[1] = torch.randn_like(sem2[1])
    out2 = model(**x, semantic=sem2)
    assert torch.equal(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


def test_block_selection_and_parameter_savings():
    assert chosen_blocks("every:2", 5, 4) == ([0, 2, 4], [0, 2])
    counts = {}
    for blocks in ["all", "double", "every:2"]:
        model = Flux(tiny())
        counts[blocks] = count_parameters(attach(model, SemanticConfig(blocks=blocks)))
    assert counts["all"] > counts["every:2"] > counts["double"] > 0
    narrow = count_parameters(attach(Flux(tiny()), SemanticConfig(inner_dim=32, num_heads=2)))
    assert narrow < counts["all"]


def test_bad_inputs_get_clear_errors():
    model = Flux(tiny())
    attach(model, SemanticConfig())
    x, sem, _ = inputs(h=3, w=4)
    with pytest.raises(ValueError, match="semantic_ids"):
        model(**x, semantic=sem[:, :6], semantic_ids=image_ids(2, 3, 4))
    with pytest.raises(ValueError, match="batch"):
        model(**x, semantic=sem[:1])
    with pytest.raises(ValueError, match="unknown scheme"):
        SemanticConfig(scheme="xatn").validate()
    with pytest.raises(ValueError, match="blocks"):
        SemanticConfig(blocks="every:0").validate()
    with pytest.raises(ValueError, match="one size"):
        overlay(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 48))
    cnn = Flux(tiny())
    attach(cnn, SemanticConfig(encoder="cnn"))
    with pytest.raises(ValueError, match="multiples of 16"):
        cnn(**x, semantic=torch.zeros(2, 3, 40, 64))


def test_semantic_input_matches_encoder():
    class FakeVAE:
        def encode(self, x):
            return torch.ones(x.shape[0], 16, x.shape[2] // 8, x.shape[3] // 8)
    img = torch.zeros(1, 3, 32, 48)
    assert semantic_input(SemanticConfig(encoder="cnn"), img) is img
    assert semantic_input(SemanticConfig(), img, FakeVAE()).shape == (1, 6, 64)
    with pytest.raises(ValueError, match="autoencoder"):
        semantic_input(SemanticConfig(), img)
