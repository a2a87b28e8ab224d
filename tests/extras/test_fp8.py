"""extras/fp8.py: a frozen base stored in fp8 really holds 1 byte per Linear weight, computes exactly what its
dequantized weights compute, stays within a measured error of the bf16 model, carries a LoRA that trains as over the
dequantized base, round-trips its state dict bit for bit, and fp8 checkpoint files (Kijai / kohya plain fp8) load
without being upcast. The ComfyUI scaled-fp8 files are in tests/extras/test_checkpoint_forms.py with the other
checkpoint forms."""

import copy
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tools import bench, fp8_error
from extras import fp8
from checkpoint import save_atomic
from conftest import kontext_batch, small_flux_params
from extras.checkpoint_forms import load_flux
from flux_model import PRESETS, Flux
from extras.fp8 import Fp8Linear, dequantize, dequantize_, is_fp8, quantize, quantize_
from lora import inject_lora, lora_modules, lora_parameters, merge_lora
from tools.measure import tensor_bytes
from sem_cross_attn import SemanticConfig, attach

PARAMS = small_flux_params()  # hidden 64, 4 heads, 2 double + 2 single blocks, guidance


def base_model(params=PARAMS, dtype=torch.float32, seed=0) -> Flux:
    sd = bench.random_weights(params, seed)
    return bench.build_ours(params, {k: v.to(dtype) for k, v in sd.items()}).eval()


def inputs(params=PARAMS, dtype=torch.float32, seed=1) -> dict:
    x = kontext_batch(params, seed=seed)
    x.pop("semantic")
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in x.items()}


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ---------------------------------------------------------------------------------------------------------------
# Storage and the numbers

def test_fp8_storage_holds_one_byte_per_frozen_linear_weight():
    bf16 = base_model(dtype=torch.bfloat16)
    low = copy.deepcopy(bf16)
    names = quantize_(low, per="row")
    weights = linear_weights(bf16)
    assert set(names) == set(weights)  # every Linear of the base, the outer ones too (as ComfyUI's scaled files)
    assert all(w.dtype == torch.float8_e4m3fn and w.element_size() == 1 for w in linear_weights(low).values())
    n_weights = sum(w.numel() for w in weights.values())
    n_rows = sum(w.shape[0] for w in weights.values())  # one float32 scale per output row
    assert tensor_bytes(low) == tensor_bytes(bf16) - n_weights + 4 * n_rows
    per_tensor = copy.deepcopy(bf16)
    quantize_(per_tensor, per="tensor")
    assert tensor_bytes(per_tensor) == tensor_bytes(bf16) - n_weights + 4 * len(weights)
    print(f"bf16 {tensor_bytes(bf16):,} B, fp8 per row {tensor_bytes(low):,} B, per tensor "
          f"{tensor_bytes(per_tensor):,} B")


def test_flux_dev_in_fp8_holds_half_the_bytes_of_bf16():
    """Counted on a meta-device dev (no memory): 23,802,816,640 bytes in bf16, 11,916,757,376 with every Linear weight
    in fp8 and a float32 scale per row (11.90 G of weights at 1 byte, 3.1 M biases and norm scales at 2)."""
    with torch.device("meta"):
        model = Flux(PRESETS["dev"]).to(torch.bfloat16)
    assert tensor_bytes(model) == 23_802_816_640
    quantize_(model)
    assert tensor_bytes(model) == 11_916_757_376


