"""
LoRA files in three layouts: save_lora writes one, read_lora tells them apart from the keys and reads any (load_lora
into LoRA layers; merge_lora_file / add_lora_file on top of a model: sample.py --lora); export_run writes a run's.

References: diffusers loaders/lora_pipeline.py `FluxLoraLoaderMixin` and loaders/lora_conversion_utils.py (the
diffusers module names, the kohya conversion); diffusers scripts/convert_flux_to_diffusers.py (BFL <-> diffusers
names: the fused q|k|v (|mlp) rows, the final adaLN's swapped halves); huggingface/peft (LoraConfig,
rank_pattern/alpha_pattern); kohya-ss/sd-scripts networks/lora_flux.py (kohya names). The LoRA layer itself is
lora.py.

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
A file that also trains a text encoder (kohya lora_te1_ / lora_te3_, diffusers text_encoder.*) loads its transformer
part, what diffusers' load_lora_into_transformer and ComfyUI's LoraLoaderModelOnly take from it; the text-encoder
tensors left out are counted in one note. ai-toolkit writes the diffusers key layout.

Applying a file on top of a model (sample.py / tools.eval --lora FILE[:SCALE], through pipeline.load_pipeline):
merge_lora_file adds scale * (alpha / r) * B A to each base weight (bf16 / fp32 bases; a run's own LoRA layer keeps
its branch over the new weight); an fp8 base cannot take a merge (extras/fp8.py), so add_lora_file puts the file
beside it as LoRA layers, stacking it with a LoRA already there into one branch of the summed rank, exactly.

Exporting a training run (export_run; `python -m extras.lora_formats export RUN_DIR_OR_FINAL [--out DIR]`): a
train.py final.safetensors holds the semantic modules and, for the joint / finetune stages, the backbone LoRA. Only
the LoRA can go to other tools; it is written beside the run as lora_kohya.safetensors (ComfyUI, kohya, Forge) and
lora_diffusers.safetensors (FluxPipeline / FluxKontextPipeline.load_lora_weights), with the base model named in the
metadata the way those tools record it: kohya's `ss_base_model_version` ("flux1") and `ss_sd_model_name` (the base
checkpoint's file name), the SAI model spec's `modelspec.architecture` ("flux-1-dev/lora", ...), and `base_model`
(the Hugging Face id of an official base, as a diffusers model card names it), and the settings to sample with
(guidance, steps, semantic strength and guidance: sample_*). The LoRA is stored in bf16 unless fp32 is asked for
(--dtype; train.py --lora-export-dtype). A model card README.md goes beside them (base, stage, data, the scores of
these weights if the run folder's scores.json has any, how to load them in ComfyUI and diffusers); a README.md that
this exporter did not write (no CARD_MARKER line) is left alone. The semantic modules stay behind: they need this
project (pipeline.load_pipeline, sample.py).
"""

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from checkpoint import (CheckpointError, check_keys, command, read_header, read_metadata, read_safetensors, run_config,
                        save_atomic, strip_prefix, trained_file, write_atomic)
from lora import LoRALinear, base_linears, load_lora_state_dict, lora_modules, mismatch_hint, wrap_linear

# ----------------------------------------------------------------------------------------------------------------
# BFL <-> diffusers module names (as diffusers scripts/convert_flux_to_diffusers.py converts them). A fused BFL
# Linear maps to several diffusers Linears, each taking a block of its output rows; in diffusers' order q, k, v (, mlp).

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
SWAPPED = "final_layer.adaLN_modulation.1"  # BFL rows (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift)
# The q/k RMSNorm scales, the transformer's only weights outside a Linear (no LoRA on them; a full checkpoint in the
# diffusers layout needs them): BFL parameter <- diffusers parameter, per block.
DIFFUSERS_NORMS_DOUBLE = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
DIFFUSERS_NORMS_SINGLE = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


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


