"""
Staged training of semantic-guided infrared generation on FLUX (rectified flow, Kontext-style conditioning).

    python train.py --stage warmup                       # backbone frozen: only the semantic modules learn
    python train.py --stage joint --init runs/warmup/final.safetensors      # + LoRA on the backbone
    python train.py --stage joint --init runs/warmup --init-lora lora.safetensors  # the LoRA starts from a file
    python train.py --stage finetune --init runs/joint/final.safetensors    # only the strength scales/gates
    python train.py --stage warmup --val-data data/synth-test --sample-every 200 --tensorboard   # held-out scores
    torchrun --nproc_per_node 8 train.py --stage joint ...                  # data parallel over GPUs
    python train.py --stage base --scheme none           # the tiny demo's RGB-conditioned base (weights/demo)

With no official FLUX checkpoint in weights/, everything runs on the tiny demo preset and synthetic scenes.
From Python: `train.run(TrainConfig(stage="joint", ...))`.

One training step (the shapes for 512x512, dev sizes):
    x0 = pack(VAE(ir))            [B, 1024, 64]     (latents cached on disk once; the VAE encoder is then freed)
    x_cond = pack(VAE(rgb))       [B, 1024, 64]     (overlay baseline: VAE(blend(rgb, sem)))
    t ~ logit-normal;  noise ~ N(0, I);  x_t = (1 - t) x0 + t noise;  target v = noise - x0      (flow.py)
    v_pred = flux(cat(x_t, x_cond), kontext ids, txt, t, y, guidance, semantic=sem)[:, :1024]   (flow.velocity)
    loss = mean((v_pred - v)^2)

The file reads top to bottom: the stages and the config, the checks made before any work, the data, the model and
what trains, one batch, the outputs and what happens when something goes wrong, the processes of a torchrun, and
last `run`: setup, then the loop.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

import data
from checkpoint import (changed_settings, claim, command, load_state, read_header, resume_command, restore,
                        run_config, save_atomic, save_state, set_aside, settle, trained_file, trim_log,
                        write_numbered)
from extras.fp8 import BASE_DTYPES
from flow import denoise, flow_loss, get_noise, get_schedule, make_condition, pack, sample_t, unpack
from flux_model import PRESETS, Flux
from latents import encode_dataset, encode_jittered, semantic_batch, tokens_path
from pipeline import (DEFAULT_PROMPT, ROOT, SAMPLING_DEFAULTS, SCHEMES, Pipeline, Setup, Stopper,
                      base_condition_cache, build_model, check_not_lora, check_run_config, check_same_base, find_setup,
                      generate, is_trained_key, load_trained, note_cpu_fp32, resolve_device, text_condition)
from sem_cross_attn import ATTENTION_FORMS, DEFAULT_B, SCHEMES as MODULE_SCHEMES, SemanticConfig
from vae import AutoEncoder, load_ae
from viz import grid, save_image, to_pil_gray, to_pil_rgb


# ----------------------------------------------------------------------------------------------------------------
# The stages and the config


@dataclass(frozen=True)
class Stage:
    """One stage's defaults (a flag left unset takes them) and what it trains."""
    steps: int
    lr: float  # FLUX.1-size bases
    demo_lr: float  # the tiny demo learns faster
    sem_drop: float  # share of samples trained without the semantic input (a scheme with a module only)
    trains: str  # what learns: "semantic" | "semantic+lora" | "strengths" | "everything" (select_trainable)
    init_from: tuple[str, ...]  # the stages whose output an --init may be


STAGES = {
    # the tiny demo's warmup at 3e-3: the default B after 1000 steps at batch 8 scores 22.5 dB on the held-out
    # scenes where 1e-3 gives 21.0 (docs/training.md)
    "warmup": Stage(steps=1000, lr=1e-4, demo_lr=3e-3, sem_drop=0.0, trains="semantic", init_from=("warmup",)),
    # condition dropout 0.1, as ControlNet-style trainers use: the LoRA learns the "without" prediction of semantic
    # guidance
    "joint": Stage(steps=1000, lr=5e-5, demo_lr=1e-3, sem_drop=0.1, trains="semantic+lora",
                   init_from=("warmup", "joint")),
    "finetune": Stage(steps=200, lr=1e-3, demo_lr=1e-3, sem_drop=0.0, trains="strengths",
                      init_from=("warmup", "joint", "finetune")),
    "base": Stage(steps=4000, lr=3e-4, demo_lr=3e-4, sem_drop=0.0, trains="everything", init_from=("base",)),
}
LORA_STAGES = ("joint", "finetune")  # the stages with LoRA on the backbone
CHOICES = {"stage": tuple(STAGES), "scheme": SCHEMES, "t_sampling": ("logit_normal", "uniform", "shifted"),
           "sem_encoder": ("vae", "cnn"), "sem_attention": ATTENTION_FORMS, "base_dtype": tuple(BASE_DTYPES),
           "lora_export_dtype": ("bf16", "fp32")}  # extras.lora_formats.EXPORT_DTYPES


def opt(default, help: str = " "):
    """A config field with its command-line help."""
    return field(default=default, metadata={"help": help})


def per_stage(value) -> str:
    return ", ".join(f"{name} {value(s):g}" for name, s in STAGES.items())


PRESET = "default: the scheme's preset (sem_cross_attn.DEFAULT_B for xattn, extras.schemes.PRESETS)"


