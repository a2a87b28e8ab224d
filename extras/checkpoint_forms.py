"""
The FLUX transformer from every other form of checkpoint users have, read into the official BFL keys and loaded
strictly. BFL's own single file (flux1-dev.safetensors) is the core's (checkpoint.load_flux_official); load_flux
hands it that case and reads the others:

  the official single file with a `model.diffusion_model.` or `diffusion_model.` prefix
  a ComfyUI all-in-one checkpoint: the transformer under `model.diffusion_model.` beside `vae.` / `first_stage_model.`
      and `text_encoders.` / `cond_stage_model.` parts, which are not read (the info line says so)
  fp8 weights, plain (Kijai, kohya) or with ComfyUI's scales (scale_weight + scaled_fp8, weight_scale + comfy_quant):
      fp8.split_scales; kept in fp8 or upcast as base_dtype asks (fp8.to_base_dtype)
  diffusers' FluxTransformer2DModel: its folder (config.json, diffusion_pytorch_model*.safetensors and the
      *.safetensors.index.json that joins the shards), that index, a Hugging Face snapshot holding it in transformer/,
      or one file; converted with extras/lora_formats.py's BFL <-> diffusers name table: q | k | v (| mlp) rows
      concatenated, the final adaLN's (scale, shift) halves swapped back to (shift, scale). Shard by shard: checked
      strictly from the headers first, then each shard read, each official tensor made (and for base_dtype fp8
      quantized) as soon as its last part is read, a layer's parts kept until then (they may lie in several shards),
      and the shard let go: the peak is one shard plus the converted model, not the whole file in its own dtype
"""

import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from checkpoint import (CheckpointError, check_keys, check_state_dict, chosen_preset, flux_hint, flux_params,
                        flux_preset, header_keys, load_flux_official, load_strict, read_header, read_metadata,
                        read_safetensors, read_sharded, shard_files, split_prefix)
from extras import fp8
from extras.lora_formats import SWAPPED, diffusers_norm, diffusers_parts, swap_halves
from flux_model import Flux, FluxParams

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI / kohya single files
OTHER_PARTS = ("vae.", "first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")  # all-in-one
_DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                    "time_text_embed.", "norm_out.")


def _quant_hint(unexpected: set) -> str:
    quant = sorted(k for k in unexpected if fp8.QUANT_KEY.search(k))
    if not quant:
        return ""
    return (f"the file holds quantization tensors of a format this loader does not read (e.g. {quant[0]}): fp8 "
            "weights are read plain or with ComfyUI's per-tensor / per-row scales (scale_weight, weight_scale); use a "
            "bf16 or an fp8 checkpoint")


def _forms_hint(unexpected: set) -> str:
    """What the other forms add to checkpoint.flux_hint: parts of a pipeline without the transformer, quantization
    tensors of a format not read here."""
    if unexpected and all(k.startswith(OTHER_PARTS) for k in unexpected):
        parts = ", ".join(sorted({k.split(".")[0] + ".*" for k in unexpected}))
        return f"the file holds other parts of a pipeline ({parts}) but no transformer (no model.diffusion_model.*)"
    return _quant_hint(unexpected)


def _flux_hint(params: FluxParams):
    """checkpoint.flux_hint, knowing the other forms (_forms_hint)."""
    return flux_hint(params, _forms_hint)


def _diffusers_hint(params: FluxParams):
    """_flux_hint's diagnosis for a file in diffusers' names."""
    chosen, g = chosen_preset(params), "time_text_embed.guidance_embedder."
    blocks = re.compile(r"(single_)?transformer_blocks\.\d+\.")

    def hint(missing: set, unexpected: set, mismatched: list) -> str:
        if h := _quant_hint(unexpected):
            return h
        if mismatched:
            return f"shapes differ: the transformer is for another model size than {chosen} (see its config.json)"
        if any(blocks.match(k) for k in (*missing, *unexpected)) and not all(k.startswith(g) for k in unexpected):
            return (f"the block count differs from {chosen}'s ({params.depth} double, {params.depth_single_blocks} "
                    "single): a transformer of another model size (see its config.json)")
        if params.guidance_embed and any(k.startswith(g) for k in missing):
            return (f"no guidance embedder, which {chosen} has: a FLUX.1-schnell transformer (load it with "
                    "params='schnell'; the commands read the preset from the file's keys)")
        if not params.guidance_embed and any(k.startswith(g) for k in unexpected):
            return (f"a guidance embedder, which {chosen} lacks: a dev / Kontext transformer (load it with "
                    "params='dev'; the commands read the preset from the file's keys)")
        return ""
    return hint


def transformer_source(path) -> Path:
    """What to read: a file, an index, or a folder (a Hugging Face snapshot's transformer/ when given the snapshot).
    A folder of several safetensors files needs the index that joins them."""
    p = Path(path)
    if not p.is_dir():
        return p  # a file, an index, or nothing (then read_sharded says so)
    if not any(p.glob("*.safetensors")) and (p / "transformer").is_dir():
        p = p / "transformer"
    files = sorted(f.name for f in p.glob("*.safetensors"))
    if len(files) > 1 and not any(p.glob("*.safetensors.index.json")):
        also = " or its transformer/ folder" if (p / "transformer").is_dir() else ""
        raise CheckpointError(f"{p}: {len(files)} safetensors files ({', '.join(files)}) and no "
                              f"*.safetensors.index.json that joins them: give the transformer's own file{also}")
    return p


