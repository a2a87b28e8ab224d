"""
Staged training of semantic-guided infrared generation on FLUX (rectified flow, Kontext-style conditioning).

    python train.py --stage warmup                       # backbone frozen: only the semantic modules learn
    python train.py --stage joint --init runs/warmup/final.safetensors      # + LoRA on the backbone
    python train.py --stage finetune --init runs/joint/final.safetensors    # only the strength scales/gates
    torchrun --nproc_per_node 8 train.py --stage joint ...                  # data parallel over GPUs
    python train.py --stage base --scheme none           # the tiny demo's RGB-conditioned base (weights/demo)

With no official FLUX checkpoint in weights/, everything runs on the tiny demo preset and synthetic scenes.
From Python: `train.run(TrainConfig(stage="joint", ...))` (eval.py's ablation does this).

One training step (the shapes for 512x512, dev sizes):
    x0 = pack(VAE(ir))            [B, 1024, 64]     (latents cached on disk once; the VAE encoder is then freed)
    x_cond = pack(VAE(rgb))       [B, 1024, 64]     (overlay baseline: VAE(blend(rgb, sem)))
    t ~ logit-normal;  noise ~ N(0, I);  x_t = (1 - t) x0 + t noise;  target v = noise - x0      (flow.py)
    v_pred = flux(cat(x_t, x_cond), kontext ids, txt, t, y, guidance, semantic=sem)[:, :1024]   (flow.velocity)
    loss = mean((v_pred - v)^2)
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

import data
from checkpoint import save_atomic
from flow import denoise, flow_loss, get_noise, get_schedule, make_condition, pack, sample_t, unpack
from extras.checkpoint_forms import load_flux
from flux_model import PRESETS, Flux
from pipeline import (DEFAULT_PROMPT, ROOT, SCHEMES, Setup, Stopper, base_condition_cache, build_model, command,
                      find_setup, is_trained_key, load_trained, resolve_device, run_config, text_condition)
from sem_cross_attn import (ATTENTION_FORMS, BASELINES, DEFAULT_B as SEM_DEFAULT_B, SCHEMES as MODULE_SCHEMES,
                            SemanticConfig)
from latents import encode_dataset, encode_jittered, semantic_batch, tokens_path
from run_state import changed_settings, claim, load_state, resume_command, save_state, trim_log
from tools.synth import TRAIN_SET, ensure_set
from extras.fp8 import BASE_DTYPES
from extras import fsdp as distributed
from extras.lora_formats import EXPORTS, export_if_lora
from vae import AutoEncoder, load_ae
from viz import grid, to_pil_gray, to_pil_rgb

STAGES = ("warmup", "joint", "finetune", "base")
SEM_DROP_JOINT = 0.1  # the joint stage's default condition dropout (--sem-drop), as ControlNet-style trainers use
# the default scheme B (sem_cross_attn.DEFAULT_B): the ablation's best quality per trainable parameter at dev size
# (README): decoupled attention on 64-dim semantic tokens, 22.8 M parameters at dev (the separate form: 2.16 B)
DEFAULT_B = {"sem_attention": SEM_DEFAULT_B.attention, "sem_token_dim": SEM_DEFAULT_B.token_dim}
# which earlier stage's output an --init may come from
INIT_FROM = {"warmup": ("warmup",), "joint": ("warmup", "joint"), "finetune": ("warmup", "joint", "finetune"),
             "base": ("base",)}
CHOICES = {"stage": STAGES, "scheme": SCHEMES, "t_sampling": ("logit_normal", "uniform", "shifted"),
           "sem_encoder": ("vae", "cnn"), "sem_attention": ("",) + ATTENTION_FORMS,
           "base_dtype": ("",) + tuple(BASE_DTYPES)}


def opt(default, help: str = " "):
    """A config field with its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    stage: str = opt("warmup", "warmup | joint | finetune (the design's stages); base (the tiny demo's base)")
    scheme: str = opt("xattn", "xattn (B) | zeroconv (A) | adapter (C) | overlay (pixel blend baseline) | none")
    data: str = opt("", "dataset folder (rgb/, sem/, ir/); default: the synthetic set, generated on first use")
    size: int = opt(0, "resize + centre-crop to SxS; 0 keeps the files' size (multiples of 16)")
    out: str = opt("", "default runs/<stage>")
    init: str = opt("", "the previous stage's output")
    resume: bool = opt(False, "continue from <out>/resume.pt")
    steps: int = opt(0, "0: the stage's default")
    batch_size: int = opt(8, "per process and micro-step")
    grad_accum: int = opt(1, "micro-steps per optimiser step")
    lr: float = opt(0.0, "0: the stage's default (FLUX.1 sizes: warmup 1e-4, joint 5e-5; the tiny demo: warmup 3e-3, "
                         "else 1e-3)")
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
    sem_encoder: str = opt("vae", "vae | cnn")
    sem_blocks: str = opt("all", "all | double | single | every:K")
    sem_heads: int = opt(0, "cross-attention heads; 0: the transformer's")
    sem_inner_dim: int = opt(0, "cross-attention width; 0: the transformer's hidden size (smaller saves parameters)")
    sem_attention: str = opt("", "scheme B's form: decoupled (new keys/values read by the block's own queries, "
                                 "IP-Adapter) | separate (its own cross-attention after each block); empty: "
                                 "decoupled for xattn (the README's ablation), separate otherwise")
    sem_token_dim: int = opt(-1, "semantic token width; 0: the transformer's hidden size (smaller: small K/V); -1: "
                                 f"{DEFAULT_B['sem_token_dim']} for the decoupled xattn, else 0")
    sem_shared_kv: bool = opt(False, "decoupled: one key/value projection shared by every block")
    sem_drop: float = opt(-1.0, "share of samples trained without the semantic input (the 'without' prediction "
                                "of semantic guidance at sampling); only the joint stage (it trains LoRA); -1: "
                                f"{SEM_DROP_JOINT} in joint with a semantic module, else 0")
    sem_jitter: int = opt(0, "augment: shift each semantic map by up to this many pixels and coarsen it by 1, 2 or "
                             "4 (nearest), as misregistered pairs and coarse segmenters give; 0: off")
    overlay_alpha: float = opt(0.5, "overlay baseline: weight of the semantic colours in the blend")
    condition_cache: bool = opt(False, "train the condition cache (OminiControl2 / EasyControl): the condition tokens "
                                       "get the modulation of t = 0 and attend only to themselves, so sampling "
                                       "computes their keys and values once per image (about half the work per "
                                       "step; another model than Kontext: a base trained with it needs it)")
    base_dtype: str = opt("", "how the frozen base is stored: fp8 (1 byte per linear weight, fp8.py) | bf16 | "
                              "fp32; empty: bf16 on a GPU, fp32 on the CPU")
    gradient_checkpointing: bool = opt(False, "recompute each block with its semantic module in backward "
                                              "(memory for compute)")
    compile: bool = opt(False, "torch.compile the model (opt-in)")
    fsdp: bool = opt(False, "under torchrun: shard weights, gradients and optimiser state over the processes "
                            "(FSDP2: one unit per transformer block with its semantic module) instead of "
                            "replicating them (DDP); one process: no effect")
    log_every: int = opt(10, "steps between log.jsonl lines")
    sample_every: int = opt(0, "steps between sample grids; 0: at the end only")
    sample_steps: int = opt(10, "Euler steps of the sample grids (0: no grids)")
    ckpt_every: int = opt(100, "steps between latest.safetensors + resume.pt")
    device: str = opt("", "default: cuda:LOCAL_RANK if available, else cpu")
    progress: bool = opt(True, "progress bar")
    overwrite: bool = opt(False, "start over in an --out that holds another run (its weights, resume state and log)")


