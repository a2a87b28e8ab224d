"""
Reading and writing safetensors files, strictly and safely; the FLUX transformer from BFL's own file; a train.py
output's run config; a run's output folder; one-line errors for bad input.

Every weight file in this project goes through here, so the rules hold everywhere:
- only safetensors are read (no pickle from a file a user was sent);
- a missing, truncated or corrupt file is reported by name before any tensor is touched;
- a sharded Hugging Face checkpoint (a folder, or the *.safetensors.index.json naming its shards) reads as one file;
- loading into a module is strict: every missing, unexpected or mis-shaped key is listed, with a hint;
- writes go to a temporary file that is renamed over the target, so a kill mid-write never corrupts the old file;
- a resume state (torch.save of tensors, numbers and lists) is read with weights_only=True: no object is unpickled.

    load_flux_official   the transformer from BFL's single file (flux1-dev.safetensors); every other form of it
                         (prefixes, ComfyUI all-in-one, fp8 scales, diffusers folders) is extras/checkpoint_forms.py
    run_config           the settings a train.py output carries in its metadata
    claim, save_state, load_state, ...   a run's output folder: one live owner, resume states, nothing lost
    command              a script's main(argv) with bad input as one line on stderr and exit status 2
"""

import contextlib
import functools
import json
import os
import pickle
import re
import struct
import secrets
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flux_model import PRESETS, Flux, FluxParams

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked: the message names the file and the problem."""


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Parse and validate a safetensors header without reading the tensors.

    Returns (entries, metadata): entries maps key -> {"dtype", "shape", "data_offsets"}.
    Raises CheckpointError for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file (truncated or empty?)")
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            # not a plausible header length: say so more helpfully if the file is torch.save's zip or a raw pickle
            if head.startswith((b"PK\x03\x04", b"\x80")):
                raise CheckpointError(f"{path}: this is a PyTorch pickle (.pt/.ckpt/.bin), not safetensors. Only "
                                      "safetensors are read (a pickle can run code); convert it where you trust it")
            if head.lstrip().startswith(b"{") and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
                raise CheckpointError(f"{path}: a JSON text file, not safetensors (a sharded checkpoint's "
                                      "*.safetensors.index.json is read by read_sharded, from it or its folder)")
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size}: "
                                  "not a safetensors file, or truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise CheckpointError(f"{path}: corrupt safetensors header ({_detail(e)}); is this a .ckpt/.pt pickle renamed? "
                              "Only safetensors are read.") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CheckpointError(f"{path}: corrupt safetensors metadata (must map strings to strings)")
    data_len = size - 8 - n
    for key, e in header.items():
        try:
            dtype, shape, (start, end) = e["dtype"], e["shape"], e["data_offsets"]
            numel = 1
            for s in shape:
                if not isinstance(s, int) or s < 0:
                    raise ValueError
                numel *= s
            ok = (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
                  and end - start == numel * _DTYPE_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors entry for {key!r}")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} ends at byte {end} of the data but the file "
                                  f"holds {data_len}; re-download or re-copy the file")
    # the format requires the tensors to tile the data section exactly: no gaps, no overlaps, no trailing bytes
    covered = 0
    for start, end in sorted(tuple(e["data_offsets"]) for e in header.values()):
        if start != covered:
            raise CheckpointError(f"{path}: corrupt safetensors layout (tensor data overlaps or leaves a gap at "
                                  f"byte {covered})")
        covered = end
    if covered != data_len:
        raise CheckpointError(f"{path}: {data_len - covered} bytes after the last tensor: corrupt, or not a "
                              "safetensors file")
    return header, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path)[1]


def read_safetensors(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu",
                     keys: Iterable[str] | None = None,
                     convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All (or the named) tensors of a validated file, cast to dtype if given (floating tensors only), each passed
    through `convert(key, tensor)` as it is read if given (a per-tensor cast that must spare some keys)."""
    read_header(path)
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in (f.keys() if keys is None else keys):
                t = f.get_tensor(k)
                t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                out[k] = convert(k, t) if convert is not None else t
    except Exception as e:  # anything the header check above did not foresee is still the file's fault
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    return out


