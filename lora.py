"""
LoRA for the FLUX transformer: the LoRA layer, injection into nn.Linear layers, merging, and strict loading of a
LoRA state dict. LoRA files (our, diffusers and kohya layouts) are read and written by extras/lora_formats.py.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
huggingface/peft tuners/lora/layer.py (kaiming-uniform A, zero B, scaling = alpha / r).

A LoRA layer replaces an nn.Linear of the model in place and IS an nn.Linear, so the base keys stay the official
ones (`double_blocks.0.img_attn.qkv.weight`) and only `...qkv.lora_A.weight` [r, in] and `...qkv.lora_B.weight`
[out, r] are added:
    y = W x + b + (alpha / r) * B A dropout(x),   B = 0 at init, so step 0 is the pretrained model.
A variant over another kind of base weight (extras/fp8.py: a weight stored in fp8) subclasses the layer, as peft's
quantized layers wrap its plain one: it overrides `base_forward` (the product x W^T + b) and may refuse to merge
(`merge_refusal`). A base layer names its variant in a `lora_class` attribute; from_linear then builds that class.
"""

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from checkpoint import check_keys

# ----------------------------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: base keys `weight`/`bias`, LoRA keys `lora_A.weight`, `lora_B.weight`."""

    merge_refusal = ""  # why the update cannot be folded into this layer's weight; "" when it can (a variant sets it)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 16,
                 alpha: float | None = None, dropout: float = 0.0, device=None, dtype=None,
                 lora_dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the LoRA branch only
        self.merged = False
        self._new_lora(device, lora_dtype)

    def _new_lora(self, device, dtype):
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)  # PEFT's default for A
        nn.init.zeros_(self.lora_B.weight)  # zero B: the layer starts exactly as the base layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                    dtype: torch.dtype = torch.float32) -> "LoRALinear":
        """Wrap an existing layer. Its weight and bias Parameters and its buffers (e.g. an fp8 weight's
        `weight_scale`) are reused (no copy; requires_grad untouched); the LoRA parameters are new, on the weight's
        device, in `dtype`. A layer with a `lora_class` attribute is wrapped by that class (its LoRA variant)."""
        cls = getattr(linear, "lora_class", cls)
        # built on the meta device so no throwaway base weight is allocated, then given the real Parameters
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank, alpha=alpha,
                  dropout=dropout, device="meta", dtype=linear.weight.dtype, lora_dtype=dtype)
        new.weight, new.bias = linear.weight, linear.bias
        for name, buffer in linear.named_buffers(recurse=False):
            new.register_buffer(name, buffer)
        new._new_lora(linear.weight.device, dtype)
        new.train(linear.training)
        return new

    def delta_weight(self) -> Tensor:
        """scale * B @ A in fp32: [out, r] @ [r, in] -> [out, in]."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self):
        """Fold the update into `weight` (rounded once to the weight's dtype); forward then skips the branch."""
        if self.merge_refusal:
            raise ValueError(self.merge_refusal)
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update again (exact in fp32; bf16 weights keep a rounding error of one bf16 ulp)."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def base_forward(self, x: Tensor) -> Tensor:
        """The base layer's product x W^T + b: [B, L, in] -> [B, L, out]."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_forward(x)  # [B, L, in] -> [B, L, out]
        if self.merged:
            return out
        # the branch runs in the LoRA dtype (fp32 by default) even under a bf16 base, then is added in the output's
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # [B, L, in] -> [B, L, r]
        # scaled on the narrow side: no extra [B, L, out] tensor (single-block linear1's is the largest of the step)
        h = self.lora_B(h * self.scale)  # [B, L, r] -> [B, L, out]
        return out + h.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------------------------
# Injection and the model-level helpers

# Regular expressions matched against the WHOLE module name (re.fullmatch), so `semantic.*` never matches by accident.
DEFAULT_TARGETS = (
    r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)",
    r"double_blocks\.\d+\.(img|txt)_mlp\.[02]",
    r"single_blocks\.\d+\.linear[12]",
)
MODULATION_TARGETS = (
    r"double_blocks\.\d+\.(img|txt)_mod\.lin",
    r"single_blocks\.\d+\.modulation\.lin",
)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def base_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every base Linear by name (a LoRALinear counts once; its own lora_A/lora_B do not)."""
    inner = {f"{n}.{s}" for n in lora_modules(model) for s in ("lora_A", "lora_B")}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in inner}


