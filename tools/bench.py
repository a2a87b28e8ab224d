"""
Our FLUX transformer against diffusers' FluxTransformer2DModel (+ peft LoRA), same weights, same work.

    python -m tools.bench                    # the `medium` config on 2 CPU threads: one JSON line (~20 min)
    python -m tools.bench --config tiny      # seconds: the smoke run tests/tools/test_bench.py makes
    python -m tools.bench --device cuda      # on a GPU: times with synchronize, memory from torch.cuda's allocator
    python -m tools.bench --bf16 / --checkpointing / --compile  # the GPU-relevant options, applied to BOTH sides
    python -m tools.bench --sampling         # 20-step sampling: ours, the condition cache, diffusers' Kontext
    python -m tools.bench --device cuda --stage-peaks  # FLUX.1-dev's training peaks per stage on a GPU: JSON lines
    python -m tools.bench --fp8-matmul       # an fp8 Linear's two forms against bf16 at FLUX.1-dev's shapes (sm89+)

(flux-dev's memory per training stage, without a GPU: `python -m tools.memory_plan`.)

Both models get the same random weights: ours is built and randomised, its state dict (the official BFL key
layout) is converted for diffusers with diffusers' own converter, and the outputs are compared before anything is
timed, so the two sides do the same arithmetic. Cases (`medium`: hidden 768 = 12 heads of 64, 4 double + 8 single
blocks, 1024 noisy + 1024 condition image tokens, 64 text tokens, batch 1, fp32):

    forward       one transformer call under no_grad
    train_full    forward + MSE on the x_t tokens + backward, every base parameter trainable
    train_lora    base frozen, LoRA rank 16 on the attention and MLP linears: lora.py against peft on diffusers,
                  with identical nonzero LoRA weights (peft's q, k, v LoRAs take our fused qkv LoRA's rows)
    train_warmup  base frozen, scheme B (its separate form: a cross-attention after every block) trains; ours only
    train_joint   LoRA + scheme B train; ours only
    sample        a full sampling call: --sample-steps Euler steps x <- x + (t_next - t) v on the x_t tokens,
                  with the Kontext condition tokens appended at every step
    semantic      scheme B's cost over the base (forward and train_full, everything trainable), per option:
                  every block, double blocks only, every 2nd block, half the inner width and heads (timed with two
                  calls fewer; no memory measured)

How it measures (the methods and their reasons are in tools/measure.py):
- Time: the median of --repeats calls after --warmup calls. Ours and theirs alternate in ABBA order so a busy
  phase of a shared machine hits both sides; the spread (max - min) / median and the load average before and
  after are printed, so a noisy run shows itself.
- FLOPs: counted over the first warm-up call of each case (the call that also checks the two sides agree).
  GFLOP/s = counted FLOPs / median time; `of_peak` divides by this machine's matmul rate, a large GEMM in the same
  dtype timed in the same run (best median of the start and the end of the run).
- Peak memory: what one call needs on top of the weights and inputs already resident, after a warm call. CUDA:
  from the allocator, in this process. CPU: per side in a fresh process (python -m tools.bench --memory-worker)
  whose resident set follows its live tensors; timing runs in this process with the default allocator.
"""

import argparse
import dataclasses
import functools
import gc
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extras import fp8
from extras.condition_cache import ConditionCache
from extras.lora_formats import diffusers_parts
from extras.schemes import attach
from flow import denoise, kontext_ids, make_condition, text_ids
from flux_model import PRESETS, Flux, FluxParams
from lora import inject_lora, lora_modules
from sem_cross_attn import DEFAULT_B, SemanticConfig
from tools import memory_plan
from tools.sizes import CONFIGS, BenchConfig
from tools.measure import RSS_FOLLOWS_TENSORS, flop_counter, load_average, matmul_peak, peak_bytes, seconds

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------
# Configs


SEMANTIC_VARIANTS = ("all", "double", "every:2", "half-width")
# scheme B's separate form at full width (its own cross-attention after every block): what train_warmup and
# train_joint train, and what the options below cut (extras.schemes builds it)
SEPARATE_B = SemanticConfig(attention="separate", token_dim=0)


def semantic_config(variant: str, hidden: int, heads: int) -> SemanticConfig:
    """The scheme-B options that cut its cost: where it is injected, and how wide its attention is."""
    if variant == "half-width":  # half the heads at the same head dim: half the inner width
        return dataclasses.replace(SEPARATE_B, inner_dim=hidden // 2, num_heads=max(1, heads // 2))
    return dataclasses.replace(SEPARATE_B, blocks=variant)


# ----------------------------------------------------------------------------------------------------------------
# The same weights on both sides


def random_weights(params: FluxParams, seed: int = 0) -> dict[str, Tensor]:
    """Every tensor random (norm scales near 1), in the official key layout: a dropped or swapped weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    return {k: (1.0 + 0.2 * torch.randn(s, generator=g)) if k.endswith(".scale")
            else torch.randn(s, generator=g) / math.sqrt(s[-1]) for k, s in shapes.items()}


def build_ours(params: FluxParams, sd: dict[str, Tensor]) -> Flux:
    with torch.device("meta"):
        model = Flux(params)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def build_diffusers(params: FluxParams, sd: dict[str, Tensor]) -> nn.Module:
    """diffusers' FluxTransformer2DModel holding `sd` (official BFL layout), converted by diffusers' own converter
    of that layout. Strict load: every key of the converted dict must fit. Returned in train mode (no dropout)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils as sfu
    # The converter hard-codes dev's width (`inner_dim = 3072`, used to split single blocks' fused linear1) and
    # takes no argument for it, so it cannot convert a smaller model as it stands. Its own source is run with that
    # one number replaced by ours: everything else is diffusers' code. If the line changes, refuse rather than guess.
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        raise RuntimeError("diffusers' FLUX converter changed: 'inner_dim = 3072' is no longer in it")
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {params.hidden_size}"), namespace)
    converted = namespace["convert_flux_transformer_checkpoint_to_diffusers"](dict(sd))
    converted = {k: v.clone() for k, v in converted.items()}  # its own tensors: nothing shared with ours
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=params.in_channels, out_channels=params.out_channels, num_layers=params.depth,
            num_single_layers=params.depth_single_blocks, attention_head_dim=params.hidden_size // params.num_heads,
            num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
            pooled_projection_dim=params.vec_in_dim, guidance_embeds=params.guidance_embed,
            axes_dims_rope=tuple(params.axes_dim))
    model.load_state_dict(converted, strict=True, assign=True)
    return model