def diffusers_norm(key: str) -> str | None:
    """The diffusers name of one BFL norm scale ("double_blocks.3.img_attn.norm.query_norm.scale"), or None."""
    if m := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", key):
        name = DIFFUSERS_NORMS_DOUBLE.get(m[2])
        return name and f"transformer_blocks.{m[1]}.{name}"
    if m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", key):
        name = DIFFUSERS_NORMS_SINGLE.get(m[2])
        return name and f"single_transformer_blocks.{m[1]}.{name}"
    return None


def swap_halves(B: Tensor) -> Tensor:
    return torch.cat(B.chunk(2, dim=0)[::-1])  # [2D, r] -> [2D, r] with the halves exchanged


def _kohya_name(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")  # double_blocks.0.img_attn.qkv -> lora_unet_double_blocks_0_img_...


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _entries(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{BFL module name: (A [r, in], B [out, r], alpha)} of the model's LoRA layers: what each layout is made of."""
    return {n: (m.lora_A.weight.detach(), m.lora_B.weight.detach(), m.alpha) for n, m in lora_modules(model).items()}


def _to_diffusers(entries: dict) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The diffusers / PEFT state dict and metadata of {BFL name: (A [r, in], B [out, r], alpha)}: B split by rows
    into the diffusers parts (A repeated), alpha/r folded into B."""
    sd, ranks = {}, {}
    for name, (A, B, alpha) in entries.items():
        rank = A.shape[0]
        parts = diffusers_parts(name, A.shape[1], B.shape[0])
        if parts is None:
            raise ValueError(f"{name} has no diffusers counterpart: save this LoRA as format='ours' or 'kohya'")
        B = (alpha / rank * B.float()).to(A.dtype)  # alpha/r folded in: the file's alpha is r
        if name == SWAPPED:
            B = swap_halves(B)
        for (dname, _), B_part in zip(parts, B.split([r for _, r in parts], dim=0)):
            # clone: safetensors refuses tensors that share memory (the repeated A, the row views of B)
            sd[f"transformer.{dname}.lora_A.weight"] = A.clone()
            sd[f"transformer.{dname}.lora_B.weight"] = B_part.clone()
            ranks[dname] = rank
    # PEFT LoraConfig kwargs, as diffusers' save_lora_weights writes them; '^' anchors a full name (peft#2419)
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {f"^{d}": k for d, k in ranks.items() if k != r}
    config = {"r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": other,
              "target_modules": sorted(ranks), "use_dora": False, "lora_bias": False}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    return sd, meta


def _save_entries(entries: dict, path, format: str, metadata: dict[str, str] | None, dtype: torch.dtype | None = None):
    """Write {BFL name: (A, B, alpha)} in one layout; `dtype` (None: as they are) rounds A and B once, after alpha/r
    is folded in (diffusers). A kohya `.alpha` stays float32: a scalar per layer, kept exact."""
    if dtype is not None:  # [r, in], [out, r] in fp32 first: the diffusers fold rounds once, at the end
        entries = {n: (A.float(), B.float(), alpha) for n, (A, B, alpha) in entries.items()}
    if format == "ours":
        sd = {f"{n}.lora_{x}.weight": t.clone() for n, (A, B, _) in entries.items() for x, t in (("A", A), ("B", B))}
        meta = {"lora_format": "ours", "lora_alphas": json.dumps({n: alpha for n, (_, _, alpha) in entries.items()})}
    elif format == "kohya":
        sd = {}
        for n, (A, B, alpha) in entries.items():
            stem = _kohya_name(n)
            sd[f"{stem}.lora_down.weight"] = A.clone()
            sd[f"{stem}.lora_up.weight"] = B.clone()
            sd[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        meta = {"lora_format": "kohya"}
    elif format == "diffusers":
        sd, meta = _to_diffusers(entries)
    else:
        raise ValueError(f"unknown LoRA format {format!r}; choose 'ours', 'diffusers' or 'kohya'")
    if dtype is not None:
        sd = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in sd.items()}
    save_atomic(sd, path, metadata={**(metadata or {}), **meta})


def save_lora(model: nn.Module, path, format: str = "ours", metadata: dict[str, str] | None = None):
    """Write the model's LoRA layers to a safetensors file in layout 'ours', 'diffusers' or 'kohya'."""
    entries = _entries(model)
    if not entries:
        raise ValueError("the model has no LoRA layers to save")
    _save_entries(entries, path, format, metadata)


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
        out[name] = (A, swap_halves(B) if name == SWAPPED else B, alpha)
    return out


def _foreign_hint(unexpected) -> str:
    """What kind of file it is when its keys are not FLUX LoRA keys at all."""
    hints = []
    text = " ".join(sorted(unexpected))
    if re.search(r"(lora_unet_|^|\.)(down|up|mid|input|output|middle)_blocks?[._]", text):
        hints.append("this is a Stable Diffusion / SDXL LoRA (UNet down/mid/up blocks), not a FLUX one")
    if "processor" in text:
        hints.append("this is an XLabs-layout LoRA (double_blocks.*.processor.*); convert it to the diffusers layout")
    if any(k.endswith("lora_B.bias") for k in unexpected):
        hints.append("lora_B.bias: a BFL-native LoRA with biases (Canny/Depth LoRA), which this loader does not take")
    return "; ".join(hints)


# A text encoder's LoRA in a FLUX LoRA file: kohya's lora_te1_ (CLIP-L) / lora_te3_ (T5) and SD's lora_te_, diffusers'
# text_encoder. / text_encoder_2., ComfyUI's text_encoders.: not the transformer's, so left out and counted (the part
# diffusers' load_lora_into_transformer and ComfyUI's LoraLoaderModelOnly take is the transformer's)
TEXT_ENCODER_KEY = re.compile(r"lora_te\d*_|text_encoders?(_\d+)?\.")


@dataclass
class LoraFile:
    """A LoRA file read against a model's Linears (read_lora): every key checked, nothing applied yet."""
    path: Path
    layout: str  # ours | diffusers | kohya
    entries: dict[str, tuple[Tensor, Tensor, float]]  # BFL module name -> (A [r, in], B [out, r], alpha), fp32
    skipped: int = 0  # text-encoder tensors left out

    def describe(self) -> str:
        """'FILE (kohya layout, 40 layers, rank 16)'."""
        ranks = sorted({A.shape[0] for A, _, _ in self.entries.values()})
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]}"
        return f"{self.path} ({self.layout} layout, {len(self.entries)} layers, {rank})"

    def skip_note(self) -> str:
        """One line on the text-encoder tensors left out; "" when there were none."""
        if not self.skipped:
            return ""
        return (f"note: {self.path}: skipped {self.skipped} text-encoder tensors (lora_te*/text_encoder*): the "
                "FLUX transformer's LoRA is loaded, the text encoders are used as they are")


