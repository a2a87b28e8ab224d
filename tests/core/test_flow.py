"""flow.py: latents packed into tokens and their ids, FLUX's sampling schedule (reference values), seeded noise,
the noising formula, the Kontext velocity call (condition tokens appended, their outputs dropped) and Euler
integration."""

import pytest
import torch

import flow
from flow import image_ids, kontext_ids, pack, text_ids, unpack


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
    both = kontext_ids(2, 2, 3)  # target tokens (index 0) first, then the condition tokens on the same grid
    assert torch.equal(both, torch.cat([image_ids(2, 2, 3), ids], dim=1))


def test_schedule_matches_reference_values():
    shifted = flow.get_schedule(4, 4096)
    assert shifted == pytest.approx([1.0, 0.904531, 0.759511, 0.512844, 0.0], abs=1e-6)
    assert flow.get_schedule(4, 4096, shift=False) == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    mu = flow.get_lin_function()
    assert mu(256) == pytest.approx(0.5) and mu(4096) == pytest.approx(1.15)


def test_noise_is_seeded_and_device_independent():
    a = flow.get_noise(1, 48, 80, seed=3)
    assert a.shape == (1, 16, 6, 10)
    assert torch.equal(a, flow.get_noise(1, 48, 80, seed=3))
    assert not torch.equal(a, flow.get_noise(1, 48, 80, seed=4))


def test_noised_interpolates_data_and_noise_and_targets_their_difference():
    x0, noise = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    x_t, v = flow.noised(x0, noise, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])
    assert torch.equal(v, noise - x0)


@pytest.mark.parametrize("kind", ["logit_normal", "uniform", "shifted"])
def test_training_times_are_in_the_open_unit_interval_and_seeded(kind):
    t = flow.sample_t(1000, torch.Generator().manual_seed(0), kind, seq_len=4096)
    assert t.shape == (1000,) and 0 < t.min() and t.max() < 1
    assert torch.equal(t, flow.sample_t(1000, torch.Generator().manual_seed(0), kind, seq_len=4096))
    if kind == "shifted":  # the resolution shift moves times towards noise
        assert t.mean() > flow.sample_t(1000, torch.Generator().manual_seed(0)).mean()


class Recorder(torch.nn.Module):
    """A stand-in transformer: returns 2 * img, and remembers what it was called with."""

    def forward(self, **kw):
        self.kw = kw
        return 2 * kw["img"]


def condition(B=2, h=2, w=3):
    return flow.make_condition(torch.randn(B, h * w, 64), None, (torch.zeros(1, 1, 8), text_ids(1, 1),
                                                                 torch.zeros(1, 4)), h, w)


def test_velocity_appends_the_condition_tokens_and_drops_their_outputs():
    model, cond, x = Recorder(), condition(), torch.randn(2, 6, 64)
    v = flow.velocity(model, x, torch.full((2,), 0.5), cond)
    assert torch.equal(model.kw["img"], torch.cat([x, cond.x_cond], dim=1))  # [x_t | x_cond]
    assert torch.equal(model.kw["img_ids"], kontext_ids(2, 2, 3))
    assert model.kw["txt"].shape == (2, 1, 8) and model.kw["y"].shape == (2, 4)
    assert torch.equal(v, 2 * x)  # only the x_t tokens' outputs


def test_euler_integrates_a_constant_velocity_exactly():
    class Constant(torch.nn.Module):
        def forward(self, img, **kw):
            return torch.ones_like(img)
    x = torch.randn(2, 6, 64)
    out = flow.denoise(Constant(), x, condition(), flow.get_schedule(7, 6))
    torch.testing.assert_close(out, x - 1)  # sum of (t_next - t) from 1 to 0 is -1


class SemanticToy(torch.nn.Module):
    """img -> 2 img without a semantic input, 2 img + strength * semantic with one (on the x_t tokens)."""

    def forward(self, img, semantic=None, semantic_strength=1.0, **kw):
        out = 2 * img
        if semantic is not None:
            out[:, : semantic.shape[1]] += semantic_strength * semantic
        return out


def test_semantic_guidance_with_w_1_is_the_plain_conditional_prediction():
    cond, x, t = condition(), torch.randn(2, 6, 64), torch.full((2,), 0.5)
    cond.semantic = torch.randn(2, 6, 64)
    model = SemanticToy()
    plain = flow.velocity(model, x, t, cond)
    assert torch.equal(flow.guided_velocity(model, x, t, cond, sem_guidance=1.0), plain)
    without = flow.velocity(model, x, t, flow.replace(cond, semantic=None))
    torch.testing.assert_close(flow.guided_velocity(model, x, t, cond, sem_guidance=0.0), without)
    torch.testing.assert_close(flow.guided_velocity(model, x, t, cond, sem_guidance=3.0),
                               without + 3 * (plain - without))
    cond.sem_strength = 0.5  # the strength reaches the model
    torch.testing.assert_close(flow.velocity(model, x, t, cond), 2 * x + 0.5 * cond.semantic)


def test_denoise_on_the_transformer_takes_the_per_sample_strength_and_guidance():
    """flow.denoise on a Flux with scheme B acting: a per-sample strength [1.5, 0] gives sample 1 exactly the base's
    sample (no semantic input) and sample 0 another; semantic guidance changes only the sample that has a semantic
    update. (The condition cache's sampling: tests/extras/test_condition_cache.py.)"""
    from conftest import small_flux_params
    from flux_model import Flux
    from sem_cross_attn import DEFAULT_B, attach
    torch.manual_seed(0)
    model = Flux(small_flux_params()).eval()
    sem_mod = attach(model, DEFAULT_B)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sem_mod.parameters():
            if p.ndim > 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    B, h, w = 2, 3, 4
    text = (torch.randn(1, 5, 32, generator=g), text_ids(1, 5), torch.randn(1, 16, generator=g))
    cond = flow.make_condition(torch.randn(B, h * w, 64, generator=g), torch.randn(B, h * w, 64, generator=g), text,
                               h, w)
    x = torch.randn(B, h * w, 64, generator=g)
    ts = flow.get_schedule(4, h * w)
    with torch.no_grad():
        base = flow.denoise(model, x, flow.replace(cond, semantic=None), ts, guidance=3.5)
        cond.sem_strength = torch.tensor([1.5, 0.0])
        ours = flow.denoise(model, x, cond, ts, guidance=3.5)
        guided = flow.denoise(model, x, cond, ts, guidance=3.5, sem_guidance=2.0)
    torch.testing.assert_close(ours[1], base[1])
    torch.testing.assert_close(guided[1], base[1])
    assert not torch.allclose(ours[0], base[0]) and not torch.allclose(guided[0], ours[0])