STAGE_DEFAULTS = {  # steps, lr for FLUX.1-size models
    "warmup": (1000, 1e-4), "joint": (1000, 5e-5), "finetune": (200, 1e-3), "base": (4000, 3e-4),
}
# the tiny demo learns faster; warmup 3e-3: the default (decoupled) B after 1000 steps at batch 8 scores 22.5 dB on
# the held-out scenes where 1e-3 gives 21.0 (README)
DEMO_LR = {"warmup": 3e-3, "joint": 1e-3, "finetune": 1e-3, "base": 3e-4}


def parse_args(argv=None) -> TrainConfig:
    """One flag per TrainConfig field."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            ap.add_argument(name, type=f.type, default=f.default, choices=CHOICES.get(f.name), help=help)
    return TrainConfig(**vars(ap.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------
# Checks before any work


def stage_config(cfg: TrainConfig, setup: Setup) -> dict:
    """The self-description written into every output (pipeline.load_pipeline rebuilds the model from it)."""
    c = {"stage": cfg.stage, "scheme": cfg.scheme, "base_preset": setup.preset, "base_file": setup.flux.name,
         "prompt": cfg.prompt, "guidance": cfg.guidance, "overlay_alpha": cfg.overlay_alpha, "size": cfg.size,
         "condition_cache": cfg.condition_cache}
    if cfg.scheme in MODULE_SCHEMES:
        semantic = SemanticConfig(scheme=cfg.scheme, encoder=cfg.sem_encoder, blocks=cfg.sem_blocks,
                                  num_heads=cfg.sem_heads, inner_dim=cfg.sem_inner_dim, attention=cfg.sem_attention,
                                  token_dim=cfg.sem_token_dim, shared_kv=cfg.sem_shared_kv)
        p = PRESETS[setup.preset]
        try:
            semantic.validate(p.hidden_size, p.num_heads)
        except ValueError as e:
            raise ValueError(f"--scheme/--sem-encoder/--sem-blocks/--sem-heads/--sem-inner-dim/--sem-attention/"
                             f"--sem-token-dim/--sem-shared-kv: {e}") from None
        c["semantic"] = semantic.to_dict()
    if cfg.stage in ("joint", "finetune"):
        c["lora_rank"], c["lora_alpha"] = cfg.lora_rank, cfg.lora_alpha
    return c


def check_numbers(cfg: TrainConfig) -> None:
    """Every count positive, every rate finite and in range: one ValueError naming the flag."""
    for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
        if getattr(cfg, name) < 1:
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
    if cfg.stage in ("joint", "finetune") and cfg.lora_rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {cfg.lora_rank}")


def check_config(cfg: TrainConfig, setup: Setup, want: dict) -> dict | None:
    """Stage, scheme and --init agree (an --init comes from an earlier stage of the same scheme, base and module
    layout); returns the --init's run config. Raises ValueError naming the conflict."""
    if cfg.stage == "warmup" and cfg.scheme in BASELINES:
        raise ValueError(f"--stage warmup trains only semantic modules, and scheme {cfg.scheme!r} has none: "
                         "use --stage joint")
    if cfg.stage == "finetune" and cfg.scheme in BASELINES:
        raise ValueError(f"--stage finetune trains the semantic strengths, and scheme {cfg.scheme!r} has none")
    if cfg.stage == "base" and cfg.scheme != "none":
        raise ValueError("--stage base trains the RGB-conditioned base model: use --scheme none")
    if cfg.stage == "base" and cfg.base_dtype:
        raise ValueError("--base-dtype stores the frozen base; --stage base trains every weight (in fp32)")
    if cfg.sem_drop and (cfg.stage != "joint" or cfg.scheme in BASELINES):
        raise ValueError("--sem-drop trains the prediction without the semantic input, which only the LoRA can "
                         "learn: use it with --stage joint and a scheme with a module (in warmup the base is that "
                         "prediction already)")
    if cfg.fsdp and cfg.compile:
        raise ValueError("--fsdp with --compile: compiling the sharded model as a whole is not supported here; drop "
                         "one of them")
    if cfg.sem_jitter and cfg.scheme in BASELINES:
        raise ValueError(f"--sem-jitter moves the semantic input of a module; scheme {cfg.scheme!r} has none")
    if cfg.stage != "base" and base_condition_cache(setup) and not cfg.condition_cache:
        raise ValueError(f"the base {setup.flux} was trained with the condition cache: pass --condition-cache")
    if cfg.resume and not (Path(cfg.out) / "resume.pt").is_file():
        raise ValueError(f"--resume: no {Path(cfg.out) / 'resume.pt'} (was the run started with --out {cfg.out}?)")
    if not cfg.init:
        if cfg.stage == "finetune":
            raise ValueError("--stage finetune adjusts a trained model: pass --init runs/joint/final.safetensors")
        return None
    got = run_config(cfg.init)
    if got.get("stage") not in INIT_FROM[cfg.stage]:
        raise ValueError(f"--init {cfg.init} is a {got.get('stage')!r} output; --stage {cfg.stage} starts from "
                         f"{' or '.join(INIT_FROM[cfg.stage])}")
    if isinstance(got.get("semantic"), dict):  # a file from before a SemanticConfig field existed has its default
        try:
            got["semantic"] = SemanticConfig(**got["semantic"]).to_dict()
        except TypeError:
            pass
    for key in ("scheme", "base_preset", "semantic"):
        if got.get(key) != want.get(key):
            raise ValueError(f"--init {cfg.init} has {key}={got.get(key)!r} but this run has {want.get(key)!r}")
    if got.get("lora_rank") and want.get("lora_rank"):
        for key, flag in (("lora_rank", "--lora-rank"), ("lora_alpha", "--lora-alpha")):
            if got.get(key) != want[key]:
                raise ValueError(f"--init {cfg.init} has {key}={got.get(key)!r} but this run asks for {flag} "
                                 f"{want[key]!r}")
    return got


