"""
LoRA for the FLUX transformer: injection into nn.Linear layers, merging, and LoRA files in three layouts.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
huggingface/peft tuners/lora/layer.py (kaiming-uniform A, zero B, scaling = alpha / r; rank_pattern/alpha_pattern);
diffusers loaders/lora_pipeline.py `FluxLoraLoaderMixin` and loaders/lora_conversion_utils.py (the diffusers module
names, the kohya conversion); kohya-ss/sd-scripts networks/lora_flux.py (kohya names);
../shared/design/FLUX_SPEC.md §7 (BFL <-> diffusers names) and §8 (LoRA formats).

A LoRA layer replaces an nn.Linear of the model in place and IS an nn.Linear, so the base keys stay the official
ones (`double_blocks.0.img_attn.qkv.weight`) and only `...qkv.lora_A.weight` [r, in] and `...qkv.lora_B.weight`
[out, r] are added:
    y = W x + b + (alpha / r) * B A dropout(x),   B = 0 at init, so step 0 is the pretrained model.

File layouts (save_lora writes one; load_lora tells them apart from the keys):
  ours       `double_blocks.0.img_attn.qkv.lora_A.weight`; metadata `lora_alphas` = JSON {module name: alpha}.
  diffusers  `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (PEFT names; FluxPipeline.load_lora_weights).
             BFL fuses q|k|v (and q|k|v|mlp in single blocks) into one Linear where diffusers has one Linear each, so
             saving splits B by rows and repeats A.
             Alpha: alpha/r is FOLDED into lora_B and the file says lora_alpha = r (metadata `lora_adapter_metadata`,
             PEFT LoraConfig kwargs, with rank_pattern/alpha_pattern where ranks differ). diffusers (which builds its
             LoraConfig from that metadata) and readers that take alpha = r when a file stores none (ComfyUI, older
             diffusers) then apply scale 1 to the stored product and get our weights. The alpha used in training is
             not kept there; resume training from the `ours` layout.
             Loading: parts that share one A (our files, converted kohya files) keep rank r. Parts with different A's
             (what PEFT training writes) become one rank-(r_q + r_k + r_v) LoRA on the fused layer, exactly:
                 [B_q 0 0; 0 B_k 0; 0 0 B_v] @ [A_q; A_k; A_v] = [B_q A_q; B_k A_k; B_v A_v]
             and a part the file does not train (e.g. proj_mlp) gets zero rows in B.
             Reading also honours per-layer `.alpha` tensors and metadata alpha_pattern / use_rslora.
  kohya      `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` (= A), `.lora_up.weight` (= B), `.alpha` (scalar;
             missing or 0 means alpha = r). The name is "lora_unet_" + the BFL module path with "." -> "_".
"""

import json
import re
from collections import Counter

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from checkpoint import CheckpointError, read_metadata, read_safetensors, save_atomic, strip_prefix