def shard_files(path: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files a checkpoint path names, and its index's weight map (None without an index):
        a file                                  -> [the file]
        a `*.safetensors.index.json`            -> the shards it names (Hugging Face / diffusers sharding)
        a folder with one such index            -> its shards
        a folder without one                    -> every *.safetensors in it"""
    path = Path(path)
    if path.is_file() and not path.name.endswith(".json"):
        return [path], None
    index = path if path.is_file() else None
    if index is None:
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such file or folder")
        found = sorted(path.glob("*.safetensors.index.json"))
        if len(found) > 1:
            raise CheckpointError(f"{path}: {len(found)} safetensors indexes ({', '.join(f.name for f in found)}): "
                                  "pass the one to read")
        if not found:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors file and no *.safetensors.index.json "
                                      "(only safetensors are read; convert .bin pickles first)")
            return files, None
        index = found[0]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to shard file names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s]
    if outside:
        raise CheckpointError(f"{index}: names shards outside its folder ({outside[0]}); corrupt index")
    return [index.parent / s for s in shards], weight_map


def header_keys(path: str | os.PathLike) -> list[str]:
    """Every tensor name of a checkpoint (a file, an index or a folder: see shard_files), read from the headers."""
    return [k for f in shard_files(path)[0] for k in read_header(f)[0]]


def read_sharded(path: str | os.PathLike, dtype=None, device="cpu", keys: Iterable[str] | None = None,
                 convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint: `model.safetensors` or the shards an index names (see shard_files); all tensors, or
    those in `keys`, read as read_safetensors does. Every name the index lists must be in its shards."""
    files, weight_map = shard_files(path)
    names = {f: list(read_header(f)[0]) for f in files}
    if weight_map is not None:
        present = {k for ks in names.values() for k in ks}
        missing = sorted(set(weight_map) - present)
        if missing:
            raise CheckpointError(f"{path}: keys listed in the index but absent from the shards: {missing[:5]}")
    wanted = None if keys is None else set(keys)
    out = {}
    for f, ks in names.items():
        out.update(read_safetensors(f, dtype, device, ks if wanted is None else [k for k in ks if k in wanted],
                                    convert))
    return out


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop `prefix` from every key if every key has it (ComfyUI/kohya single files use `model.diffusion_model.`)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def split_prefix(sd: dict, prefix: str) -> tuple[dict, dict]:
    """(the entries under `prefix`, with it dropped; the others as they are): one part of a file that holds several
    (a ComfyUI all-in-one checkpoint keeps its transformer under `model.diffusion_model.`)."""
    inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in sd.items() if not k.startswith(prefix)}


def check_keys(expected: dict[str, tuple], sd: dict[str, torch.Tensor], what: str,
               hint: Callable[[set, set, list], str] | None = None,
               allow_missing: Callable[[str], bool] = lambda k: False,
               problem: str = "the weights do not match the model") -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key of `sd` against `expected`
    (key -> shape). The one format of every strict check in the project:
        <what>: <problem>
          2 missing: a, b
          1 unexpected: c
          1 mis-shaped: d (file (2, 3), model (1, 3))
          hint: <hint(missing, unexpected, mismatched)>
    `allow_missing(key)` marks keys that `sd` need not have."""
    missing = {k for k in expected if k not in sd and not allow_missing(k)}
    unexpected = {k for k in sd if k not in expected}
    mismatched = [(k, tuple(sd[k].shape), tuple(expected[k])) for k in sd
                  if k in expected and tuple(sd[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what}: {problem}"]
    shown = [f"{k} (file {f}, model {m})" for k, f, m in mismatched]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shown)):
        if keys:
            keys = sorted(keys)
            more = f" ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            lines.append(f"  {len(keys)} {label}: " + ", ".join(keys[:20]) + more)
    if hint is not None:
        h = hint(missing, unexpected, mismatched)
        if h:
            lines.append("  hint: " + h)
    raise CheckpointError("\n".join(lines))


def check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], what: str,
                     hint: Callable[[set, set, list], str] | None = None,
                     allow_missing: Callable[[str], bool] = lambda k: False) -> None:
    """check_keys against the module's own state dict.

    `hint(missing, unexpected, mismatched)` may add one sentence of diagnosis; `allow_missing(key)` marks keys
    a file need not have (e.g. freshly initialised adapter parameters)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    check_keys(expected, sd, what, hint, allow_missing)


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str,
                hint: Callable[[set, set, list], str] | None = None,
                allow_missing: Callable[[str], bool] = lambda k: False, assign: bool = True) -> None:
    """check_state_dict, then load. With assign=True a model built on the meta device takes the file's tensors
    as its parameters (no second copy of the weights is ever made)."""
    check_state_dict(module, sd, what, hint, allow_missing)
    module.load_state_dict(sd, strict=False, assign=assign)


