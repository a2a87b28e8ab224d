"""
What the commands run on: the base files, a model built from a run config, and IR generation from a pair.

    find_setup      -> which base files are present: the official FLUX files in weights/, else the tiny demo
    build_model     -> base transformer + the modules a run config names (semantic scheme, LoRA)
    load_trained    -> a train.py output's weights into that model, strictly (checkpoint.check_state_dict)
    load_pipeline   -> all of the above + the autoencoder and the prompt: a Pipeline; LoRA files from other tools
                       (--lora FILE[:SCALE], extras.lora_formats) on top: merged into the base weights, or beside
                       them as LoRA layers on an fp8 base
    run_classes     -> the class palette a train.py output was trained with (its run config), if it records one
    generate        -> rgb, sem [B, 3, H, W] -> IR [B, 1, H, W]:
                       encode_condition: RGB --VAE--> [B,16,H/8,W/8] --pack--> x_cond [B,L,64] (overlay: blended first)
                       noise [B,16,H/8,W/8] --pack--> x [B,L,64] --flow.denoise--> x --unpack, VAE decode--> IR
                       (a prediction that is not finite is a ValueError, never a black image)
    resolve_device  -> a --device that exists, checked before anything loads

A train.py output carries its run config (scheme, semantic options, LoRA rank, base preset) in its safetensors
metadata, so a model is rebuilt from the file alone.

This is the one library module that picks extras (extras/), as a run config or a flag names them: the other
schemes (extras.schemes.attach builds any scheme, the default B through the core's own), the condition cache
(Pipeline.sampler), the base file's form and fp8 storage (extras.checkpoint_forms.load_flux), LoRA files
(extras.lora_formats, where --lora / --init-lora name them). The other core modules import only the core.
"""

import hashlib
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import data
from checkpoint import CheckpointError, check_state_dict, read_header, read_safetensors, run_config, shard_files
from flow import Condition, denoise, get_noise, get_schedule, make_condition, pack, text_ids, unpack
from extras.checkpoint_forms import detect_preset, load_flux, transformer_source
from extras.fp8 import BASE_DTYPES
from extras.condition_cache import ConditionCache
from extras.schemes import BASELINES, PRESETS as SCHEME_PRESETS, attach
from flux_model import PRESETS, Flux
from latents import cache_dir
from sem_cross_attn import SemanticConfig, overlay, semantic_input
from vae import AutoEncoder, load_ae

ROOT = Path(__file__).resolve().parent
DEFAULT_PROMPT = "a thermal infrared image"
SCHEMES = (*SCHEME_PRESETS, *BASELINES)  # xattn (B) | zeroconv (A) | adapter (C) | overlay | none


def is_trained_key(name: str) -> bool:
    """What the warmup / joint / finetune stages add to the base: semantic modules and LoRA weights."""
    return name.startswith("semantic.") or ".lora_" in name