# ----------------------------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: base keys `weight`/`bias`, LoRA keys `lora_A.weight`, `lora_B.weight`."""

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
        """Wrap an existing layer. Its weight and bias Parameters are reused (no copy; requires_grad untouched);
        the LoRA parameters are new, on the weight's device, in `dtype`."""
        # built on the meta device so no throwaway base weight is allocated, then given the real Parameters
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank, alpha=alpha,
                  dropout=dropout, device="meta", dtype=linear.weight.dtype, lora_dtype=dtype)
        new.weight, new.bias = linear.weight, linear.bias
        new._new_lora(linear.weight.device, dtype)
        new.train(linear.training)
        return new

    def delta_weight(self) -> Tensor:
        """scale * B @ A in fp32: [out, r] @ [r, in] -> [out, in]."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self):
        """Fold the update into `weight` (rounded once to the weight's dtype); forward then skips the branch."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update again (exact in fp32; bf16 weights keep a rounding error of one bf16 ulp)."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)  # [B, L, in] -> [B, L, out]
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


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every base Linear by name (a LoRALinear counts once; its own lora_A/lora_B do not)."""
    inner = {f"{n}.{s}" for n in lora_modules(model) for s in ("lora_A", "lora_B")}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in inner}


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


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
                         "(use load_lora to load weights into them)")
    names = [n for n in _linears(model) if any(p.fullmatch(n) for p in patterns)]
    if not names:
        raise ValueError(f"no nn.Linear of the model matches the LoRA targets {[p.pattern for p in patterns]}")
    for n in names:
        _replace(model, n, LoRALinear.from_linear(model.get_submodule(n), rank, alpha, dropout, dtype))
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
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()


def _fail(what: str, missing, unexpected, mismatched, hint: str):
    """One CheckpointError listing every missing, unexpected and mis-shaped key (the format of checkpoint.py)."""
    lines = [f"{what}: the LoRA weights do not match the model"]
    for label, items in (("missing", sorted(missing)), ("unexpected", sorted(unexpected)),
                         ("mis-shaped", [f"{k} (file {f}, model {m})" for k, f, m in mismatched])):
        if items:
            more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
            lines.append(f"  {len(items)} {label}: " + ", ".join(items[:20]) + more)
    if hint:
        lines.append("  hint: " + hint)
    raise CheckpointError("\n".join(lines))


def _hint(model: nn.Module, missing, unexpected, mismatched) -> str:
    hints = []
    text = " ".join(unexpected)
    if re.search(r"(lora_unet_|^|\.)(down|up|mid|input|output|middle)_blocks?[._]", text) or "lora_te_" in text:
        hints.append("this is a Stable Diffusion / SDXL LoRA (UNet down/mid/up blocks, lora_te_ text encoder), "
                     "not a FLUX one")
    elif re.search(r"(^| )(lora_te\d?_|text_encoder)", text):
        hints.append("the file also trains a text encoder (lora_te*/text_encoder.*), which is not part of the FLUX "
                     "transformer; drop those keys to load the transformer part")
    if "processor" in text:
        hints.append("this is an XLabs-layout LoRA (double_blocks.*.processor.*); convert it to the diffusers layout")
    if any(k.endswith("lora_B.bias") for k in unexpected):
        hints.append("lora_B.bias: a BFL-native LoRA with biases (Canny/Depth LoRA), which this loader does not take")
    if unexpected and not any("lora" in k or k.endswith(".alpha") for k in unexpected):
        hints.append("the file holds no LoRA tensors; a full FLUX checkpoint loads with flux_model.load_flux")
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
        raise ValueError("the model has no LoRA layers: call inject_lora first (or use load_lora, which injects)")
    if any(m.merged for m in mods.values()):
        raise ValueError("LoRA layers are merged into the weights: unmerge_lora(model) before loading new LoRA weights")
    own = lora_state_dict(model)
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        _fail(what, missing, unexpected, mismatched, _hint(model, missing, unexpected, mismatched))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


# ----------------------------------------------------------------------------------------------------------------
# BFL <-> diffusers module names (FLUX_SPEC §7). A fused BFL Linear maps to several diffusers Linears, each taking a
# block of its output rows; in diffusers' order q, k, v (, mlp).

_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
}
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_SWAPPED = "final_layer.adaLN_modulation.1"  # BFL rows (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift)


def _swap_halves(B: Tensor) -> Tensor:
    return torch.cat(B.chunk(2, dim=0)[::-1])  # [2D, r] -> [2D, r] with the halves exchanged


def _diffusers_parts(name: str, linear: nn.Linear) -> list[tuple[str, int]] | None:
    """[(diffusers module name, number of output rows)] for one BFL Linear, or None if diffusers has no such layer."""
    if m := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", name):
        prefix, names = f"transformer_blocks.{m[1]}.", _DOUBLE.get(m[2])
    elif m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", name):
        prefix, names = f"single_transformer_blocks.{m[1]}.", _SINGLE.get(m[2])
    else:
        prefix, names = "", [_GLOBAL[name]] if name in _GLOBAL else None
    if names is None:
        return None
    # fused layers: q, k, v take D rows each (D = in_features), the MLP input takes the rest
    D, n = linear.in_features, len(names)
    rows = [D] * (n - 1) + [linear.out_features - (n - 1) * D] if n > 1 else [linear.out_features]
    return [(prefix + d, r) for d, r in zip(names, rows)]


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _to_diffusers(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    sd, ranks = {}, {}
    for name, m in lora_modules(model).items():
        parts = _diffusers_parts(name, m)
        if parts is None:
            raise ValueError(f"{name} has no diffusers counterpart: save this LoRA as format='ours' or 'kohya'")
        A = m.lora_A.weight.detach()
        B = (m.scale * m.lora_B.weight.detach().float()).to(A.dtype)  # alpha/r folded in: the file's alpha is r
        if name == _SWAPPED:
            B = _swap_halves(B)
        for (dname, _), B_part in zip(parts, B.split([r for _, r in parts], dim=0)):
            # clone: safetensors refuses tensors that share memory (the repeated A, the row views of B)
            sd[f"transformer.{dname}.lora_A.weight"] = A.clone()
            sd[f"transformer.{dname}.lora_B.weight"] = B_part.clone()
            ranks[dname] = m.rank
    # PEFT LoraConfig kwargs, as diffusers' save_lora_weights writes them; '^' anchors a full name (peft#2419)
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {f"^{d}": k for d, k in ranks.items() if k != r}
    config = {"r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": other,
              "target_modules": sorted(ranks), "use_dora": False, "lora_bias": False}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    return sd, meta


def save_lora(model: nn.Module, path, format: str = "ours", metadata: dict[str, str] | None = None):
    """Write the model's LoRA layers to a safetensors file in layout 'ours', 'diffusers' or 'kohya'."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers to save")
    if format == "ours":
        sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
        meta = {"lora_format": "ours", "lora_alphas": json.dumps({n: m.alpha for n, m in mods.items()})}
    elif format == "kohya":
        sd = {}
        for n, m in mods.items():
            stem = "lora_unet_" + n.replace(".", "_")
            sd[f"{stem}.lora_down.weight"] = m.lora_A.weight.detach().clone()
            sd[f"{stem}.lora_up.weight"] = m.lora_B.weight.detach().clone()
            sd[f"{stem}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        meta = {"lora_format": "kohya"}
    elif format == "diffusers":
        sd, meta = _to_diffusers(model)
    else:
        raise ValueError(f"unknown LoRA format {format!r}; choose 'ours', 'diffusers' or 'kohya'")
    save_atomic(sd, path, metadata={**(metadata or {}), **meta})


# ----------------------------------------------------------------------------------------------------------------
# Loading: every layout is read into {BFL module name: (A [r, in], B [out, r], alpha)} in fp32, then applied.

_DIFFUSERS_ROOTS = ("transformer.", "transformer_blocks.", "single_transformer_blocks.", "x_embedder.",
                    "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)")


def _pairs(sd: dict[str, Tensor], unexpected: list) -> dict[str, dict[str, Tensor]]:
    """{module: {"A": .., "B": .., "alpha": ..}} from `<module>.lora_A.weight`-style keys; others go to unexpected."""
    out = {}
    for key, t in sd.items():
        m = _KEY.fullmatch(key)
        if m is None:
            unexpected.append(key)
            continue
        kind = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B"}.get(m[2])
        out.setdefault(m[1], {})[kind or "alpha"] = t
    return out


def _check_pair(stem: str, keys: tuple[str, str], p: dict, in_f: int, out_f: int, missing, mismatched) -> bool:
    """A [r, in] and B [out, r] present and of the layer's sizes; problems are recorded under the file's key names."""
    if "A" not in p or "B" not in p:
        missing.extend(f"{stem}.{k}" for k, x in zip(keys, "AB") if x not in p)
        return False
    A, B = p["A"], p["B"]
    r = A.shape[0] if A.ndim == 2 else "r"
    ok = A.ndim == 2 and A.shape[1] == in_f
    if not ok:
        mismatched.append((f"{stem}.{keys[0]}", tuple(A.shape), (r, in_f)))
    if tuple(B.shape) != (out_f, r):
        mismatched.append((f"{stem}.{keys[1]}", tuple(B.shape), (out_f, r)))
        ok = False
    return ok


def _alpha(p: dict, rank: int) -> float:
    alpha = float(p["alpha"].item()) if "alpha" in p else 0.0
    return alpha if alpha > 0 else float(rank)  # kohya: missing or 0 means alpha = rank


def _json(meta: dict, key: str) -> dict:
    try:
        return json.loads(meta[key]) if meta.get(key) else {}
    except ValueError as e:
        raise CheckpointError(f"corrupt LoRA metadata {key!r}: {e}") from None


def _file_keys(stem: str, p: dict, keys: tuple[str, str]) -> list[str]:
    return [f"{stem}.{k}" for k, x in ((keys[0], "A"), (keys[1], "B"), ("alpha", "alpha")) if x in p]


def _read_ours(sd, meta, linears, missing, unexpected, mismatched) -> dict:
    alphas = _json(meta, "lora_alphas")
    keys = ("lora_A.weight", "lora_B.weight")
    out = {}
    for name, p in _pairs(sd, unexpected).items():
        if name not in linears:
            unexpected.extend(_file_keys(name, p, keys))
            continue
        lin = linears[name]
        if _check_pair(name, keys, p, lin.in_features, lin.out_features, missing, mismatched):
            out[name] = (p["A"].float(), p["B"].float(), float(alphas.get(name, _alpha(p, p["A"].shape[0]))))
    return out


def _read_kohya(sd, linears, missing, unexpected, mismatched) -> dict:
    by_stem = {"lora_unet_" + n.replace(".", "_"): n for n in linears}
    keys = ("lora_down.weight", "lora_up.weight")
    out = {}
    for stem, p in _pairs(sd, unexpected).items():
        if stem not in by_stem:
            unexpected.extend(_file_keys(stem, p, keys))
            continue
        lin = linears[by_stem[stem]]
        if _check_pair(stem, keys, p, lin.in_features, lin.out_features, missing, mismatched):
            out[by_stem[stem]] = (p["A"].float(), p["B"].float(), _alpha(p, p["A"].shape[0]))
    return out


def _peft_value(patterns: dict, name: str, default):
    """PEFT's rule (utils/other.py get_pattern_key): a pattern matches the end of the name at a '.' boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _fuse(parts: list, rows: list[int]) -> tuple[Tensor, Tensor, float]:
    """One LoRA on a fused Linear from its parts [(A_j [r_j, in], B_j [rows_j, r_j], scale_j) or None]; exact."""
    present = [p for p in parts if p is not None]
    A0, _, s0 = present[0]
    same_scale = all(s == s0 for _, _, s in present)
    if same_scale and all(torch.equal(A, A0) for A, _, _ in present):
        # one shared A: B's rows stack up, a part the file does not train is zero rows
        r = A0.shape[0]
        B = torch.cat([p[1] if p is not None else A0.new_zeros(n, r) for p, n in zip(parts, rows)])  # [out, r]
        return A0, B, s0 * r
    # different A's: rank sum(r_j), A stacked [sum r_j, in], B block-diagonal [out, sum r_j]
    A = torch.cat([A for A, _, _ in present])
    B = A.new_zeros(sum(rows), A.shape[0])
    row = col = 0
    for p, n in zip(parts, rows):
        if p is not None:
            r = p[0].shape[0]
            B[row:row + n, col:col + r] = p[1] if same_scale else p[1] * p[2]  # unequal scales are folded into B
            col += r
        row += n
    return A, B, (s0 if same_scale else 1.0) * A.shape[0]


def _read_diffusers(sd, meta, linears, missing, unexpected, mismatched) -> dict:
    config = _json(meta, "lora_adapter_metadata")
    config = {k.removeprefix("transformer."): v for k, v in config.items() if not k.startswith("text_encoder")}
    if config.get("use_dora"):
        raise CheckpointError("this diffusers LoRA is a DoRA (use_dora in lora_adapter_metadata), which is not LoRA")
    where, table = {}, {}  # diffusers name -> (BFL name, part index); BFL name -> parts
    for name, lin in linears.items():
        if (parts := _diffusers_parts(name, lin)) is not None:
            table[name] = parts
            where.update({d: (name, j) for j, (d, _) in enumerate(parts)})
    found = {}  # BFL name -> [part or None]
    keys = ("lora_A.weight", "lora_B.weight")
    for dname, p in _pairs({k.removeprefix("transformer."): v for k, v in sd.items()}, unexpected).items():
        if dname not in where:
            unexpected.extend(_file_keys(dname, p, keys))
            continue
        name, j = where[dname]
        lin, rows = linears[name], table[name][j][1]
        if not _check_pair(dname, keys, p, lin.in_features, rows, missing, mismatched):
            continue
        r = p["A"].shape[0]
        alpha = float(p["alpha"].item()) if "alpha" in p else float(
            _peft_value(config.get("alpha_pattern", {}), dname, config.get("lora_alpha", r)))
        scale = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
        found.setdefault(name, [None] * len(table[name]))[j] = (p["A"].float(), p["B"].float(), scale)
    out = {}
    for name, parts in found.items():
        A, B, alpha = _fuse(parts, [r for _, r in table[name]])
        out[name] = (A, _swap_halves(B) if name == _SWAPPED else B, alpha)
    return out


def _layout(keys: list[str], meta: dict) -> str:
    if meta.get("lora_format") in ("ours", "kohya"):
        return meta["lora_format"]
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith(_DIFFUSERS_ROOTS) for k in keys):
        return "diffusers"
    return "ours"


def load_lora(model: nn.Module, path, strength: float = 1.0) -> list[str]:
    """Load a LoRA file in any of the three layouts; returns the names of the loaded layers.

    A model without LoRA gets LoRALinear layers injected exactly where the file has them, with the file's ranks and
    alphas. A model that already has LoRA layers must match the file strictly (same layers, same ranks).
    `strength` multiplies the update (it is folded into lora_B)."""
    sd = read_safetensors(path)
    meta = read_metadata(path)
    sd = strip_prefix(strip_prefix(sd, "model.diffusion_model."), "diffusion_model.")  # ComfyUI-style prefixes
    layout = _layout(list(sd), meta)
    linears = _linears(model)
    missing, unexpected, mismatched = [], [], []
    if layout == "kohya":
        entries = _read_kohya(sd, linears, missing, unexpected, mismatched)
    elif layout == "diffusers":
        entries = _read_diffusers(sd, meta, linears, missing, unexpected, mismatched)
    else:
        entries = _read_ours(sd, meta, linears, missing, unexpected, mismatched)
    if missing or unexpected or mismatched or not entries:
        _fail(f"{path} ({layout} layout)", missing, unexpected, mismatched,
              _hint(model, missing, unexpected, mismatched) or "the file holds no LoRA layers")

    mods = lora_modules(model)
    if not mods:
        for name, (A, _, alpha) in entries.items():
            _replace(model, name, LoRALinear.from_linear(linears[name], rank=A.shape[0], alpha=alpha))
        mods = lora_modules(model)
    load_lora_state_dict(model, {f"{n}.lora_{x}.weight": t for n, (A, B, _) in entries.items()
                                 for x, t in (("A", A), ("B", B))}, what=f"{path} ({layout} layout)")
    with torch.no_grad():
        for name, (_, _, alpha) in entries.items():
            mods[name].alpha = alpha
            mods[name].lora_B.weight.mul_(strength)
    return list(entries)