def _detail(e: BaseException) -> str:
    """The gist of a library error in a few words: an OSError's reason, or the first sentence of the message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = re.sub(r"^\[enforce fail at [^\]]*\][ .]*", "", str(e).strip())  # torch's C++ source location
    return text.split("\n")[0].split(". ")[0] or type(e).__name__


def _write_failure(path: Path, e: BaseException) -> CheckpointError:
    """One line for a write that failed: torch.save on a full disk only says `unexpected pos`."""
    return CheckpointError(f"{path}: could not write it ({_detail(e)}); is the disk full, or the folder not writable? "
                           "Any existing file is unchanged")


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) to a temporary file of its own beside `path` (`.<name>.<random>.tmp`: two writers of one path never
    share it), fsync, then rename: a kill mid-write leaves the old file intact, and a reader sees the old file or the
    whole new one.

    The file gets the mode a plain open() gives (umask, a folder's default ACL), not its writer's: safetensors writes
    0600, which would hide a run on a shared machine from the group. A failed write (full disk, unwritable folder)
    removes the temporary file and raises CheckpointError naming `path`."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(path)
        mode = tmp.stat().st_mode & 0o777  # safetensors would write 0600, hiding a run from the group
        write(str(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError, SafetensorError)):
            raise _write_failure(path, e) from None
        raise


def temporary_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new, empty file of this call's own beside `path` (the same folder: the rename onto `path` is atomic),
    created as open() creates files (umask, the folder's default ACL)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name beside {path.name}")


def save_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Safetensors, written atomically (see write_atomic)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_torch_atomic(state: dict, path: str | os.PathLike):
    """torch.save of plain tensors, numbers and lists (a resume state, read back with load_torch_state), written
    atomically."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_torch_state(path: str | os.PathLike) -> dict:
    """save_torch_atomic's state back, on the CPU, with weights_only=True (no object is unpickled). A missing,
    truncated or corrupt file, or one holding pickled objects, raises a one-line CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # a foreign pickle makes torch warn about its protocol before failing
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except MemoryError:
        raise
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(f"{path}: holds a pickled Python object ({refused[1]}), not only tensors, numbers "
                                  "and lists; refused (a pickle can run code)") from None
        raise CheckpointError(f"{path}: not a torch.save file, or corrupt") from None
    except Exception as e:  # EOFError, RuntimeError (damaged zip), OSError, UnicodeDecodeError: the file's fault
        raise CheckpointError(f"{path}: truncated or corrupt ({_detail(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a saved state (a dict)")
    return state


# ----------------------------------------------------------------------------------------------------------------
# The FLUX transformer from BFL's own file: official keys (black-forest-labs/flux, src/flux/model.py), no prefix

_GUIDANCE_KEYS = {f"guidance_in.{layer}.{p}" for layer in ("in_layer", "out_layer") for p in ("weight", "bias")}


def flux_params(params: FluxParams | str) -> FluxParams:
    """A preset's name (flux_model.PRESETS) or FluxParams -> FluxParams."""
    if isinstance(params, str):
        if params not in PRESETS:
            raise ValueError(f"unknown preset {params!r}; choose from {sorted(PRESETS)}")
        return PRESETS[params]
    return params


def chosen_preset(params: FluxParams) -> str:
    """How a hint names the model it compared the file with: "the chosen preset (dev / kontext)"."""
    names = [n for n, p in PRESETS.items() if p == params]
    return f"the chosen preset ({' / '.join(names)})" if names else "the chosen model parameters"