def read_lora(model: nn.Module, path) -> LoraFile:
    """A LoRA file in any of the three layouts, checked against the model's Linears (every key at once; the model
    may be on the meta device: only its layer names and sizes are used) and read into {BFL module name: (A, B,
    alpha)} in fp32. Text-encoder tensors are left out and counted."""
    path = Path(path)
    sd = read_safetensors(path)
    meta = read_metadata(path)
    skipped = [k for k in sd if TEXT_ENCODER_KEY.match(k)]
    sd = {k: v for k, v in sd.items() if not TEXT_ENCODER_KEY.match(k)}
    sd = strip_prefix(strip_prefix(sd, "model.diffusion_model."), "diffusion_model.")  # ComfyUI-style prefixes
    layout = _layout(list(sd), meta)
    what = f"{path} ({layout} layout)"
    if skipped and not sd:
        raise CheckpointError(f"{path}: the file holds only text-encoder LoRA ({len(skipped)} tensors), nothing for "
                              "the FLUX transformer")
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
    return LoraFile(path, layout, entries, len(skipped))


def load_lora(model: nn.Module, path, strength: float = 1.0) -> list[str]:
    """Load a LoRA file in any of the three layouts; returns the names of the loaded layers.

    A model without LoRA gets LoRALinear layers injected exactly where the file has them, with the file's ranks and
    alphas. A model that already has LoRA layers must match the file strictly (same layers, same ranks).
    `strength` multiplies the update (it is folded into lora_B). Text-encoder tensors are left out, in one note."""
    lora = read_lora(model, path)
    what = f"{lora.path} ({lora.layout} layout)"
    mods = lora_modules(model)
    if not mods:
        for name, (A, _, alpha) in lora.entries.items():
            wrap_linear(model, name, rank=A.shape[0], alpha=alpha)
        mods = lora_modules(model)
    load_lora_state_dict(model, {f"{n}.lora_{x}.weight": t for n, (A, B, _) in lora.entries.items()
                                 for x, t in (("A", A), ("B", B))}, what=what)
    with torch.no_grad():
        for name, (_, _, alpha) in lora.entries.items():
            mods[name].alpha = alpha
            mods[name].lora_B.weight.mul_(strength)
    if lora.skipped:
        print(lora.skip_note())
    return list(lora.entries)


