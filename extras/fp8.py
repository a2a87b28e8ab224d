"""
A frozen base kept in fp8: each frozen nn.Linear stores its weight as float8_e4m3fn (1 byte) with a float32 scale.
Written from the formulas; no quantization library.

    stored    q = fp8(clamp(W / s, -448, 448)),   s = max|W| / 448 per tensor (s: []) or per output row (s: [out])
    forward   y = x (q s)^T + b, in one of two forms (matmul_form chooses, per layer and call, and says why):
      dequantize  q s formed in the compute dtype with one rounding (s stays float32), then a bf16 / fp32 product:
                  the reference, and the form everywhere the next one is not (CPU, GPUs before sm89, odd shapes)
      scaled_mm   the fp8 product (torch._scaled_mm) on cards that have it (CUDA compute capability 8.9+: Ada,
                  Hopper): x rounded to fp8 with a scale per row (token), xs = max|x_row| / 448, times q, both scales
                  applied to the fp32 accumulator, bias added, rounded once to bf16. No upcast copy of the weight
    A plain fp8 weight (no scale in its file: Kijai, kohya) keeps weight_scale None: a scale of 1, never multiplied.

e4m3 keeps 3 mantissa bits: a weight is stored within 2^-4 of its value (half an ulp, relative), so the output moves
by a few percent against the bf16 model (`python -m tools.fp8_error` measures it) for half the bytes. The scaled_mm
form also rounds the activation so (2^-4 of each value, relative, at most); its gradient of x is the dequantizing
form's (g (q s)), the activation's rounding passed straight through.

What is quantized. The facts, from the public files:
- ComfyUI's scaled-fp8 FLUX export (comfyanonymous/flux_dev_scaled_fp8_test) stores EVERY Linear weight in fp8 with
  a per-tensor `scale_weight`, the outer layers too (img_in, txt_in, time_in, vector_in, guidance_in, final_layer);
  biases in fp8 without a scale; the RMSNorm scales in bf16.
- kohya's sd-scripts `--fp8_base` casts the whole model, norms included, to float8_e4m3fn with no scale.
Neither keeps the outer layers in higher precision, so quantize_ converts every Linear of the base by default;
`skip=OUTER_LAYERS` keeps those (0.5% of dev's weights) in full precision. Biases and norm scales are never stored
in fp8 here: they are not Linear weights, and a few KB.

fp8 weights in checkpoint files (split_scales reads them; extras.checkpoint_forms.load_flux(..., base_dtype=...)
uses it):
  plain fp8    float8 weights and no scale (Kijai's flux1-dev-fp8, kohya --fp8_base saves): the scale is 1
  scaled fp8   `<layer>.scale_weight` (float32, per tensor) + a `scaled_fp8` marker tensor (its dtype names the
               weights' fp8 dtype, float32 meaning e4m3fn): weight = fp8 weight * scale_weight   (ComfyUI)
  comfy_quant  `<layer>.weight_scale` + `<layer>.comfy_quant` (uint8: the JSON {"format": "float8_e4m3fn"}), or the
               same per layer in the metadata `_quantization_metadata`   (ComfyUI's newer mixed precision)
  `<layer>.scale_input` / `.input_scale` scale the ACTIVATIONS for fp8 matrix multiplies (torch._scaled_mm): a
  per-tensor scale calibrated once. The scaled_mm form here computes its activation scales per row at each call
  (never stale, finer), and the dequantizing form has no use for one: they are checked to be scalars and ignored,
  and the load says so.
This module's own fp8 state dicts use `weight_scale` ([] or [out]; none for a plain fp8 weight), so they load back
through the same path.
Loaded with base_dtype "fp8", a file that holds fp8 weights keeps its Linears as it has them (the fp8 ones in fp8, those
it keeps in bf16, as ComfyUI's mixed-precision files do on purpose, in the compute dtype); a bf16 / fp32 file has every
Linear weight quantized at load.

A LoRA over an fp8 base is Fp8LoRALinear, the plain lora.LoRALinear with this file's base product: it upcasts the
base weight the same way (base_linear) and runs its branch in its own dtype (fp32): only lora_A / lora_B train.
Merging into an fp8 weight is refused (merge_refusal says why). Fp8Linear names it as its `lora_class`, so
lora.inject_lora over an fp8 base builds it, and quantize_ turns a LoRA layer injected before into it.
"""

import functools
import json
import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from checkpoint import CheckpointError
from lora import LoRALinear, base_linears