@dataclass
class TrainConfig:
    """Every field is a flag (--batch-size for batch_size). None: the stage's or the scheme's value, filled in by
    `resolve` before the run; the outputs record the filled-in config."""
    stage: str = opt("warmup", "warmup | joint | finetune (the design's stages); base (the tiny demo's base)")
    scheme: str = opt("xattn", "xattn (B) | zeroconv (A) | adapter (C) | overlay (pixel blend baseline) | none")
    data: str = opt("", "dataset folder (rgb/, sem/, ir/); default: the synthetic set, generated on first use")
    size: int = opt(0, "serve every pair at about SxS pixels at its own aspect ratio, sides multiples of 16 (a set "
                       "of several image shapes trains in buckets, one shape a batch); 0 keeps the files' size "
                       "(multiples of 16)")
    out: str | None = opt(None, "default: runs/<stage>")
    init: str = opt("", "the previous stage's output")
    resume: bool = opt(False, "continue from <out>/resume.pt")
    steps: int | None = opt(None, f"default: the stage's ({per_stage(lambda s: s.steps)})")
    batch_size: int | None = opt(None, "per process and micro-step; default: 8 on the tiny demo, 1 with an official "
                                       "base on the CPU, and on a GPU the largest of 8, 4, 2, 1 that the memory plan "
                                       "fits on the card (tools/memory_plan.py; a resumed run: its own)")
    grad_accum: int = opt(1, "micro-steps per optimiser step")
    lr: float | None = opt(None, f"default: the stage's (FLUX.1 sizes: {per_stage(lambda s: s.lr)}; the tiny demo: "
                                 f"{per_stage(lambda s: s.demo_lr)})")
    strength_lr_mult: float = opt(10.0, "the zero-initialised scales/gates learn this many times faster")
    warmup_steps: int = opt(50)
    min_lr_ratio: float = opt(0.1, "cosine decays to lr * this")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    grad_clip: float = opt(1.0, "max global gradient norm")
    seed: int = opt(0, "data order, t and noise all come from one generator seeded with this")
    t_sampling: str = opt("logit_normal", "logit_normal | uniform | shifted (logit-normal, then FLUX's resolution "
                                          "shift)")
    logit_mean: float = opt(0.0, "t = sigmoid(mean + std * N(0, 1))")
    logit_std: float = opt(1.0, "see logit_mean")
    guidance: float = opt(1.0, "fixed guidance input for guidance-distilled bases (dev/Kontext), as kohya/x-flux "
                               "train")
    prompt: str = opt(DEFAULT_PROMPT, "the one prompt of every pair (official bases; the demo has no text encoder)")
    lora_rank: int = opt(16, "joint / finetune: LoRA rank on the backbone")
    lora_alpha: float = opt(16.0, "LoRA scale = alpha / rank")
    init_lora: str = opt("", "joint: start the backbone LoRA from this LoRA file (kohya's --network_weights; any "
                             "layout extras/lora_formats.py reads: kohya / ComfyUI, diffusers, ai-toolkit, a run's "
                             "lora_*.safetensors); its rank must be --lora-rank and its alpha --lora-alpha")
    lora_export_dtype: str = opt("bf16", "dtype of the LoRA exports lora_kohya / lora_diffusers.safetensors (bf16: "
                                         "half the bytes, as kohya and diffusers save; fp32 on request)")
    sem_encoder: str | None = opt(None, f"vae | cnn; {PRESET}")
    sem_blocks: str | None = opt(None, f"all | double | single | every:K; {PRESET}")
    sem_heads: int | None = opt(None, f"cross-attention heads, 0: the transformer's; {PRESET}")
    sem_inner_dim: int | None = opt(None, "cross-attention width, 0: the transformer's hidden size (smaller saves "
                                          f"parameters); {PRESET}")
    sem_attention: str | None = opt(None, "scheme B's form: decoupled (new keys/values read by the block's own "
                                          "queries, IP-Adapter) | separate (its own cross-attention after each "
                                          f"block); {PRESET}: decoupled for xattn, else separate")
    sem_token_dim: int | None = opt(None, "semantic token width, 0: the transformer's hidden size (smaller: small "
                                          f"K/V); {PRESET}: {DEFAULT_B.token_dim} for xattn, else 0; with "
                                          f"--sem-attention given: {DEFAULT_B.token_dim} for the decoupled xattn, "
                                          "else 0")
    sem_shared_kv: bool | None = opt(None, f"decoupled: one key/value projection shared by every block; {PRESET}")
    sem_drop: float | None = opt(None, "share of samples trained without the semantic input (the 'without' "
                                       "prediction of semantic guidance at sampling); only the joint stage (it trains "
                                       f"LoRA); default: the stage's ({per_stage(lambda s: s.sem_drop)}) with a "
                                       "semantic module, else 0")
    sem_jitter: int = opt(0, "augment: shift each semantic map by up to this many pixels and coarsen it by 1, 2 or "
                             "4 (nearest), as misregistered pairs and coarse segmenters give; 0: off")
    overlay_alpha: float = opt(0.5, "overlay baseline: weight of the semantic colours in the blend")
    condition_cache: bool = opt(False, "train the condition cache (OminiControl2 / EasyControl, "
                                       "extras/condition_cache.py): the condition tokens get the modulation of t = 0 "
                                       "and attend only to themselves, so sampling computes their keys and values "
                                       "once per image (about half the work per step; another model than Kontext: "
                                       "a base trained with it needs it)")
    base_dtype: str | None = opt(None, "how the frozen base is stored: fp8 (1 byte per linear weight, "
                                       "extras/fp8.py) | bf16 | fp32; default: bf16 on a GPU, fp32 on the CPU")
    gradient_checkpointing: bool | None = opt(None, "recompute each block with its semantic module in backward "
                                                    "(memory for compute); default: off, but on a GPU with an "
                                                    "official base where the memory plan needs it for the batch")
    compile: bool = opt(False, "torch.compile the model (opt-in)")
    fsdp: bool = opt(False, "under torchrun: shard weights, gradients and optimiser state over the processes "
                            "(FSDP2, extras/fsdp.py: one unit per transformer block with its semantic module) "
                            "instead of replicating them (DDP); one process: no effect")
    log_every: int = opt(10, "steps between log.jsonl lines")
    sample_every: int = opt(0, "steps between sample grids (and validations); 0: at the end only")
    sample_steps: int = opt(10, "Euler steps of the sample grids and validations (0: no grids)")
    val_data: str = opt("", "a held-out folder (rgb/, sem/, ir/, the training data's classes): its first --val-count "
                            "pairs are sampled wherever a grid is (seed i for pair i, the run's sampling settings, "
                            "--sample-steps) into samples/val_step_N.png, and scored as tools.eval scores (PSNR, "
                            "SSIM, miss, decoy hallucination) into log.jsonl; default: no validation")
    val_count: int = opt(8, "validation pairs (the first of --val-data in name order)")
    ckpt_every: int = opt(100, "steps between latest.safetensors + resume.pt, and a numbered "
                               "checkpoints/step_N.safetensors")
    keep_last: int = opt(5, "numbered checkpoints kept (the newest); 0: every one")
    tensorboard: bool = opt(False, "also log the loss, lr, validation scores and grids to <out>/tb (needs the "
                                   "tensorboard package)")
    device: str = opt("", "default: cuda:LOCAL_RANK if available, else cpu")
    progress: bool = opt(True, "progress bar (loss, it/s)")
    overwrite: bool = opt(False, "start over in an --out that holds another run (its weights, resume state and log)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default; a None default is described in the flag's own help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None) -> TrainConfig:
    """One flag per TrainConfig field."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type in (bool, bool | None):
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            kind = {int | None: int, float | None: float, str | None: str}.get(f.type, f.type)  # None: see help
            ap.add_argument(name, type=kind, default=f.default, choices=CHOICES.get(f.name), help=help)
    return TrainConfig(**vars(ap.parse_args(argv)))


# the --sem-* flags: SemanticConfig's fields
SEMANTIC_FLAGS = {"encoder": "sem_encoder", "blocks": "sem_blocks", "num_heads": "sem_heads",
                  "inner_dim": "sem_inner_dim", "attention": "sem_attention", "token_dim": "sem_token_dim",
                  "shared_kv": "sem_shared_kv"}
# what the outputs of a scheme without a module (overlay, none) record for the --sem-* settings it does not use
NO_MODULE = SemanticConfig(attention="separate", token_dim=0)


def semantic_config(cfg: TrainConfig) -> SemanticConfig:
    """The scheme's preset (the default scheme B is the core's DEFAULT_B; the others are extras.schemes.PRESETS)
    with the --sem-* flags that were given on top. Scheme B's token width goes with its form: with --sem-attention
    given and no --sem-token-dim, the decoupled form's preset width, the separate form's 0 (the hidden size)."""
    if cfg.scheme == "xattn":
        preset = DEFAULT_B
    elif cfg.scheme not in MODULE_SCHEMES:
        preset = NO_MODULE
    else:
        from extras.schemes import PRESETS as SCHEME_PRESETS
        preset = SCHEME_PRESETS[cfg.scheme]
    given = {k: getattr(cfg, flag) for k, flag in SEMANTIC_FLAGS.items() if getattr(cfg, flag) is not None}
    if "attention" in given and "token_dim" not in given:
        decoupled_b = cfg.scheme == "xattn" and given["attention"] == "decoupled"
        given["token_dim"] = DEFAULT_B.token_dim if decoupled_b else 0
    return dataclasses.replace(preset, **given)


def resolve(cfg: TrainConfig, setup: Setup) -> TrainConfig:
    """A copy of `cfg` with every None filled in: the stage's steps, learning rate (the tiny demo's own) and
    condition dropout, the output folder, the scheme's semantic settings; --init as the file it names (a run folder:
    its final.safetensors). --base-dtype stays None: the run's dtype."""
    stage = STAGES[cfg.stage]
    defaults = {"steps": stage.steps, "lr": stage.demo_lr if setup.kind == "demo" else stage.lr,
                "sem_drop": stage.sem_drop if cfg.scheme in MODULE_SCHEMES else 0.0,
                "out": str(ROOT / "runs" / cfg.stage)}
    semantic = semantic_config(cfg)
    init = str(trained_file(cfg.init)) if cfg.init else ""  # a run folder: its final.safetensors
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None},
                               **{flag: getattr(semantic, k) for k, flag in SEMANTIC_FLAGS.items()}, init=init)


def settings(cfg: TrainConfig) -> dict:
    """The resolved config as the outputs' train_args and the resume state record it (an unset --base-dtype as "",
    as outputs always have: a resume compares these)."""
    return asdict(cfg) | {"base_dtype": cfg.base_dtype or ""}


# ----------------------------------------------------------------------------------------------------------------
# Checks before any work