# ----------------------------------------------------------------------------------------------------------------
# Distributed (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)


def init_distributed(cfg: TrainConfig):
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


# ----------------------------------------------------------------------------------------------------------------
# Data: encoded once, cached on disk


def dataset_for(cfg: TrainConfig, setup: Setup, master: bool) -> data.PairedDataset:
    root = Path(cfg.data) if cfg.data else ROOT / "data" / "synth"
    if not cfg.data and not root.is_dir():
        if setup.kind != "demo":
            raise ValueError("pass --data DIR (rgb/, sem/, ir/): the synthetic set is for the tiny demo")
        if master:
            ensure_set(root, TRAIN_SET, cfg.progress)
        if dist.is_initialized():
            dist.barrier()
    ds = data.PairedDataset(root, size=cfg.size or None)
    if len(ds) == 0:
        raise ValueError(f"{root}: empty dataset")
    return ds


# ----------------------------------------------------------------------------------------------------------------
# The model and what trains in each stage


def build(cfg: TrainConfig, setup: Setup, want: dict, device, dtype) -> Flux:
    """The one build step (nanoGPT's init_from): the base stage fine-tunes the whole transformer (the tiny demo's
    from scratch, or from --init); every other stage is the frozen base in `dtype` + this stage's modules in fp32
    (bf16 autocast computes in bf16), then the previous stage's weights (a warmup output has no LoRA keys: its
    LoRA starts at zero, i.e. the identity)."""
    if cfg.stage == "base":
        if cfg.init:
            model = load_flux(cfg.init, setup.preset, device=device, dtype=torch.float32)
        elif setup.kind == "demo":
            model = Flux(PRESETS["tiny"]).to(device)
        else:
            model = load_flux(setup.flux, setup.preset, device=device, dtype=torch.float32)
        model.condition_cache = cfg.condition_cache
        return model
    model = build_model(setup, want, device, dtype, modules_dtype=torch.float32, base_dtype=cfg.base_dtype or None)
    if cfg.init:
        load_trained(model, cfg.init, want, lora_optional=True)
    return model