def _transformer_keys(keys: list[str]) -> tuple[dict[str, str], str]:
    """{key in the file: key without the transformer prefix} for the keys to read, and a note when other parts of
    an all-in-one checkpoint are left out. Keys outside the prefix and outside OTHER_PARTS stay, to be named."""
    prefix = next((p for p in TRANSFORMER_PREFIXES if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        return {k: k for k in keys}, ""
    inside, rest = split_prefix(dict.fromkeys(keys), prefix)
    chosen = {prefix + k: k for k in inside} | {k: k for k in rest if not k.startswith(OTHER_PARTS)}
    left = Counter(next(p for p in OTHER_PARTS if k.startswith(p)) for k in rest if k.startswith(OTHER_PARTS))
    note = (f"a ComfyUI all-in-one checkpoint: read its transformer ({len(inside)} tensors under {prefix}), left out "
            + ", ".join(f"{p}* ({n} tensors)" for p, n in sorted(left.items()))) if left else ""
    return chosen, note


def _diffusers_plan(model: Flux) -> dict[str, list[tuple[str, tuple]]]:
    """{official key: [(diffusers key, shape)]}: the diffusers tensors each official tensor is made of, in row order."""
    plan = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            parts = diffusers_parts(name, m.in_features, m.out_features)
            if parts is None:
                raise RuntimeError(f"extras/lora_formats.py's name table has no diffusers name for {name}")
            plan[f"{name}.weight"] = [(f"{d}.weight", (rows, m.in_features)) for d, rows in parts]
            if m.bias is not None:
                plan[f"{name}.bias"] = [(f"{d}.bias", (rows,)) for d, rows in parts]
    for key, t in model.state_dict(keep_vars=True).items():
        if key not in plan:
            if diffusers_norm(key) is None:
                raise RuntimeError(f"extras/lora_formats.py's name table has no diffusers name for {key}")
            plan[key] = [(diffusers_norm(key), tuple(t.shape))]
    return plan


def _join(key: str, parts: list[Tensor]) -> Tensor:
    """An official tensor from its diffusers parts in row order (q | k | v (| mlp)); the final adaLN's halves
    swapped back."""
    t = torch.cat(parts) if len(parts) > 1 else parts[0]  # [rows, ...]
    return swap_halves(t) if key.rpartition(".")[0] == SWAPPED else t


def _diffusers_shards(src: Path, model: Flux, chosen: dict[str, str], device, convert,
                      what: str) -> tuple[Iterator[tuple[str, Tensor]], bool]:
    """A diffusers-format transformer read shard by shard: (official key, tensor) pairs, each made as soon as the
    last of its parts is read (the parts of one layer may lie in several shards: they wait in `pending`), and
    whether the file holds fp8 Linear weights. Strict before any tensor is read: every missing / unexpected /
    mis-shaped diffusers key named, from the headers. `chosen`: _transformer_keys' {key in the file: key}."""
    files = shard_files(src)[0]
    heads = {f: read_header(f)[0] for f in files}
    twice = sorted(k for k, n in Counter(chosen[k] for f in files for k in heads[f] if k in chosen).items() if n > 1)
    if twice:
        raise CheckpointError(f"{what}: {len(twice)} tensors are in more than one shard (e.g. {twice[0]})")
    found = {chosen[k]: e for f in files for k, e in heads[f].items() if k in chosen}  # diffusers key -> header
    plan = _diffusers_plan(model)
    check_keys({d: shape for parts in plan.values() for d, shape in parts},
               {d: torch.empty(e["shape"], device="meta") for d, e in found.items()},
               f"{what} (a diffusers-format FluxTransformer2DModel)", _diffusers_hint(model.params))
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp8_file = any(found[d]["dtype"].startswith("F8") for key in linear_weights for d, _ in plan[key])
    owner = {d: key for key, parts in plan.items() for d, _ in parts}  # diffusers key -> the official one it is in

    def tensors():
        pending, unread = {}, {key: len(parts) for key, parts in plan.items()}  # parts read, parts still to read
        for f in files:
            names = [k for k in heads[f] if k in chosen]
            pending.update({chosen[k]: t for k, t in read_safetensors(f, device=device, keys=names,
                                                                       convert=convert).items()})
            done = []
            for k in names:
                key = owner[chosen[k]]
                unread[key] -= 1
                if not unread[key]:
                    done.append(key)
            for key in done:  # complete: joined and handed on, its parts let go
                yield key, _join(key, [pending.pop(d) for d, _ in plan[key]])
    return tensors(), fp8_file


def _diffusers_source(keys) -> bool:
    return any(k.startswith(_DIFFUSERS_ROOTS) for k in keys)


def _read(path, model: Flux, device, convert) -> tuple[dict | Iterator, dict, list[str], bool | None]:
    """read_flux_checkpoint's parts, a diffusers transformer left as its shard-by-shard stream: (the tensors, the
    weight scales, the notes, whether the file has fp8 Linear weights: None where the tensors are a dict)."""
    src, what = transformer_source(path), f"FLUX transformer {path}"
    chosen, note = _transformer_keys(header_keys(src))
    notes = [note] if note else []
    if _diffusers_source(chosen.values()):
        stream, fp8_file = _diffusers_shards(src, model, chosen, device, convert, what)
        notes.append("a diffusers-format FluxTransformer2DModel, converted to the official names")
        return stream, {}, notes, fp8_file
    sd = {chosen[k]: t for k, t in read_sharded(src, device=device, keys=chosen, convert=convert).items()}
    meta = read_metadata(src) if src.is_file() and not src.name.endswith(".json") else {}
    sd, scales, note = fp8.split_scales(sd, meta, what)
    return sd, scales, notes + ([note] if note else []), None


def read_flux_checkpoint(path, model: Flux, device="cpu", convert=None) -> tuple[dict, dict, list[str]]:
    """The transformer's tensors from any form above: (official keys -> tensors in the file's dtypes, passed through
    checkpoint's `convert` as read; the fp8 weight scales by layer (fp8.split_scales); notes for the info line).
    A diffusers-format file's quantization tensors are refused by its strict key check (no scales to split)."""
    sd, scales, notes, _ = _read(path, model, device, convert)
    return dict(sd), scales, notes


def _official(path) -> bool:
    """BFL's own single file: official names only (no prefix, no diffusers names, no quantization tensors)."""
    p = Path(path)
    if not p.is_file() or p.name.endswith(".json"):
        return False
    entries, meta = read_header(p)
    return not meta.get("_quantization_metadata") and not any(
        k.startswith((*TRANSFORMER_PREFIXES, *_DIFFUSERS_ROOTS)) or fp8.QUANT_KEY.search(k) for k in entries)


def load_flux(path, params: FluxParams | str = "dev", device="cpu", dtype=torch.bfloat16,
              base_dtype: str | None = None) -> Flux:
    """Build on the meta device and take the file's tensors as parameters (no second copy of 24 GB). Reads every
    form listed above (BFL's own file, unless kept in fp8, through checkpoint.load_flux_official); anything
    non-official it did (a part left out, names converted, scales applied, weights kept in fp8) is said in one line
    on stdout.

    base_dtype (train.py / sample.py --base-dtype):
      None            every tensor in `dtype` (fp8 weights upcast, their scales applied)
      "bf16", "fp32"  the same in that dtype (it replaces `dtype`)
      "fp8"           every Linear weight stored float8 with a float32 scale (fp8.Fp8Linear): an fp8 file's as they
                      are, a bf16 / fp32 file's quantized per output row at load (read on the CPU, moved one tensor at
                      a time); biases and norm scales in `dtype`"""
    params = flux_params(params)
    if base_dtype is not None and base_dtype not in fp8.BASE_DTYPES:
        raise ValueError(f"base_dtype {base_dtype!r}: choose from {', '.join(fp8.BASE_DTYPES)}")
    keep_fp8, dtype = base_dtype == "fp8", fp8.BASE_DTYPES.get(base_dtype) or dtype
    if not keep_fp8 and _official(path):
        return load_flux_official(path, params, device, dtype, _flux_hint(params))
    with torch.device("meta"):
        model = Flux(params)
    what, hint = f"FLUX transformer {path}", _flux_hint(params)

    def cast(key: str, t: Tensor) -> Tensor:  # as read: everything but fp8 weights and their scales
        spare = t.dtype in fp8.FP8_DTYPES or not t.is_floating_point() or fp8.QUANT_KEY.search(key)
        return t if spare else t.to(dtype)
    sd, scales, notes, fp8_file = _read(path, model, "cpu" if keep_fp8 else device, None if keep_fp8 else cast)
    if isinstance(sd, dict):  # (a diffusers stream was checked from its headers)
        check_state_dict(model, sd, what, hint)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sd, note = fp8.to_base_dtype(sd, scales, linears, keep_fp8, dtype, device, what=what, fp8_file=fp8_file)
    fp8.fp8_modules_(model, sd)
    load_strict(model, sd, what, hint)
    if notes or note:
        print(f"{path}: " + "; ".join(notes + [note] * bool(note)))
    return model.to(device)


def detect_preset(path) -> str:
    """Guess a preset from a checkpoint's keys without loading tensors (dev and Kontext share a layout); any form
    load_flux reads."""
    keys = set(_transformer_keys(header_keys(transformer_source(path)))[0].values())
    if "transformer_blocks.0.attn.norm_k.weight" in keys:  # diffusers' names
        return "dev" if "time_text_embed.guidance_embedder.linear_1.weight" in keys else "schnell"
    return flux_preset(keys, path)