def memory_defaults(cfg: TrainConfig, setup: Setup, device: torch.device) -> TrainConfig:
    """--batch-size and --gradient-checkpointing, where left unset: a resumed run's own; batch 8 on the tiny demo and
    1 with an official base on the CPU, without checkpointing; on a GPU with an official base, the largest batch of
    8, 4, 2, 1 whose step the memory plan (tools/memory_plan.py, traced on the meta device: about a minute) fits on
    this card, without checkpointing where that batch fits so. One line says what was chosen and why; when nothing
    fits, a ValueError before anything loads names the settings that would."""
    if cfg.batch_size is not None and cfg.gradient_checkpointing is not None:
        return cfg
    if cfg.resume and (Path(cfg.out) / "resume.pt").is_file():
        was = load_state(Path(cfg.out) / "resume.pt")["settings"]
        return dataclasses.replace(cfg, batch_size=was["batch_size"] if cfg.batch_size is None else cfg.batch_size,
                                   gradient_checkpointing=bool(was["gradient_checkpointing"]
                                                               if cfg.gradient_checkpointing is None
                                                               else cfg.gradient_checkpointing))
    base = cfg.base_dtype or "bf16"
    if setup.kind != "official" or device.type != "cuda" or cfg.stage == "base" or base == "fp32":
        default = 8 if setup.kind == "demo" else 1
        return dataclasses.replace(cfg, batch_size=default if cfg.batch_size is None else cfg.batch_size,
                                   gradient_checkpointing=bool(cfg.gradient_checkpointing))
    from tools.memory_plan import BATCHES, GIB, choose, plan_for
    pairs = data.PairedDataset(cfg.data, size=cfg.size or None)  # the headers only: the token grid of the data
    side = math.ceil(math.sqrt(max(w * h for w, h in pairs.served) / 256))  # the largest bucket, as a square
    semantic = semantic_config(cfg) if cfg.scheme in MODULE_SCHEMES else DEFAULT_B  # none / overlay: B's, as a bound
    card = torch.cuda.get_device_properties(device).total_memory
    where = f"a {cfg.stage} step at {side * 16}x{side * 16} on the {base} base, this {card / GIB:.0f} GiB card"
    print(f"planning the memory of {where} (--batch-size and --gradient-checkpointing skip it)")
    plan = lambda b: plan_for(PRESETS[setup.preset], cfg.stage, semantic, b, side, lora_rank=cfg.lora_rank)  # noqa
    given = {"batches": BATCHES if cfg.batch_size is None else (cfg.batch_size,),  # one flag given: the plan picks
             "checkpointing": (False, True) if cfg.gradient_checkpointing is None else (cfg.gradient_checkpointing,)}
    choice = choose(card, plan(base), **given)
    if choice.batch is None:
        other = choose(card, plan("fp8"), **given) if base == "bf16" else None
        ckpt = ", gradient checkpointing" if other is not None and other.checkpointing else ""
        would = (f"--base-dtype fp8 fits (batch {other.batch}{ckpt})" if other is not None and other.batch
                 else "a smaller --size, or a card with more memory")
        smallest = f"batch {given['batches'][-1]}{' with gradient checkpointing' if choice.checkpointing else ''}"
        raise ValueError(f"nothing fits: {smallest} needs {choice.total / GIB:.1f} GiB (+10% and 1 GiB) for {where}; "
                         f"{would}")
    chosen = [f"--batch-size {choice.batch}"] if cfg.batch_size is None else []
    if cfg.gradient_checkpointing is None:
        chosen.append(f"--{'' if choice.checkpointing else 'no-'}gradient-checkpointing")
    print(f"chose {' '.join(chosen)}: the largest batch the memory plan fits, without checkpointing where it fits so "
          f"({choice.total / GIB:.1f} GiB planned for {where})")
    return dataclasses.replace(cfg, batch_size=choice.batch, gradient_checkpointing=choice.checkpointing)


def stage_config(cfg: TrainConfig, setup: Setup) -> dict:
    """The self-description written into every output (pipeline.load_pipeline rebuilds the model from it)."""
    c = {"stage": cfg.stage, "scheme": cfg.scheme, "base_preset": setup.preset, "base_file": setup.flux.name,
         "prompt": cfg.prompt, "guidance": cfg.guidance, "overlay_alpha": cfg.overlay_alpha, "size": cfg.size,
         "condition_cache": cfg.condition_cache, "sample_guidance": setup.guidance}
    if cfg.stage != "base":  # the base's weights, identified by content (pipeline.base_id): what the output needs
        c["base_id"] = setup.base_id()
    if cfg.scheme in MODULE_SCHEMES:
        semantic = semantic_config(cfg)
        p = PRESETS[setup.preset]
        try:
            semantic.validate(p.hidden_size, p.num_heads)
        except ValueError as e:
            raise ValueError(f"--scheme/--sem-encoder/--sem-blocks/--sem-heads/--sem-inner-dim/--sem-attention/"
                             f"--sem-token-dim/--sem-shared-kv: {e}") from None
        c["semantic"] = semantic.to_dict()
    if cfg.stage in LORA_STAGES:
        c["lora_rank"], c["lora_alpha"] = cfg.lora_rank, cfg.lora_alpha
    return c