def share_weights(model: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
    """A second module over the SAME weight tensors (no copy), so LoRA or semantic variants cost no memory."""
    with torch.device("meta"):
        twin = make()
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    return twin


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the calls of each side


def make_inputs(cfg: BenchConfig, device, seed: int = 1) -> dict[str, Tensor]:
    """Kontext layout: [x_t | x_cond] image tokens on one grid (condition ids' first axis = 1), text at (0, 0, 0)."""
    g = torch.Generator().manual_seed(seed)
    B, (h, w), n = cfg.batch, cfg.grid, cfg.grid[0] * cfg.grid[1]
    x = dict(img=torch.randn(B, 2 * n, 64, generator=g), img_ids=kontext_ids(B, h, w),
             txt=torch.randn(B, cfg.n_txt, cfg.context_in_dim, generator=g), txt_ids=text_ids(B, cfg.n_txt),
             timesteps=torch.full((B,), 0.7), y=torch.randn(B, cfg.vec_in_dim, generator=g),
             guidance=torch.full((B,), 3.5),
             target=torch.randn(B, n, 64, generator=g),  # the velocity a training step regresses to
             semantic=torch.randn(B, n, 64, generator=g))  # packed semantic latents on the target grid
    return {k: v.to(device) for k, v in x.items()}


def call_ours(model: Flux, x: dict, img: Tensor | None = None, t: Tensor | None = None, semantic: bool = False):
    return model(x["img"] if img is None else img, x["img_ids"], x["txt"], x["txt_ids"],
                 x["timesteps"] if t is None else t, x["y"], guidance=x["guidance"],
                 semantic=x["semantic"] if semantic else None)


def call_theirs(model: nn.Module, x: dict, img: Tensor | None = None, t: Tensor | None = None, semantic=False):
    # diffusers takes 2-D ids shared by the batch; it scales t and guidance by 1000 itself, as ours does
    return model(hidden_states=x["img"] if img is None else img, encoder_hidden_states=x["txt"],
                 pooled_projections=x["y"], timestep=x["timesteps"] if t is None else t, img_ids=x["img_ids"][0],
                 txt_ids=x["txt_ids"][0], guidance=x["guidance"], return_dict=False)[0]


def train_step(call, model: nn.Module, x: dict, amp) -> Tensor:
    """forward + MSE on the x_t tokens (the condition tokens' outputs are dropped, as train.py does) + backward."""
    n = x["target"].shape[1]
    with amp():
        out = call(model, x)
    loss = F.mse_loss(out[:, :n].float(), x["target"])
    loss.backward()
    return loss.detach()


@torch.no_grad()
def sample(call, model: nn.Module, x: dict, steps: int, amp) -> Tensor:
    """Euler from t = 1 (noise) to 0 on a linear schedule; the condition tokens ride along unchanged."""
    n = x["target"].shape[1]
    noisy, cond = x["img"][:, :n], x["img"][:, n:]
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noisy.device)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        with amp():
            v = call(model, x, img=torch.cat((noisy, cond), dim=1), t=t_cur.expand(noisy.shape[0]))[:, :n]
        noisy = noisy + (t_next - t_cur) * v.float()  # x_{t_next} = x_t + (t_next - t) v
    return noisy


# ----------------------------------------------------------------------------------------------------------------
# LoRA on both sides: lora.py on ours, peft on diffusers, with the same numbers


def add_lora_ours(model: Flux, rank: int, seed: int = 2) -> list[str]:
    """Base frozen, LoRA on lora.py's default targets. B is made nonzero, so the check below compares real LoRA
    outputs (a zero B would make both sides equal to the base whatever they did)."""
    model.requires_grad_(False)
    names = inject_lora(model, rank=rank, alpha=float(rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(0.02 * torch.randn(m.lora_B.weight.shape, generator=g))
    return names


def add_lora_theirs(model: nn.Module, ours: Flux, rank: int) -> list[str]:
    """peft LoRA on the diffusers modules that hold the rows of ours' LoRA layers, with our A repeated and our B
    split by rows: [B_q; B_k; B_v] A x = [B_q A x; B_k A x; B_v A x], so the two models compute the same function."""
    from peft import LoraConfig
    mods = lora_modules(ours)
    parts = {n: diffusers_parts(n, m.in_features, m.out_features) for n, m in mods.items()}
    targets = [d for p in parts.values() for d, _ in p]
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=float(rank), lora_dropout=0.0, target_modules=targets,
                                 init_lora_weights=True))
    with torch.no_grad():
        for n, p in parts.items():
            B_rows = mods[n].lora_B.weight.split([r for _, r in p], dim=0)  # [out, r] -> one [rows, r] per module
            for (d, _), B in zip(p, B_rows):
                layer = model.get_submodule(d)
                layer.lora_A["default"].weight.copy_(mods[n].lora_A.weight)
                layer.lora_B["default"].weight.copy_(B)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return targets