def select_trainable(model: Flux, stage: str) -> list[tuple[str, torch.nn.Parameter]]:
    """warmup: semantic modules; joint: semantic + LoRA; finetune: the strength scales/gates; base: everything.
    Everything else gets requires_grad=False and stays out of the optimiser."""
    model.requires_grad_(False)
    if stage == "base":
        names = {n for n, _ in model.named_parameters()}
    elif stage == "warmup":
        names = {n for n, _ in model.named_parameters() if n.startswith("semantic.")}
    elif stage == "joint":
        names = {n for n, _ in model.named_parameters() if is_trained_key(n)}
    elif stage == "finetune":
        strengths = {id(p) for p in model.semantic.strength_parameters()} if model.semantic is not None else set()
        names = {n for n, p in model.named_parameters() if id(p) in strengths}
    else:
        raise ValueError(stage)
    params = [(n, p) for n, p in model.named_parameters() if n in names]
    for _, p in params:
        p.requires_grad_(True)
    return params


def make_optimizer(cfg: TrainConfig, model: Flux, trainable) -> torch.optim.AdamW:
    """AdamW on the trainable weights. Adam moves a parameter by about lr per step whatever its gradient, so a scalar
    gate that starts at 0 reaches at most steps * lr: at lr 1e-4 a 1000-step warmup could never open it against
    hidden states of magnitude ~10. The strength scalars (scheme A/B/C) therefore get a larger learning rate."""
    strengths = {id(p) for p in model.semantic.strength_parameters()} if model.semantic is not None else set()
    mult = 1.0 if cfg.stage == "finetune" else cfg.strength_lr_mult
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