def check_numbers(cfg: TrainConfig) -> None:
    """Every count positive, every rate finite and in range: one ValueError naming the flag."""
    for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:  # batch_size None: memory_defaults
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "sample_every", "sample_steps", "size", "sem_heads", "sem_inner_dim",
                 "sem_token_dim", "sem_jitter"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    for name in ("lr", "strength_lr_mult", "grad_clip", "logit_std"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and 0 < v < torch.finfo(torch.float32).max):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive finite float32 number, got {v}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    if not (math.isfinite(cfg.sem_drop) and 0 <= cfg.sem_drop < 1):
        raise ValueError(f"--sem-drop must be in [0, 1), got {cfg.sem_drop}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.size % 16:
        raise ValueError(f"--size must be a multiple of 16 (8x VAE downsampling x 2x2 patches), got {cfg.size}")
    if cfg.stage in LORA_STAGES and cfg.lora_rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {cfg.lora_rank}")


def check_logging(cfg: TrainConfig) -> None:
    """The validation, numbered-checkpoint and TensorBoard flags: one ValueError naming the flag."""
    if cfg.keep_last < 0:
        raise ValueError(f"--keep-last must be 0 (keep every numbered checkpoint) or more, got {cfg.keep_last}")
    if cfg.val_count < 1:
        raise ValueError(f"--val-count must be at least 1, got {cfg.val_count}")
    if cfg.val_data:
        if not Path(cfg.val_data).is_dir():
            raise ValueError(f"--val-data {cfg.val_data}: no such folder")
        if Path(cfg.val_data).resolve() == Path(cfg.data or ROOT / "data" / "synth").resolve():
            raise ValueError(f"--val-data {cfg.val_data} is the training data: give a held-out folder")
        if cfg.sample_steps < 1:
            raise ValueError("--val-data samples its pairs with --sample-steps Euler steps: give at least 1")
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


def check_config(cfg: TrainConfig, setup: Setup, want: dict) -> dict | None:
    """Stage, scheme and --init agree (an --init comes from an earlier stage of the same scheme, base and module
    layout); returns the --init's run config. Raises ValueError naming the conflict."""
    if cfg.stage == "warmup" and cfg.scheme not in MODULE_SCHEMES:
        raise ValueError(f"--stage warmup trains only semantic modules, and scheme {cfg.scheme!r} has none: "
                         "use --stage joint")
    if cfg.stage == "finetune" and cfg.scheme not in MODULE_SCHEMES:
        raise ValueError(f"--stage finetune trains the semantic strengths, and scheme {cfg.scheme!r} has none")
    if cfg.stage == "base" and cfg.scheme != "none":
        raise ValueError("--stage base trains the RGB-conditioned base model: use --scheme none")
    if cfg.stage == "base" and cfg.base_dtype is not None:
        raise ValueError("--base-dtype stores the frozen base; --stage base trains every weight (in fp32)")
    if cfg.sem_drop and (cfg.stage != "joint" or cfg.scheme not in MODULE_SCHEMES):
        raise ValueError("--sem-drop trains the prediction without the semantic input, which only the LoRA can "
                         "learn: use it with --stage joint and a scheme with a module (in warmup the base is that "
                         "prediction already)")
    if cfg.fsdp and cfg.compile:
        raise ValueError("--fsdp with --compile: compiling the sharded model as a whole is not supported here; drop "
                         "one of them")
    if cfg.sem_jitter and cfg.scheme not in MODULE_SCHEMES:
        raise ValueError(f"--sem-jitter moves the semantic input of a module; scheme {cfg.scheme!r} has none")
    if cfg.stage != "base" and base_condition_cache(setup) and not cfg.condition_cache:
        raise ValueError(f"the base {setup.flux} was trained with the condition cache: pass --condition-cache")
    if cfg.resume and not (Path(cfg.out) / "resume.pt").is_file():
        raise ValueError(f"--resume: no {Path(cfg.out) / 'resume.pt'} (was the run started with --out {cfg.out}?)")
    if not cfg.init:
        if cfg.stage == "finetune":
            raise ValueError("--stage finetune adjusts a trained model: pass --init runs/joint/final.safetensors")
        return None
    check_not_lora(cfg.init, "--init", f"--init-lora {cfg.init} (with --stage joint)")
    got = run_config(cfg.init)
    check_run_config(got, cfg.init, setup)  # types, ranges and the file's shapes, before anything is built
    init_from = STAGES[cfg.stage].init_from
    if got.get("stage") not in init_from:
        raise ValueError(f"--init {cfg.init} is a {got.get('stage')!r} output; --stage {cfg.stage} starts from "
                         f"{' or '.join(init_from)}")
    if isinstance(got.get("semantic"), dict):  # a file from before a field existed: what it meant (from_dict)
        try:
            got["semantic"] = SemanticConfig.from_dict(got["semantic"]).to_dict()
        except TypeError:
            pass
    check_same_base(got, cfg.init, setup)  # the same base weights, whatever the base file is called now
    for key in ("scheme", "semantic"):
        if got.get(key) != want.get(key):
            raise ValueError(f"--init {cfg.init} has {key}={got.get(key)!r} but this run has {want.get(key)!r}")
    if cfg.stage != "base" and got.get("condition_cache", False) != cfg.condition_cache:
        trained = "with" if got.get("condition_cache", False) else "without"
        raise ValueError(f"--init {cfg.init} was trained {trained} --condition-cache, another model than this run's: "
                         f"{'pass' if trained == 'with' else 'drop'} --condition-cache")
    if got.get("lora_rank") and want.get("lora_rank"):
        for key, flag in (("lora_rank", "--lora-rank"), ("lora_alpha", "--lora-alpha")):
            if got.get(key) != want[key]:
                raise ValueError(f"--init {cfg.init} has {key}={got.get(key)!r} but this run asks for {flag} "
                                 f"{want[key]!r}")
    return got


def check_init_lora(cfg: TrainConfig, setup: Setup, got: dict | None):
    """--init-lora, before any work: the file read and checked against the base (extras.lora_formats.read_lora, on
    the meta device) and against the joint stage's LoRA: the same rank (--lora-rank) and alpha (--lora-alpha: the
    run records one alpha, and a flag given is never overridden by a file), only layers the stage puts LoRA on, and
    no second LoRA from the --init (`got`, its run config). Returns the LoraFile, None without --init-lora."""
    if not cfg.init_lora:
        return None
    flag = f"--init-lora {cfg.init_lora}"
    if cfg.stage != "joint":
        raise ValueError(f"{flag}: starts the joint stage's LoRA; this is --stage {cfg.stage}")
    if got is not None and got.get("lora_rank"):
        raise ValueError(f"{flag}: --init {cfg.init} holds a LoRA already (a {got.get('stage')} output): start from "
                         "one of them (an --init from warmup gives the semantic modules, --init-lora the LoRA)")
    if not Path(cfg.init_lora).is_file():
        raise ValueError(f"{flag}: no such file")
    if "config" in read_header(cfg.init_lora)[1]:
        raise ValueError(f"{flag}: a train.py output, not a LoRA file: a run starts from it with --init")
    from extras.lora_formats import read_lora
    from lora import DEFAULT_TARGETS
    with torch.device("meta"):
        base = Flux(PRESETS[setup.preset])
    lora = read_lora(base, cfg.init_lora)  # every key checked against the base's layers
    ranks = sorted({A.shape[0] for A, _, _ in lora.entries.values()})
    if len(ranks) > 1:
        raise ValueError(f"{flag}: its layers have ranks {', '.join(map(str, ranks))} (a diffusers file whose q, k, v "
                         "have their own A's adds them up on the fused layer); the joint stage has one --lora-rank")
    if ranks[0] != cfg.lora_rank:
        raise ValueError(f"{flag}: its LoRA has rank {ranks[0]} but this run has --lora-rank {cfg.lora_rank}: pass "
                         f"--lora-rank {ranks[0]}")
    alphas = sorted({alpha for _, _, alpha in lora.entries.values()})
    if len(alphas) > 1:
        raise ValueError(f"{flag}: its layers have alphas {', '.join(f'{a:g}' for a in alphas)}; the joint stage has "
                         "one --lora-alpha")
    if not math.isclose(alphas[0], cfg.lora_alpha, rel_tol=1e-6):
        raise ValueError(f"{flag}: its LoRA has alpha {alphas[0]:g} but this run has --lora-alpha "
                         f"{cfg.lora_alpha:g}: pass --lora-alpha {alphas[0]:g}")
    outside = [n for n in lora.entries if not any(re.fullmatch(t, n) for t in DEFAULT_TARGETS)]
    if outside:
        raise ValueError(f"{flag}: it trains {len(outside)} layers the joint stage puts no LoRA on (e.g. "
                         f"{outside[0]}): the stage's LoRA covers the attention, MLP and single-block linears")
    return lora


# ----------------------------------------------------------------------------------------------------------------
# Data: encoded once, cached on disk


def dataset_for(cfg: TrainConfig, setup: Setup, master: bool) -> data.PairedDataset:
    """--data (default: the synthetic set, generated on first use) at --size. The master says in one line what the
    sizing crops, and in one line the buckets when the pairs are served at several sizes."""
    root = Path(cfg.data) if cfg.data else ROOT / "data" / "synth"
    if not cfg.data and not root.is_dir():
        if setup.kind != "demo":
            raise ValueError("pass --data DIR (rgb/, sem/, ir/): the synthetic set is for the tiny demo")
        if master:
            from tools.synth import TRAIN_SET, ensure_set
            ensure_set(root, TRAIN_SET, cfg.progress)
        if dist.is_initialized():
            dist.barrier()
    ds = data.PairedDataset(root, size=cfg.size or None)
    if len(ds) == 0:
        raise ValueError(f"{root}: empty dataset")
    if master and len(ds.buckets()) > 1:
        print(f"{root}: {len(ds)} pairs in {len(ds.buckets())} buckets, each batch from one (drawn in proportion to "
              f"its pairs): {ds.describe_buckets()}")
    if master and ds.crop_note():
        print(f"note: {root}: {ds.crop_note()}")
    return ds


def encode_latents(cfg: TrainConfig, setup: Setup, ds: data.PairedDataset, device, dtype, master: bool):
    """(latents, ae): the dataset's latent tokens, one dict per bucket of pairs served at one size
    (latents.encode_dataset; --sem-jitter adds misaligned copies of every map to each, the same for every run on
    this data) and the autoencoder, its encoder freed (the decoder stays for the sample grids)."""
    ae = load_ae(setup.ae, device=device, dtype=dtype)
    latents = encode_dataset(ds, ae, setup.ae, cfg.overlay_alpha, device, dtype, master, cfg.progress)
    if cfg.sem_jitter:
        jittered = encode_jittered(latents, ds.classes, ae, tokens_path(ds, setup.ae, cfg.overlay_alpha),
                                   cfg.sem_jitter, device, dtype, master=master, progress=cfg.progress)
        for bucket, copies in zip(latents, jittered):
            bucket["jittered"] = copies
    del ae.encoder
    return latents, ae


# ----------------------------------------------------------------------------------------------------------------
# The model and what trains in each stage


def build(cfg: TrainConfig, setup: Setup, want: dict, device, dtype, init_lora=None) -> Flux:
    """The one build step (nanoGPT's init_from): the base stage fine-tunes the whole transformer (the tiny demo's
    from scratch, or from --init); every other stage is the frozen base in `dtype` + this stage's modules in fp32
    (bf16 autocast computes in bf16), then the previous stage's weights (a warmup output has no LoRA keys: its
    LoRA starts at zero, i.e. the identity), then `init_lora` (--init-lora, checked by check_init_lora): its layers'
    A and B (same rank and alpha); the layers it does not cover start at zero."""
    if cfg.stage == "base":
        if setup.kind == "demo" and not cfg.init:
            return Flux(PRESETS["tiny"]).to(device)
        from extras.checkpoint_forms import load_flux
        return load_flux(cfg.init or setup.flux, setup.preset, device=device, dtype=torch.float32)
    model = build_model(setup, want, device, dtype, modules_dtype=torch.float32, base_dtype=cfg.base_dtype)
    if cfg.init:
        load_trained(model, cfg.init, want, lora_optional=True)
    if init_lora is not None:
        from lora import lora_modules
        mods = lora_modules(model)
        with torch.no_grad():
            for name, (A, B, _) in init_lora.entries.items():
                mods[name].lora_A.weight.copy_(A)  # [r, in]
                mods[name].lora_B.weight.copy_(B)  # [out, r]
    return model


def select_trainable(model: Flux, stage: str) -> list[tuple[str, torch.nn.Parameter]]:
    """warmup: semantic modules; joint: semantic + LoRA; finetune: the strength scales/gates; base: everything.
    Everything else gets requires_grad=False and stays out of the optimiser."""
    model.requires_grad_(False)
    trains = STAGES[stage].trains
    strengths = {id(p) for p in model.semantic.strength_parameters()} if model.semantic is not None else set()
    chosen = {"everything": lambda n, p: True, "semantic": lambda n, p: n.startswith("semantic."),
              "semantic+lora": lambda n, p: is_trained_key(n), "strengths": lambda n, p: id(p) in strengths}[trains]
    params = [(n, p) for n, p in model.named_parameters() if chosen(n, p)]
    for _, p in params:
        p.requires_grad_(True)
    return params


def describe(cfg: TrainConfig, model: Flux, n_train: int, tensors: int, latents: list[dict], world: int) -> None:
    """What trains, of how much, on what (the master prints it)."""
    N = sum(len(b["ir"]) for b in latents)
    tokens = " or ".join(str(L) for L in sorted({b["ir"].shape[1] for b in latents}))  # [N_b, L_b, 64] each
    print(f"stage {cfg.stage}, scheme {cfg.scheme}: {n_train:,} trainable of "
          f"{sum(p.numel() for p in model.parameters()):,} parameters ({tensors} tensors); {N} training pairs of "
          f"{tokens} tokens")
    if cfg.fsdp and world == 1:
        print("note: --fsdp in one process has nothing to shard: training as a single process (start it with "
              "torchrun --nproc_per_node N to shard)")


def make_optimizer(cfg: TrainConfig, model: Flux, trainable) -> torch.optim.AdamW:
    """AdamW on the trainable weights. Adam moves a parameter by about lr per step whatever its gradient, so a scalar
    gate that starts at 0 reaches at most steps * lr: at lr 1e-4 a 1000-step warmup could never open it against
    hidden states of magnitude ~10. The strength scalars (scheme A/B/C) therefore get a larger learning rate (but
    in finetune, where they are all that trains)."""
    strengths = {id(p) for p in model.semantic.strength_parameters()} if model.semantic is not None else set()
    mult = 1.0 if STAGES[cfg.stage].trains == "strengths" else cfg.strength_lr_mult
    groups = [{"params": [p for _, p in trainable if id(p) not in strengths], "lr_mult": 1.0},
              {"params": [p for _, p in trainable if id(p) in strengths], "lr_mult": mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(0.9, 0.999))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def forward_module(model: Flux, cfg: TrainConfig, device, ddp: bool):
    """(net, fwd): what computes the velocity, and what the loss calls. net is the model, inside the condition
    cache under --condition-cache (extras/condition_cache.py); fwd is net, inside DDP when several processes
    replicate it (DDP synchronises only the trainable weights; the frozen base is the same everywhere), compiled
    under --compile. Sampling and the finite-loss check call net."""
    net = model
    if cfg.condition_cache:
        from extras.condition_cache import ConditionCache
        net = ConditionCache(model)
    fwd = net
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(net, device_ids=[device] if device.type == "cuda" else None, init_sync=False)
    if cfg.compile:
        fwd = torch.compile(fwd)
    return net, fwd


# ----------------------------------------------------------------------------------------------------------------
# One batch


def condition(model: Flux, cfg: TrainConfig, latents: dict, idx: Tensor, text: tuple, device, dtype,
              variant: Tensor | None = None):
    """The flow.Condition of the pairs `idx` of one bucket's `latents`: their RGB (overlay: blended) latent tokens on
    the bucket's token grid, semantic input (`variant`: each map's misaligned copy, --sem-jitter) and the prompt."""
    H, W = latents["sem_ids"].shape[-2:]
    image = latents["overlay" if cfg.scheme == "overlay" else "rgb"][idx].to(device).to(dtype)
    semcfg = model.semantic.config if model.semantic is not None else None
    sem_in = semantic_batch(latents, idx, semcfg, device, variant)
    return make_condition(image, None if sem_in is None else sem_in.to(dtype), text, H // 16, W // 16)


def get_batch(model: Flux, cfg: TrainConfig, latents: list[dict], text: tuple, g: torch.Generator, rank: int,
              world: int, device, dtype):
    """(x0, noise, t, cond, guidance): flow_loss's arguments for this process's part of one global batch. The
    global batch is drawn identically on every rank from the one generator `g`; each rank takes its slice. It comes
    from one bucket (pairs served at one size, data.draw_bucket); its pairs are drawn with replacement, so a bucket
    smaller than the batch serves it too."""
    n, part = cfg.batch_size * world, slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    bucket = latents[data.draw_bucket([len(b["ir"]) for b in latents], g)]
    N, L, _ = bucket["ir"].shape  # [N_b, L_b, 64] tokens
    idx = torch.randint(N, (n,), generator=g)[part]
    x0 = bucket["ir"][idx].to(device)  # [B, L, 64]
    variant = None  # --sem-jitter: one of the misaligned copies of each map
    if cfg.sem_jitter:
        variant = torch.randint(len(bucket["jittered"]["sem"]), (n,), generator=g)[part]
    cond = condition(model, cfg, bucket, idx, text, device, dtype, variant)
    t = sample_t(n, g, cfg.t_sampling, cfg.logit_mean, cfg.logit_std, L)[part].to(device)
    noise = torch.randn((n, L, 64), generator=g)[part].to(device)
    if cfg.sem_drop:  # these samples train the prediction without the semantic input
        cond.sem_strength = (torch.rand(n, generator=g)[part] >= cfg.sem_drop).to(device)
    guidance = torch.full((len(idx),), cfg.guidance, device=device) if model.params.guidance_embed else None
    return x0, noise, t, cond, guidance


# ----------------------------------------------------------------------------------------------------------------
# Outputs: the log, the weights, the resume state, the sample grids


def run_files() -> tuple[str, ...]:
    """What a run leaves in --out (with the LoRA exports, extras/lora_formats.py; two folders: the numbered
    checkpoints and the TensorBoard events)."""
    from extras.lora_formats import EXPORTS
    return ("resume.pt", "latest.safetensors", "final.safetensors", "log.jsonl", "checkpoints", "tb") + \
        tuple(EXPORTS.values())


class Log:
    """The master's log.jsonl: every --log-every steps the loss, lr, steps/s and the mean loss in 10 bins of t (the
    bins gather the losses of every micro-step in between; they are part of the resume state); at each validation a
    line of its own with the scores (val_psnr, val_ssim, val_miss, val_decoy, ...). With `tb` (--tensorboard) the
    same numbers and the validation grids also go to TensorBoard event files in that folder."""

    def __init__(self, path: Path | None, step: int, bins: list | None = None, tb: Path | None = None):
        self.file = open(path, "a") if path is not None else None
        self.bins = bins or [[0.0, 0] for _ in range(10)]
        self.t0, self.step = time.time(), step
        self.tb = None
        if tb is not None:
            from torch.utils.tensorboard import SummaryWriter  # the tensorboard package (check_logging)
            # a resumed run: the events an earlier process wrote after its resume state (past `step`) go
            self.tb = SummaryWriter(str(tb), purge_step=step + 1 if step else None)

    def add(self, t: Tensor, per_sample: Tensor):
        for ti, li in zip(t.tolist(), per_sample.tolist()):
            self.bins[min(9, int(ti * 10))][0] += li
            self.bins[min(9, int(ti * 10))][1] += 1

    def write(self, step: int, loss: float, lr: float) -> float:
        """One line; returns steps/s since the last line."""
        sps = (step - self.step) / max(time.time() - self.t0, 1e-9)
        self.t0, self.step = time.time(), step
        bins = [round(s / n, 5) if n else None for s, n in self.bins]
        self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "steps_per_s": sps, "loss_by_t": bins})
                        + "\n")
        self.file.flush()
        self.bins = [[0.0, 0] for _ in range(10)]
        if self.tb is not None:
            for name, value in (("loss", loss), ("lr", lr), ("steps_per_s", sps)):
                self.tb.add_scalar(f"train/{name}", value, step)
        return sps

    def validation(self, step: int, scores: dict, image, seconds: float):
        """The validation's line (scores: name -> number, None where undefined) and grid (a PIL image); the time it
        took does not count against the training's steps/s."""
        self.file.write(json.dumps({"step": step, **scores}) + "\n")
        self.file.flush()
        self.t0 += seconds
        if self.tb is not None:
            for name, value in scores.items():
                if value is not None and name != "val_pairs":
                    self.tb.add_scalar(f"val/{name.removeprefix('val_')}", value, step)
            self.tb.add_image("val/grid", np.asarray(image), step, dataformats="HWC")  # [H, W, 3] uint8
            self.tb.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def export(final: Path, cfg: TrainConfig, n_train: int) -> None:
    """Says what was written; a LoRA stage's LoRA part is also written in the layouts ComfyUI / kohya and diffusers
    load, in --lora-export-dtype, with a model card README.md (extras/lora_formats.py)."""
    print(f"wrote {final} ({'the full transformer' if cfg.stage == 'base' else f'{n_train:,} trained parameters'})")
    if cfg.stage in LORA_STAGES:
        from extras.lora_formats import export_if_lora
        for path in export_if_lora(final, dtype=cfg.lora_export_dtype):
            print(f"wrote {path}")


