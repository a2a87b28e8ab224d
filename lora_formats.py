"""
LoRA files in three layouts: save_lora writes one, load_lora tells them apart from the keys and reads any.

References: diffusers loaders/lora_pipeline.py `FluxLoraLoaderMixin` and loaders/lora_conversion_utils.py (the
diffusers module names, the kohya conversion); huggingface/peft (LoraConfig, rank_pattern/alpha_pattern);
kohya-ss/sd-scripts networks/lora_flux.py (kohya names); ../shared/design/FLUX_SPEC.md §7 (BFL <-> diffusers names)
and §8 (LoRA formats). The LoRA layer itself is lora.py.

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

from checkpoint import CheckpointError, check_keys, read_metadata, read_safetensors, save_atomic, strip_prefix
from lora import base_linears, load_lora_state_dict, lora_modules, lora_state_dict, mismatch_hint, wrap_linear

# ----------------------------------------------------------------------------------------------------------------
# BFL <-> diffusers module names (FLUX_SPEC §7). A fused BFL Linear maps to several diffusers Linears, each taking a
# block of its output rows; in diffusers' order q, k, v (, mlp).

DIFFUSERS_DOUBLE = {  # double_blocks.N.<key> -> transformer_blocks.N.<value>
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
DIFFUSERS_SINGLE = {  # single_blocks.N.<key> -> single_transformer_blocks.N.<value>
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
DIFFUSERS_GLOBAL = {  # outside the blocks: one Linear each
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


def diffusers_parts(name: str, in_features: int, out_features: int) -> list[tuple[str, int]] | None:
    """[(diffusers module name, number of output rows)] for one BFL nn.Linear name such as
    "double_blocks.3.img_attn.qkv", or None if diffusers has no such layer."""
    if m := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", name):
        prefix, names = f"transformer_blocks.{m[1]}.", DIFFUSERS_DOUBLE.get(m[2])
    elif m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", name):
        prefix, names = f"single_transformer_blocks.{m[1]}.", DIFFUSERS_SINGLE.get(m[2])
    else:
        prefix, names = "", [DIFFUSERS_GLOBAL[name]] if name in DIFFUSERS_GLOBAL else None
    if names is None:
        return None
    # fused layers: q, k, v take D rows each (D = in_features), the MLP input takes the rest
    D, n = in_features, len(names)
    rows = [D] * (n - 1) + [out_features - (n - 1) * D] if n > 1 else [out_features]
    return [(prefix + d, r) for d, r in zip(names, rows)]


def _swap_halves(B: Tensor) -> Tensor:
    return torch.cat(B.chunk(2, dim=0)[::-1])  # [2D, r] -> [2D, r] with the halves exchanged


def _kohya_name(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")  # double_blocks.0.img_attn.qkv -> lora_unet_double_blocks_0_img_...


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _to_diffusers(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    sd, ranks = {}, {}
    for name, m in lora_modules(model).items():
        parts = diffusers_parts(name, m.in_features, m.out_features)
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
            stem = _kohya_name(n)
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
# Loading: the file's modules are matched to the model's Linears by name, every key is checked at once (check_keys),
# then each layout is read into {BFL module name: (A [r, in], B [out, r], alpha)} in fp32 and applied.

_DIFFUSERS_ROOTS = ("transformer.", "transformer_blocks.", "single_transformer_blocks.", "x_embedder.",
                    "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)")
_KIND = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B", "alpha": "alpha"}
_NAMES = {"ours": ("lora_A.weight", "lora_B.weight"), "diffusers": ("lora_A.weight", "lora_B.weight"),
          "kohya": ("lora_down.weight", "lora_up.weight")}  # the layout's names for A and B


def _layout(keys: list[str], meta: dict) -> str:
    if meta.get("lora_format") in ("ours", "kohya"):
        return meta["lora_format"]
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith(_DIFFUSERS_ROOTS) for k in keys):
        return "diffusers"
    return "ours"


def _targets(layout: str, linears: dict[str, nn.Linear]) -> dict[str, tuple[str, int, int]]:
    """{file module name: (BFL module name, part index, output rows)} for every Linear of the model."""
    if layout == "kohya":
        return {_kohya_name(n): (n, 0, lin.out_features) for n, lin in linears.items()}
    if layout == "ours":
        return {n: (n, 0, lin.out_features) for n, lin in linears.items()}
    out = {}
    for n, lin in linears.items():
        for j, (dname, rows) in enumerate(diffusers_parts(n, lin.in_features, lin.out_features) or []):
            out[dname] = (n, j, rows)
    return out


def _pairs(sd: dict[str, Tensor]) -> dict[str, dict[str, str]]:
    """{file module: {"A": key, "B": key, "alpha": key}} from `<module>.lora_A.weight`-style keys (others are left
    out, so check_keys reports them as unexpected)."""
    out = {}
    for key in sd:
        if m := _KEY.fullmatch(key):
            out.setdefault(m[1], {})[_KIND[m[2]]] = key
    return out


def _expected_shapes(stem: str, p: dict, sd: dict, names: tuple[str, str], in_f: int, out_f: int) -> dict:
    """The shapes the file's keys of one module must have: A [r, in] and B [out, r], r the file's rank."""
    if "A" in p and "B" in p:
        A = sd[p["A"]]
        r = A.shape[0] if A.ndim == 2 else "r"
        shapes = {p["A"]: (r, in_f), p["B"]: (out_f, r)}
    else:  # half a pair: the absent half is reported missing under the layout's name, the other half as it is
        shapes = {}
        for x, n in zip("AB", names):
            if x in p:
                shapes[p[x]] = tuple(sd[p[x]].shape)
            else:
                shapes[f"{stem}.{n}"] = ()  # not in the file, so only its name counts
    if "alpha" in p:
        shapes[p["alpha"]] = tuple(sd[p["alpha"]].shape)  # a scalar of any shape
    return shapes


def _alpha(sd: dict, p: dict, rank: int) -> float:
    alpha = float(sd[p["alpha"]].item()) if "alpha" in p else 0.0
    return alpha if alpha > 0 else float(rank)  # kohya: missing or 0 means alpha = rank


def _json(meta: dict, key: str) -> dict:
    try:
        return json.loads(meta[key]) if meta.get(key) else {}
    except ValueError as e:
        raise CheckpointError(f"corrupt LoRA metadata {key!r}: {e}") from None


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


def _read_diffusers(sd, pairs, config, targets, linears) -> dict:
    found = {}  # BFL name -> {part index: (A, B, scale)}
    for dname, p in pairs.items():
        name, j, _ = targets[dname]
        A, B = sd[p["A"]], sd[p["B"]]
        r = A.shape[0]
        alpha = float(sd[p["alpha"]].item()) if "alpha" in p else float(
            _peft_value(config.get("alpha_pattern", {}), dname, config.get("lora_alpha", r)))
        scale = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
        found.setdefault(name, {})[j] = (A.float(), B.float(), scale)
    out = {}
    for name, got in found.items():
        lin = linears[name]
        rows = [r for _, r in diffusers_parts(name, lin.in_features, lin.out_features)]
        A, B, alpha = _fuse([got.get(j) for j in range(len(rows))], rows)
        out[name] = (A, _swap_halves(B) if name == _SWAPPED else B, alpha)
    return out


def _foreign_hint(unexpected) -> str:
    """What kind of file it is when its keys are not FLUX LoRA keys at all."""
    hints = []
    text = " ".join(sorted(unexpected))
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
    return "; ".join(hints)


def load_lora(model: nn.Module, path, strength: float = 1.0) -> list[str]:
    """Load a LoRA file in any of the three layouts; returns the names of the loaded layers.

    A model without LoRA gets LoRALinear layers injected exactly where the file has them, with the file's ranks and
    alphas. A model that already has LoRA layers must match the file strictly (same layers, same ranks).
    `strength` multiplies the update (it is folded into lora_B)."""
    sd = read_safetensors(path)
    meta = read_metadata(path)
    sd = strip_prefix(strip_prefix(sd, "model.diffusion_model."), "diffusion_model.")  # ComfyUI-style prefixes
    layout = _layout(list(sd), meta)
    what = f"{path} ({layout} layout)"
    alphas = _json(meta, "lora_alphas") if layout == "ours" else {}
    if layout == "diffusers":
        config = _json(meta, "lora_adapter_metadata")
        config = {k.removeprefix("transformer."): v for k, v in config.items() if not k.startswith("text_encoder")}
        if config.get("use_dora"):
            raise CheckpointError("this diffusers LoRA is a DoRA (use_dora in lora_adapter_metadata), which is not "
                                  "LoRA")
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}

    # every key checked at once against the model's Linears: each file module must be a Linear of the model
    linears = base_linears(model)
    targets = _targets(layout, linears)
    pairs = {stem: p for stem, p in _pairs(sd).items() if stem in targets}
    expected = {}
    for stem, p in pairs.items():
        name, _, rows = targets[stem]
        expected.update(_expected_shapes(stem, p, sd, _NAMES[layout], linears[name].in_features, rows))

    def hint(missing, unexpected, mismatched) -> str:
        found = (_foreign_hint(unexpected), mismatch_hint(model, missing, unexpected, mismatched))
        return "; ".join(h for h in found if h) or "the file holds no LoRA layers"
    check_keys(expected, sd, what, hint, problem="the LoRA weights do not match the model")
    if not pairs:
        raise CheckpointError(f"{what}: the file holds no LoRA layers")

    if layout == "diffusers":
        entries = _read_diffusers(sd, pairs, config, targets, linears)
    else:
        entries = {}
        for stem, p in pairs.items():
            name, A, B = targets[stem][0], sd[p["A"]], sd[p["B"]]
            entries[name] = (A.float(), B.float(), float(alphas.get(name, _alpha(sd, p, A.shape[0]))))

    mods = lora_modules(model)
    if not mods:
        for name, (A, _, alpha) in entries.items():
            wrap_linear(model, name, rank=A.shape[0], alpha=alpha)
        mods = lora_modules(model)
    load_lora_state_dict(model, {f"{n}.lora_{x}.weight": t for n, (A, B, _) in entries.items()
                                 for x, t in (("A", A), ("B", B))}, what=what)
    with torch.no_grad():
        for name, (_, _, alpha) in entries.items():
            mods[name].alpha = alpha
            mods[name].lora_B.weight.mul_(strength)
    return list(entries)