# ----------------------------------------------------------------------------------------------------------------
# Applying a LoRA file on top of a model (sample.py / tools.eval --lora): merged into the base weights, or beside
# them as LoRA layers where the weights cannot take a merge (an fp8 base)


def merge_refusal(layer: nn.Module) -> str:
    """Why a merge into this layer's weight is refused ("" when it is not): a LoRA variant's merge_refusal, also
    for a base layer that names its variant (an fp8 Linear's lora_class)."""
    return getattr(layer, "merge_refusal", "") or getattr(getattr(layer, "lora_class", None), "merge_refusal", "")


@torch.no_grad()
def merge_lora_file(model: nn.Module, lora: LoraFile, scale: float = 1.0) -> None:
    """W <- W + scale * (alpha / r) * B A for every layer of the file (computed in fp32, rounded once to W's dtype).
    A run's own LoRA layer keeps its branch: the file goes into the base weight under it. Refused, before any layer
    changes, where a weight cannot take a merge (fp8): use add_lora_file there."""
    layers = {name: model.get_submodule(name) for name in lora.entries}
    if refused := [n for n, m in layers.items() if merge_refusal(m)]:
        raise ValueError(f"{lora.path}: cannot merge into {len(refused)} layers (e.g. {refused[0]}): "
                         f"{merge_refusal(layers[refused[0]])}")
    for name, (A, B, alpha) in lora.entries.items():
        W = layers[name].weight  # [out, in]
        delta = (scale * alpha / A.shape[0]) * (B.to(W.device) @ A.to(W.device))  # [out, r] @ [r, in] -> [out, in]
        W.copy_((W.float() + delta).to(W.dtype))


@torch.no_grad()
def add_lora_file(model: nn.Module, lora: LoraFile, scale: float = 1.0) -> None:
    """The file as unmerged LoRA branches (the base weights untouched; what an fp8 base takes). A layer without LoRA
    gets one with the file's rank and alpha (branch in fp32). A layer that has one already (a run's own, or an
    earlier file's) gets both in one branch of rank r1 + r2 and scale 1, exactly:
        [s1 B1, s2 B2] @ [A1; A2] = s1 B1 A1 + s2 B2 A2     (s = scale * alpha / r of each)"""
    for name, (A, B, alpha) in lora.entries.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            layer = wrap_linear(model, name, rank=A.shape[0], alpha=alpha)
            layer.lora_A.weight.copy_(A)  # [r, in]
            layer.lora_B.weight.copy_(scale * B)  # [out, r]
            continue
        if layer.merged:
            raise ValueError(f"{name}: its own LoRA is merged into the weight; unmerge_lora(model) first")
        device, dtype = layer.lora_A.weight.device, layer.lora_A.weight.dtype
        A_all = torch.cat([layer.lora_A.weight.float(), A.to(device)])  # [r1 + r2, in]
        B_all = torch.cat([layer.scale * layer.lora_B.weight.float(),
                           (scale * alpha / A.shape[0]) * B.to(device)], dim=1)  # [out, r1 + r2]
        layer.rank, layer.alpha = A_all.shape[0], float(A_all.shape[0])  # scale 1: the scales are in B
        layer.lora_A = nn.Linear(layer.in_features, layer.rank, bias=False, device=device, dtype=dtype)
        layer.lora_B = nn.Linear(layer.rank, layer.out_features, bias=False, device=device, dtype=dtype)
        layer.lora_A.weight.copy_(A_all)
        layer.lora_B.weight.copy_(B_all)