def flux_hint(params: FluxParams, forms: Callable[[set], str] | None = None):
    """check_keys' hint for a FLUX transformer file in official names: one sentence naming the real problem. It
    never suggests the preset already chosen (the guidance hints point from a model with guidance_in to schnell and
    back). `forms(unexpected)`: what a loader of other checkpoint forms recognises among the unexpected keys
    (extras/checkpoint_forms.py), asked after the autoencoder check."""
    chosen = chosen_preset(params)

    def hint(missing: set, unexpected: set, mismatched: list) -> str:
        if any(k.startswith(("encoder.", "decoder.")) for k in unexpected):
            return "this is an autoencoder (ae.safetensors), not the transformer"
        if forms is not None and (h := forms(unexpected)):
            return h
        for k, f, m in mismatched:
            if k == "img_in.weight" and f[1] != m[1]:
                kind = {128: "a Canny/Depth", 384: "a Fill"}.get(f[1], f"an in_channels={f[1]}")
                return f"img_in takes {f[1]} channels: this is {kind} checkpoint, not a base text-to-image one"
            if k == "img_in.weight" and f[0] != m[0]:
                return (f"the file's hidden size is {f[0]}, the preset's {m[0]}: "
                        "it is for another model size than the chosen preset")
        if mismatched:
            return "shapes differ: the file is for another model size than the chosen preset"
        if params.guidance_embed and _GUIDANCE_KEYS <= missing:
            return (f"the file has no guidance_in, which {chosen} has: a flux1-schnell checkpoint (load it with "
                    "params='schnell'; the commands read the preset from the file's keys)")
        if not params.guidance_embed and _GUIDANCE_KEYS & unexpected:
            return (f"the file has guidance_in, which {chosen} lacks: a guidance-distilled (dev / Kontext) "
                    "checkpoint (load it with params='dev'; the commands read the preset from the file's keys)")
        if any(".lora_" in k or "lora_unet" in k for k in unexpected):
            return "the file holds LoRA weights: load it with lora.py on top of the base model"
        return ""
    return hint


def flux_preset(keys: Iterable[str], path) -> str:
    """The preset of a FLUX transformer from its official key names (read from a header, no tensor loaded): "dev"
    with guidance_in (dev and Kontext share a layout), "schnell" without. `path` is named in the error."""
    keys = set(keys)
    if "double_blocks.0.img_attn.norm.key_norm.scale" not in keys:
        raise CheckpointError(f"{path}: not a FLUX transformer checkpoint (no double_blocks.0.img_attn.* keys)")
    return "dev" if "guidance_in.in_layer.weight" in keys else "schnell"


def load_flux_official(path, params: FluxParams | str = "dev", device="cpu", dtype=torch.bfloat16,
                       hint: Callable[[set, set, list], str] | None = None) -> Flux:
    """The transformer from BFL's single file (flux1-dev.safetensors), strictly: built on the meta device, every
    tensor read in `dtype` on `device` and taken as the model's parameter (no second copy of 24 GB); every missing,
    unexpected or mis-shaped key named, with flux_hint's diagnosis (or `hint`'s). Every other form of the file loads
    with extras.checkpoint_forms.load_flux."""
    params = flux_params(params)
    with torch.device("meta"):
        model = Flux(params)
    sd = read_safetensors(path, dtype, device)
    load_strict(model, sd, f"FLUX transformer {path}", hint or flux_hint(params))
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# A train.py output's run config


def trained_file(path) -> Path:
    """What --ckpt / --init name: a train.py output, or a run folder (its final.safetensors). A resume state or a
    folder without final weights is a one-line CheckpointError pointing at the file to pass."""
    path = Path(path)
    if path.is_dir():
        if (path / "final.safetensors").is_file():
            return path / "final.safetensors"
        latest = path / "latest.safetensors"
        stopped = f" (a stopped run: its last weights are {latest})" if latest.is_file() else ""
        raise CheckpointError(f"{path}: a folder without final.safetensors{stopped}")
    if path.name.endswith(".pt"):
        raise CheckpointError(f"{path}: a resume state (read by --resume), not weights; pass "
                              f"{path.parent / 'final.safetensors'}, or latest.safetensors of a stopped run")
    return path


