"""The condition cache (extras/condition_cache.py): its attention is Kontext's joint attention with the condition rows
masked, it needs Kontext's condition tokens, a step costs about half a Kontext step, a sampling run computes the
condition pass once (with the same result as computing it every step), gradient checkpointing trains through the
cached keys and values, scheme A acts in the condition pass only, and the pipeline samples through it."""

import pytest
import torch
import torch.nn.functional as F

import flow
import pipeline
from tools import bench
from tools.measure import count_flops
from flow import image_ids, text_ids
from flux_model import Flux, attention
from sem_cross_attn import DEFAULT_B, SemanticConfig
from extras.condition_cache import Cached, ConditionCache, condition_tokens
from extras.schemes import PRESETS, attach
from conftest import check_checkpointing_same_gradients

FORMS = {"base": None, "scheme-b": SemanticConfig(token_dim=32),
         "separate": SemanticConfig(attention="separate", token_dim=0),
         "decoupled-shared": SemanticConfig(token_dim=32, shared_kv=True),
         "decoupled-cnn": SemanticConfig(token_dim=32, encoder="cnn"),
         "adapter": PRESETS["adapter"], "zeroconv": PRESETS["zeroconv"]}


def model_with(params, form, x):
    """A Flux with the semantic form `form` attached and acting (bench.acting); x's `semantic` made to fit it."""
    model = Flux(params)
    config = FORMS[form]
    if config is None:
        x.pop("semantic")
    else:
        bench.acting(attach(model, config))
        if config.takes_pixels:
            B, N = x["semantic"].shape[:2]
            x["semantic"] = torch.randn(B, 3, 16 * 3, 16 * (N // 3), generator=torch.Generator().manual_seed(5))
    return model


def counting(model: Flux) -> list:
    """Every call of the transformer's forward appends its number of image tokens."""
    calls = []
    model.register_forward_pre_hook(lambda m, args, kw: calls.append((args[0] if args else kw["img"]).shape[1]),
                                    with_kwargs=True)
    return calls


def test_cached_attention_is_joint_attention_with_the_condition_rows_masked():
    """The condition cache's attention is Kontext's joint attention over [txt, x_t | x_cond] with one change: the
    condition queries see only the condition keys. Written as that masked attention, the other rows are a step's
    attention with the recorded condition keys appended (Cached.keys_values), and the condition rows are the
    condition pass's self-attention."""
    torch.manual_seed(0)
    B, H, L, L_c, Dh = 2, 3, 7, 5, 8
    q, k, v = (torch.randn(B, H, L + L_c, Dh) for _ in range(3))
    mask = torch.ones(L + L_c, L + L_c, dtype=torch.bool)
    mask[L:, :L] = False  # condition queries: condition keys only
    joint = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L + L_c, H * Dh)
    cached = Cached(None, {"double.0": (k[:, :, L:], v[:, :, L:])})
    main = attention(q[:, :, :L], *cached.keys_values("double.0", k[:, :, :L], v[:, :, :L]))
    cond = attention(q[:, :, L:], k[:, :, L:], v[:, :, L:])
    torch.testing.assert_close(torch.cat((main, cond), dim=1), joint, rtol=1e-5, atol=1e-6)


def test_condition_cache_needs_kontext_condition_tokens(small_params, kontext_inputs):
    params = small_params()
    cache = ConditionCache(Flux(params))
    x = kontext_inputs(params)
    x.pop("semantic")
    assert condition_tokens(x["img_ids"]) == x["img"].shape[1] // 2
    assert cache(**x).shape == (2, x["img"].shape[1] // 2, 64)  # the x_t tokens' velocity only
    for broken in (torch.zeros_like(x["img_ids"]), x["img_ids"].flip(1)):  # none marked; marked but not last
        with pytest.raises(ValueError, match="condition tokens last"):
            cache(**(x | {"img_ids": broken}))


def step_flops(fn) -> int:
    with torch.no_grad():
        return count_flops(fn)


def test_condition_cache_does_half_the_work_of_a_kontext_step(small_params, kontext_inputs):
    """Counted FLOPs at 8x8 tokens (+ 5 text tokens), scheme B attached: a step through the condition cache (its
    condition pass kept) runs the x_t and text tokens only, about half a Kontext step; the condition pass, once per
    image, costs less than half a Kontext step."""
    params = small_params()
    model = Flux(params).eval()
    bench.acting(attach(model, DEFAULT_B))
    x = kontext_inputs(params, h=8, w=8)
    whole = step_flops(lambda: model(**x))
    kept = ConditionCache(model, keep=True)
    with torch.no_grad():
        kept(**x)  # the condition pass, kept for the run
    step = step_flops(lambda: kept(**x))
    condition_pass = step_flops(lambda: ConditionCache(model)(**x)) - step
    assert step < 0.56 * whole and condition_pass < 0.5 * whole, (step / whole, condition_pass / whole)


def sampling_case(params, form="scheme-b", B=2, h=3, w=4):
    """A model with `form` acting, a Kontext condition with a per-sample strength, noise and a 4-step schedule."""
    g = torch.Generator().manual_seed(1)
    x = {"semantic": torch.randn(B, h * w, 64, generator=g)}
    model = model_with(params, form, x).eval()
    text = (torch.randn(1, 5, params.context_in_dim, generator=g), text_ids(1, 5),
            torch.randn(1, params.vec_in_dim, generator=g))
    cond = flow.make_condition(torch.randn(B, h * w, 64, generator=g), x.get("semantic"), text, h, w)
    cond.sem_strength = torch.tensor([1.0, 1.5])[:B]
    return model, cond, torch.randn(B, h * w, 64, generator=g), flow.get_schedule(4, h * w)


@pytest.mark.parametrize("form", ["scheme-b", "zeroconv"])
def test_a_sampling_run_computes_the_condition_pass_once(small_params, form):
    """keep=True over a whole flow.denoise run: one condition pass (the x_cond tokens alone) and one step pass (the
    x_t tokens) per step, and exactly what computing the condition pass at every step gives. With gradients on (a
    training step) nothing is kept."""
    params = small_params()
    model, cond, x, ts = sampling_case(params, form)
    calls = counting(model)
    L = x.shape[1]
    with torch.no_grad():
        every = flow.denoise(ConditionCache(model), x, cond, ts, guidance=3.5)
        assert calls == [L, L] * 4  # condition pass, step; per step
        calls.clear()
        once = flow.denoise(ConditionCache(model, keep=True), x, cond, ts, guidance=3.5)
        assert calls == [L] + [L] * 4
    assert not torch.equal(once, x) and torch.equal(once, every)
    calls.clear()
    kept = ConditionCache(model, keep=True)
    for _ in range(2):
        flow.velocity(kept, x, torch.full((2,), 0.5), cond, torch.full((2,), 3.5))
    assert len(calls) == 4


def test_kept_condition_pass_follows_its_inputs_and_semantic_guidance(small_params):
    """A kept condition pass is reused only while the condition inputs are equal: semantic guidance (its "without"
    pass has no semantic input) and a new image give the same results as computing it every time. Under guidance
    both passes are kept: two condition passes in the whole run, not two per step."""
    params = small_params()
    model, cond, x, ts = sampling_case(params)
    calls = counting(model)
    with torch.no_grad():
        every = flow.denoise(ConditionCache(model), x, cond, ts, guidance=3.5, sem_guidance=1.5)
        kept = ConditionCache(model, keep=True)
        calls.clear()
        assert torch.equal(flow.denoise(kept, x, cond, ts, guidance=3.5, sem_guidance=1.5), every)
        assert len(calls) == 2 + 2 * 4  # two condition passes, then two step passes per step
        other = flow.replace(cond, x_cond=cond.x_cond.flip(0))
        assert torch.equal(flow.denoise(kept, x, other, ts, guidance=3.5),
                           flow.denoise(ConditionCache(model), x, other, ts, guidance=3.5))


@pytest.mark.parametrize("form", list(FORMS))
def test_gradient_checkpointing_same_gradients_through_the_cache(small_params, kontext_inputs, form):
    """Checkpointing recomputes each block (its semantic module included) in both passes: the gradients of every
    parameter equal the uncheckpointed ones, the condition pass training through the cached keys and values."""
    torch.manual_seed(0)
    params = small_params()
    x = kontext_inputs(params)
    model = model_with(params, form, x)
    cache = ConditionCache(model).train()
    grads = check_checkpointing_same_gradients(model, lambda: cache(**x).square().mean())
    assert any(n.startswith("semantic.") for n in grads) == (FORMS[form] is not None)


def test_zeroconv_acts_in_the_condition_pass_only(small_params, kontext_inputs):
    """Scheme A adds strength * zeroconv(sem) to the condition tokens: in the condition pass (x_cond alone); the
    step pass's x_t tokens enter unchanged."""
    params = small_params()
    x = kontext_inputs(params)
    model = model_with(params, "zeroconv", x)
    seen = []
    model.img_in.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        ConditionCache(model)(**x, semantic_strength=0.5)
        delta = model.semantic.zeroconv(x["semantic"], (3, 4))
    L = x["img"].shape[1] // 2
    assert len(seen) == 2 and delta.abs().amax() > 0
    torch.testing.assert_close(seen[0], x["img"][:, L:] + 0.5 * delta)  # the condition pass
    assert torch.equal(seen[1], x["img"][:, :L])  # the step


@pytest.mark.parametrize("form", ["scheme-b", "decoupled-cnn", "separate"])
def test_semantic_tokens_sit_on_the_target_grid_in_both_passes(small_params, kontext_inputs, form):
    """Without semantic_ids the semantic tokens take the target's ids (0, row, col), from latents or pixels (the /16
    grid), in the condition pass as in the step."""
    params = small_params()
    x = kontext_inputs(params)
    model = model_with(params, form, x).eval()
    with torch.no_grad():
        default = ConditionCache(model)(**x)
        given = ConditionCache(model)(**x, semantic_ids=image_ids(2, 3, 4))
        assert not torch.equal(default, ConditionCache(model)(**(x | {"semantic": None})))
    assert torch.equal(default, given)


def test_the_pipeline_samples_through_the_cache_with_one_condition_pass_per_run(env):
    """Pipeline.sampler(): the model, or (condition_cache) a ConditionCache keeping its condition pass for one
    run; generate computes it once per run, and the attention maps record the step's x_t queries."""
    pipe = pipeline.load_pipeline(None, quiet=True)
    assert not pipe.condition_cache and pipe.sampler() is pipe.model
    pipe.condition_cache = True
    sampler = pipe.sampler()
    assert isinstance(sampler, ConditionCache) and sampler.keep and sampler.model is pipe.model
    assert pipe.sampler() is not sampler  # one per run: a kept pass does not outlive its run
    calls = counting(pipe.model)
    rgb = torch.zeros(1, 3, 32, 48)
    ir = pipeline.generate(pipe, rgb, rgb, steps=3)
    assert ir.shape == (1, 1, 32, 48) and calls == [6] * 4  # one condition pass, then 3 steps, of 2 x 3 tokens
    attach(pipe.model, DEFAULT_B)
    maps = pipeline.attention_maps(pipe, rgb, rgb, steps=4)
    p = pipe.model.params
    assert len(maps) == p.depth + p.depth_single_blocks
    assert all(m.shape == (2 * 3, 2 * 3) for m in maps.values())  # [L_img = the x_t tokens, N]