def gathered(sd: dict, fsdp: bool) -> dict:
    """`sd` with every shard gathered into its full tensor under --fsdp (a collective: every rank calls it)."""
    if not fsdp:
        return sd
    from extras.fsdp import full_tensors
    return full_tensors(sd)


def write_weights(path: Path, model: Flux, stage: str, meta: dict, write: bool = True, fsdp: bool = False):
    """Only what the stage adds to the base (semantic + LoRA); the base stage writes the whole transformer.
    Under --fsdp every rank calls it (the shards are gathered into full tensors) and only `write` writes."""
    sd = model.state_dict()
    if stage != "base":
        sd = {k: v for k, v in sd.items() if is_trained_key(k)}
    sd = gathered(sd, fsdp)
    if write:
        save_atomic(sd, path, meta)


# settings a resumed run may change: they do not change what is computed (--steps is checked on its own)
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "log_every", "sample_every", "sample_steps", "ckpt_every",
                     "device", "compile", "gradient_checkpointing", "fsdp", "steps", "lora_export_dtype", "val_data",
                     "val_count", "keep_last", "tensorboard")


def dataset_record(ds: data.PairedDataset) -> dict:
    """What a resumed run must find again: the content of the pairs (data.PairedDataset.fingerprint, which covers
    --size and the sizes it serves), their count, the class palette and the buckets."""
    return {"fingerprint": ds.fingerprint(), "pairs": len(ds), "classes": [asdict(c) for c in ds.classes],
            "root": str(ds.root), "buckets": [list(shape) for shape in ds.buckets()]}