def run_config(path) -> dict:
    """The config a train.py output carries in its metadata (scheme, semantic options, LoRA, base)."""
    meta = read_metadata(path)
    if "config" not in meta:
        raise CheckpointError(f"{path}: no 'config' metadata: not a train.py output (a LoRA file? read it with "
                              "extras/lora_formats.py)")
    try:
        cfg = json.loads(meta["config"])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt config metadata ({_detail(e)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: corrupt config metadata (a {type(cfg).__name__}, not a JSON object)")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# A run's output folder: one owner at a time, a resume state that continues the SAME run, nothing of an earlier run
# lost. train.py and tools/train_ae.py both stand on it.
#
#     claim(out, files, ...)   refuse a folder a live run writes to (OUT/run.lock holds its pid), or one that holds
#                              an earlier run's files, unless --resume continues it or --overwrite starts over
#     set_aside, settle, restore   --overwrite: the earlier run goes only once the new one has a checkpoint
#     save_state / load_state  weights, optimiser, generator, step and the run's settings: tensors, numbers and
#                              strings only, read back with torch.load(weights_only=True)
#     changed_settings         what a --resume would change about the run (refused by the trainers)
#     resume_command           the command that continues a stopped run (torchrun's under torchrun)
#     trim_log                 log lines past the state a run continues from are dropped (no duplicate steps)
#     write_numbered           OUT/checkpoints/step_000500.safetensors beside `latest`, the newest K of them kept

LOCK = "run.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def claim(out: Path, files: tuple[str, ...], finished: str, resume: bool, overwrite: bool, master: bool = True,
          keep: tuple = ()) -> Path | None:
    """Before any work: refuse `out` if another live process holds its lock, or if it holds any of `files` (an earlier
    run's; `finished` is the one a completed run writes) and neither `resume` nor `overwrite` is asked. `keep`: files
    the new run reads (its --init); --overwrite is refused when one of them is among the files it would replace.
    Nothing is removed here: set_aside moves the earlier run's files away once the new run is checked and ready.
    The master takes the lock (an unwritable folder fails here, as an OSError) and puts back what a killed
    --overwrite had set aside (recover); returns the lock file, None on other ranks."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the stopped run, or start over")
    lock = out / LOCK
    if master:
        check_owner(out)
    earlier = [n for n in files if (out / n).exists()]
    if earlier and not (resume or overwrite):
        what = "a finished run" if (out / finished).exists() else "a stopped run"
        raise ValueError(f"{out} holds {what} ({', '.join(earlier)}): continue it with --resume, or pass --overwrite "
                         "to start over (the earlier run is removed only once the new one has written its first "
                         "checkpoint)")
    read = {Path(k).resolve() for k in keep if k}
    # a file the run reads, or a folder that holds one (an --init from OUT/checkpoints/)
    held = [n for n in earlier if any(r == (out / n).resolve() or (out / n).resolve() in r.parents for r in read)]
    if overwrite and held:
        raise ValueError(f"{out / held[0]} is or holds the file this run starts from (--init) and --overwrite would "
                         f"replace it: copy it elsewhere first, or give the new run another --out")
    if not master:
        return None
    out.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"{os.getpid()}\n")
    recover(out, files)
    return lock


def check_owner(out: Path) -> None:
    """Refuse `out` while another live process holds its lock (OUT/run.lock holds the owner's pid)."""
    lock = out / LOCK
    owner = lock.read_text().strip() if lock.is_file() else ""
    if owner.isdigit() and int(owner) != os.getpid() and pid_alive(int(owner)):
        raise ValueError(f"{out}: another run (pid {owner}) is writing here; wait for it to end or use another --out")


# --overwrite in three moves: set_aside (the new run is checked and about to write), then settle (its first
# checkpoint is written: the earlier run goes) or, if it ends before that, restore (the earlier run comes back)
REPLACED = ".replaced"


def set_aside(out: Path, files: tuple[str, ...]) -> Path | None:
    """Move the earlier run's `files` (or folders) from `out` into OUT/.replaced (renames, nothing copied); returns
    that folder, None when there was nothing to move."""
    out, aside = Path(out), Path(out) / REPLACED
    earlier = [n for n in files if (out / n).exists()]
    if not earlier:
        return None
    aside.mkdir(exist_ok=True)
    for n in earlier:
        os.replace(out / n, aside / n)
    return aside


def settle(aside: Path | None) -> None:
    """The new run has written its first checkpoint: the earlier run it replaces is removed."""
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def restore(aside: Path | None, files: tuple[str, ...]) -> None:
    """The new run ended before its first checkpoint: its files go, the earlier run's come back."""
    if aside is None or not aside.is_dir():
        return
    out = aside.parent
    for n in files:
        if (out / n).is_dir():  # a folder of files (OUT/checkpoints)
            shutil.rmtree(out / n)
        else:
            (out / n).unlink(missing_ok=True)
    for f in aside.iterdir():
        os.replace(f, out / f.name)
    aside.rmdir()


def recover(out: Path, files: tuple[str, ...]) -> None:
    """What a killed --overwrite left (OUT/.replaced): the earlier run comes back if the new one never wrote a
    checkpoint (no OUT/resume state among `files`), else it goes; one note either way."""
    aside = Path(out) / REPLACED
    if not aside.is_dir():
        return
    written = [n for n in files if n.endswith(".pt") and (Path(out) / n).exists()]
    if written:
        settle(aside)
        print(f"note: removed {aside}, the run an interrupted --overwrite replaced (the new run had written {written[0]})")
    else:
        restore(aside, files)
        print(f"note: an --overwrite in {out} was interrupted before its first checkpoint: the earlier run's files are "
              "back in place")


def save_state(path: Path, step: int, weights: dict, opt: torch.optim.Optimizer, g: torch.Generator,
               settings: dict, **extra) -> None:
    """The resume state: `weights` (name -> tensor), the optimiser, the generator, the step, the run's settings
    (JSON) and any `extra` plain values; written atomically."""
    state = {"step": step, "weights": {k: v.detach().cpu() for k, v in weights.items()}, "optimizer": opt.state_dict(),
             "rng": g.get_state(), "settings": json.dumps(settings), **extra}
    save_torch_atomic(state, path)


def load_state(path: Path, weight_names=None, extra: tuple[str, ...] = ()) -> dict:
    """save_state's dict back, checked: every key present, the same weight names (when `weight_names` is given). A
    file another program or version wrote is a one-line CheckpointError naming it."""
    state = load_torch_state(path)  # a truncated, corrupt or pickled file is a one-line error naming it
    if missing := [k for k in ("step", "weights", "optimizer", "rng", "settings", *extra) if k not in state]:
        raise CheckpointError(f"{path}: not a resume state of this program (no {', '.join(missing)}); start over "
                              "with --overwrite")
    if weight_names is not None and sorted(state["weights"]) != sorted(weight_names):
        raise ValueError(f"{path} was written by a run with other trainable weights (another stage or scheme)")
    try:
        state["settings"] = json.loads(state["settings"])
    except (TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: corrupt run settings in the resume state; start over with --overwrite") from None
    return state


def differing(was: dict, now: dict, may_change: tuple[str, ...]) -> list[str]:
    """The settings of `now` outside `may_change` that `was` records otherwise (or not at all)."""
    return [k for k, v in now.items() if k not in may_change and was.get(k, "(not recorded)") != v]


def changed_settings(was: dict, now: dict, may_change: tuple[str, ...]) -> list[str]:
    """`--flag old -> new` for every setting outside `may_change` that differs."""
    return [f"--{k.replace('_', '-')} {was.get(k)!r} -> {now[k]!r}" for k in differing(was, now, may_change)]


def resume_command(script: str, world: int = 1) -> str:
    """The command that continues this run (torchrun's when it runs under torchrun), quoted for a POSIX shell."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    launcher = ["torchrun", "--nproc_per_node", str(os.environ.get("LOCAL_WORLD_SIZE", world))] if world > 1 else \
        ["python"]
    return shlex.join([*launcher, *script.split(), *args, "--resume"])


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the resume state a run continues from), atomically. A line that is
    not a log record (the partial last line of a full disk or a power loss) is dropped with a note."""
    if not path.is_file():
        return
    rows, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            at = record["step"]
        except (ValueError, RecursionError, KeyError, TypeError):
            dropped += bool(line.strip())
            continue
        if isinstance(at, int) and at <= step:
            rows.append(line)
    if dropped:
        print(f"note: {path}: dropped {dropped} unreadable line(s) (a write cut short)")
    write_atomic(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))


NUMBERED = re.compile(r"step_(\d+)\.safetensors")  # OUT/checkpoints/step_000500.safetensors


def write_numbered(weights: Path, folder: Path, step: int, keep: int) -> Path:
    """A copy of `weights` (a run's latest.safetensors, metadata and all) as folder/step_NNNNNN.safetensors, written
    atomically; then only the `keep` highest-numbered step_*.safetensors of the folder stay (0: every one). Other
    files in the folder are never touched. Returns the new file."""
    path = Path(folder) / f"step_{step:06d}.safetensors"
    write_atomic(path, lambda tmp: shutil.copyfile(weights, tmp))
    if keep:
        numbered = sorted((int(m[1]), p) for p in Path(folder).iterdir() if (m := NUMBERED.fullmatch(p.name)))
        for _, old in numbered[:-keep]:
            old.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# One-line errors


def command(main):
    """Decorator of a script's main(argv) -> exit status: bad input, raised as a ValueError anywhere below (the
    project's own CheckpointError and data.DataError are ValueErrors), and a file the system refuses (OSError:
    unwritable folder, full disk), become one line on stderr and exit status 2 (None returned is 0)."""
    @functools.wraps(main)
    def run_main(argv=None) -> int:
        try:
            return main(argv) or 0
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run_main