class Stopper:
    """SIGINT/SIGTERM while a command sets up (at_once, the default) stop it at once: a KeyboardInterrupt, which the
    command turns into one line. Once its loop runs (at_once = False) they ask the loop to write a resume state and
    exit after the current step; a second one leaves at once."""

    def __init__(self):
        self.signal, self.at_once = None, True
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        leave = self.at_once or self.signal is not None
        self.signal = self.signal or signum
        if leave:
            raise KeyboardInterrupt

    def close(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def resolve_device(name: str | None = None, flag: str = "--device") -> torch.device:
    """`name` (None or "": a GPU if there is one, else the CPU) as a device that exists on this machine."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r}: not a device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {name}: no GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {name}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {name}: the Apple GPU (mps) is not available on this machine (use --device cpu)")
    elif device.type != "cpu":
        raise ValueError(f"{flag} {name}: {device.type} devices are not supported (use cpu, cuda, cuda:N or mps)")
    return device


def weights_dir() -> Path:
    """The base files (FLUX_IR_WEIGHTS overrides weights/; tests use a scratch folder)."""
    return Path(os.environ.get("FLUX_IR_WEIGHTS", ROOT / "weights"))


# ----------------------------------------------------------------------------------------------------------------
# The base files


@dataclass
class Setup:
    """Which base files the commands use: an official FLUX transformer (found by what its file holds) with the FLUX
    autoencoder and text encoders in weights/, or the tiny demo."""
    kind: str  # "official" | "demo"
    flux: Path
    preset: str
    ae: Path
    t5: Path | None = None
    clip: Path | None = None
    guidance: float | None = None  # the base's sampling guidance input (guidance-distilled bases: dev / Kontext)
    how: str = ""  # how the base was found, for describe()

    def describe(self) -> str:
        if self.kind == "demo":
            return (f"no official FLUX checkpoint in {self.flux.parent.parent}: using the tiny demo preset "
                    f"({self.flux}, trained on synthetic scenes; see weights/README.md to use FLUX.1)")
        return f"using {self.flux} ({self.how}) with {self.ae.name}"

    def base_id(self) -> str:
        """The base's identity, from its content: the same weights under any name, path or storage form give the
        same id (base_id)."""
        return base_id(self.flux)


BASE_ENV = "FLUX_IR_BASE"  # any transformer file or folder load_flux reads (fp8, ComfyUI all-in-one, diffusers)
NOT_BASES = ("ae.safetensors",)  # files of weights/ that are never the transformer
# The FLUX.1 layouts by the input width of img_in (x_embedder in diffusers' names) other than a text-to-image base's
# 64 (dev, schnell, Kontext): Canny / Depth and Fill concatenate their condition in channels
IMG_IN_WIDTHS = {128: "a Canny/Depth checkpoint", 384: "a Fill checkpoint"}


def base_layout(path: Path) -> tuple[str | None, str, bool]:
    """What a file or folder is, judged from its header alone: (preset, "", True) for a FLUX base transformer in any
    form load_flux reads ("dev" with guidance_in: dev and Kontext share a layout; "schnell" without); (None, why,
    True) for a FLUX transformer that is not a base (Fill, Canny/Depth); (None, why, False) for anything else (an
    autoencoder, a LoRA, a text encoder)."""
    try:
        preset = detect_preset(path)
        files, _ = shard_files(transformer_source(path))
        shapes = {k: e["shape"] for f in files for k, e in read_header(f)[0].items()}
    except CheckpointError as e:
        return None, str(e).removeprefix(f"{path}: "), False
    width = next((v[1] for k, v in shapes.items() if k.endswith(("img_in.weight", "x_embedder.weight"))), 64)
    if width != 64:
        return None, f"{IMG_IN_WIDTHS.get(width, f'an in_channels={width} checkpoint')}, not a text-to-image base", True
    return preset, "", True


def find_setup(weights: Path | None = None) -> Setup:
    """$FLUX_IR_BASE if set, else the one FLUX transformer checkpoint in weights/, whatever its name or form (found
    by the keys and shapes of its header: base_layout), with weights/ae.safetensors and the text encoder folders;
    else the tiny demo. Several transformers in weights/ are refused, naming them and $FLUX_IR_BASE."""
    weights = weights or weights_dir()
    if os.environ.get(BASE_ENV):
        f = Path(os.environ[BASE_ENV])
        if not f.exists():
            raise CheckpointError(f"${BASE_ENV}={f}: no such file or folder")
        preset, why, _ = base_layout(f)
        if preset is None:
            raise CheckpointError(f"${BASE_ENV}={f}: not a FLUX base transformer ({why})")
        found, how = [(f, preset)], f"${BASE_ENV}"
    else:
        candidates = sorted(p for p in weights.glob("*") if p.name not in NOT_BASES and not p.name.startswith(".")
                            and (p.suffix == ".safetensors" or p.is_dir() and p.name not in ("demo", "t5", "clip")))
        layouts = {p: base_layout(p) for p in candidates}
        found = [(p, preset) for p, (preset, _, _) in layouts.items() if preset is not None]
        how = "found by its keys"
        if len(found) > 1:
            raise CheckpointError(f"{weights}: {len(found)} FLUX transformer checkpoints ("
                                  + ", ".join(p.name for p, _ in found) + f"): set {BASE_ENV} to the one to use")
        if not found and (other := [f"{p}: {why}" for p, (_, why, flux) in layouts.items() if flux]):
            raise CheckpointError(f"no FLUX base transformer in {weights}, only " + "; ".join(other))
    if found:
        f, preset = found[0]
        ae = weights / "ae.safetensors"
        if not ae.is_file():
            raise CheckpointError(f"found {f} but no {ae}: the FLUX autoencoder is needed too (weights/README.md)")
        t5, clip = weights / "t5", weights / "clip"
        layout = "dev / Kontext layout" if preset == "dev" else "schnell layout"
        return Setup("official", f, preset, ae, t5, clip, guidance=None if preset == "schnell" else 2.5,
                     how=f"{layout}, {how}")
    demo = weights / "demo"  # its transformer may not exist yet: `train.py --stage base` makes it
    return Setup("demo", demo / "flux.safetensors", "tiny", demo / "ae.safetensors")


# The first block's query-norm scale in BFL's and diffusers' names (after any prefix): RMSNorm scales are never
# quantized by the fp8 forms, and cast to fp8 they agree between a bf16 file and a plain fp8 cast of it
IDENTITY_KEYS = ("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight")


def base_id(path: Path) -> str:
    """The identity of a transformer checkpoint's weights, whatever its name, path or storage form: a hash of its
    first block's query-norm scale rounded to fp8 (IDENTITY_KEYS). Two trainings of FLUX give other scales; the same
    weights renamed, linked, or stored in bf16 or fp8 give the same id."""
    for f in shard_files(transformer_source(path))[0]:
        key = next((k for k in read_header(f)[0] if k.endswith(IDENTITY_KEYS)), None)
        if key is not None:
            scale = read_safetensors(f, keys=[key])[key].to(torch.float8_e4m3fn)  # [head_dim]
            return hashlib.sha256(scale.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    raise CheckpointError(f"{path}: no {IDENTITY_KEYS[0]} (or diffusers' {IDENTITY_KEYS[1]}): not a FLUX transformer")


def note_cpu_fp32(setup: Setup, device: torch.device, base_dtype: str | None, dtype: torch.dtype) -> None:
    """One note when an official base is about to be held in fp32 on the CPU (4 bytes a weight: about 48 GB at dev
    size) because no --base-dtype was given."""
    if setup.kind == "official" and device.type == "cpu" and base_dtype is None and dtype == torch.float32:
        with torch.device("meta"):
            n = sum(p.numel() for p in Flux(PRESETS[setup.preset]).parameters())
        print(f"note: on the CPU the base is held in fp32, {4 * n / 2**30:.0f} GiB; --base-dtype bf16 halves that, "
              "fp8 stores its linear weights in one byte")


def check_same_base(cfg: dict, path, setup: Setup) -> None:
    """A train.py output is used on the base it was trained on: the same weights (its recorded base_id), whatever
    the base file is called now; an output from before ids were recorded, the same layout (its base_preset)."""
    if "base_id" in cfg:
        if cfg["base_id"] != setup.base_id():
            raise CheckpointError(f"{path} was trained on another base ({cfg.get('base_file', '?')}, id "
                                  f"{cfg['base_id']}); this run's base {setup.flux} holds other weights (id "
                                  f"{setup.base_id()}): use the base it was trained on ({BASE_ENV} names a file)")
    elif PRESETS.get(cfg.get("base_preset", setup.preset)) != PRESETS[setup.preset]:  # dev and kontext: one layout
        raise CheckpointError(f"{path} was trained on a base of the {cfg['base_preset']!r} layout, but this run's base "
                              f"{setup.flux} has the {setup.preset!r} layout (read from its keys)")


def text_condition(setup: Setup, params, batch: int, prompt: str, device, dtype, prompt_cache: Path | None = None):
    """(txt [B, L_txt, context_in_dim], txt_ids, y [B, vec_in_dim]). The tiny demo has no text encoders: one constant
    zero token (txt_in's bias makes it a learned constant) and a zero pooled vector."""
    if setup.kind == "demo":
        txt = torch.zeros(batch, 1, params.context_in_dim, device=device, dtype=dtype)
        y = torch.zeros(batch, params.vec_in_dim, device=device, dtype=dtype)
    else:
        from text_encoders import PromptCache
        # the encoders in bf16 whatever the run's dtype: T5-XXL takes 9.5 GB instead of 19, and its embeddings stay
        # within bf16's rounding of the fp32 ones (tests/core/test_text_encoders.py); they are cast to `dtype` below
        cache = PromptCache(prompt_cache or cache_dir() / "prompts", setup.t5, setup.clip,
                            t5_max_length=256 if setup.preset == "schnell" else 512, device=device,
                            dtype=torch.bfloat16)
        txt, y = cache([prompt])
        txt, y = txt.expand(batch, -1, -1).to(device, dtype), y.expand(batch, -1).to(device, dtype)
    return txt, text_ids(batch, txt.shape[1], device=device), y


# ----------------------------------------------------------------------------------------------------------------
# A model from a run config


def run_classes(cfg: dict, where) -> tuple[data.SemClass, ...] | None:
    """The class palette a run config records (train.py writes the dataset's classes as data.save_classes rows),
    validated; None for a file written before configs carried it."""
    rows = cfg.get("classes")
    if rows is None:
        return None
    if not isinstance(rows, list):
        raise CheckpointError(f"{where}: the classes in its config are not a list of {{id, name, color, hot}} objects")
    return data.classes_from_rows(rows, f"{where}: the classes in its config")


def base_condition_cache(setup: Setup) -> bool:
    """Whether the base transformer was trained with the condition cache (a `train.py --stage base
    --condition-cache` output records it in its run config; the official files and every other form do not)."""
    f = setup.flux
    if not (f.is_file() and f.suffix == ".safetensors"):
        return False
    try:
        return bool(run_config(f).get("condition_cache", False))
    except CheckpointError:  # not a train.py output
        return False


def build_model(setup: Setup, cfg: dict, device, dtype, modules_dtype: torch.dtype | None = None,
                base_dtype: str | None = None) -> Flux:
    """The base transformer in `dtype` + the modules the run config names (semantic scheme, then LoRA), before their
    weights load. `modules_dtype` (default `dtype`) is the new modules' dtype: training keeps them fp32.
    `base_dtype` ("fp8" | "bf16" | "fp32", None: `dtype`): how the frozen base is stored
    (extras.checkpoint_forms.load_flux)."""
    scheme, rank = cfg.get("scheme", "none"), cfg.get("lora_rank") or 0
    if scheme not in SCHEMES or not isinstance(rank, int) or rank < 0:
        raise CheckpointError(f"run config with scheme {scheme!r} and LoRA rank {rank!r}: not a train.py config")
    if scheme in SCHEME_PRESETS:
        try:
            semantic = SemanticConfig.from_dict(cfg["semantic"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"run config: its semantic options are malformed ({e})") from None
    model = load_flux(setup.flux, setup.preset, device=device, dtype=dtype, base_dtype=base_dtype)
    dtype = BASE_DTYPES.get(base_dtype) or dtype  # bf16 / fp32: the modules compute in the base's dtype
    if scheme in SCHEME_PRESETS:
        attach(model, semantic, dtype=modules_dtype or dtype)  # the default scheme B, or one of extras/schemes.py
    if rank:
        from lora import inject_lora
        inject_lora(model, rank=cfg["lora_rank"], alpha=cfg.get("lora_alpha"), dtype=modules_dtype or dtype)
    return model


def check_trained(model: Flux, sd: dict, path, cfg: dict, lora_optional: bool = False) -> None:
    """A train.py output's tensors (or their shapes on the meta device) against the model built from its run config:
    every trained key of the model (semantic module, LoRA) must be in the file, nothing else may be, and shapes must
    agree. A base-stage output is the whole transformer. `lora_optional`: the file may lack the LoRA (a warmup
    output starting a joint run: its LoRA starts at zero)."""
    if cfg.get("stage") == "base":
        optional = lambda k: False  # noqa: E731
    elif lora_optional:
        optional = lambda k: not k.startswith("semantic.")  # noqa: E731
    else:
        optional = lambda k: not is_trained_key(k)  # noqa: E731
    hint = lambda *_: (f"was it trained with another --scheme, preset or LoRA rank? (this model: scheme "  # noqa: E731
                       f"{cfg.get('scheme')}, LoRA rank {cfg.get('lora_rank', 0)})")
    check_state_dict(model, sd, f"{path}", hint=hint, allow_missing=optional)


def load_trained(model: Flux, path, cfg: dict, lora_optional: bool = False) -> None:
    """A train.py output's weights into the model built from its run config, strictly (check_trained)."""
    sd = read_safetensors(path, device=model.img_in.weight.device)  # load_state_dict casts to each parameter's dtype
    check_trained(model, sd, path, cfg, lora_optional)
    model.load_state_dict(sd, strict=False)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# the run config's fields that shape or steer a model: (is the value acceptable, what it must be)
RUN_CONFIG_FIELDS = {
    "scheme": (lambda v: v in SCHEMES, f"one of {', '.join(SCHEMES)}"),
    "stage": (lambda v: isinstance(v, str), "a stage name"),
    "base_preset": (lambda v: v in PRESETS, f"one of {', '.join(PRESETS)}"),
    "lora_rank": (lambda v: v is None or _whole(v) and v >= 0, "a whole number >= 0"),
    "lora_alpha": (lambda v: v is None or _number(v) and v > 0, "a positive number"),
    "condition_cache": (lambda v: isinstance(v, bool), "true or false"),
    "guidance": (lambda v: v is None or _number(v), "a finite number"),
    "sample_guidance": (lambda v: v is None or _number(v), "a finite number"),
    "base_id": (lambda v: isinstance(v, str), "a string"),
    "overlay_alpha": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "semantic": (lambda v: isinstance(v, dict), "an object of semantic options"),
}


def check_run_config(cfg: dict, path, setup: Setup) -> None:
    """A train.py output's run config, before anything is built: every field that shapes the model of the right type
    and range, the semantic options valid for the base, and every trained tensor's shape in the file's header equal
    to the model the config describes (built on the meta device: nothing is allocated). A crafted or damaged file is
    one CheckpointError naming the field or the tensors, never a huge allocation or a traceback."""
    for field, (ok, what) in RUN_CONFIG_FIELDS.items():
        if field in cfg and not ok(cfg[field]):
            raise CheckpointError(f"{path}: its run config has {field}={cfg[field]!r}; expected {what}")
    scheme, rank = cfg.get("scheme", "none"), cfg.get("lora_rank") or 0
    with torch.device("meta"):
        model = Flux(PRESETS[setup.preset])
        if scheme in SCHEME_PRESETS:
            try:
                attach(model, SemanticConfig.from_dict(cfg["semantic"]))
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: its run config's semantic options are not valid for the "
                                      f"{setup.preset!r} base ({type(e).__name__}: {e})") from None
        if rank:
            from lora import inject_lora
            inject_lora(model, rank=rank, alpha=cfg.get("lora_alpha"))
    header = read_header(path)[0]
    check_trained(model, {k: torch.empty(e["shape"], device="meta") for k, e in header.items()}, path, cfg)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Pipeline:
    setup: Setup
    model: Flux
    ae: AutoEncoder
    cfg: dict  # the run config (scheme, semantic options, LoRA, guidance, prompt)
    guidance: float | None
    prompt: str
    device: torch.device
    dtype: torch.dtype
    ckpt: Path | None = None  # the trained weights, if any (named when something goes wrong)
    condition_cache: bool = False  # trained with the condition cache (extras/condition_cache.py)
    text: tuple | None = None  # the prompt's (txt [1, L_txt, D], txt_ids, y [1, D]), encoded before the model loads
    loras: tuple = ()  # the LoRA files applied on top: ((path, scale), ...)

    @property
    def scheme(self) -> str:  # xattn | zeroconv | adapter | overlay | none
        return self.cfg.get("scheme", "none")

    def sampler(self) -> torch.nn.Module:
        """What one sampling run calls: the model, or with the condition cache the model behind a ConditionCache
        that keeps the condition pass for the run."""
        return ConditionCache(self.model, keep=True) if self.condition_cache else self.model


def default_ckpt(setup: Setup) -> Path | None:
    """The newest warmup output, else the demo's shipped semantic weights."""
    for p in (ROOT / "runs" / "warmup" / "final.safetensors", setup.flux.parent / "xattn.safetensors"):
        if p.is_file():
            return p
    return None


def load_pipeline(ckpt=None, device=None, dtype=None, setup: Setup | None = None, prompt: str = DEFAULT_PROMPT,
                  quiet: bool = False, base_dtype: str | None = None, loras=()) -> Pipeline:
    """The base (+ the trained weights of `ckpt`, a train.py output), frozen, in eval mode, with its autoencoder.
    base_dtype "fp8" keeps the base's linear weights in float8 (extras/fp8.py); "bf16" / "fp32" set the model's
    dtype. `loras`: ((LoRA file, scale), ...) from other tools, read and checked against the base before anything
    loads, then applied on top of the trained weights (apply_loras)."""
    dtype = BASE_DTYPES.get(base_dtype) or dtype
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    setup = setup or find_setup()
    if not quiet:
        print(setup.describe())
        note_cpu_fp32(setup, device, base_dtype, dtype)
    if setup.kind == "demo" and not setup.flux.is_file():
        raise CheckpointError(f"no FLUX transformer in {setup.flux.parent.parent} and no demo base {setup.flux}: put "
                              f"the official files there (weights/README.md), set {BASE_ENV} to a transformer "
                              "checkpoint, or remake the demo (`python train.py --stage base`)")
    cfg = run_config(ckpt) if ckpt else {"scheme": "none"}
    if ckpt:
        check_same_base(cfg, ckpt, setup)
        check_run_config(cfg, ckpt, setup)
    files = read_loras(loras, setup)
    # the prompt first: its encoders are loaded, used and freed before the transformer, so the peaks do not add up
    text = text_condition(setup, PRESETS[setup.preset], 1, cfg.get("prompt", prompt), device, dtype)
    model = build_model(setup, cfg, device, dtype, base_dtype=base_dtype)
    if ckpt:
        load_trained(model, ckpt, cfg)
    apply_loras(model, files, merge=base_dtype != "fp8", quiet=quiet)
    model.eval().requires_grad_(False)
    ae = load_ae(setup.ae, device=device, dtype=dtype).eval().requires_grad_(False)
    # sampling guidance: the base's default (training runs at its own, fixed guidance: another setting)
    guidance = setup.guidance if PRESETS[setup.preset].guidance_embed else None
    # the condition cache: the run's choice, or (no run config, e.g. sampling the base alone) the base's own
    cache = bool(cfg["condition_cache"] if "condition_cache" in cfg else base_condition_cache(setup))
    return Pipeline(setup, model, ae, cfg, guidance, cfg.get("prompt", prompt), device, dtype,
                    Path(ckpt) if ckpt else None, cache, text, tuple((Path(f), float(s)) for f, s in loras))


# ----------------------------------------------------------------------------------------------------------------
# LoRA files from other tools (kohya / ComfyUI, diffusers, ai-toolkit, ours): --lora FILE[:SCALE]


def parse_lora(text: str, flag: str = "--lora") -> tuple[Path, float]:
    """FILE[:SCALE] (SCALE default 1.0, any finite number) as (path, scale), checked before anything loads: the file
    must exist and the scale be a number. A path that itself holds a ':' is taken whole when it is a file."""
    path, scale = text, "1"
    if not Path(text).is_file() and ":" in text:
        path, scale = text.rsplit(":", 1)
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{flag} {text}: the scale {scale!r} is not a finite number (FILE[:SCALE], e.g. "
                         f"{path}:0.8)")
    if not Path(path).is_file():
        raise ValueError(f"{flag} {text}: no such file {path}")
    return Path(path), value


def read_loras(loras, setup: Setup) -> list:
    """Each (LoRA file, scale) read and checked against the base's layers, on the meta device (nothing loads): a
    file that does not fit fails here, before the text encoders and the transformer. [(LoraFile, scale)]."""
    if not loras:
        return []
    from extras.lora_formats import read_lora
    with torch.device("meta"):
        base = Flux(PRESETS[setup.preset])
    files = []
    for path, scale in loras:
        if "config" in read_header(path)[1]:
            raise CheckpointError(f"--lora {path}: a train.py output, not a LoRA file: pass it as --ckpt")
        files.append((read_lora(base, path), scale))
    return files


def apply_loras(model: Flux, files: list, merge: bool, quiet: bool = False) -> None:
    """read_loras' files onto the model, each at its scale, on top of whatever it holds (a run's LoRA and semantic
    modules): merged into the base weights (`merge`, bf16 / fp32 bases), else (an fp8 base, which cannot take a
    merge: extras/fp8.py) as unmerged LoRA layers, exactly. Says what it applied, one line per file."""
    if not files:
        return
    from extras.lora_formats import add_lora_file, merge_lora_file
    for lora, scale in files:
        (merge_lora_file if merge else add_lora_file)(model, lora, scale)
        if not quiet:
            how = "merged into the base weights" if merge else "as LoRA layers beside the fp8 base weights"
            print(f"LoRA: {lora.describe()} at scale {scale:g}, {how}")
            if lora.skipped:
                print(lora.skip_note())


def check_not_lora(path, flag: str, instead: str) -> None:
    """A LoRA file given where a train.py output belongs (--ckpt, --init): one line naming the flag that takes it."""
    from extras.lora_formats import is_lora_file
    if is_lora_file(path):
        raise CheckpointError(f"{flag} {path}: a LoRA file, not a train.py output: pass it as {instead}")


def encode_condition(pipe: Pipeline, rgb: Tensor, sem: Tensor) -> Condition:
    """rgb, sem [B, 3, H, W] in [-1, 1] -> the Condition flow.denoise takes: x_cond tokens, ids, text, semantic."""
    B, _, H, W = rgb.shape
    if rgb.shape != sem.shape:
        raise ValueError(f"rgb {tuple(rgb.shape)} and semantic map {tuple(sem.shape)} differ in size")
    if H % 16 or W % 16:
        raise ValueError(f"image sides must be multiples of 16, got {H}x{W} (use --size)")
    with torch.no_grad():
        image = overlay(rgb, sem, pipe.cfg.get("overlay_alpha", 0.5)) if pipe.scheme == "overlay" else rgb
        semantic = pipe.model.semantic
        sem_in = semantic_input(semantic.config, sem, pipe.ae) if semantic is not None else None
        x_cond = pack(pipe.ae.encode(image))  # [B, 3, H, W] -> [B, 16, H/8, W/8] -> [B, L, 64]
    return make_condition(x_cond, sem_in, pipe.text, H // 16, W // 16)  # the prompt's batch-1 text, expanded


# sampling-time semantic strength and guidance (sample.py, tools/eval.py): the best point of the strength and guidance
# sweeps on the demo (docs/sampling.md; highest PSNR with decoy hallucination <= 1.5%: strength 1.5, one pass;
# guidance 1.5 scores 0.08 dB more but doubles the sampling time and hallucinates twice as many decoys)
SEM_STRENGTH = 1.5
SEM_GUIDANCE = 1.0
SAMPLE_STEPS = 20  # Euler steps (sample.py, tools/eval.py)
# what a run's outputs record as the settings to sample it with (train.py's metadata `sampling`; the LoRA exports
# and their model card repeat it)
SAMPLING_DEFAULTS = {"steps": SAMPLE_STEPS, "sem_strength": SEM_STRENGTH, "sem_guidance": SEM_GUIDANCE}


@torch.no_grad()
def generate(pipe: Pipeline, rgb: Tensor, sem: Tensor, steps: int = SAMPLE_STEPS, seed: int | list[int] = 0,
             guidance=None, progress: bool = False, sem_strength: float = SEM_STRENGTH,
             sem_guidance: float = SEM_GUIDANCE) -> Tensor:
    """rgb, sem [B, 3, H, W] in [-1, 1] -> IR [B, 1, H, W] in [0, 1]. A list of seeds gives each pair its own noise,
    so a pair's result does not depend on what it was batched with. sem_strength multiplies the semantic module's
    learned scales and gates (ControlNet's conditioning_scale); sem_guidance w is semantic classifier-free guidance
    (flow.guided_velocity: two passes per step unless w = 1)."""
    rgb, sem = rgb.to(pipe.device, pipe.dtype), sem.to(pipe.device, pipe.dtype)
    cond = encode_condition(pipe, rgb, sem)
    cond.sem_strength = sem_strength
    B, _, H, W = rgb.shape
    if isinstance(seed, int):
        noise = get_noise(B, H, W, seed, pipe.device, pipe.dtype)
    else:
        noise = torch.cat([get_noise(1, H, W, s, pipe.device, pipe.dtype) for s in seed])
    x = pack(noise)  # [B, 16, H/8, W/8] -> [B, L, 64]
    timesteps = get_schedule(steps, x.shape[1], shift=pipe.setup.preset != "schnell")
    x = denoise(pipe.sampler(), x, cond, timesteps, guidance if guidance is not None else pipe.guidance, progress,
                sem_guidance)
    img = pipe.ae.decode(unpack(x.float().to(pipe.dtype), H, W))  # [B, L, 64] -> [B, 16, H/8, W/8] -> [B, 3, H, W]
    for what, t, source in (("transformer", x, pipe.ckpt or pipe.setup.flux), ("autoencoder", img, pipe.setup.ae)):
        if not torch.isfinite(t).all():  # clamp would turn NaN into a plausible black image
            raise ValueError(f"the {what}'s prediction is not finite (NaN or inf): the weights ({source}) are "
                             "broken, e.g. saved from a diverged training run")
    return data.rgb_to_ir(img.float().clamp(-1, 1))


def check_attention_maps(pipe: Pipeline) -> None:
    """attention_maps needs a semantic module with cross-attention (checked before any sampling)."""
    module = pipe.model.semantic
    if module is None or not module.recorded_attentions():
        raise ValueError(f"attention maps exist only for the xattn and adapter schemes (this model: {pipe.scheme})")


@torch.no_grad()
def attention_maps(pipe: Pipeline, rgb: Tensor, sem: Tensor, seed: int = 0,
                   steps: int = SAMPLE_STEPS) -> dict[str, Tensor]:
    """Where the semantic cross-attention looks at mid-denoising (t ~ 0.5) for the first pair: block name ("double.3",
    "single.0") -> [L_img, N] attention of every image query over the semantic tokens, heads averaged."""
    check_attention_maps(pipe)
    module = pipe.model.semantic
    rgb, sem = rgb[:1].to(pipe.device, pipe.dtype), sem[:1].to(pipe.device, pipe.dtype)
    cond = encode_condition(pipe, rgb, sem)
    H, W = rgb.shape[-2:]
    ts = get_schedule(steps, (H // 16) * (W // 16), shift=pipe.setup.preset != "schnell")
    mid = min(range(len(ts) - 1), key=lambda i: abs(ts[i] - 0.5))
    x = denoise(pipe.sampler(), pack(get_noise(1, H, W, seed, pipe.device, pipe.dtype)), cond, ts[: mid + 1],
                pipe.guidance)  # run to t ~ 0.5, then record one step
    module.record_attention(True)
    try:
        denoise(pipe.sampler(), x, cond, ts[mid: mid + 2], pipe.guidance)
        record = module.record
    finally:
        module.record_attention(False)
    # the step's call (with the condition cache, the condition pass's call comes first), first sample: [L_img, N]
    return {name: maps[-1][0] for name, maps in record.items()}