@pytest.mark.parametrize("per", ["row", "tensor"])
def test_quantize_rounds_every_weight_to_the_nearest_fp8_value(per):
    """|q s - w| <= half an e4m3 ulp: 2^-4 |w| in the normal range (|w / s| >= 2^-6), 2^-10 s below it; the largest
    |w| of each row (or of the tensor) maps to 448 exactly."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # rows over four decades
    q, s = quantize(w, per)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == ((48,) if per == "row" else ())
    err = (dequantize(q, s, torch.float32) - w).abs()
    s_col = s[:, None] if per == "row" else s
    normal = (w / s_col).abs() >= 2 ** -6
    assert (err[normal] <= 2 ** -4 * w.abs()[normal] * (1 + 1e-6)).all()
    assert (err[~normal] <= (2 ** -10 * s_col.expand_as(w))[~normal] * (1 + 1e-6)).all()
    amax = w.abs().amax(dim=1) if per == "row" else w.abs().amax()
    assert torch.allclose(amax / s, torch.tensor(448.0))
    assert not dequantize(*quantize(torch.zeros(3, 4), per), torch.float32).any()  # an all-zero weight stays zero


@pytest.mark.parametrize("per", ["row", "tensor"])
def test_fp8_model_computes_exactly_what_its_dequantized_weights_compute(per):
    model = base_model()
    quantize_(model, per=per)
    reference = copy.deepcopy(model)
    assert dequantize_(reference) and not is_fp8(reference)
    assert all(type(m) is nn.Linear for m in reference.modules() if isinstance(m, nn.Linear))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(model(**x), reference(**x))
        for n, w in linear_weights(model).items():  # and the weights put back are q * s, in full precision
            m = model.get_submodule(n)
            assert torch.equal(reference.get_submodule(n).weight, w.float() * (m.weight_scale[:, None]
                                                                                 if per == "row" else m.weight_scale))


def test_fp8_error_against_the_bf16_model_is_small_and_measured():
    """The tiny preset, random weights, one velocity call computing in bf16. Measured here (seed 0): 7.7% with every
    Linear in fp8, 4.5% with the outer layers kept in bf16, against bf16's own 1.2% from fp32. A single Linear's is
    2.6% (e4m3's 3 mantissa bits); the random model amplifies it. The bound fails for a coarser rounding (e5m2's
    2 mantissa bits double the error) or a scale applied wrongly."""
    full = fp8_error.measure_error(PRESETS["tiny"])
    outer = fp8_error.measure_error(PRESETS["tiny"], skip=fp8.OUTER_LAYERS)
    print(f"\nfp8 vs bf16 output, relative: {full['fp8_vs_bf16']:.2%} (every Linear), {outer['fp8_vs_bf16']:.2%} "
          f"(outer layers in bf16); bf16 vs fp32: {full['bf16_vs_fp32']:.2%}")
    assert full["fp8_vs_bf16"] < 0.10 and outer["fp8_vs_bf16"] < 0.06
    assert outer["fp8_vs_bf16"] < full["fp8_vs_bf16"]
    assert full["bytes_fp8"] < 0.55 * full["bytes_bf16"]


def test_quantize_leaves_semantic_modules_lora_and_skipped_layers_alone():
    model = base_model()
    attach(model, SemanticConfig(scheme="xattn"))
    inject_lora(model, rank=4)
    names = quantize_(model, skip=fp8.OUTER_LAYERS)
    assert not any(n.startswith(("semantic.", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                                 "final_layer")) for n in names)
    assert not is_fp8(model.semantic) and not is_fp8(model.img_in) and not is_fp8(model.final_layer)
    assert is_fp8(model.double_blocks[0].img_attn.qkv) and is_fp8(model.single_blocks[1].modulation.lin)
    for m in lora_modules(model).values():  # the LoRA's own weights stay fp32 and trainable
        assert is_fp8(m) and m.lora_A.weight.dtype == torch.float32 and m.lora_B.weight.requires_grad
    assert quantize_(model, skip=fp8.OUTER_LAYERS) == []  # idempotent


def test_an_fp8_weight_refuses_to_train():
    model = base_model()
    quantize_(model)
    model.requires_grad_(True)  # what a stage training the whole base would do
    with pytest.raises(RuntimeError, match="fp8 base weight is frozen"):
        model(**inputs())


# ---------------------------------------------------------------------------------------------------------------
# LoRA over an fp8 base

def randomize_lora(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) / math.sqrt(m.in_features))
            m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))


def lora_grads(model, x) -> dict:
    model.zero_grad(set_to_none=True)
    model(**x).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("order", ["quantize-then-inject", "inject-then-quantize"])
def test_lora_on_an_fp8_base_trains_only_lora_with_the_gradients_of_the_dequantized_base(order):
    model = base_model()
    model.requires_grad_(False)
    if order == "quantize-then-inject":
        quantize_(model)
        inject_lora(model, rank=4, include_modulation=True)
    else:
        inject_lora(model, rank=4, include_modulation=True)
        quantize_(model)
    randomize_lora(model)
    reference = copy.deepcopy(model)
    dequantize_(reference)
    x = inputs()
    got, expected = lora_grads(model, x), lora_grads(reference, x)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable == {n for n in dict(model.named_parameters()) if ".lora_" in n}
    assert len(got) == 2 * len(lora_modules(model)) and all(g.abs().sum() > 0 for g in got.values())
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight.grad is None
    assert {k for k in model.state_dict() if k.startswith("double_blocks.0.img_attn.qkv.")} == {
        f"double_blocks.0.img_attn.qkv.{k}" for k in ("weight", "bias", "weight_scale", "lora_A.weight",
                                                       "lora_B.weight")}
    stored = uint8(qkv.weight).clone()
    torch.optim.SGD(lora_parameters(model), lr=0.1).step()  # one step: the LoRA moves, the fp8 base does not
    assert torch.equal(uint8(qkv.weight), stored) and not torch.equal(qkv.lora_A.weight, reference.double_blocks[0]
                                                                        .img_attn.qkv.lora_A.weight)


def test_merge_lora_on_an_fp8_base_is_refused_before_any_layer_changes():
    model = base_model()
    quantize_(model)
    inject_lora(model, rank=4)
    randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fp8 base.*unmerge could not give the base back"):
        merge_lora(model)
    after = model.state_dict()
    assert not any(m.merged for m in lora_modules(model).values())
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)


# ---------------------------------------------------------------------------------------------------------------
# State dicts and fp8 files

def uint8(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)  # the bytes: an equality that no NaN or cast can fake


@pytest.mark.parametrize("per", ["row", "tensor"])
def test_an_fp8_state_dict_loads_back_into_an_fp8_model_bit_for_bit(tmp_path, per):
    model = base_model()
    quantize_(model, per=per)
    save_atomic(model.state_dict(), tmp_path / "fp8.safetensors")
    loaded = load_flux(tmp_path / "fp8.safetensors", PARAMS, dtype=torch.float32, base_dtype="fp8")
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(uint8(a[k]), uint8(b[k])), k
    other = base_model(seed=5)  # and into a quantized model by load_state_dict: the same bytes
    quantize_(other, per=per)
    other.load_state_dict(a)
    assert all(torch.equal(uint8(a[k]), uint8(v)) for k, v in other.state_dict().items())


def test_a_bf16_file_loaded_as_fp8_is_quantized_as_quantize_does(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in bench.random_weights(PARAMS).items()}
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    loaded = load_flux(tmp_path / "bf16.safetensors", PARAMS, dtype=torch.bfloat16, base_dtype="fp8")
    made = load_flux(tmp_path / "bf16.safetensors", PARAMS, base_dtype="bf16")
    quantize_(made)
    a, b = loaded.state_dict(), made.state_dict()
    assert set(a) == set(b) and all(torch.equal(uint8(a[k]), uint8(b[k])) for k in a)
    assert isinstance(loaded.img_in, Fp8Linear) and loaded.img_in.bias.dtype == torch.bfloat16


def kijai_file(path, params, prefix="", all_fp8=False) -> dict:
    """The layout of Kijai's flux1-dev-fp8: the block Linears' weights cast to float8_e4m3fn (no scale), everything
    else bf16, official names; all_fp8: every tensor in fp8, biases and norm scales too (as in the fp8 FLUX files
    listed in AUTOMATIC1111/stable-diffusion-webui#16484). Returns the file's tensors without the prefix."""
    sd = {k: v.to(torch.bfloat16) for k, v in bench.random_weights(params).items()}
    with torch.device("meta"):
        linears = {n for n, m in Flux(params).named_modules() if isinstance(m, nn.Linear)}
    for k in sd:
        if all_fp8 or (k.startswith(("double_blocks.", "single_blocks.")) and k.removesuffix(".weight") in linears):
            sd[k] = sd[k].to(torch.float8_e4m3fn)
    save_file({prefix + k: v for k, v in sd.items()}, str(path))
    return sd


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("all_fp8", [False, True], ids=["blocks-fp8", "all-fp8"])
def test_a_kijai_fp8_file_loads_without_upcasting(tmp_path, prefix, all_fp8):
    """base_dtype fp8 keeps the file's fp8 weights byte for byte and its bf16 Linears (the outer layers here) in bf16,
    as the file has them; biases and norm scales in bf16. Bytes: 1 per fp8 weight + a float32 scale per fp8 layer,
    2 per other value. Its output is that of the same file upcast to bf16 (fp8 values are exact in bf16)."""
    path = tmp_path / "flux1-dev-fp8.safetensors"
    sd = kijai_file(path, PARAMS, prefix, all_fp8)
    model = load_flux(path, PARAMS, dtype=torch.bfloat16, base_dtype="fp8")
    state, linears = model.state_dict(), linear_weights(model)
    stored = [k for k, v in sd.items() if v.dtype == torch.float8_e4m3fn and k.removesuffix(".weight") in linears]
    assert len(stored) == (len(linears) if all_fp8 else 10 * PARAMS.depth + 3 * PARAMS.depth_single_blocks)
    assert all(state[k].dtype == torch.float8_e4m3fn and torch.equal(uint8(state[k]), uint8(sd[k])) for k in stored)
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k not in stored and not k.endswith("_scale"))
    assert tensor_bytes(model) == sum(v.numel() * (1 if k in stored else 2) for k, v in sd.items()) + 4 * len(stored)
    x = inputs(dtype=torch.bfloat16)
    reference = load_flux(path, PARAMS, base_dtype="bf16")
    with torch.no_grad():
        assert torch.equal(model(**x), reference(**x))