# ----------------------------------------------------------------------------------------------------------------
# Outputs


# what a run leaves in --out (the exports: lora_formats.export_if_lora)
RUN_FILES = ("resume.pt", "latest.safetensors", "final.safetensors", "log.jsonl") + tuple(EXPORTS.values())
# settings a resumed run may change: they do not change what is computed (--steps is checked on its own)
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "log_every", "sample_every", "sample_steps", "ckpt_every",
                     "device", "compile", "gradient_checkpointing", "fsdp", "steps")


def save_resume(path: Path, trainable, opt, step: int, g: torch.Generator, t_bins, cfg: TrainConfig,
                write: bool = True):
    """The trainable weights, optimiser, generator, step, loss bins and the run's settings (run_state.save_state).
    Under --fsdp every rank calls it (the shards are gathered into full tensors) and only `write` writes."""
    weights, opt_state = distributed.full_tensors(dict(trainable)), distributed.full_optimizer_state(opt)
    if write:
        save_state(path, step, weights, distributed.GatheredOptimizer(opt_state), g, asdict(cfg), t_bins=t_bins)


def load_resume(path: Path, trainable, opt, g: torch.Generator, cfg: TrainConfig) -> tuple[int, list, dict]:
    """save_resume's state back into the trainable weights, the optimiser and the generator: (step, loss bins, the
    overrides allowed: a longer --steps, recorded). A change of any other setting is refused."""
    state = load_state(path, [n for n, _ in trainable], extra=("t_bins",))
    was, now = state["settings"], asdict(cfg)
    if changed := changed_settings(was, now, RESUME_MAY_CHANGE):
        raise ValueError(f"--resume with other settings than {path} was written with: {', '.join(changed)}; resume "
                         "with the run's own settings, or start a new run (--overwrite or another --out)")
    overrides = {}
    if now["steps"] != was["steps"]:
        if now["steps"] < state["step"]:
            raise ValueError(f"--steps {now['steps']}: {path} is already at step {state['step']}")
        print(f"note: --steps {was['steps']} -> {now['steps']}: the learning-rate schedule follows the new length "
              f"from step {state['step']} on (recorded in the outputs' metadata)")
        overrides = {"steps": [was["steps"], now["steps"]], "at_step": state["step"]}
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(distributed.like(p, state["weights"][n]))  # --fsdp: this rank's shard
    opt.load_state_dict(distributed.shard_optimizer_state(opt, state["optimizer"]))
    g.set_state(state["rng"])
    return state["step"], state["t_bins"], overrides


@torch.no_grad()
def gives_finite_loss(model: Flux, batch: tuple, use_cuda: bool) -> bool:
    """The weights as they are now, on the last batch: finite loss? (A huge but finite weight can give NaN.)"""
    x0, noise, t, cond, guidance = batch
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=use_cuda):
        return bool(torch.isfinite(flow_loss(model, x0, noise, t, cond, guidance)).all())


def write_weights(path: Path, model: Flux, stage: str, meta: dict, write: bool = True):
    """Only what the stage adds to the base (semantic + LoRA); the base stage writes the whole transformer.
    Under --fsdp every rank calls it (the shards are gathered into full tensors) and only `write` writes."""
    sd = model.state_dict()
    if stage != "base":
        sd = {k: v for k, v in sd.items() if is_trained_key(k)}
    sd = distributed.full_tensors(sd)
    if write:
        save_atomic(sd, path, meta)