# ----------------------------------------------------------------------------------------------------------------
# Cases: one call each, on an eager model and (--compile) on its compiled wrapper


@dataclass
class Case:
    model: nn.Module  # the eager model; its .grad fields are cleared before each call
    fn: Callable[[nn.Module], Tensor]  # runs the case once on a model
    compiled: nn.Module | None = None  # torch.compile(model) with --compile

    def run(self) -> Tensor:
        return self.fn(self.compiled if self.compiled is not None else self.model)

    def run_eager(self) -> Tensor:  # FlopCounterMode counts the eager ops
        return self.fn(self.model)


def clear_grads(model: nn.Module):
    for p in model.parameters():
        p.grad = None


def build_cases(cfg: BenchConfig, side: str, opts: argparse.Namespace, sd: dict[str, Tensor], x: dict,
                which: tuple[str, ...], lora_from: Flux | None = None) -> dict[str, Case]:
    """The cases named in `which` for one side ("ours" or "theirs"), all over ONE copy of the weights `sd`.
    theirs' LoRA copies its weights from `lora_from` (a model of ours with LoRA: ours' train_lora model)."""
    params, device = cfg.params(), opts.device
    amp = (lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)) if opts.bf16 else nullcontext
    call = call_ours if side == "ours" else call_theirs
    call_sem = functools.partial(call_ours, semantic=True)
    if side == "ours":
        base = build_ours(params, sd)
        make = lambda: Flux(params)  # noqa: E731
    else:
        base = build_diffusers(params, sd)
        make = lambda: type(base).from_config(base.config)  # noqa: E731

    def ready(model: nn.Module) -> nn.Module:
        if isinstance(model, Flux):
            model.gradient_checkpointing = opts.checkpointing
        elif opts.checkpointing:
            model.enable_gradient_checkpointing()
        return model.to(device).train()  # no dropout on either side; train mode lets checkpointing act

    def forward(c):
        def run(m):
            with torch.no_grad(), amp():
                return c(m, x)
        return run

    def step(c):
        return lambda m: train_step(c, m, x, amp)

    def case(fn, model) -> Case:
        return Case(model, fn, torch.compile(model) if opts.compile else None)

    base = ready(base)
    cases = {}
    if "forward" in which:
        cases["forward"] = case(forward(call), base)
    if "train_full" in which:
        cases["train_full"] = case(step(call), base)
    if "sample" in which:
        cases["sample"] = case(lambda m: sample(call, m, x, cfg.sample_steps, amp), base)
    if "train_lora" in which:
        model = share_weights(base, make)
        if side == "ours":
            add_lora_ours(model, cfg.lora_rank)
        else:
            add_lora_theirs(model, lora_from, cfg.lora_rank)
        cases["train_lora"] = case(step(call), ready(model))
    if side == "theirs":
        return cases
    for stage in ("train_warmup", "train_joint"):  # frozen base; scheme B (and LoRA) train
        if stage in which:
            model = share_weights(base, make)
            model.requires_grad_(False)
            if stage == "train_joint":
                add_lora_ours(model, cfg.lora_rank)
            attach(model, SEPARATE_B)  # its parameters are new, so trainable
            cases[stage] = case(step(call_sem), ready(model))
    for variant in SEMANTIC_VARIANTS:  # scheme B's cost on top of forward / train_full (everything trainable)
        if f"semantic:{variant}" in which:
            model = share_weights(base, make)
            attach(model, semantic_config(variant, cfg.hidden, cfg.heads))
            model = ready(model)
            cases[f"semantic:{variant}:forward"] = case(forward(call_sem), model)
            cases[f"semantic:{variant}:train_full"] = case(step(call_sem), model)
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Time and peak memory per case