@pytest.mark.parametrize("lora", [False, True], ids=["fp8-linear", "lora-over-fp8"])
def test_keeping_fp8_for_the_backward_gives_the_plain_gradients_and_saves_no_upcast_weight(lora, monkeypatch):
    """Fp8MatMul (fp8.KEEP_FP8_FOR_BACKWARD) against F.linear on the upcast weight: the same output and input
    gradient (and LoRA gradients), while autograd saves no tensor of the weight's size."""
    torch.manual_seed(0)
    layer = fp8.Fp8Linear.from_linear(nn.Linear(48, 40))
    if lora:
        from lora import LoRALinear
        layer = LoRALinear.from_linear(layer, rank=4)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 48, requires_grad=True)
    results = {}
    for keep in (False, True):
        monkeypatch.setattr(fp8, "KEEP_FP8_FOR_BACKWARD", keep)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append((t.numel(), t.dtype)), t)[1],
                                                      lambda t: t):
            out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + [p for p in layer.parameters() if p.requires_grad])
        results[keep] = (out, grads, saved)
    torch.testing.assert_close(results[True][0], results[False][0])
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b)
    upcast = (48 * 40, torch.float32)  # the weight's size in the compute dtype
    assert upcast in results[False][2] and upcast not in results[True][2]
    assert (48 * 40, torch.float8_e4m3fn) in results[True][2]  # what it keeps instead: the stored fp8 weight
