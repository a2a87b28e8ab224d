"""extras/fp8.py: a frozen base stored in fp8 really holds 1 byte per Linear weight, computes exactly what its
dequantized weights compute, stays within a measured error of the bf16 model, carries a LoRA that trains as over the
dequantized base, round-trips its state dict bit for bit, and fp8 checkpoint files (Kijai / kohya plain fp8) load
without being upcast. The ComfyUI scaled-fp8 files are in tests/extras/test_checkpoint_forms.py with the other
checkpoint forms."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tools import bench, fp8_error
from extras import fp8
from checkpoint import save_atomic
from conftest import kontext_batch, small_flux_params
from extras.checkpoint_forms import load_flux
from flux_model import PRESETS, Flux
from extras.fp8 import Fp8Linear, dequantize, dequantize_, is_fp8, quantize, quantize_
from lora import LoRALinear, inject_lora, lora_modules, lora_parameters, merge_lora
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
    as the file has them; biases and norm scales in bf16. Bytes: 1 per fp8 weight (no scale: the file has none, so
    none is stored or multiplied), 2 per other value. Its output is that of the same file upcast to bf16 (fp8 values
    are exact in bf16)."""
    path = tmp_path / "flux1-dev-fp8.safetensors"
    sd = kijai_file(path, PARAMS, prefix, all_fp8)
    model = load_flux(path, PARAMS, dtype=torch.bfloat16, base_dtype="fp8")
    state, linears = model.state_dict(), linear_weights(model)
    stored = [k for k, v in sd.items() if v.dtype == torch.float8_e4m3fn and k.removesuffix(".weight") in linears]
    assert len(stored) == (len(linears) if all_fp8 else 10 * PARAMS.depth + 3 * PARAMS.depth_single_blocks)
    assert all(state[k].dtype == torch.float8_e4m3fn and torch.equal(uint8(state[k]), uint8(sd[k])) for k in stored)
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k not in stored)
    assert all(fp8.weight_scale(model.get_submodule(k.removesuffix(".weight"))) is None for k in stored)
    assert tensor_bytes(model) == sum(v.numel() * (1 if k in stored else 2) for k, v in sd.items())
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