def time_calls(cases: dict[str, Case], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call; the cases alternate A B ... B A each round, so drift of the machine hits all alike."""
    names = list(cases)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            clear_grads(cases[n].model)
            times[n].append(seconds(cases[n].run, device))
            clear_grads(cases[n].model)  # gradients of idle models would only take memory
    return times


def peak_memory(case: Case, device: str) -> int:
    """Bytes one call needs on top of what is resident before it, after a warm call (measure.peak_bytes)."""
    clear_grads(case.model)
    case.run()  # warm: one-time allocations (library workspaces, compiled graphs) are not the call's
    clear_grads(case.model)
    return peak_bytes(case.run, device)


def memory_worker(args: argparse.Namespace):
    """Runs in a fresh process (see measure_memory_cpu): peak memory of each case of one side, as JSON."""
    cfg = resolve_config(args)
    torch.manual_seed(0)
    sd = random_weights(cfg.params())
    x = make_inputs(cfg, args.device)
    which = tuple(args.cases.split(","))
    lora_from = None
    if args.memory_worker == "theirs" and "train_lora" in which:
        lora_from = build_ours(cfg.params(), sd)  # whose LoRA peft copies (the numbers do not matter here)
        add_lora_ours(lora_from, cfg.lora_rank)
    cases = build_cases(cfg, args.memory_worker, args, sd, x, which, lora_from)
    del sd, lora_from
    gc.collect()
    print(json.dumps({name: peak_memory(case, args.device) for name, case in cases.items()}))


def measure_memory_cpu(args: argparse.Namespace, side: str, which: tuple[str, ...]) -> dict[str, int]:
    """The cases of one side, measured by this module in a fresh process whose resident set follows its tensors."""
    env = dict(os.environ, **RSS_FOLLOWS_TENSORS, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "tools.bench", "--memory-worker", side, "--cases", ",".join(which),
           "--config", args.config, "--device", args.device, "--threads", str(args.threads)]
    cmd += [f"--{flag}" for flag in ("bf16", "checkpointing", "compile") if getattr(args, flag)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"memory worker for {side} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Checks: the two sides compute the same thing


def max_rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: one number for outputs and gradients alike."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def first_calls(ours: dict[str, Case], theirs: dict[str, Case], tol: float) -> tuple[dict, dict]:
    """The first warm-up call of every case, counted by FlopCounterMode (on the eager model). For the cases both
    sides have, the outputs (a training step's: the loss) and one gradient of each training step must agree
    before anything is timed: the two sides do the same work, backward included. Returns (flops, differences)."""
    flops, out, diffs = {}, {}, {}
    for side, cases in (("ours", ours), ("theirs", theirs)):
        for name, case in cases.items():
            clear_grads(case.model)
            with flop_counter() as counter:
                out[(side, name)] = case.run_eager()
            flops[(side, name)] = counter.get_total_flops()
            if name == "train_full":
                out[(side, "grad")] = case.model.img_in.weight.grad if side == "ours" else \
                    case.model.x_embedder.weight.grad
            elif name == "train_lora" and side == "ours":
                out[(side, "lora_grad")] = case.model.double_blocks[0].img_attn.qkv.lora_A.weight.grad
            elif name == "train_lora":
                # our qkv LoRA's A is shared by q, k and v; peft has one A each holding the same numbers, so ours
                # gets the sum of their three gradients
                out[(side, "lora_grad")] = sum(case.model.get_submodule(f"transformer_blocks.0.attn.to_{c}")
                                               .lora_A["default"].weight.grad for c in "qkv")
            clear_grads(case.model)
    for name in [n for n in ours if n in theirs] + ["grad", "lora_grad"]:
        if ("ours", name) in out and ("theirs", name) in out:
            key = {"grad": "train_full:grad", "lora_grad": "train_lora:grad"}.get(name, name)
            diffs[key] = max_rel_diff(out[("ours", name)], out[("theirs", name)])
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    if bad:
        raise AssertionError(f"ours and diffusers disagree (max |diff| / max |ref| over {tol:g}): {bad}")
    return flops, diffs


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


SHARED = ("forward", "train_full", "train_lora", "sample")  # both sides
STAGES = ("train_warmup", "train_joint")  # ours alone: diffusers has no semantic module
TARGETS = {"forward": 0.9, "train_full": 0.85, "train_lora": 0.85}  # our time / theirs, at most


def resolve_config(args) -> BenchConfig:
    cfg = CONFIGS[args.config]
    if args.repeats:
        cfg = dataclasses.replace(cfg, repeats=args.repeats)
    if args.sample_steps:
        cfg = dataclasses.replace(cfg, sample_steps=args.sample_steps)
    return cfg


def run_benchmark(args: argparse.Namespace) -> dict:
    cfg = resolve_config(args)
    device = args.device
    import diffusers
    import peft
    result = {"config": args.config, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": "bf16-autocast" if args.bf16 else "float32",
              "checkpointing": args.checkpointing, "compile": args.compile, "torch": torch.__version__,
              "diffusers": diffusers.__version__, "peft": peft.__version__, "load_avg_start": load_average(),
              "shape": {"hidden": cfg.hidden, "heads": cfg.heads, "double": cfg.depth, "single": cfg.single,
                        "img_tokens": 2 * cfg.grid[0] * cfg.grid[1], "txt_tokens": cfg.n_txt, "batch": cfg.batch,
                        "sample_steps": cfg.sample_steps, "lora_rank": cfg.lora_rank},
              "repeats": cfg.repeats, "warmup": cfg.warmup}
    peak_dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak_n = cfg.peak_n if device == "cpu" else 8192
    peaks = [matmul_peak(device, peak_dtype, peak_n)]

    torch.manual_seed(0)
    sd = random_weights(cfg.params())
    x = make_inputs(cfg, device)
    ours_only = STAGES + tuple(f"semantic:{v}" for v in SEMANTIC_VARIANTS if not args.skip_semantic)
    ours = build_cases(cfg, "ours", args, sd, x, SHARED + ours_only)
    theirs = build_cases(cfg, "theirs", args, sd, x, SHARED, lora_from=ours["train_lora"].model)
    del sd
    result["params"] = sum(p.numel() for p in ours["forward"].model.parameters())
    result["lora_trainable"] = {side: sum(p.numel() for p in cases["train_lora"].model.parameters() if p.requires_grad)
                                for side, cases in (("ours", ours), ("theirs", theirs))}
    # warm-up: the first call counts FLOPs and checks that both sides agree; more (compiled: one compiles)
    if args.bf16:
        # diffusers under autocast rounds t and the guidance to bf16 before scaling them by 1000 (3.5 -> 3504),
        # so its bf16 outputs are far from fp32 (ours keep t in fp32). The same weights and the same work are
        # checked on an fp32 forward; the bf16 differences are reported, not asserted.
        with torch.no_grad():
            fp32 = max_rel_diff(call_ours(ours["forward"].model, x), call_theirs(theirs["forward"].model, x))
        if not fp32 <= 1e-4:
            raise AssertionError(f"ours and diffusers disagree in fp32 (max |diff| / max |ref| = {fp32:.3g})")
        result["check_fp32_forward"] = float(f"{fp32:.3g}")
    flops, diffs = first_calls(ours, theirs, float("inf") if args.bf16 else 1e-4)
    result["check_max_rel_diff"] = {k: float(f"{v:.3g}") for k, v in diffs.items()}
    for cases in (ours, theirs):
        for case in cases.values():
            for _ in range(cfg.warmup - 1 + int(args.compile)):
                clear_grads(case.model)
                case.run()
            clear_grads(case.model)

    timed = {}
    for name in SHARED:  # the two sides of a case alternate
        ts = time_calls({"ours": ours[name], "theirs": theirs[name]}, cfg.repeats, device)
        timed.update({(side, name): t for side, t in ts.items()})
    stages = {n: c for n, c in ours.items() if n in STAGES}
    timed.update({("ours", n): t for n, t in time_calls(stages, cfg.repeats, device).items()})
    options = {n: c for n, c in ours.items() if n.startswith("semantic:")}  # eight cases: two fewer calls each
    timed.update({("ours", n): t for n, t in time_calls(options, max(1, cfg.repeats - 2), device).items()})
    peaks.append(matmul_peak(device, peak_dtype, peak_n))
    peak = max(peaks, key=lambda p: p["gflops"])
    result["matmul_peak"] = {**peak, "gflops": round(peak["gflops"], 1),
                             "runs_gflops": [round(p["gflops"], 1) for p in peaks]}
    result["load_avg_end"] = load_average()

    mem = {}
    if not args.no_memory:
        if device == "cpu":
            mem.update({("ours", k): v for k, v in measure_memory_cpu(args, "ours", SHARED + STAGES).items()})
            mem.update({("theirs", k): v for k, v in measure_memory_cpu(args, "theirs", SHARED).items()})
        else:
            for side, cases in (("ours", ours), ("theirs", theirs)):
                mem.update({(side, n): peak_memory(c, device) for n, c in cases.items()})

    def med(side, name) -> float:
        return statistics.median(timed[(side, name)])

    def entry(side, name) -> dict:
        ts, f = timed[(side, name)], flops[(side, name)]
        s = statistics.median(ts)
        e = {"s": round(s, 4), "spread": round((max(ts) - min(ts)) / s, 3), "runs": [round(t, 4) for t in ts],
             "gflop": round(f / 1e9, 3), "gflops": round(f / 1e9 / s, 2),
             "of_peak": round(f / 1e9 / s / peak["gflops"], 3)}
        if (side, name) in mem:
            e["peak_mb"] = round(mem[(side, name)] / 2 ** 20, 1)
        return e

    cases = {}
    for name in SHARED:
        o, t = entry("ours", name), entry("theirs", name)
        c = {"ours": o, "theirs": t, "ratio": round(o["s"] / t["s"], 3)}
        if name in TARGETS:
            c["target_ratio"], c["met_time"] = TARGETS[name], c["ratio"] <= TARGETS[name]
        if "peak_mb" in o and "peak_mb" in t:
            c["met_memory"] = o["peak_mb"] <= t["peak_mb"]
        cases[name] = c
    for name in STAGES:
        cases[name] = {"ours": entry("ours", name), "theirs": None,
                       "vs_train_full": round(med("ours", name) / med("ours", "train_full"), 3)}
    result["cases"] = cases
    if not args.skip_semantic:  # scheme B over the base, on the same call with the same trainable base
        result["semantic_cost"] = {
            v: {kind: {"s": round(med("ours", f"semantic:{v}:{kind}"), 4),
                       "time_overhead": round(med("ours", f"semantic:{v}:{kind}") / med("ours", kind) - 1, 3),
                       "flop_overhead": round(flops[("ours", f"semantic:{v}:{kind}")] / flops[("ours", kind)] - 1, 3)}
                for kind in ("forward", "train_full")}
            for v in SEMANTIC_VARIANTS}
    return result


# ----------------------------------------------------------------------------------------------------------------
# --sampling: sampling with the default scheme B, ours with and without the condition cache, against diffusers

SAMPLING_STEPS = 20
SAMPLING_TARGETS = {"cache_vs_diffusers": 0.6, "train_full": 1.0}  # ours / theirs, at most


def acting(module: nn.Module, seed: int = 3) -> nn.Module:
    """A semantic module that acts: strengths 0.5 and every weight matrix moved by 0.02 N(0, 1), so the parts that
    start at zero (zero convs, the decoupled B's value rows) are nonzero and checks compare real semantic outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.strength_parameters():
            p.fill_(0.5)
        for p in module.parameters():
            if p.ndim > 1:
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p))
    return module


def sampling_cases(cfg: BenchConfig, args: argparse.Namespace, sd: dict[str, Tensor], x: dict) -> dict[tuple, Case]:
    """Ours: flow.denoise, 20 Euler steps, the default scheme B attached (sem_cross_attn.DEFAULT_B, acting): one whole
    forward per step (`kontext_per_step`), and the same weights behind the condition cache (`cache`: a
    ConditionCache made for each sampling run, as pipeline's sampler makes it, so its condition pass is in the time);
    the base alone (diffusers' work) in both modes (`base_per_step`, `cache_base`). Theirs: diffusers' Kontext
    sampling on the same base weights (`kontext`)."""
    params, device = cfg.params(), args.device
    n = x["target"].shape[1]
    noisy, x_cond = x["img"][:, :n], x["img"][:, n:]
    ts = torch.linspace(1.0, 0.0, cfg.sample_steps + 1).tolist()  # the schedule of `sample` (diffusers' side)
    text = (x["txt"], x["txt_ids"], x["y"])
    base = build_ours(params, sd).to(device).eval()
    b = Flux(params)
    attach(b, DEFAULT_B)
    b = b.to(device)
    b.load_state_dict(base.state_dict(), strict=False, assign=True)  # the base weights shared, B's own
    acting(b.semantic)
    b.eval()
    cond_b = make_condition(x_cond, x["semantic"], text, *cfg.grid)
    cond = make_condition(x_cond, None, text, *cfg.grid)

    def ours(cond, cached: bool):
        def run(m):
            return denoise(ConditionCache(m, keep=True) if cached else m, noisy, cond, ts, float(x["guidance"][0]))
        return torch.no_grad()(run)

    theirs = build_diffusers(params, sd).to(device).train()
    return {("ours", "kontext_per_step"): Case(b, ours(cond_b, False)),
            ("ours", "cache"): Case(b, ours(cond_b, True)),
            ("ours", "base_per_step"): Case(base, ours(cond, False)),
            ("ours", "cache_base"): Case(base, ours(cond, True)),
            ("theirs", "kontext"): Case(theirs, lambda m: sample(call_theirs, m, x, cfg.sample_steps, nullcontext))}


def run_sampling(args: argparse.Namespace) -> dict:
    """The sampling benchmark: times, FLOPs and ratios of the cases of `sampling_cases`, and the training step of
    both sides (time and peak memory), on the same random weights. The outputs that must agree are checked before
    anything is timed: the base against diffusers (sampling and the training step's loss)."""
    cfg = resolve_config(args)
    if not args.sample_steps:
        cfg = dataclasses.replace(cfg, sample_steps=SAMPLING_STEPS)
    repeats = args.repeats or 2  # a sampling call is 20 forwards already
    device = args.device
    torch.manual_seed(0)
    sd = random_weights(cfg.params())
    x = make_inputs(cfg, device)
    cases = sampling_cases(cfg, args, sd, x)
    cases |= {(side, "train_full"): build_cases(cfg, side, args, sd, x, ("train_full",))["train_full"]
              for side in ("ours", "theirs")}
    trained = cases[("ours", "train_full")].model  # the training step of the condition-cache mode, same weights
    cases[("ours", "train_full_cache")] = Case(trained, lambda m: train_step(call_ours, ConditionCache(m), x,
                                                                             nullcontext))
    del sd
    result = {"config": args.config, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "load_avg_start": load_average(),
              "sample_steps": cfg.sample_steps, "repeats": repeats,
              "shape": {"hidden": cfg.hidden, "heads": cfg.heads, "double": cfg.depth, "single": cfg.single,
                        "img_tokens": 2 * cfg.grid[0] * cfg.grid[1], "txt_tokens": cfg.n_txt},
              "semantic": "sem_cross_attn.DEFAULT_B"}
    flops, out = {}, {}
    for key, case in cases.items():  # the first call: FLOPs, and the outputs checked below
        clear_grads(case.model)
        with flop_counter() as counter:
            out[key] = case.run_eager()
        flops[key] = counter.get_total_flops()
        clear_grads(case.model)
    checks = {"base_vs_diffusers": max_rel_diff(out[("ours", "base_per_step")], out[("theirs", "kontext")]),
              "train_full_loss": max_rel_diff(out[("ours", "train_full")], out[("theirs", "train_full")])}
    bad = {k: v for k, v in checks.items() if not v <= 1e-4}
    if bad:
        raise AssertionError(f"outputs that must agree do not (max |diff| / max |ref| over 1e-4): {bad}")
    result["check_max_rel_diff"] = {k: float(f"{v:.3g}") for k, v in checks.items()}
    times = time_calls(cases, repeats, device)
    result["load_avg_end"] = load_average()
    mem = {}
    if not args.no_memory and device == "cpu":
        for side in ("ours", "theirs"):
            mem[side] = measure_memory_cpu(args, side, ("train_full",))["train_full"]
    med = {k: statistics.median(t) for k, t in times.items()}
    result["cases"] = {f"{side}:{name}": {"s": round(med[(side, name)], 3),
                                          "runs": [round(t, 3) for t in times[(side, name)]],
                                          "gflop": round(flops[(side, name)] / 1e9, 2),
                                          "gflops": round(flops[(side, name)] / 1e9 / med[(side, name)], 2)}
                       for side, name in cases}
    for side in mem:
        result["cases"][f"{side}:train_full"]["peak_mb"] = round(mem[side] / 2 ** 20, 1)
    pairs = {"per_step_vs_diffusers": (("ours", "kontext_per_step"), ("theirs", "kontext")),
             "base_vs_diffusers": (("ours", "base_per_step"), ("theirs", "kontext")),
             "cache_vs_diffusers": (("ours", "cache"), ("theirs", "kontext")),
             "cache_base_vs_diffusers": (("ours", "cache_base"), ("theirs", "kontext")),
             "cache_vs_per_step": (("ours", "cache"), ("ours", "kontext_per_step")),
             "train_full": (("ours", "train_full"), ("theirs", "train_full")),
             "train_full_cache_vs_kontext": (("ours", "train_full_cache"), ("ours", "train_full"))}
    result["ratios"] = {k: {"time": round(med[a] / med[b], 3), "flops": round(flops[a] / flops[b], 3)}
                        for k, (a, b) in pairs.items()}
    result["targets"] = {k: {"at_most": v, "met": result["ratios"][k]["time"] <= v}
                         for k, v in SAMPLING_TARGETS.items()}
    if mem:
        result["targets"]["train_full_memory"] = {"ours_mb": round(mem["ours"] / 2 ** 20, 1),
                                                  "theirs_mb": round(mem["theirs"] / 2 ** 20, 1),
                                                  "met": mem["ours"] <= mem["theirs"]}
    return result


# ----------------------------------------------------------------------------------------------------------------
# --stage-peaks: the memory of real training steps at FLUX.1-dev's size, per stage (a GPU only)

STAGE_PEAK_B = (memory_plan.FULL_B, memory_plan.LEAN_B, "decoupled, shared K/V, 256-dim")


def stage_peak_cases() -> list[dict]:
    """The cases of --stage-peaks, in the keys of memory_plan's rows (so the two can be joined): FLUX.1-dev with
    random weights, batch 1, 512 text tokens, gradient checkpointing; scheme B's full-width separate form, the
    default (decoupled, 64-dim tokens) and the decoupled form with shared K/V; every stage; fp8 and bf16 base;
    1024x1024 first, then 512x512."""
    return [{"b": b, "stage": stage, "base": base, "resolution": res, "side": memory_plan.RESOLUTIONS[res],
             "text_tokens": memory_plan.N_TXT, "checkpointing": True}
            for res in sorted(memory_plan.RESOLUTIONS, reverse=True) for base in ("fp8", "bf16") for b in STAGE_PEAK_B
            for stage in memory_plan.STAGES]


def stage_peak_model(case: dict) -> Flux:
    """The case's stage model on the meta device (memory_plan.stage_model: as train.py builds it), nothing allocated."""
    dev = PRESETS["dev"]
    return memory_plan.stage_model(dev, case["stage"], memory_plan.b_configs(dev.hidden_size, dev.num_heads)[case["b"]],
                                   case["base"])


def measure_stage_peak(case: dict) -> dict:
    """One case on the GPU: the meta model's tensors made on the GPU in their own dtypes (random values), AdamW's
    state allocated, a first step, then torch.cuda.max_memory_allocated over a second one. GiB: resident before
    the step (weights, AdamW state, batch), the step's peak above it, their sum (memory_plan's total)."""
    gib = 2 ** 30
    out = dict(case, device=torch.cuda.get_device_name())
    try:
        model = memory_plan.randomize_(memory_plan.materialize_(
            stage_peak_model(case), lambda t: torch.empty(t.shape, dtype=t.dtype, device="cuda")))
        model.train()
        model.gradient_checkpointing = case["checkpointing"]
        opt, trainable = memory_plan.make_optimizer(model, case["stage"])
        batch = memory_plan.training_batch(PRESETS["dev"], case["side"], case["text_tokens"], case["stage"], "cuda")
        memory_plan.training_step(model, batch, trainable, opt)
        gc.collect()
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = seconds(lambda: memory_plan.training_step(model, batch, trainable, opt), "cuda")
        peak = torch.cuda.max_memory_allocated()
        out.update(resident_gib=round(resident / gib, 3), step_gib=round((peak - resident) / gib, 3),
                   total_gib=round(peak / gib, 3), reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 3),
                   seconds=round(t0, 2))
    except torch.cuda.OutOfMemoryError as e:
        out["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        model = opt = trainable = batch = None  # noqa: F841
        gc.collect()
        torch.cuda.empty_cache()
    return out


def stage_peaks(args: argparse.Namespace) -> int:
    """--stage-peaks: one JSON line per case, printed as it is measured."""
    if args.device != "cuda" or not torch.cuda.is_available():
        why = "--device cuda is needed" if args.device != "cuda" else "no CUDA device here"
        print(f"tools.bench --stage-peaks: {why}; it measures FLUX.1-dev's training steps on a GPU (the largest "
              "case plans to about 64 GiB: an 80 GB card); without one, python -m tools.memory_plan plans them",
              file=sys.stderr)
        raise SystemExit(2)
    for case in stage_peak_cases():
        print(json.dumps(measure_stage_peak(case)), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# --fp8-matmul: an fp8 Linear's forward, its fp8 product against its dequantizing form and bf16 (an sm89+ GPU only)


def fp8_matmul_cases() -> dict[str, tuple[int, int, int]]:
    """(tokens, in, out) of the products timed, at FLUX.1-dev's hidden size over a 1024² image's 4096 tokens: an
    attention projection [4096, 3072] x [3072, 3072], and the single block's linear1 [3072 -> 21504] (q | k | v |
    mlp in)."""
    dev = PRESETS["dev"]
    h, n = dev.hidden_size, 4096
    return {"attn_proj": (n, h, h), "linear1": (n, h, 3 * h + int(h * dev.mlp_ratio))}


def cuda_ms(fn: Callable, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls, from CUDA events recorded around it, after 3 warm calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


@torch.no_grad()
def measure_fp8_matmul(name: str, shape: tuple[int, int, int], repeats: int, device="cuda",
                       timer: Callable[[Callable, int], list[float]] = cuda_ms) -> dict:
    """One shape on the GPU (`device`, `timer`: the CPU and a fake clock only to check the plumbing), on the same bf16
    activations: a bf16 nn.Linear, and the Fp8Linear quantized from it (per row) in its two forms, scaled_mm
    (torch._scaled_mm, the activation quantized each call) and dequantize (fp8.SCALED_MM off: the weight upcast each
    call); and the bare torch._scaled_mm on an activation already in fp8 (what the activation's quantization costs
    is the difference). Median ms and TFLOP/s (2 N in out per product), the speed-ups of scaled_mm, and how far its
    output is from the dequantizing form's."""
    n, d_in, d_out = shape
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, device=device, dtype=torch.bfloat16)
    layer = fp8.Fp8Linear.from_linear(linear)
    x = torch.randn(n, d_in, device=device, dtype=torch.bfloat16)
    out = {"case": "fp8_matmul", "name": name, "shape": [n, d_in, d_out], "torch": torch.__version__}
    if device == "cuda":
        out |= {"device": torch.cuda.get_device_name(),
                "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    form, why = fp8.matmul_form(layer, x)
    if form != "scaled_mm":
        return out | {"skipped": why}
    xq, xs = fp8.quantize_activation(x)
    ws, bias = layer.weight_scale.reshape(1, -1), layer.bias.to(torch.bfloat16)
    calls = {"bf16": lambda: linear(x), "fp8_scaled_mm": lambda: layer(x),
             "scaled_mm_product_only": lambda: torch._scaled_mm(xq, layer.weight.t(), scale_a=xs, scale_b=ws,
                                                                 bias=bias, out_dtype=torch.bfloat16)}
    times, was = {}, fp8.SCALED_MM
    try:
        for k, fn in calls.items():
            times[k] = timer(fn, repeats)
        fast = layer(x)
        fp8.SCALED_MM = False
        times["fp8_dequantize"] = timer(lambda: layer(x), repeats)
        plain = layer(x)
    finally:
        fp8.SCALED_MM = was
    ms = {k: statistics.median(t) for k, t in times.items()}
    return out | {"repeats": repeats, "ms": {k: round(v, 4) for k, v in ms.items()},
                  "tflops": {k: round(2 * n * d_in * d_out / (v / 1e3) / 1e12, 1) for k, v in ms.items()},
                  "scaled_mm_speedup": {"vs_bf16": round(ms["bf16"] / ms["fp8_scaled_mm"], 3),
                                        "vs_dequantize": round(ms["fp8_dequantize"] / ms["fp8_scaled_mm"], 3)},
                  "scaled_mm_vs_dequantize_max_rel_diff": float(f"{max_rel_diff(fast, plain):.3g}")}


def fp8_matmul(args: argparse.Namespace) -> int:
    """--fp8-matmul: one JSON line per shape of fp8_matmul_cases; without a GPU that multiplies fp8, one line saying
    why, and nothing is timed."""
    why = "no CUDA device here" if not torch.cuda.is_available() else fp8.fp8_matmul_device(torch.device("cuda"))
    if why is not None:
        print(json.dumps({"case": "fp8_matmul", "skipped": f"{why}; run it on an Ada or Hopper GPU"}))
        return 0
    for name, shape in fp8_matmul_cases().items():
        print(json.dumps(measure_fp8_matmul(name, shape, args.repeats or 20)), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench",
                                description="Time our FLUX transformer against diffusers (+ peft), same weights.")
    p.add_argument("--config", default="medium", choices=sorted(CONFIGS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=0, help="timed calls per case (0: the config's)")
    p.add_argument("--sample-steps", type=int, default=0, help="Euler steps of the sampling call (0: the config's)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (weights stay fp32)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (opt-in)")
    p.add_argument("--skip-semantic", action="store_true", help="do not time scheme B's options")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--stage-peaks", action="store_true",
                   help="instead of the benchmark: torch.cuda.max_memory_allocated of training steps of FLUX.1-dev "
                        "(random weights) per stage, base and scheme B form at 512² and 1024², one JSON line each "
                        "(--device cuda; python -m tools.memory_plan plans the same cases)")
    p.add_argument("--sampling", action="store_true",
                   help="instead of the benchmark: 20-step sampling with the default scheme B, ours with a whole "
                        "forward per step and with the condition cache, against diffusers' Kontext sampling, and "
                        "the training step (one JSON line)")
    p.add_argument("--fp8-matmul", action="store_true",
                   help="instead of the benchmark: an fp8 Linear's forward through torch._scaled_mm against its "
                        "dequantizing form and a bf16 Linear at FLUX.1-dev's shapes, timed with CUDA events, one "
                        "JSON line per shape (a GPU of compute capability 8.9+; elsewhere one line saying so)")
    p.add_argument("--memory-worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--cases", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.stage_peaks:
        return stage_peaks(args)
    if args.fp8_matmul:
        return fp8_matmul(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args)
    result = run_sampling(args) if args.sampling else run_benchmark(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