@torch.no_grad()
def sample_grid(model: Flux, ae: AutoEncoder, setup: Setup, cfg: TrainConfig, latents: dict, idx: Tensor, device,
                dtype, text: tuple, out: Path, step: int, write: bool = True):
    """RGB | semantic | target | prediction for a few training pairs, sampled with the current weights from the
    cached latents (the VAE encoder is not needed). Under --fsdp every rank runs the sampling (its forward passes
    gather the shards) and only `write` draws and writes the grid."""
    B = len(idx)
    H, W = latents["sem_ids"].shape[-2:]
    cond_key = "overlay" if cfg.scheme == "overlay" else "rgb"
    semcfg = model.semantic.config if model.semantic is not None else None
    sem_in = semantic_batch(latents, idx, semcfg, device)
    cond = make_condition(latents[cond_key][idx].to(device, dtype), None if sem_in is None else sem_in.to(dtype), text,
                          H // 16, W // 16)
    was_training = model.training
    model.eval()
    x = pack(get_noise(B, H, W, seed=0, device=device, dtype=dtype))
    x = denoise(model, x, cond, get_schedule(cfg.sample_steps, x.shape[1], shift=setup.preset != "schnell"),
                cfg.guidance if model.params.guidance_embed else None,
                reuse=not cfg.fsdp)  # FSDP gathers the root's weights in forward only: one forward per step
    model.train(was_training)
    path = out / f"step_{step:06d}.png"
    if not write:
        return path
    z = [unpack(t, H, W) for t in (x, latents["rgb"][idx].to(device, dtype), latents["ir"][idx].to(device, dtype))]
    pred, rgb, target = (ae.decode(zi).float().clamp(-1, 1) for zi in z)  # [B, 16, H/8, W/8] -> [B, 3, H, W]
    pred, target = data.rgb_to_ir(pred), data.rgb_to_ir(target)  # [B, 1, H, W]
    sem = latents["sem_pixels"][idx].float() / 127.5 - 1
    rows = [[to_pil_rgb(rgb[i]), to_pil_rgb(sem[i]), to_pil_gray(target[i]), to_pil_gray(pred[i])] for i in range(B)]
    out.mkdir(parents=True, exist_ok=True)
    grid(rows, ["RGB", "semantic", "target", "prediction"]).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------


def run(cfg: TrainConfig) -> int:
    """Train one stage as `cfg` says; 0 when done, 1 on a non-finite loss, 128 + signal when stopped by one.
    Raises ValueError (data.DataError, checkpoint.CheckpointError) for bad input, before any work."""
    cfg = dataclasses.replace(cfg)  # the defaults below are filled in on a copy
    cfg.steps = cfg.steps or STAGE_DEFAULTS[cfg.stage][0]
    cfg.out = cfg.out or str(ROOT / "runs" / cfg.stage)
    if cfg.sem_drop == -1:
        cfg.sem_drop = SEM_DROP_JOINT if cfg.stage == "joint" and cfg.scheme in MODULE_SCHEMES else 0.0
    if not cfg.sem_attention:
        cfg.sem_attention = DEFAULT_B["sem_attention"] if cfg.scheme == "xattn" else "separate"
    if cfg.sem_token_dim == -1:
        decoupled = cfg.scheme == "xattn" and cfg.sem_attention == "decoupled"
        cfg.sem_token_dim = DEFAULT_B["sem_token_dim"] if decoupled else 0
    rank, world, device = init_distributed(cfg)
    master = rank == 0
    fsdp = cfg.fsdp and world > 1  # one process: nothing to shard, the run is the single-process one
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    setup = find_setup()
    if master:
        print(setup.describe())
    cfg.lr = cfg.lr or (DEMO_LR if setup.kind == "demo" else {k: v[1] for k, v in STAGE_DEFAULTS.items()})[cfg.stage]
    out = Path(cfg.out)
    check_numbers(cfg)
    want = stage_config(cfg, setup)
    check_config(cfg, setup, want)
    lock = claim(Path(cfg.out), RUN_FILES, "final.safetensors", cfg.resume, cfg.overwrite, master)
    use_cuda = device.type == "cuda"
    # base weights (fp8: its linear weights in float8, the rest in this); trainable weights stay fp32
    dtype = BASE_DTYPES.get(cfg.base_dtype) or (torch.bfloat16 if use_cuda else torch.float32)

    # ---- latents (VAE encoder used once, then freed) and the prompt embedding
    ds = dataset_for(cfg, setup, master)
    want["classes"] = [asdict(c) for c in ds.classes]  # the palette: sampling reads label-id maps with it
    ae = load_ae(setup.ae, device=device, dtype=dtype)
    latents = encode_dataset(ds, ae, setup.ae, cfg.overlay_alpha, device, dtype, master, cfg.progress)
    if cfg.sem_jitter:  # misaligned copies of every map, the same for every run on this data
        latents["jittered"] = encode_jittered(latents, ds.classes, ae, tokens_path(ds, setup.ae, cfg.overlay_alpha),
                                              cfg.sem_jitter, device, dtype, master=master, progress=cfg.progress)
    del ae.encoder  # not needed in the loop (the decoder stays for the sample grids)
    N, L, _ = latents["ir"].shape  # [N, L, 64] tokens of an h x w grid
    h, w = (s // 16 for s in latents["sem_ids"].shape[-2:])
    text = text_condition(setup, PRESETS[setup.preset], 1, cfg.prompt, device, dtype)  # (txt, txt_ids, y), batch 1

    # ---- the model, what trains, the optimiser
    model = build(cfg, setup, want, device, dtype)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    trainable = select_trainable(model, cfg.stage)
    n_train = sum(p.numel() for _, p in trainable)
    if n_train == 0:
        raise ValueError(f"nothing to train in stage {cfg.stage} with scheme {cfg.scheme}")
    if master:
        n_all = sum(p.numel() for p in model.parameters())
        print(f"stage {cfg.stage}, scheme {cfg.scheme}: {n_train:,} trainable of {n_all:,} parameters "
              f"({len(trainable)} tensors); {N} training pairs of {L} tokens")
    if cfg.fsdp and world == 1 and master:
        print("note: --fsdp in one process has nothing to shard: training as a single process (start it with "
              "torchrun --nproc_per_node N to shard)")
    if fsdp:  # in place: the parameters become new ones (DTensor shards), so what trains is taken again
        distributed.shard(model, device)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_optimizer(cfg, model, trainable)
    fwd = model
    if world > 1 and not fsdp:  # DDP synchronises only trainable parameters; the frozen base is the same everywhere
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(model, device_ids=[device] if use_cuda else None, init_sync=False)
    if cfg.compile:
        fwd = torch.compile(fwd)

    # ---- state
    g = torch.Generator().manual_seed(cfg.seed)  # one stream for data order, t and noise: identical on every rank
    step, t_bins = 0, [[0.0, 0] for _ in range(10)]
    resume_path = out / "resume.pt"
    if cfg.resume:
        step, t_bins, overrides = load_resume(resume_path, trainable, opt, g, cfg)
        if master:
            trim_log(out / "log.jsonl", step)
            print(f"resumed from {resume_path} at step {step}")
    meta = {"config": json.dumps(want), "base": setup.flux.name, "ae": setup.ae.name,
            "train_args": json.dumps(asdict(cfg))}
    if cfg.resume and overrides:
        meta["resume_overrides"] = json.dumps(overrides)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a") if master else None
    stopper = Stopper()
    try:
        sample_idx = torch.arange(min(4, N))
        global_batch = cfg.batch_size * world
        cond_key = "overlay" if cfg.scheme == "overlay" else "rgb"
        semcfg = model.semantic.config if model.semantic is not None else None

        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.stage}/{cfg.scheme}",
                   disable=not (master and cfg.progress))
        t0, last_log_step = time.time(), step
        fwd.train()
        good_ckpt = None
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_mult"]
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                # the global batch is drawn identically on every rank; each rank takes its slice
                sl = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
                idx = torch.randint(N, (global_batch,), generator=g)[sl]
                x0 = latents["ir"][idx].to(device)  # [B, L, 64]
                variant = None  # --sem-jitter: one of the misaligned copies of each map
                if cfg.sem_jitter:
                    variant = torch.randint(len(latents["jittered"]["sem"]), (global_batch,), generator=g)[sl]
                sem_in = semantic_batch(latents, idx, semcfg, device, variant)
                t = sample_t(global_batch, g, cfg.t_sampling, cfg.logit_mean, cfg.logit_std, L)[sl].to(device)
                noise = torch.randn((global_batch, L, 64), generator=g)[sl].to(device)
                cond = make_condition(latents[cond_key][idx].to(device).to(dtype),
                                      None if sem_in is None else sem_in.to(dtype), text, h, w)
                if cfg.sem_drop:  # these samples train the prediction without the semantic input
                    cond.sem_strength = (torch.rand(global_batch, generator=g)[sl] >= cfg.sem_drop).to(device)
                guidance = torch.full((len(idx),), cfg.guidance, device=device) if model.params.guidance_embed else None
                # DDP reduces the gradients once, at the last micro-step; FSDP reduce-scatters every micro-step's
                last = micro == cfg.grad_accum - 1
                sync = nullcontext() if (world == 1 or fsdp or last) else fwd.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                        per_sample = flow_loss(fwd, x0, noise, t, cond, guidance)  # [B]
                    last_batch = (x0, noise, t, cond, guidance)
                    loss = per_sample.mean() / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.item()
                for ti, li in zip(t.tolist(), per_sample.tolist()):  # the loss by t, in 10 bins, for the log
                    t_bins[min(9, int(ti * 10))][0] += li
                    t_bins[min(9, int(ti * 10))][1] += 1
            if not math.isfinite(loss_sum):
                where = f"the last good weights are {good_ckpt}" if good_ckpt else "no checkpoint was written yet"
                print(f"error: loss is {loss_sum} at step {step}; stopping ({where}; lower --lr?)", file=sys.stderr)
                return 1
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.grad_clip)
            opt.step()
            step += 1
            bar.update(1)

            if master and (step % cfg.log_every == 0 or step == cfg.steps):
                dt = time.time() - t0
                sps = (step - last_log_step) / max(dt, 1e-9)
                t0, last_log_step = time.time(), step
                bins = [round(s / n, 5) if n else None for s, n in t_bins]
                bar.set_postfix(loss=f"{loss_sum:.4f}", it_s=f"{sps:.2f}")
                log.write(json.dumps({"step": step, "loss": loss_sum, "lr": lr, "steps_per_s": sps,
                                      "loss_by_t": bins}) + "\n")
                log.flush()
                t_bins = [[0.0, 0] for _ in range(10)]
            if (master or fsdp) and cfg.sample_every and step % cfg.sample_every == 0:
                sample_grid(model, ae, setup, cfg, latents, sample_idx, device, dtype, text, out / "samples", step,
                            write=master)
            stop = stopper.signal is not None
            if world > 1:  # a signal on any rank stops every rank at the same step
                flag = torch.tensor([float(stop)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if step % cfg.ckpt_every == 0 or stop or step == cfg.steps:
                # only weights that still give a finite loss are ever written as good ones
                ok = torch.tensor([float(gives_finite_loss(model, last_batch, use_cuda))], device=device)
                if world > 1:
                    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                if not ok.item():
                    where = f"the last good weights are {good_ckpt}" if good_ckpt else "no checkpoint was written yet"
                    print(f"error: the weights after step {step} give a non-finite loss; stopping ({where}; lower "
                          "--lr?)", file=sys.stderr)
                    return 1
                if master or fsdp:  # --fsdp: every rank takes part in gathering the shards; the master writes
                    write_weights(out / "latest.safetensors", model, cfg.stage, meta, write=master)
                    save_resume(resume_path, trainable, opt, step, g, t_bins, cfg, write=master)
                    good_ckpt = out / "latest.safetensors"
            if stop:
                if master:
                    print(f"\nstopped by signal {stopper.signal or 'on another rank'} at step {step}; resume with "
                          f"`{resume_command('train.py', world)}`")
                return 128 + (stopper.signal or signal.SIGTERM)
        bar.close()
        final = out / "final.safetensors"
        if master or fsdp:  # --fsdp: every rank gathers and runs the grid's forward passes; the master writes
            write_weights(final, model, cfg.stage, meta, write=master)
        if master:
            what = "the full transformer" if cfg.stage == "base" else f"{n_train:,} trained parameters"
            print(f"wrote {final} ({what})")
            for path in export_if_lora(final):  # the LoRA part in the layouts ComfyUI / kohya and diffusers load
                print(f"wrote {path}")
        if (master or fsdp) and cfg.sample_every == 0 and cfg.sample_steps > 0:
            path = sample_grid(model, ae, setup, cfg, latents, sample_idx, device, dtype, text, out / "samples",
                               step, write=master)
            if master:
                print(f"wrote {path}")
    finally:
        stopper.close()
        if log is not None:
            log.close()
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