FP8 = torch.float8_e4m3fn  # what quantize writes
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # what a file may hold (both upcast exactly to bf16)
BASE_DTYPES = {"fp8": None, "bf16": torch.bfloat16, "fp32": torch.float32}  # --base-dtype; fp8: the rest in `dtype`

# The Linears outside the blocks, matched against the whole module name (re.fullmatch): quantize_(skip=OUTER_LAYERS)
OUTER_LAYERS = (r"img_in", r"txt_in", r"(time|vector|guidance)_in\.(in|out)_layer", r"final_layer\..+")

# Names of quantization tensors: the ones read here (scale_weight, weight_scale, scale_input, input_scale,
# comfy_quant, scaled_fp8) and those of formats that are not (nvfp4's weight_scale_2, pre_quant_scale,
# bitsandbytes' absmax / quant_state, GPTQ's qweight / qzeros). A norm's own `.scale` does not match.
QUANT_KEY = re.compile(r"scale_|_scale|scaled_fp8|quant|absmax|qweight|qzeros")
_WEIGHT_SCALES = ("scale_weight", "weight_scale")  # ComfyUI's two spellings
_INPUT_SCALES = ("scale_input", "input_scale")


# ----------------------------------------------------------------------------------------------------------------
# The numbers


def _col(scale: Tensor) -> Tensor:
    return scale[:, None] if scale.ndim == 1 else scale  # per row: [out] -> [out, 1] against [out, in]