def dataset_changes(was: dict, now: dict) -> str:
    """How the dataset differs from the one a run started on, in words ("" if it does not)."""
    if was.get("fingerprint") == now["fingerprint"]:
        return ""
    what = []
    if was.get("pairs") != now["pairs"]:
        what.append(f"{was.get('pairs')} -> {now['pairs']} pairs")
    if json.dumps(was.get("classes")) != json.dumps(now["classes"]):  # as recorded: colours as lists
        what.append("the class palette (classes.json) differs")
    if was.get("buckets", now["buckets"]) != now["buckets"]:  # [w, h] of each bucket
        was_at, now_at = (", ".join(f"{w}x{h}" for w, h in rows) for rows in (was["buckets"], now["buckets"]))
        what.append(f"served at {was_at}, now at {now_at}")
    return "; ".join(what) or "the content of its files (or the sizes --size serves them at) changed"


def save_resume(path: Path, trainable, opt, step: int, g: torch.Generator, t_bins, cfg: TrainConfig, dataset: dict,
                write: bool = True, fsdp: bool = False):
    """The trainable weights, optimiser, generator, step, loss bins, the run's settings and its dataset (a
    dataset_record) (checkpoint.save_state).
    Under --fsdp every rank calls it (the shards are gathered into full tensors) and only `write` writes."""
    weights, opt_state = gathered(dict(trainable), fsdp), opt
    if fsdp:
        from extras.fsdp import GatheredOptimizer, full_optimizer_state
        opt_state = GatheredOptimizer(full_optimizer_state(opt))
    if write:
        save_state(path, step, weights, opt_state, g, settings(cfg), t_bins=t_bins, dataset=json.dumps(dataset))


def load_resume(out: Path, trainable, opt, g: torch.Generator, cfg: TrainConfig, dataset: dict, fsdp: bool = False,
                master: bool = True) -> tuple[int, list, dict]:
    """save_resume's state (out/resume.pt) back into the trainable weights, the optimiser and the generator: (step,
    loss bins, the overrides allowed: a longer --steps, recorded). A change of any other setting, or of the dataset
    (`dataset`, a dataset_record), is refused; a setting the state does not record (added to train.py since) counts
    as unchanged while it keeps its default. The log loses its lines past that step (written after the state: no
    duplicate steps)."""
    path = out / "resume.pt"
    state = load_state(path, [n for n, _ in trainable], extra=("t_bins",))
    was, now = state["settings"], settings(cfg)
    # a setting added to train.py after the state was written (e.g. --init-lora): its default is what that run did
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    was = {k: v for k, v in now.items() if k not in was and k in defaults and v == defaults[k]} | was
    if changed := changed_settings(was, now, RESUME_MAY_CHANGE):
        raise ValueError(f"--resume with other settings than {path} was written with: {', '.join(changed)}; resume "
                         "with the run's own settings, or start a new run (--overwrite or another --out)")
    if "dataset" not in state:
        print(f"note: {path} does not record its dataset (written by an older version): the data is not compared")
    elif changes := dataset_changes(json.loads(state["dataset"]), dataset):
        raise ValueError(f"--resume: the dataset {dataset['root']} changed since this run started ({changes}); resume "
                         "on the same data, or start a new run (--overwrite or another --out)")
    overrides = {}
    if now["steps"] != was["steps"]:
        if now["steps"] < state["step"]:
            raise ValueError(f"--steps {now['steps']}: {path} is already at step {state['step']}")
        print(f"note: --steps {was['steps']} -> {now['steps']}: the learning-rate schedule follows the new length "
              f"from step {state['step']} on (recorded in the outputs' metadata)")
        overrides = {"steps": [was["steps"], now["steps"]], "at_step": state["step"]}
    weights, opt_state = state["weights"], state["optimizer"]
    if fsdp:  # this rank's shard of every full tensor
        from extras.fsdp import like, shard_optimizer_state
        weights = {n: like(p, weights[n]) for n, p in trainable}
        opt_state = shard_optimizer_state(opt, opt_state)
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(weights[n])
    opt.load_state_dict(opt_state)
    g.set_state(state["rng"])
    if master:
        trim_log(out / "log.jsonl", state["step"])
        print(f"resumed from {path} at step {state['step']}")
    return state["step"], state["t_bins"], overrides


@torch.no_grad()
def gives_finite_loss(net, batch: tuple, mixed: bool) -> bool:
    """The weights as they are now, on the last batch: finite loss? (A huge but finite weight can give NaN.)"""
    x0, noise, t, cond, guidance = batch
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=mixed):
        return bool(torch.isfinite(flow_loss(net, x0, noise, t, cond, guidance)).all())


def interrupted(stopper: Stopper, step: int | None, world: int, master: bool) -> int:
    """A signal before the loop (nothing of this run is kept), or a second one in it (the last checkpoint is kept):
    one line, no traceback; the exit status 128 + signal."""
    if master:
        if stopper.at_once:
            print(f"\nstopped by signal {stopper.signal} before training began: this run wrote nothing; run the "
                  "command again to start it", file=sys.stderr)
        else:
            print(f"\nstopped at once by a second signal at step {step}: continue from the last checkpoint with "
                  f"`{resume_command('train.py', world)}`", file=sys.stderr)
    return 128 + (stopper.signal or signal.SIGINT)