def test_a_plain_fp8_weight_skips_its_unit_scale_and_computes_the_same(tmp_path):
    """A Kijai file's fp8 weights have no scale: the layers keep weight_scale None and never multiply by 1. The same
    layers given an explicit scale of 1 compute the same bits, forward and backward, over a LoRA too; dequantize_
    turns both back alike."""
    path = tmp_path / "flux1-dev-fp8.safetensors"
    kijai_file(path, PARAMS)
    plain = load_flux(path, PARAMS, dtype=torch.bfloat16, base_dtype="fp8")
    qkv = plain.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and qkv.weight_scale is None and "no scale" in repr(qkv)
    assert not any(k.endswith("weight_scale") for k in plain.state_dict())
    unit = copy.deepcopy(plain)
    for m in unit.modules():
        if isinstance(m, Fp8Linear) and m.weight_scale is None:
            m.weight_scale = torch.ones(())
    x = inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(plain(**x), unit(**x))
    for model in (plain, unit):
        inject_lora(model, rank=4)
        randomize_lora(model)
    grads = [lora_grads(model, x) for model in (plain, unit)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    for model in (plain, unit):
        dequantize_(model)
    with torch.no_grad():
        assert not is_fp8(plain) and torch.equal(plain(**x), unit(**x))


# ---------------------------------------------------------------------------------------------------------------
# The fp8 product (torch._scaled_mm) and the choice of form

def scaled_mm_devices() -> list[str]:
    """Where the scaled_mm form can be checked: this CPU if its torch._scaled_mm runs (torch 2.13's does), and a CUDA
    GPU that multiplies fp8."""
    devices = []
    try:
        one = torch.ones((), dtype=torch.float32)
        torch._scaled_mm(torch.ones(16, 16, dtype=fp8.FP8), torch.ones(16, 16, dtype=fp8.FP8).t(), scale_a=one,
                         scale_b=one, out_dtype=torch.bfloat16)
        devices.append("cpu")
    except (RuntimeError, NotImplementedError):
        pass
    if torch.cuda.is_available() and fp8.fp8_matmul_device(torch.device("cuda")) is None:
        devices.append("cuda")
    return devices


SCALED_MM_DEVICES = scaled_mm_devices()
needs_scaled_mm = pytest.mark.skipif(not SCALED_MM_DEVICES, reason="torch._scaled_mm runs neither on this CPU build "
                                     "nor on a GPU here (it needs CUDA compute capability 8.9+)")


def fp8_layer(per: str | None, bias: bool = True, shape=(48, 64), seed=0) -> Fp8Linear:
    """An Fp8Linear of random weights: scale per row, per tensor, or none (per None: plain fp8, a scale of 1)."""
    torch.manual_seed(seed)
    layer = Fp8Linear.from_linear(nn.Linear(shape[1], shape[0], bias=bias), per or "tensor")
    if per is None:
        layer.weight_scale = None
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_activation_is_rounded_as_quantize_rounds_a_weight_row(dtype):
    """quantize_activation (the scaled_mm form's input, every call) gives quantize(x, "row")'s bytes and scales, an
    all-zero row included: the rounding whose error the tests below bound."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 32, generator=g) * torch.logspace(-3, 2, 7)[:, None]).to(dtype)
    x[3] = 0
    q, s = fp8.quantize_activation(x)
    q_ref, s_ref = quantize(x, "row")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (7, 1)
    assert torch.equal(uint8(q), uint8(q_ref)) and torch.equal(s[:, 0], s_ref)
    assert (q.float().abs().amax(dim=1)[[0, 1, 2, 4, 5, 6]] == 448).all() and s[3, 0] == 1


def test_the_dequantizing_form_is_chosen_on_the_cpu_and_says_why(monkeypatch):
    """The one place that chooses (matmul_form): on this CPU, and wherever SCALED_MM is off, the dequantizing form,
    with a reason naming what is missing; an Fp8Linear then computes exactly F.linear on its upcast weight."""
    layer = fp8_layer("row")
    x = torch.randn(2, 5, 64)
    form, why = fp8.matmul_form(layer, x.bfloat16())
    assert form == "dequantize" and "cpu" in why and "8.9" in why
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, dequantize(layer.weight, layer.weight_scale, torch.float32),
                                              layer.bias))
    monkeypatch.setattr(fp8, "SCALED_MM", False)
    assert fp8.matmul_form(layer, x) == ("dequantize", "extras.fp8.SCALED_MM is off")


def test_the_scaled_mm_form_is_chosen_only_where_torch_scaled_mm_takes_the_call(monkeypatch):
    """With a card that multiplies fp8 (the device check made to pass here), matmul_form picks scaled_mm for an
    e4m3fn weight computing in bf16 (bf16 activations, or autocast's bf16 over fp32 ones) and the dequantizing form,
    naming why, for fp32 compute, an e5m2 weight, dimensions not multiples of 16 and a non-contiguous weight."""
    monkeypatch.setattr(fp8, "fp8_matmul_device", lambda device: None)
    layer, x = fp8_layer("row"), torch.randn(3, 64)
    assert fp8.matmul_form(layer, x.bfloat16())[0] == "scaled_mm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8.matmul_form(layer, x)[0] == "scaled_mm"
    assert fp8.matmul_form(layer, x) == ("dequantize", "computing in float32 (the fp8 product serves bf16)")
    e5m2 = fp8_layer("row")
    e5m2.weight = nn.Parameter(e5m2.weight.to(torch.float8_e5m2), requires_grad=False)
    assert "float8_e5m2 weight" in fp8.matmul_form(e5m2, x.bfloat16())[1]
    odd = fp8_layer("row", shape=(40, 64))
    assert "multiples of 16" in fp8.matmul_form(odd, x.bfloat16())[1]
    strided = fp8_layer("row", shape=(48, 128))
    strided.weight = nn.Parameter(strided.weight[:, ::2], requires_grad=False)
    assert "non-contiguous" in fp8.matmul_form(strided, x.bfloat16())[1]


def rounding_room(x, w, b) -> torch.Tensor:
    """|x| |W|^T + |b| [N, out] (float64): what each bf16 rounding of an output is relative to. A rounding moves a
    value by at most 2^-9 of itself, and every value rounded on the way (the product, the product plus the bias)
    is at most this; the bias may be added after the product is rounded (this CPU kernel does so), so a small
    output left by cancellation can move by far more than 2^-9 of ITSELF."""
    return x.abs() @ w.abs().T + (b.double().abs() if b is not None else 0)


def agreement_bound(x, q, s, b, xq, xs):
    """|scaled_mm form - dequantizing form| <= |x^ - x| |W|^T + 2^-6 room, elementwise (room: rounding_room), with
    x^ = xq xs the activation as the fp8 product sees it and W = q s. The first term is the activation's fp8 rounding
    carried through the product (at most 2^-4 of each value, relative: e4m3's 3 mantissa bits), computed exactly
    from the rounded values. The second covers bf16's roundings, 2^-9 of the room each: the dequantizing form rounds
    W, its product and its sum with the bias; the fp8 product its product and its sum (5 x 2^-9 < 2^-6, x^ within
    2^-4 of x); float32 accumulation over K = 64 terms (~2^-18) is far below."""
    w = dequantize(q, s, torch.float64)
    x64 = x.double().reshape(-1, x.shape[-1])
    err = (xq.double() * xs.double() - x64).abs()
    return err @ w.abs().T + 2 ** -6 * rounding_room(x64, w, b)


@needs_scaled_mm
@pytest.mark.parametrize("device", SCALED_MM_DEVICES or ["cpu"])
@pytest.mark.parametrize("per", ["row", "tensor", None], ids=["per-row", "per-tensor", "plain"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_scaled_mm_form_agrees_with_the_dequantizing_form_within_the_activation_rounding(device, per, bias):
    """The fp8 product (torch._scaled_mm, here on this CPU build's kernel and on an sm89+ GPU where there is one)
    against the reference: within agreement_bound elementwise; and within one bf16 rounding of the exact product of
    the rounded activation, so the scales, the layout and the bias are applied right (a scale on the wrong side, or
    a transposed per-row scale, misses by far more). Activations over four decades across rows (FLUX's tokens
    differ that much)."""
    layer = fp8_layer(per, bias, shape=(48, 64)).to(device)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 9, 64, generator=g) * torch.logspace(-2, 2, 9)[:, None]).to(device, torch.bfloat16)
    q, s, b = layer.weight, layer.weight_scale, layer.bias
    fast = fp8.scaled_mm_linear(x, q, s, b, torch.bfloat16)  # [2, 9, 48]
    plain = F.linear(x, dequantize(q, s, torch.bfloat16), b.bfloat16() if bias else None)
    assert fast.dtype == plain.dtype == torch.bfloat16 and fast.shape == plain.shape == (2, 9, 48)
    xq, xs = fp8.quantize_activation(x.reshape(-1, 64))
    diff = (fast.double() - plain.double()).abs().reshape(-1, 48)
    bound = agreement_bound(x, q, s, b, xq, xs)
    assert (diff <= bound).all(), (diff / bound).max()
    x_hat, w = xq.double() * xs.double(), dequantize(q, s, torch.float64)
    exact = x_hat @ w.T + (b.double() if bias else 0)  # [18, 48]: the product of the rounded activation
    # two bf16 roundings at most (the product, then its sum with the bias), float32 accumulation far below
    assert ((fast.double().reshape(-1, 48) - exact).abs() <= 2 ** -8 * rounding_room(x_hat, w, b)).all()
    print(f"\nscaled_mm vs dequantize ({device}, {per}): max |diff| / max |y| = "
          f"{(diff.max() / plain.double().abs().max()).item():.2%}")


@needs_scaled_mm
def test_an_fp8_layer_on_the_scaled_mm_form_trains_its_lora_with_the_dequantizing_gradients(monkeypatch):
    """Chosen by matmul_form (the device check made to pass, so this CPU's torch._scaled_mm runs it), the layer's
    forward is scaled_mm_linear's, bit for bit, under autocast too; its backward is the dequantizing form's: for the
    same output gradient, the same gradient of x and of the LoRA's weights."""
    layer = LoRALinear.from_linear(fp8_layer("row"), rank=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 64).bfloat16().requires_grad_()
    g = torch.randn(3, 5, 48).bfloat16()
    results = {}
    for form in ("dequantize", "scaled_mm"):
        monkeypatch.setattr(fp8, "fp8_matmul_device", (lambda d: None) if form == "scaled_mm" else (lambda d: "cpu"))
        assert fp8.matmul_form(layer, x)[0] == form
        out = layer(x)
        grads = torch.autograd.grad(out, [x, layer.lora_A.weight, layer.lora_B.weight], g)
        results[form] = out, grads
    with torch.no_grad():  # (the device check still passes)
        base = fp8.scaled_mm_linear(x, layer.weight, layer.weight_scale, layer.bias, torch.bfloat16)
        assert torch.equal(layer.base_forward(x), base)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 activations, bf16 compute: the fast form too
            assert torch.equal(layer.base_forward(x.float()), base)
    assert not torch.equal(results["scaled_mm"][0], results["dequantize"][0])  # the activation's rounding shows
    for a, b in zip(results["scaled_mm"][1], results["dequantize"][1]):
        assert torch.equal(a, b)