def quantize(weight: Tensor, per: str = "row") -> tuple[Tensor, Tensor]:
    """W [out, in] -> (q [out, in] float8_e4m3fn, s float32: [] per tensor, [out] per row) with W ~ q * s."""
    if per not in ("row", "tensor"):
        raise ValueError(f"per must be 'row' or 'tensor', got {per!r}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if per == "row" else w.abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero row keeps scale 1
    return (w / _col(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """q * s in `dtype`: the fp8 values are exact in bf16 / fp32, the product is rounded once (s stays float32).
    scale None (a plain fp8 weight): q itself in `dtype`, no multiply."""
    if q.dtype not in FP8_DTYPES:
        raise TypeError(f"dequantize takes an fp8 tensor, got {q.dtype}")
    w = q.to(dtype)  # a new tensor: multiplied in place
    return w if scale is None else w.mul_(_col(scale))


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [N, in] -> (q [N, in] float8_e4m3fn, s [N, 1] float32) with x ~ q * s, one scale per row (token): the
    rounding quantize(x, "row") gives, in fewer passes (the input of the scaled_mm form, every call)."""
    amax = x.abs().amax(dim=1, keepdim=True).float()  # [N, 1]: exact in any float dtype
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)  # an all-zero row keeps scale 1
    # x / s is computed in float32 (s is) and rounded once to fp8; |x / s| <= 448 up to float32 rounding, which
    # the fp8 rounding takes back to 448, so no clamp is needed (a non-finite x gives NaN in either form)
    return (x / scale).to(FP8), scale


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear multiplies in: autocast's when it is on (F.linear would cast to it anyway), else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def weight_scale(linear: nn.Linear) -> Tensor | None:
    """An fp8 Linear's weight scale ([] or [out]), or None where it has none (plain fp8: a scale of 1)."""
    return getattr(linear, "weight_scale", None)


def base_weight(linear: nn.Linear, x: Tensor) -> Tensor:
    """A Linear's weight for its product with x: upcast (q * s) when stored in fp8, else the weight itself."""
    w = linear.weight
    if w.dtype not in FP8_DTYPES:
        return w
    check_frozen(w)
    return dequantize(w, weight_scale(linear), _compute_dtype(x))


def check_frozen(w: Tensor) -> None:
    if w.requires_grad:
        raise RuntimeError("an fp8 base weight is frozen and cannot be trained (something set requires_grad on it, "
                           "e.g. the `base` stage): train with base_dtype bf16 or fp32, or train LoRA / the "
                           "semantic modules only")


# ----------------------------------------------------------------------------------------------------------------
# The product: dequantize (the reference) or scaled_mm (fp8 matrix multiplies), chosen by matmul_form

KEEP_FP8_FOR_BACKWARD = True  # base_linear's fast form (see Fp8MatMul); False: F.linear on the upcast weight
SCALED_MM = True  # the fp8 product where matmul_form allows it; False: the dequantizing form everywhere
FP8_MATMUL_CAPABILITY = (8, 9)  # CUDA compute capability with fp8 tensor cores: Ada (8.9), Hopper (9.0), later


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_matmul_device(device: torch.device) -> str | None:
    """None where the device multiplies fp8 matrices (CUDA, compute capability 8.9+), else why not."""
    if device.type != "cuda":
        return f"{device.type}: fp8 matrix multiplies need a CUDA GPU of compute capability 8.9+ (Ada, Hopper)"
    cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if cap < FP8_MATMUL_CAPABILITY:
        return f"CUDA compute capability {cap[0]}.{cap[1]}: fp8 matrix multiplies need 8.9+ (Ada, Hopper)"
    return None


def matmul_form(linear: nn.Linear, x: Tensor) -> tuple[str, str]:
    """Which product an fp8 Linear runs for x, and why: ("scaled_mm", ...) where the card multiplies fp8 and the call
    fits torch._scaled_mm (an e4m3fn weight, a bf16 compute dtype, in and out features multiples of 16, the weight
    contiguous: its transpose is the column-major operand), else ("dequantize", the first reason it does not)."""
    w, dtype = linear.weight, _compute_dtype(x)
    if not SCALED_MM:
        return "dequantize", "extras.fp8.SCALED_MM is off"
    if (why := fp8_matmul_device(x.device)) is not None:
        return "dequantize", why
    if w.dtype != torch.float8_e4m3fn:
        return "dequantize", f"a {str(w.dtype).removeprefix('torch.')} weight (the fp8 product takes e4m3fn)"
    if dtype != torch.bfloat16:
        return "dequantize", f"computing in {str(dtype).removeprefix('torch.')} (the fp8 product serves bf16)"
    if w.shape[0] % 16 or w.shape[1] % 16:
        return "dequantize", f"weight {tuple(w.shape)}: torch._scaled_mm needs dimensions that are multiples of 16"
    if not w.is_contiguous():
        return "dequantize", "a non-contiguous weight (torch._scaled_mm takes its transpose column-major)"
    return "scaled_mm", "fp8 weight x fp8 activation (a scale per row) on a card with fp8 matrix multiplies"


def scaled_mm_linear(x: Tensor, q: Tensor, scale: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x (q s)^T + b as an fp8 product: x rounded to fp8 per row (quantize_activation), torch._scaled_mm with both
    scales on the fp32 accumulator and the bias, rounded once to `dtype`. Runs wherever torch._scaled_mm does (its
    CPU kernel too: the tests' reference); matmul_form says where it is used.
    x [..., in], q [out, in] float8_e4m3fn, scale [] / [out] / None -> [..., out]."""
    out = q.shape[0]
    xq, xs = quantize_activation(x.reshape(-1, x.shape[-1]))  # [N, in] fp8, [N, 1] float32
    s = torch.ones((), device=q.device) if scale is None else scale.float()
    ws = s.expand(out).reshape(1, out).contiguous()  # [1, out]: the weight's scale per output column
    # autocast off: every operand is in the dtype it must be (the CPU kernel's inner product would be autocast to bf16)
    with torch.autocast(x.device.type, enabled=False):
        y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=ws, bias=None if bias is None else bias.to(dtype),
                             out_dtype=dtype)  # [N, in] @ [in, out] (column-major) -> [N, out]
    return y.reshape(*x.shape[:-1], out)


class Fp8MatMul(torch.autograd.Function):
    """x @ (q * s)^T + b for a frozen fp8 weight, in the form `fast` names (scaled_mm, else dequantize), with the
    dequantizing form's backward: the weight is upcast again there, so autograd keeps only q and s (1 byte per weight,
    already resident), not the upcast copy that F.linear saves for the gradient of x. What it buys (`python -m
    tools.memory_plan`, FLUX.1-dev, default B, joint at 512², fp8 + checkpointing): the step's peak 13.74 -> 13.53
    GiB, which brings it under a 16 GB card; without checkpointing autograd no longer holds every upcast weight of
    the base. x [..., in] -> [..., out]; no gradient for q or s (the base is frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor | None, bias: Tensor | None, dtype: torch.dtype,
                fast: bool) -> Tensor:
        ctx.save_for_backward(q, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if fast:
            return scaled_mm_linear(x, q, scale, bias, dtype)
        return F.linear(x.to(dtype), dequantize(q, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        q, scale = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:  # d/dx of x W^T + b = g W, with W upcast again (the fp8 rounding of x passed)
            grad_x = (g.to(ctx.dtype) @ dequantize(q, scale, ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_b, None, None


def base_linear(linear: nn.Linear, x: Tensor) -> Tensor:
    """The frozen base's product x W^T + b. An fp8 weight: the form matmul_form chooses, through Fp8MatMul (the
    dequantizing form with KEEP_FP8_FOR_BACKWARD off: F.linear on the upcast weight). Any other weight: F.linear."""
    w = linear.weight
    if w.dtype not in FP8_DTYPES:
        return F.linear(x, w, linear.bias)
    check_frozen(w)
    fast = matmul_form(linear, x)[0] == "scaled_mm"
    if not (fast or KEEP_FP8_FOR_BACKWARD):
        return F.linear(x, base_weight(linear, x), linear.bias)
    return Fp8MatMul.apply(x, w, weight_scale(linear), linear.bias, _compute_dtype(x), fast)


# ----------------------------------------------------------------------------------------------------------------
# The layers and the model-level helpers


class Fp8LoRALinear(LoRALinear):
    """lora.LoRALinear over a frozen fp8 base weight: keys `weight` (float8), `weight_scale`, `bias`, `lora_A.weight`,
    `lora_B.weight`. The base product upcasts W = q * s per call; the branch runs in the LoRA dtype."""

    merge_refusal = ("an fp8 base weight cannot take the update: merging would round base + update to fp8 again "
                     "(each weight moves by up to 2^-4 of its value, which can swamp the update) and unmerge could "
                     "not give the base back. Keep the LoRA unmerged (its branch runs in full precision), or load "
                     "the base with base_dtype 'bf16' to merge")

    def base_forward(self, x: Tensor) -> Tensor:
        return base_linear(self, x)  # [B, L, in] -> [B, L, out]


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear with its weight in fp8: keys `weight` (float8 [out, in], requires_grad False),
    `weight_scale` (float32 [] or [out], a buffer; absent for a plain fp8 weight, whose scale is 1) and `bias`
    (unchanged, in the compute dtype)."""

    lora_class = Fp8LoRALinear  # what lora.LoRALinear.from_linear wraps this layer in

    def __init__(self, weight: Tensor, scale: Tensor | None, bias: nn.Parameter | None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a weight of its own
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", bias)
        self.register_buffer("weight_scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, per: str = "row") -> "Fp8Linear":
        """Quantize a Linear's weight; its bias Parameter is reused."""
        return cls(*quantize(linear.weight, per), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return base_linear(self, x)  # [B, L, in] -> [B, L, out]

    def extra_repr(self) -> str:
        s = self.weight_scale
        scale = "no scale (1)" if s is None else f"scale per {'row' if s.ndim else 'tensor'}"
        return f"{super().extra_repr()}, weight={str(self.weight.dtype).removeprefix('torch.')}, {scale}"


def is_fp8(module: nn.Module) -> bool:
    """True if the module is (or holds) a Linear whose weight is stored in fp8."""
    return any(isinstance(m, nn.Linear) and m.weight.dtype in FP8_DTYPES for m in module.modules())


def quantize_(model: nn.Module, per: str = "row", skip=()) -> list[str]:
    """Store the frozen base's Linear weights in fp8, in place; returns the names converted.

    Never converted: the semantic module (`semantic.*`, trained), LoRA's own lora_A / lora_B, layers already in fp8,
    and names matching `skip` (regular expressions on the whole module name, e.g. OUTER_LAYERS). A plain nn.Linear
    becomes an Fp8Linear sharing its bias; a LoRALinear keeps its LoRA and becomes an Fp8LoRALinear, only its base
    weight changes. The fp8 weights have requires_grad False. Do not `.to(dtype)` the model afterwards: that upcasts
    them again."""
    patterns = [re.compile(p) for p in ((skip,) if isinstance(skip, str) else skip)]
    names = [n for n, m in base_linears(model).items()
             if not n.startswith("semantic.") and not is_fp8(m) and not any(p.fullmatch(n) for p in patterns)]
    for n in names:
        m = model.get_submodule(n)
        if type(m) is LoRALinear:
            if m.merged:
                raise ValueError(f"{n}: its LoRA is merged into the weight; unmerge_lora(model) before quantizing")
            q, s = quantize(m.weight, per)
            m.weight = nn.Parameter(q, requires_grad=False)
            m.register_buffer("weight_scale", s)
            # the same layer and LoRA parameters, now with the fp8 base product (a class swap in place, as
            # torch.nn.utils.parametrize does): nothing new is drawn from the random generator
            m.__class__ = Fp8LoRALinear
        elif type(m) is nn.Linear:
            model.set_submodule(n, Fp8Linear.from_linear(m, per))
        else:
            raise TypeError(f"{n}: a {type(m).__name__}, which quantize_ does not know how to store in fp8")
    return names


def dequantize_(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """The inverse of quantize_: every fp8 Linear weight back as q * s in `dtype` (default: its bias's dtype, else
    float32), frozen; an Fp8Linear becomes an nn.Linear again. Returns the names converted."""
    names = []
    for n, m in list(model.named_modules()):
        if not (isinstance(m, nn.Linear) and m.weight.dtype in FP8_DTYPES):
            continue
        d = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
        w = nn.Parameter(dequantize(m.weight, weight_scale(m), d), requires_grad=False)
        if isinstance(m, Fp8Linear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            new.weight, new.bias = w, m.bias
            model.set_submodule(n, new)
        else:  # a LoRA layer over an fp8 base: the plain LoRALinear again
            if weight_scale(m) is not None:
                del m.weight_scale
            m.weight = w
            if isinstance(m, Fp8LoRALinear):
                m.__class__ = LoRALinear
        names.append(n)
    return names


# ----------------------------------------------------------------------------------------------------------------
# fp8 in checkpoint files (see the module docstring for the forms)


def _comfy_format(t: Tensor, key: str, what: str) -> str:
    try:
        conf = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode("utf-8"))
        return str(conf["format"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{what}: {key} is not a comfy_quant descriptor (the bytes of a JSON object with a "
                              "'format')") from None


def split_scales(sd: dict[str, Tensor], metadata: dict | None = None,
                 what: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """Take ComfyUI's quantization tensors out of a state dict (official keys): (the rest; {layer: weight scale,
    float32 [] or [out]}; a note for the load's info line, "" if the file has none of them).

    Every scale must belong to an fp8 `<layer>.weight` of the file and hold one value, or one per output row; a
    declared format that is not fp8 (int8, nvfp4, mxfp8, block-wise) is refused naming it. Input scales are checked
    and dropped. Keys of formats not read here stay in the dict, for the strict key check to name."""
    sd, formats = dict(sd), {}
    marker = sd.pop("scaled_fp8", None)
    for k in [k for k in sd if k.endswith(".comfy_quant")]:
        formats[k.removesuffix(".comfy_quant")] = _comfy_format(sd.pop(k), k, what)
    if (metadata or {}).get("_quantization_metadata"):
        try:
            layers = json.loads(metadata["_quantization_metadata"])["layers"]
            formats.update({layer: str(conf["format"]) for layer, conf in layers.items()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{what}: unreadable _quantization_metadata ({type(e).__name__}: {e})") from None
    other = {layer: f for layer, f in formats.items() if not f.startswith("float8_") or "block" in f}
    if other:
        layer = sorted(other)[0]
        raise CheckpointError(f"{what}: {len(other)} layers are stored as {', '.join(sorted(set(other.values())))} "
                              f"(e.g. {layer}): only fp8 weights with per-tensor or per-row scales are read; use a "
                              "bf16 or an fp8 checkpoint of the model")
    scales, inputs = {}, 0
    for k in list(sd):
        layer, _, kind = k.rpartition(".")
        if kind in _WEIGHT_SCALES:
            s, w = sd.pop(k), sd.get(f"{layer}.weight")
            if w is None or w.dtype not in FP8_DTYPES:
                raise CheckpointError(f"{what}: {k} scales {layer}.weight, which is "
                                      f"{'absent' if w is None else str(w.dtype)}: a scale belongs to an fp8 weight")
            if s.numel() == 1:
                s = s.reshape(())
            elif s.numel() == w.shape[0] and s.ndim <= 2 and s.shape[0] == w.shape[0]:
                s = s.reshape(-1)  # [out] or [out, 1]: one per row
            else:
                raise CheckpointError(f"{what}: {k} has shape {tuple(s.shape)} for a weight of {tuple(w.shape)}: only "
                                      "per-tensor and per-row scales are read (block-wise ones are not)")
            scales[layer] = s.float()
        elif kind in _INPUT_SCALES:
            s = sd.pop(k)
            if s.numel() != 1:
                raise CheckpointError(f"{what}: {k} has shape {tuple(s.shape)}: an input scale is one number")
            inputs += 1
    if not (scales or inputs or formats or marker is not None):
        return sd, scales, ""
    per = sorted({"per row" if s.ndim else "per tensor" for s in scales.values()})
    form = ("ComfyUI scaled fp8" if marker is not None else "ComfyUI comfy_quant fp8" if formats
            else "fp8 with weight_scale")
    note = f"{form}: {len(scales)} fp8 weights with scales ({' and '.join(per) or 'none'}) applied as weight * scale"
    if inputs:
        note += (f", {inputs} input scales ignored (calibrated activation scales; the fp8 product here scales "
                 "each row of the activation at each call)")
    return sd, scales, note


def to_base_dtype(sd: dict[str, Tensor] | Iterable[tuple[str, Tensor]], scales: dict[str, Tensor], linears: set[str],
                  keep_fp8: bool, dtype: torch.dtype, device="cpu", per: str = "row", what: str = "checkpoint",
                  fp8_file: bool | None = None) -> tuple[dict[str, Tensor], str]:
    """A state dict (official keys, the file's dtypes; split_scales' scales) in the dtypes of the base to build, one
    tensor at a time on `device`. Returns it and a note ("" if there is nothing to say).
      sd         a dict (emptied as it goes), or (key, tensor) pairs as they are read (a checkpoint converted shard
                 by shard: extras.checkpoint_forms); then `fp8_file` says whether the file has any fp8 Linear weight
      keep_fp8   an fp8 file's Linear weights as they are: fp8 ones with their `<linear>.weight_scale` (none if the
                 file has none: a scale of 1, never multiplied), the others (layers the file keeps in higher
                 precision, as ComfyUI's mixed files do) in `dtype`; a file without any fp8 Linear weight (bf16 /
                 fp32) has every one quantized (`per` row or tensor). Every other float in `dtype`.
      otherwise  every float in `dtype`; an fp8 weight as q * scale, any other fp8 tensor (a bias, a norm) as it is"""
    stray = sorted(set(scales) - linears)
    if stray:
        raise CheckpointError(f"{what}: weight scales for {len(stray)} layers that are not Linear layers of the model "
                              f"(e.g. {stray[0]})")
    weights = {f"{n}.weight" for n in linears}
    items = sd
    if isinstance(sd, dict):
        if fp8_file is None:
            fp8_file = any(sd[k].dtype in FP8_DTYPES for k in weights & set(sd))
        items = ((k, sd.pop(k)) for k in list(sd))  # each handed on as it leaves the dict
    elif fp8_file is None:
        raise ValueError("to_base_dtype over (key, tensor) pairs needs fp8_file")
    quantize_all = keep_fp8 and not fp8_file
    out, n, kept, plain, made = {}, 0, 0, 0, 0
    for k, t in items:
        t, layer = t.to(device), k.removesuffix(".weight")
        n += k in weights
        if keep_fp8 and k in weights and (t.dtype in FP8_DTYPES or quantize_all):
            if t.dtype in FP8_DTYPES:
                out[k], kept = t, kept + 1
                if layer in scales:
                    out[f"{layer}.weight_scale"] = scales[layer].to(device, torch.float32)
                else:
                    plain += 1
            else:
                (out[k], out[f"{layer}.weight_scale"]), made = quantize(t, per), made + 1
        elif t.dtype in FP8_DTYPES:
            out[k] = dequantize(t, scales.get(layer) if k in weights else None, dtype)
        else:
            out[k] = t.to(dtype) if t.is_floating_point() else t
        del t  # the file's tensor: gone before the next is read (a new shard's, when read shard by shard)
    if not keep_fp8:
        return out, ""
    parts = [f"{kept} kept as stored" + f" ({plain} plain, scale 1)" * bool(plain)] * bool(kept)
    parts += [f"{made} quantized per {per} at load"] * bool(made)
    full = n - kept - made
    parts += [f"{full} kept in {str(dtype).removeprefix('torch.')} as the file has them"] * bool(full)
    return out, f"fp8 base: {n} Linear weights ({', '.join(parts)})"


def fp8_modules_(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Turn every nn.Linear of the model whose `<name>.weight` in `sd` is fp8 into an Fp8Linear with sd's shapes and
    dtypes (and a weight_scale where sd has one), on the meta device: load_strict(model, sd) then takes sd's
    tensors."""
    for n, m in list(model.named_modules()):
        w = sd.get(f"{n}.weight")
        if type(m) is nn.Linear and w is not None and w.dtype in FP8_DTYPES:
            s = sd.get(f"{n}.weight_scale")
            model.set_submodule(n, Fp8Linear(torch.empty_like(w, device="meta"),
                                             None if s is None else torch.empty_like(s, device="meta"), m.bias))