def stopped(stopper: Stopper, step: int, world: int, master: bool) -> int:
    """After a signal (here, or on another rank): the resume command on stdout; the exit status 128 + signal."""
    if master:
        print(f"\nstopped by signal {stopper.signal or 'on another rank'} at step {step}; resume with "
              f"`{resume_command('train.py', world)}`")
    return 128 + (stopper.signal or signal.SIGTERM)


def diverged(what: str, good: Path | None) -> int:
    """One line on stderr naming the last good weights; the run's exit status 1."""
    where = f"the last good weights are {good}" if good else "no checkpoint was written yet"
    print(f"error: {what}; stopping ({where}; lower --lr?)", file=sys.stderr)
    return 1


@torch.no_grad()
def sample_grid(model: Flux, net, ae: AutoEncoder, setup: Setup, cfg: TrainConfig, latents: dict, text: tuple,
                device, dtype, path: Path, write: bool = True) -> Path:
    """RGB | semantic | target | prediction for the first 4 training pairs of one bucket's `latents` (the run passes
    the first bucket), sampled with the current weights (net) from the cached latents (the VAE encoder is not
    needed). Under --fsdp every rank runs the sampling (its forward passes gather the shards) and only `write` draws
    and writes the grid."""
    idx = torch.arange(min(4, len(latents["ir"])))
    B, (H, W) = len(idx), latents["sem_ids"].shape[-2:]
    cond = condition(model, cfg, latents, idx, text, device, dtype)
    was_training = net.training
    net.eval()
    x = pack(get_noise(B, H, W, seed=0, device=device, dtype=dtype))
    # as the training step computes: the fp32 trainable modules under bf16 autocast meet a bf16 base
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
        x = denoise(net, x, cond, get_schedule(cfg.sample_steps, x.shape[1], shift=setup.preset != "schnell"),
                    setup.guidance if model.params.guidance_embed else None)  # the base's sampling guidance
    net.train(was_training)
    if not write:
        return path
    z = [unpack(t, H, W) for t in (x, latents["rgb"][idx].to(device, dtype), latents["ir"][idx].to(device, dtype))]
    pred, rgb, target = (ae.decode(zi).float().clamp(-1, 1) for zi in z)  # [B, 16, H/8, W/8] -> [B, 3, H, W]
    pred, target = data.rgb_to_ir(pred), data.rgb_to_ir(target)  # [B, 1, H, W]
    sem = latents["sem_pixels"][idx].float() / 127.5 - 1
    rows = [[to_pil_rgb(rgb[i]), to_pil_rgb(sem[i]), to_pil_gray(target[i]), to_pil_gray(pred[i])] for i in range(B)]
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, ["RGB", "semantic", "target", "prediction"]).save(path)
    return path


@dataclass
class Validation:
    """--val-data: the held-out pairs sampled wherever a grid is, and a Pipeline over the model being trained with an
    autoencoder of its own (the loop's has no encoder), so they are sampled as sample.py and tools.eval sample."""
    ds: data.PairedDataset  # the held-out folder: its classes give the hot and the decoy classes
    items: list[dict]  # its first --val-count pairs: "rgb", "sem" [3, H, W] in [-1, 1], "ir" [1, H, W], "sem_ids"
    pipe: Pipeline


def validation_set(cfg: TrainConfig, setup: Setup, ds: data.PairedDataset, model: Flux, want: dict, text: tuple,
                   device, dtype, master: bool) -> Validation | None:
    """--val-data read as the training data is read (dataset_for), with the training data's palette (a colour must
    mean what the model learned it means); None without --val-data."""
    if not cfg.val_data:
        return None
    held_out = dataset_for(dataclasses.replace(cfg, data=cfg.val_data), setup, master)
    if held_out.classes != ds.classes:
        raise ValueError(f"--val-data {cfg.val_data}: its classes differ from those of the training data {ds.root} "
                         "(classes.json): the held-out pairs must use the same palette")
    ae = load_ae(setup.ae, device=device, dtype=dtype).eval().requires_grad_(False)
    guidance = setup.guidance if model.params.guidance_embed else None  # the base's sampling guidance
    pipe = Pipeline(setup, model, ae, want, guidance, cfg.prompt, device, dtype, condition_cache=cfg.condition_cache,
                    text=text)
    return Validation(held_out, [held_out[i] for i in range(min(cfg.val_count, len(held_out)))], pipe)


@torch.no_grad()
def validate(val: Validation, net, cfg: TrainConfig, step: int, out: Path, log: Log, write: bool = True) -> None:
    """Sample the validation pairs with the current weights as tools.eval does (pipeline.generate: pair i from seed
    i, --sample-steps Euler steps, the sampling settings the outputs record), in batches of one size; then, where
    `write` (the master), score them with tools.eval's own scoring (tools/metrics.py's formulas), draw RGB |
    semantic | ground truth | prediction into OUT/samples/val_step_N.png, log the scores and print one line. Under
    --fsdp every rank samples (the forward passes gather the shards)."""
    start, was_training = time.time(), net.training
    net.eval()
    preds = {}
    for members in val.ds.buckets().values():  # pairs of one size
        same = [i for i in members if i < len(val.items)]
        for k in range(0, len(same), cfg.batch_size):
            idx = same[k:k + cfg.batch_size]
            rgb, sem = (torch.stack([val.items[i][key] for i in idx]) for key in ("rgb", "sem"))  # [b, 3, H, W]
            with torch.autocast(val.pipe.device.type, dtype=torch.bfloat16, enabled=val.pipe.dtype != torch.float32):
                ir = generate(val.pipe, rgb, sem, steps=cfg.sample_steps, seed=idx,
                              sem_strength=SAMPLING_DEFAULTS["sem_strength"],
                              sem_guidance=SAMPLING_DEFAULTS["sem_guidance"])  # [b, 1, H, W] in [0, 1]
            preds |= dict(zip(idx, ir.float().cpu()))
    net.train(was_training)
    if not write:
        return
    from tools.eval import score
    pairs = [(item, preds[i]) for i, item in enumerate(val.items)]
    s = score(val.ds, pairs)  # metrics.summarize: the hot classes, and the decoys (tools.eval.DECOY_NAMES) it has
    numbers = {"val_psnr": s["psnr"], "val_ssim": s["ssim"], "val_miss": s["all"]["miss_rate"],
               "val_decoy": s["decoy"]["hallucination_rate"], "val_hallucination": s["all"]["hallucination_rate"]}
    scores = {k: v if math.isfinite(v) else None for k, v in numbers.items()}  # a rate over no region: NaN -> null
    scores["val_pairs"] = len(pairs)
    rows = [[to_pil_rgb(item["rgb"]), to_pil_rgb(item["sem"]), to_pil_gray(item["ir"]), to_pil_gray(pred)]
            for item, pred in pairs]
    image = grid(rows, ["RGB", "semantic", "ground truth", "prediction"])
    path = out / "samples" / f"val_step_{step:06d}.png"
    save_image(image, path)
    log.validation(step, scores, image, time.time() - start)
    def rate(n, d):
        return f"{100 * n / d:.1f}% ({n}/{d})" if d else "n/a (0/0)"
    tqdm.write(f"step {step}: validation on {len(pairs)} pairs of {val.ds.root}: PSNR {s['psnr']:.2f} dB, SSIM "
               f"{s['ssim']:.4f}, miss {rate(s['all']['missed'], s['all']['gt_hot'])}, decoy hallucination "
               f"{rate(s['decoy']['hallucinated'], s['decoy']['gt_cold'])} ({path})")


# ----------------------------------------------------------------------------------------------------------------
# The processes of a torchrun (it sets RANK / WORLD_SIZE / LOCAL_RANK)


def init_distributed(cfg: TrainConfig):
    """(rank, world size, device); under torchrun the process group is started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device:
        device = resolve_device(cfg.device)  # a device that exists here, or one line naming --device
    else:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return rank, world, device


def shard(model: Flux, device) -> list[tuple[str, torch.nn.Parameter]]:
    """--fsdp under torchrun (extras/fsdp.py), in place: the parameters become new ones (DTensor shards), so what
    trains is taken again and returned."""
    from extras.fsdp import shard as fully_shard
    fully_shard(model, device)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grad_sync(fwd, ddp: bool, last: bool):
    """DDP all-reduces the gradients once, at the last micro-step of --grad-accum (no_sync before it); FSDP
    reduce-scatters every micro-step's."""
    return fwd.no_sync() if ddp and not last else nullcontext()