def wrap_linear(model: nn.Module, name: str, rank: int, alpha: float | None = None, dropout: float = 0.0,
                dtype: torch.dtype = torch.float32) -> LoRALinear:
    """Replace the nn.Linear `name` of the model by a LoRALinear over the same weight and bias, in place."""
    new = LoRALinear.from_linear(model.get_submodule(name), rank, alpha, dropout, dtype)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def inject_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
                targets=DEFAULT_TARGETS, include_modulation: bool = False,
                dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace the matched nn.Linear layers by LoRALinear in place; returns their names.

    alpha=None means alpha = rank (scale 1). Training only the LoRA: `model.requires_grad_(False)` BEFORE injecting
    (the new LoRA parameters are created trainable, the reused base Parameters keep their flag)."""
    if isinstance(targets, str):
        targets = (targets,)
    patterns = [re.compile(p) for p in (*targets, *(MODULATION_TARGETS if include_modulation else ()))]
    if lora_modules(model):
        raise ValueError(f"the model already has {len(lora_modules(model))} LoRA layers; inject_lora runs once "
                         "(use extras.lora_formats.load_lora to load weights into them)")
    names = [n for n in base_linears(model) if any(p.fullmatch(n) for p in patterns)]
    if not names:
        raise ValueError(f"no nn.Linear of the model matches the LoRA targets {[p.pattern for p in patterns]}")
    for n in names:
        wrap_linear(model, n, rank, alpha, dropout, dtype)
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    sd = {}
    for n, m in lora_modules(model).items():
        sd[f"{n}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{n}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


def merge_lora(model: nn.Module):
    """Fold every LoRA into its base weight. Refused, before any layer changes, if a layer cannot merge (a variant
    with a merge_refusal, e.g. a LoRA over an fp8 base)."""
    mods = lora_modules(model)
    refused = [n for n, m in mods.items() if m.merge_refusal]
    if refused:
        raise ValueError(f"merge_lora: {len(refused)} LoRA layers (e.g. {refused[0]}) cannot merge: "
                         + mods[refused[0]].merge_refusal)
    for m in mods.values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()


# ----------------------------------------------------------------------------------------------------------------
# Strict loading


def mismatch_hint(model: nn.Module, missing, unexpected, mismatched) -> str:
    """One sentence of diagnosis for LoRA keys that do not fit the model: not LoRA at all, blocks the model lacks,
    another rank, another model size, or layers left uncovered. "" when none applies."""
    hints = []
    text = " ".join(unexpected)
    if unexpected and not any("lora" in k or k.endswith(".alpha") for k in unexpected):
        hints.append("the file holds no LoRA tensors; a full FLUX checkpoint loads with checkpoint.load_flux_official "
                     "(its other forms: extras.checkpoint_forms.load_flux)")
    depth = {"double": len(getattr(model, "double_blocks", [])), "single": len(getattr(model, "single_blocks", []))}
    for kind, pattern in (("double", r"(?<!single_)(?:double_blocks|transformer_blocks)[._](\d+)"),
                          ("single", r"single_(?:transformer_)?blocks[._](\d+)")):
        if any(int(i) >= depth[kind] for i in re.findall(pattern, text)):
            hints.append(f"the file names blocks this model does not have ({depth['double']} double and "
                         f"{depth['single']} single blocks): a LoRA for another FLUX variant or size")
            break
    if lora_modules(model) and any(_rank_only(*x) for x in mismatched):
        hints.append("the ranks differ from the injected ones: load the file into a model without LoRA (load_lora "
                     "then injects exactly the file's layers and ranks), or inject_lora with the file's rank")
    elif mismatched:
        width = getattr(model, "hidden_size", None)
        hints.append(f"layer sizes differ (this model's hidden size is {width}): a LoRA for another model size")
    if missing and lora_modules(model):
        hints.append("the file does not cover every injected LoRA layer: load it into a model without LoRA, "
                     "or inject_lora with targets that match the file")
    elif missing:
        hints.append("a lora_A without its lora_B (or the reverse): the file is incomplete")
    return "; ".join(hints)


def _rank_only(key: str, file_shape: tuple, model_shape: tuple) -> bool:
    """Same layer sizes, another rank: A is [r, in], B is [out, r]."""
    i = 0 if key.endswith(("lora_A.weight", "lora_down.weight")) else 1
    return file_shape[1 - i] == model_shape[1 - i] and file_shape[i] != model_shape[i]


def load_lora_state_dict(model: nn.Module, sd: dict[str, Tensor], what: str = "LoRA state dict"):
    """Strict: the keys and shapes of `sd` must be exactly those of lora_state_dict(model)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers: call inject_lora first (or use extras.lora_formats.load_lora, "
                         "which injects)")
    if any(m.merged for m in mods.values()):
        raise ValueError("LoRA layers are merged into the weights: unmerge_lora(model) before loading new LoRA weights")
    own = lora_state_dict(model)
    check_keys({k: tuple(v.shape) for k, v in own.items()}, sd, what,
               hint=lambda missing, unexpected, mismatched: mismatch_hint(model, missing, unexpected, mismatched),
               problem="the LoRA weights do not match the model")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