def is_lora_file(path) -> bool:
    """A safetensors file of LoRA tensors that is not a train.py output (no run config): what --lora / --init-lora
    take, where --ckpt / --init want a train.py output. False for anything unreadable (reported by its reader)."""
    try:
        keys, meta = read_header(path)
    except (CheckpointError, OSError):
        return False
    return "config" not in meta and any(_KEY.fullmatch(k) for k in keys)


# ----------------------------------------------------------------------------------------------------------------
# Exporting a training run's LoRA for other tools

EXPORTS = {"kohya": "lora_kohya.safetensors", "diffusers": "lora_diffusers.safetensors"}
EXPORT_USE = {EXPORTS["kohya"]: "ComfyUI (LoRA loader), kohya, Forge",
              EXPORTS["diffusers"]: "diffusers (`load_lora_weights`)"}
# bf16 by default, as kohya and diffusers' training scripts save: half the bytes; the rounding moves the output by a
# small fraction of what the LoRA changes (tests/extras/test_lora_formats.py states the bound)
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SAMPLING_KEYS = ("steps", "sem_strength", "sem_guidance")  # train.py's metadata `sampling` (pipeline's defaults)
CARD = "README.md"  # the model card, beside the exports
CARD_MARKER = ("<!-- model card written by this project's LoRA exporter (python -m extras.lora_formats export): "
               "rewritten on every export; delete this line to keep the file as yours -->")
# preset -> (Hugging Face id of the official base, SAI model spec architecture); the tiny demo has neither
OFFICIAL_BASES = {"kontext": ("black-forest-labs/FLUX.1-Kontext-dev", "flux-1-kontext-dev"),
                  "dev": ("black-forest-labs/FLUX.1-dev", "flux-1-dev"),
                  "schnell": ("black-forest-labs/FLUX.1-schnell", "flux-1-schnell")}