def on_any_rank(flag: bool, world: int, device) -> bool:
    """True on every rank when `flag` is true on one (a signal on any rank stops every rank at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def on_every_rank(flag: bool, world: int, device) -> bool:
    """True when `flag` is true on every rank (the weights give a finite loss everywhere)."""
    return not on_any_rank(not flag, world, device)


# ----------------------------------------------------------------------------------------------------------------


def run(cfg: TrainConfig) -> int:
    """Train one stage as `cfg` says; 0 when done, 1 on a non-finite loss, 128 + signal when stopped by one.
    Raises ValueError (data.DataError, checkpoint.CheckpointError) for bad input, before any work."""
    rank, world, device = init_distributed(cfg)
    master = rank == 0
    fsdp = cfg.fsdp and world > 1  # one process: nothing to shard, the run is the single-process one
    takes_part = master or fsdp  # in writing outputs: under FSDP every rank gathers the shards, the master writes
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    setup = find_setup()
    if master:
        print(setup.describe())
    cfg = resolve(cfg, setup)  # every flag left unset: the stage's or the scheme's value
    check_numbers(cfg)
    check_logging(cfg)
    cfg = memory_defaults(cfg, setup, device)  # the batch and checkpointing: given, the run's own, or planned
    want = stage_config(cfg, setup)  # the run config every output carries
    init_lora = check_init_lora(cfg, setup, check_config(cfg, setup, want))
    out = Path(cfg.out)
    lock = claim(out, run_files(), "final.safetensors", cfg.resume, cfg.overwrite, master, keep=(cfg.init,))
    use_cuda = device.type == "cuda"
    # base weights (fp8: its linear weights in float8, the rest in this); trainable weights stay fp32
    dtype = BASE_DTYPES.get(cfg.base_dtype) or (torch.bfloat16 if use_cuda else torch.float32)
    mixed = dtype != torch.float32  # a bf16 (or fp8) base: the fp32 trainable modules run under bf16 autocast
    if master:
        note_cpu_fp32(setup, device, cfg.base_dtype, dtype)
    # from here on the lock is held: every way out releases it, and --overwrite's earlier run is put back unless the
    # new run has written a checkpoint; a signal before the loop stops the command at once (Stopper)
    stopper, aside, step, log = Stopper(), None, None, None
    try:
        # ---- latents (VAE encoder used once, then freed), the prompt, the model, what trains, the optimiser
        ds = dataset_for(cfg, setup, master)
        want["classes"] = [asdict(c) for c in ds.classes]  # the palette: sampling reads label-id maps with it
        want["train_sizes"] = [list(shape) for shape in ds.buckets()]  # [w, h] per bucket: sampling notes a far size
        latents, ae = encode_latents(cfg, setup, ds, device, dtype, master)
        text = text_condition(setup, PRESETS[setup.preset], 1, cfg.prompt, device, dtype)  # (txt, txt_ids, y), B 1
        model = build(cfg, setup, want, device, dtype, init_lora)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        trainable = select_trainable(model, cfg.stage)
        if not trainable:
            raise ValueError(f"nothing to train in stage {cfg.stage} with scheme {cfg.scheme}")
        n_train = sum(p.numel() for _, p in trainable)
        if master:
            describe(cfg, model, n_train, len(trainable), latents, world)
            if init_lora is not None:
                print(f"the LoRA starts from {init_lora.describe()}")
                if init_lora.skipped:
                    print(init_lora.skip_note())
        if fsdp:
            trainable = shard(model, device)
        opt = make_optimizer(cfg, model, trainable)
        ddp = world > 1 and not fsdp
        net, fwd = forward_module(model, cfg, device, ddp)
        val = validation_set(cfg, setup, ds, model, want, text, device, dtype, master)  # None without --val-data

        # ---- state: one generator for data order, t and noise (identical on every rank), the step, the log
        g = torch.Generator().manual_seed(cfg.seed)
        dataset = dataset_record(ds)  # a resumed run must see the same pairs and palette
        step, t_bins, overrides = (load_resume(out, trainable, opt, g, cfg, dataset, fsdp, master) if cfg.resume
                                   else (0, None, {}))
        meta = {"config": json.dumps(want), "base": setup.flux.name, "ae": setup.ae.name,  # what every output carries
                "train_args": json.dumps(settings(cfg)),
                "sampling": json.dumps(SAMPLING_DEFAULTS)}  # the settings to sample it with (the LoRA exports say)
        if overrides:
            meta["resume_overrides"] = json.dumps(overrides)
        if master and cfg.overwrite:
            aside = set_aside(out, run_files())  # the earlier run: removed at this run's first checkpoint
        log, good = Log(out / "log.jsonl" if master else None, step, t_bins,
                        out / "tb" if master and cfg.tensorboard else None), None
        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.stage}/{cfg.scheme}",
                   disable=not (master and cfg.progress))
        stopper.at_once = False  # from here a signal stops the loop after the step, with a resume state
        fwd.train()
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_mult"]
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x0, noise, t, cond, guidance = get_batch(model, cfg, latents, text, g, rank, world, device, dtype)
                with grad_sync(fwd, ddp, last=micro == cfg.grad_accum - 1):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                        per_sample = flow_loss(fwd, x0, noise, t, cond, guidance)  # [B]
                    loss = per_sample.mean() / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.item()
                log.add(t, per_sample)  # the loss by t
            if not math.isfinite(loss_sum):
                return diverged(f"loss is {loss_sum} at step {step}", good)
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.grad_clip)
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", refresh=False)  # tqdm adds it/s
            bar.update(1)

            if master and (step % cfg.log_every == 0 or step == cfg.steps):
                log.write(step, loss_sum, lr)
            if takes_part and cfg.sample_every and step % cfg.sample_every == 0:
                if val is not None:  # the held-out pairs, sampled and scored
                    validate(val, net, cfg, step, out, log, write=master)
                else:  # a few training pairs
                    sample_grid(model, net, ae, setup, cfg, latents[0], text, device, dtype,
                                out / "samples" / f"step_{step:06d}.png", write=master)
            stop = on_any_rank(stopper.signal is not None, world, device)
            if step % cfg.ckpt_every == 0 or stop or step == cfg.steps:
                # only weights that still give a finite loss are ever written as good ones
                if not on_every_rank(gives_finite_loss(net, (x0, noise, t, cond, guidance), mixed), world, device):
                    return diverged(f"the weights after step {step} give a non-finite loss", good)
                if takes_part:
                    write_weights(out / "latest.safetensors", model, cfg.stage, meta, master, fsdp)
                    if master and step % cfg.ckpt_every == 0:  # + checkpoints/step_N, the newest --keep-last kept
                        write_numbered(out / "latest.safetensors", out / "checkpoints", step, cfg.keep_last)
                    save_resume(out / "resume.pt", trainable, opt, step, g, log.bins, cfg, dataset, master, fsdp)
                    good = out / "latest.safetensors"
                settle(aside)  # this run has a checkpoint: the run it replaces goes
                aside = None
            if stop:
                return stopped(stopper, step, world, master)
        bar.close()

        # ---- the trained weights (+ the LoRA exports), a sample grid
        final = out / "final.safetensors"
        if takes_part:
            write_weights(final, model, cfg.stage, meta, master, fsdp)
        if master:
            export(final, cfg, n_train)
        if takes_part and cfg.sample_every == 0 and cfg.sample_steps > 0:  # at the end only
            if val is not None:
                validate(val, net, cfg, step, out, log, write=master)
            else:
                path = sample_grid(model, net, ae, setup, cfg, latents[0], text, device, dtype,
                                   out / "samples" / f"step_{step:06d}.png", write=master)
                if master:
                    print(f"wrote {path}")
        if world > 1:
            dist.barrier()  # the ranks leave together: one that tears down while another still writes can abort
    except KeyboardInterrupt:  # a signal before the loop, or a second one in it
        return interrupted(stopper, step, world, master)
    finally:
        stopper.close()
        if log is not None:
            log.close()
        restore(aside, run_files())  # the new run ended before its first checkpoint: the earlier run comes back
        if lock is not None:
            lock.unlink(missing_ok=True)
        if world > 1:
            dist.destroy_process_group()
    return 0


@command
def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