def run_lora(final_path) -> tuple[dict[str, tuple[Tensor, Tensor, float]], dict]:
    """(entries {BFL module name: (A, B, alpha)}, run config) of a train.py output. Entries are empty for a run
    without a trained LoRA: a warmup (no LoRA keys), a finetune of a warmup (LoRA keys whose B is all zero: the
    identity, never trained), a base-stage output (a whole transformer)."""
    path = trained_file(final_path)
    cfg = run_config(path)
    if cfg.get("stage") == "base":
        return {}, cfg
    rank, alpha = cfg.get("lora_rank") or 0, cfg.get("lora_alpha")
    sd = read_safetensors(path)
    stems = sorted({k[:-len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")} |
                   {k[:-len(".lora_B.weight")] for k in sd if k.endswith(".lora_B.weight")})
    entries = {}
    for stem in stems:
        A, B = sd.get(f"{stem}.lora_A.weight"), sd.get(f"{stem}.lora_B.weight")
        if A is None or B is None or A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            shapes = [None if t is None else tuple(t.shape) for t in (A, B)]
            raise CheckpointError(f"{path}: the LoRA of {stem} is incomplete or mis-shaped (lora_A {shapes[0]}, "
                                  f"lora_B {shapes[1]})")
        if rank and A.shape[0] != rank:
            raise CheckpointError(f"{path}: {stem} has LoRA rank {A.shape[0]} but its run config says {rank}")
        entries[stem] = (A, B, float(alpha if alpha else A.shape[0]))
    if not any(B.any() for _, B, _ in entries.values()):
        entries = {}
    return entries, cfg


def export_metadata(cfg: dict, meta: dict, path: Path, rank: int, alpha: float) -> dict[str, str]:
    """What the exported files say about themselves: the base model (file name; the official id and architecture
    for official presets; its content id), the rank and alpha, where they come from (kohya ss_* and SAI modelspec.*
    keys), and the sampling settings the run was made for: the guidance input (run config `sample_guidance`) and
    the steps, semantic strength and semantic guidance train.py recorded (metadata `sampling`)."""
    preset = cfg.get("base_preset", "")
    base_file = cfg.get("base_file") or meta.get("base", "")
    model_id, arch = OFFICIAL_BASES.get(preset, (None, "flux-1"))
    out = {"ss_base_model_version": "flux1", "ss_sd_model_name": base_file, "ss_network_module": "networks.lora_flux",
           "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
           "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{arch}/lora",
           "modelspec.implementation": "https://github.com/black-forest-labs/flux",
           "modelspec.title": f"{path.parent.name or path.stem} infrared LoRA",
           "modelspec.description": (f"backbone LoRA of a {cfg.get('stage')} run (scheme {cfg.get('scheme')}), "
                                     "trained with the RGB image as Kontext condition tokens; the semantic modules "
                                     "are not in this file (they need this project)"),
           "base_file": base_file, "base_preset": preset, "source": f"{path.parent.name}/{path.name}",
           "prompt": str(cfg.get("prompt", ""))}
    if model_id:
        out["base_model"] = model_id
    if cfg.get("sample_guidance") is not None:  # the guidance input to sample with: the base's, not the training one
        out["sample_guidance"] = f"{cfg['sample_guidance']:g}"
    for key, value in _json(meta, "sampling").items():  # steps, sem_strength, sem_guidance (train.py records them)
        if key in SAMPLING_KEYS and isinstance(value, (int, float)):
            out[f"sample_{key}"] = f"{value:g}"
    if cfg.get("base_id"):
        out["base_id"] = cfg["base_id"]
    return out


def run_scores(path: Path) -> list[dict]:
    """The validation scores a run folder holds for these weights: the entries of <run>/scores.json (tools.eval's
    record, keyed by split, sampling, data and the weights' modification time) computed from this very
    final.safetensors, each as {split, data, sampling, summary}; [] when there are none."""
    f = path.parent / "scores.json"
    try:
        cache = json.loads(f.read_text()) if f.is_file() else {}
    except (ValueError, OSError):
        return []
    rows = []
    for key, summary in cache.items() if isinstance(cache, dict) else ():
        try:
            k = json.loads(key)
        except ValueError:
            continue
        if isinstance(k, dict) and k.get("weights") == path.stat().st_mtime_ns and isinstance(summary, dict):
            rows.append({"split": k.get("split", "?"), "data": k.get("data", "?"), "sampling": k.get("sampling", {}),
                         "summary": summary})
    return rows


def _percent(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def model_card(cfg: dict, train_args: dict, meta: dict[str, str], names: list[str], dtype: str, layers: int,
               scores: list[dict]) -> str:
    """The README.md written beside the exports: what the LoRA is (base, stage, data, rank), the settings it was
    validated with and its scores, how to load it in ComfyUI and diffusers, and that the semantic modules need this
    project. Starts with Hugging Face's YAML header and the exporter's marker line."""
    model_id = meta.get("base_model")
    guidance = meta.get("sample_guidance")
    steps = meta.get("sample_steps", "20")
    prompt = meta.get("prompt", "")
    lines = ["---"] + ([f"base_model: {model_id}"] if model_id else []) + ["tags:", "- flux", "- lora", "- infrared",
                                                                             "---", CARD_MARKER, ""]
    lines += [f"# {meta['modelspec.title']}", "",
              "The backbone LoRA of a semantic-guided infrared (thermal) image generator on FLUX.1: given a visible "
              "(RGB) image, FLUX generates the matching infrared image, with the RGB image as Kontext condition "
              "tokens.", ""]
    base = model_id or f"this project's {meta.get('base_preset', '?')} base (no Hugging Face id)"
    rank, alpha = meta["ss_network_dim"], meta["ss_network_alpha"]
    data = train_args.get("data") or "the synthetic scenes (data/synth)"
    sampled = [f"{steps} Euler steps"] + ([f"guidance {guidance}"] if guidance else [])
    sampled += [f"semantic {k.replace('_', ' ')} {meta[f'sample_sem_{k}']}" for k in ("strength", "guidance")
                if f"sample_sem_{k}" in meta]
    rows = [("base model", f"{base} (`{meta.get('base_file', '?')}`"
                           + (f", id {meta['base_id']}" if meta.get("base_id") else "") + ")"),
            ("stage, scheme", f"{cfg.get('stage')}, {cfg.get('scheme')}"),
            ("LoRA", f"rank {rank}, alpha {alpha}, {layers} layers, stored in {dtype}"),
            ("data", f"`{data}`"),
            ("training", ", ".join(f"{k.replace('_', ' ')} {train_args[k]:g}" for k in ("steps", "batch_size", "lr")
                                   if isinstance(train_args.get(k), (int, float)))),
            ("prompt", f'"{prompt}"'),
            ("sampling settings", ", ".join(sampled))]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v] + [""]
    lines += ["## Files", ""] + [f"- `{n}`: {EXPORT_USE[n]}" for n in names] + [""]
    lines += ["## Validation scores", ""]
    if scores:
        lines += ["| split | data | steps | sem. strength | sem. guidance | PSNR (dB) | SSIM | miss | decoy halluc. |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in scores:
            s, how = r["summary"], r["sampling"]
            cells = [r["split"], f"`{r['data']}`", how.get("steps", "?"), how.get("sem_strength", "?"),
                     how.get("sem_guidance", "?"), f"{s.get('psnr', float('nan')):.2f}",
                     f"{s.get('ssim', float('nan')):.4f}", _percent(s.get("all", {}).get("miss_rate")),
                     _percent(s.get("decoy", {}).get("hallucination_rate"))]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    else:
        lines.append("None in the run folder (tools.eval's ablation records them in scores.json; export again "
                     "afterwards to list them here).")
    lines.append("")
    if model_id:
        call = ", ".join([f'prompt="{prompt}"'] + ([f"guidance_scale={guidance}"] if guidance else [])
                         + [f"num_inference_steps={steps}"])
        lines += ["## ComfyUI", "",
                  f"Copy `{EXPORTS['kohya']}` into `ComfyUI/models/loras/` and apply it to the FLUX model with a "
                  "LoRA loader node (LoraLoaderModelOnly: the file has no text-encoder part), strength 1. Give the "
                  f"RGB image as the Kontext reference image; prompt \"{prompt}\", {', '.join(sampled[:2])}.", "",
                  "## diffusers", "", "```python", "import torch", "from diffusers import FluxKontextPipeline",
                  "from diffusers.utils import load_image", "",
                  f'pipe = FluxKontextPipeline.from_pretrained("{model_id}", torch_dtype=torch.bfloat16).to("cuda")',
                  f'pipe.load_lora_weights("FOLDER_OF_THIS_FILE", weight_name="{EXPORTS["diffusers"]}")',
                  f'ir = pipe(image=load_image("rgb.png"), {call}).images[0]', "```", ""]
    else:
        lines += ["## Other tools", "",
                  f"The base is this project's own {meta.get('base_preset', '?')} transformer, which ComfyUI and "
                  "diffusers do not have: these files show the formats, they are of use there only on that base. "
                  f"On an official base, `{EXPORTS['kohya']}` goes to ComfyUI's LoRA loader and "
                  f"`{EXPORTS['diffusers']}` to diffusers' `FluxKontextPipeline.load_lora_weights`.", ""]
    lines += ["## The semantic modules need this project", "",
              f"These files hold only the LoRA: the semantic modules (scheme {cfg.get('scheme')}) that read the "
              "semantic map are in the run's `final.safetensors` and load only with this project "
              "(`python sample.py rgb.png sem.png --ckpt RUN_FOLDER`). Another tool gives the RGB-conditioned part "
              "of the model, without the semantic map's guidance.", ""]
    return "\n".join(lines)


def write_card(out: Path, text: str) -> Path | None:
    """Write the model card out/README.md, unless a README.md is there that this exporter did not write (no marker
    line): that one is left alone, in one note. Returns the path written, or None."""
    card = out / CARD
    if card.exists() or card.is_symlink():
        ours = card.is_file() and CARD_MARKER in card.read_text(errors="replace").splitlines()
        if not ours:
            print(f"note: {card} is not the model card this exporter writes (no marker line): left alone")
            return None
    write_atomic(card, lambda tmp: Path(tmp).write_text(text))
    return card


def export_run(final_path, out_dir=None, dtype: str = "bf16") -> list[Path]:
    """Write a train.py output's backbone LoRA as lora_kohya.safetensors and lora_diffusers.safetensors, in `dtype`
    ("bf16", the default, or "fp32"), and the model card README.md into out_dir (default: beside
    final.safetensors); returns the paths written. A run without a trained LoRA is a ValueError."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"LoRA export dtype {dtype!r}: choose {' or '.join(EXPORT_DTYPES)}")
    path = trained_file(final_path)
    entries, cfg = run_lora(path)
    if cfg.get("stage") == "base":
        raise ValueError(f"{path}: a base-stage output is a whole transformer, not a LoRA: it loads as a checkpoint")
    if not entries:
        raise ValueError(f"{path}: no LoRA to export: this {cfg.get('stage')} run trained only the semantic modules "
                         "(no backbone LoRA), and those need this project (sample.py / pipeline.load_pipeline)")
    A, _, alpha = next(iter(entries.values()))
    run_meta = read_metadata(path)
    meta = export_metadata(cfg, run_meta, path, A.shape[0], alpha)
    out = Path(out_dir) if out_dir is not None else path.parent
    written = []
    for format, name in EXPORTS.items():
        _save_entries(entries, out / name, format, meta, EXPORT_DTYPES[dtype])
        written.append(out / name)
    train_args = _json(run_meta, "train_args")
    card = model_card(cfg, train_args if isinstance(train_args, dict) else {}, meta, list(EXPORTS.values()), dtype,
                      len(entries), run_scores(path))
    if (written_card := write_card(out, card)) is not None:
        written.append(written_card)
    return written


def export_if_lora(final_path, out_dir=None, dtype: str = "bf16") -> list[Path]:
    """train.py's hook after writing final.safetensors: export_run for a run with a trained LoRA, [] otherwise."""
    if not run_lora(final_path)[0]:
        return []
    return export_run(final_path, out_dir, dtype)


def _main(argv=None):
    parser = argparse.ArgumentParser(description="LoRA files for other tools (ComfyUI/kohya, diffusers)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help="write a training run's backbone LoRA as lora_kohya.safetensors (ComfyUI, "
                                      "kohya) and lora_diffusers.safetensors (diffusers)")
    p.add_argument("run", help="a run folder (runs/joint) or its final.safetensors")
    p.add_argument("--out", default=None, help="folder to write into (default: beside final.safetensors)")
    p.add_argument("--dtype", default="bf16", choices=list(EXPORT_DTYPES),
                   help="the exported LoRA's dtype (bf16: half the bytes, as kohya and diffusers save)")
    args = parser.parse_args(argv)
    for path in export_run(args.run, args.out, args.dtype):
        print(path)


def main(argv=None) -> int:
    return command(_main)(argv)  # one-line errors, exit status 2


if __name__ == "__main__":
    sys.exit(main())
