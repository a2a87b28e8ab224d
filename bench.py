"""
bench.py: our FLUX transformer against diffusers' FluxTransformer2DModel (+ peft LoRA), same weights, same work.

    python bench.py                          # the `medium` config on 2 CPU threads: one JSON line (~20 min)
    python bench.py --config tiny            # seconds: the smoke run tests/test_bench.py makes
    python bench.py --device cuda            # on a GPU: times with synchronize, memory from torch.cuda's allocator
    python bench.py --bf16 / --checkpointing / --compile    # the GPU-relevant options, applied to BOTH sides
    python bench.py --memory-plan            # per-stage GPU memory of flux-dev at 512x512 and 1024x1024:
                                             # a Markdown table, then one JSON line

Both models get the same random weights: ours is built and randomised, its state dict (the official BFL key
layout) is converted for diffusers with diffusers' own converter, and the outputs are compared before anything is
timed, so the two sides do the same arithmetic. Cases (`medium`: hidden 768 = 12 heads of 64, 4 double + 8 single
blocks, 1024 noisy + 1024 condition image tokens, 64 text tokens, batch 1, fp32):

    forward       one transformer call under no_grad
    train_full    forward + MSE on the x_t tokens + backward, every base parameter trainable
    train_lora    base frozen, LoRA rank 16 on the attention and MLP linears: lora.py against peft on diffusers,
                  with identical nonzero LoRA weights (peft's q, k, v LoRAs take our fused qkv LoRA's rows)
    train_warmup  base frozen, scheme B (semantic cross-attention after every block) trains; ours only
    train_joint   LoRA + scheme B train; ours only
    sample        a full sampling call: --sample-steps Euler steps x <- x + (t_next - t) v on the x_t tokens,
                  with the Kontext condition tokens appended at every step
    semantic      scheme B's cost over the base (forward and train_full, everything trainable), per option:
                  every block, double blocks only, every 2nd block, half the inner width and heads (timed with two
                  calls fewer; no memory measured)

How it measures, and why:
- Time: the median of --repeats calls after --warmup calls. Ours and theirs alternate in ABBA order so a busy
  phase of a shared machine hits both sides; the spread (max - min) / median and the load average before and
  after are printed, so a noisy run shows itself. Python's garbage collector is off inside the timed calls.
- FLOPs: torch.utils.flop_counter.FlopCounterMode over the first warm-up call of each case (the call that also
  checks the two sides agree). Its table has no entry for the CPU flash-attention kernels, so they are added here
  with its own SDPA formulas.
  GFLOP/s = counted FLOPs / median time; `of_peak` divides by this machine's matmul rate, a large GEMM in the same
  dtype timed in the same run (best median of the start and the end of the run).
- Peak memory: the memory one call needs on top of the weights and inputs already resident (activations,
  gradients, workspaces). CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before. CPU: each side
  runs in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor
  buffer is its own mapping, given back to the kernel when freed, and the resident set follows the live tensors;
  per case: one warm call, then the kernel's peak-RSS counter is reset (/proc/self/clear_refs), RSS is read, the
  call runs again, and peak = VmHWM - that RSS. Timing runs in this process with the default allocator.
- Memory plan: parameters from the meta-device model; activation bytes per token per block measured on small
  widths with autograd's saved-tensor hooks (bf16 autocast, as train.py on a GPU) and scaled to dev's width.
"""

import argparse
import dataclasses
import functools
import gc
import inspect
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_model import Flux, FluxParams, PRESETS, image_ids, text_ids
from sem_cross_attn import SemanticConfig, attach

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class BenchConfig:
    hidden: int  # D
    heads: int
    axes: tuple[int, int, int]  # RoPE split of the head dim
    depth: int  # double blocks
    single: int  # single blocks
    grid: tuple[int, int]  # token grid of the target: h*w noisy tokens + h*w Kontext condition tokens
    n_txt: int  # text tokens
    context_in_dim: int  # T5 width
    vec_in_dim: int  # CLIP pooled width
    batch: int = 1
    repeats: int = 5  # timed calls per case
    warmup: int = 1  # untimed calls first (the first one counts FLOPs)
    sample_steps: int = 4
    lora_rank: int = 16
    peak_n: int = 4096  # size of the GEMM that measures the machine's matmul rate (CPU; 8192 on a GPU)

    def params(self) -> FluxParams:
        return FluxParams(in_channels=64, out_channels=64, vec_in_dim=self.vec_in_dim,
                          context_in_dim=self.context_in_dim, hidden_size=self.hidden, mlp_ratio=4.0,
                          num_heads=self.heads, depth=self.depth, depth_single_blocks=self.single,
                          axes_dim=list(self.axes), theta=10_000, qkv_bias=True, guidance_embed=True)


CONFIGS = {
    # seconds on a CPU: the smoke test
    "tiny": BenchConfig(hidden=64, heads=4, axes=(4, 6, 6), depth=1, single=2, grid=(4, 4), n_txt=8,
                        context_in_dim=32, vec_in_dim=16, repeats=2, warmup=1, sample_steps=2, lora_rank=4,
                        peak_n=1024),
    # the issue's yardstick: dev's structure at a quarter of its width and a fifth of its depth, 512x512 tokens
    "medium": BenchConfig(hidden=768, heads=12, axes=(16, 24, 24), depth=4, single=8, grid=(32, 32), n_txt=64,
                          context_in_dim=4096, vec_in_dim=768),
}

SEMANTIC_VARIANTS = ("all", "double", "every:2", "half-width")


def semantic_config(variant: str, hidden: int, heads: int) -> SemanticConfig:
    """The scheme-B options that cut its cost: where it is injected, and how wide its attention is."""
    if variant == "half-width":  # half the heads at the same head dim: half the inner width
        return SemanticConfig(scheme="xattn", inner_dim=hidden // 2, num_heads=max(1, heads // 2))
    return SemanticConfig(scheme="xattn", blocks=variant)


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
    """diffusers' own converter of the original (BFL) layout; it hard-codes the hidden width 3072, so that one
    value is replaced by ours before it runs. Strict load: every key of the converted dict must fit."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils as sfu
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
    x = dict(img=torch.randn(B, 2 * n, 64, generator=g),
             img_ids=torch.cat([image_ids(B, h, w), image_ids(B, h, w, index=1)], dim=1),
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

# BFL module (suffix inside a block) -> the diffusers modules that hold its output rows, in row order
_DOUBLE_PARTS = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
                 "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
                 "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",)}
_SINGLE_PARTS = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",)}


def diffusers_parts(name: str, out_features: int, hidden: int) -> list[tuple[str, int]]:
    """[(diffusers module, rows)] for one of our LoRA'd linears; q, k, v take `hidden` rows each."""
    kind, i, suffix = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", name).groups()
    prefix = f"transformer_blocks.{i}." if kind == "double" else f"single_transformer_blocks.{i}."
    names = (_DOUBLE_PARTS if kind == "double" else _SINGLE_PARTS)[suffix]
    rows = [hidden] * (len(names) - 1) + [out_features - hidden * (len(names) - 1)]
    return [(prefix + n, r) for n, r in zip(names, rows)]


def add_lora_ours(model: Flux, rank: int, seed: int = 2) -> list[str]:
    """Base frozen, LoRA on lora.py's default targets. B is made nonzero, so the check below compares real LoRA
    outputs (a zero B would make both sides equal to the base whatever they did)."""
    from lora import inject_lora, lora_modules
    model.requires_grad_(False)
    names = inject_lora(model, rank=rank, alpha=float(rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(0.02 * torch.randn(m.lora_B.weight.shape, generator=g))
    return names


def add_lora_theirs(model: nn.Module, ours: Flux, names: list[str], rank: int):
    """peft LoRA on the diffusers modules that hold the same rows, with our A repeated and our B split by rows:
    [B_q; B_k; B_v] A x = [B_q A x; B_k A x; B_v A x], so the two models compute the same function."""
    from peft import LoraConfig
    from lora import lora_modules
    hidden = ours.hidden_size
    mods = lora_modules(ours)
    parts = {n: diffusers_parts(n, mods[n].out_features, hidden) for n in names}
    targets = [d for p in parts.values() for d, _ in p]
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=float(rank), lora_dropout=0.0, target_modules=targets,
                                 init_lora_weights=True))
    with torch.no_grad():
        for n, p in parts.items():
            B_rows = mods[n].lora_B.weight.split([r for _, r in p], dim=0)
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
    fast: nn.Module | None = None  # torch.compile(model) with --compile
    extra: dict = dataclasses.field(default_factory=dict)

    def run(self) -> Tensor:
        return self.fn(self.fast if self.fast is not None else self.model)

    def run_eager(self) -> Tensor:  # FlopCounterMode counts the eager ops
        return self.fn(self.model)


def set_checkpointing(model: nn.Module, on: bool):
    if isinstance(model, Flux):
        model.gradient_checkpointing = on
    elif on:
        model.enable_gradient_checkpointing()


def build_cases(cfg: BenchConfig, side: str, opts: argparse.Namespace, sd: dict[str, Tensor], x: dict,
                which: tuple[str, ...], lora_from: Flux | None = None) -> dict[str, Case]:
    """The cases named in `which` for one side ("ours" or "theirs"), all over ONE copy of the weights `sd`.
    theirs' LoRA copies its weights from `lora_from` (ours' train_lora model)."""
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
        set_checkpointing(model, opts.checkpointing)
        return model.to(device).train()  # no dropout on either side; train mode lets checkpointing act

    def forward(c):
        return lambda m: _no_grad_amp(amp, lambda: c(m, x))

    def step(c):
        return lambda m: train_step(c, m, x, amp)

    def case(fn, model, **extra) -> Case:
        return Case(model, fn, torch.compile(model) if opts.compile else None, extra)

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
            names = add_lora_ours(model, cfg.lora_rank)
        else:
            names = add_lora_theirs(model, lora_from, lora_from.lora_names, cfg.lora_rank)
        model = ready(model)
        cases["train_lora"] = case(step(call), model, lora_names=names,
                                   lora_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if side == "theirs":
        return cases
    for stage in ("train_warmup", "train_joint"):  # frozen base; scheme B (and LoRA) train
        if stage in which:
            model = share_weights(base, make)
            model.requires_grad_(False)
            if stage == "train_joint":
                add_lora_ours(model, cfg.lora_rank)
            attach(model, SemanticConfig(scheme="xattn"))  # its parameters are new, so trainable
            cases[stage] = case(step(call_sem), ready(model))
    for variant in SEMANTIC_VARIANTS:  # scheme B's cost on top of forward / train_full (everything trainable)
        if f"semantic:{variant}" in which:
            model = share_weights(base, make)
            attach(model, semantic_config(variant, cfg.hidden, cfg.heads))
            model = ready(model)
            cases[f"semantic:{variant}:forward"] = case(forward(call_sem), model)
            cases[f"semantic:{variant}:train_full"] = case(step(call_sem), model)
    return cases


def _no_grad_amp(amp, fn):
    with torch.no_grad(), amp():
        return fn()


def clear_grads(model: nn.Module):
    for p in model.parameters():
        p.grad = None


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, time, peak matmul rate


def _cpu_flash_formulas() -> dict:
    """FlopCounterMode counts SDPA only through its CUDA kernels' names; the CPU flash kernels get the same
    formulas here (4 B H Lq Lk Dh forward; backward as flop_counter's sdpa_backward_flop_count)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten

    def fwd(q, k, v, *args, **kwargs) -> int:  # FlopCounterMode hands over shapes, not tensors
        return fc.sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return out


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False, custom_mapping=_cpu_flash_formulas())


def count_flops(fn: Callable) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def _gc_off():
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def time_calls(cases: dict[str, Case], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call; the cases alternate A B ... B A each round, so drift of the machine hits all alike."""
    names = list(cases)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            clear_grads(cases[n].model)
            _sync(device)
            with _gc_off():
                t0 = time.perf_counter()
                cases[n].run()
                _sync(device)
                times[n].append(time.perf_counter() - t0)
            clear_grads(cases[n].model)  # gradients of idle models would only take memory
    return times


def matmul_peak(device: str, dtype=torch.float32, n: int | None = None, repeats: int = 5) -> dict:
    """This machine's matrix-multiply rate: the median over `repeats` of an n x n x n GEMM (after one warm-up)."""
    n = n or (4096 if device == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    ts = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "gflops": 2 * n ** 3 / statistics.median(ts) / 1e9}


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_memory(case: Case, device: str) -> int:
    """Bytes one call needs on top of what is resident before it (see the module docstring)."""
    clear_grads(case.model)
    case.run()  # warm: one-time allocations (library workspaces, compiled graphs) are not the call's
    clear_grads(case.model)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        case.run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    case.run()
    return (_status_kib("VmHWM") - before) * 1024


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
        lora_from.lora_names = add_lora_ours(lora_from, cfg.lora_rank)
    cases = build_cases(cfg, args.memory_worker, args, sd, x, which, lora_from)
    del sd, lora_from
    gc.collect()
    print(json.dumps({name: peak_memory(case, args.device) for name, case in cases.items()}))


def measure_memory_cpu(args: argparse.Namespace, side: str, which: tuple[str, ...]) -> dict[str, int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", side, "--cases", ",".join(which),
           "--config", args.config, "--device", args.device, "--threads", str(args.threads)]
    cmd += [f"--{flag}" for flag in ("bf16", "checkpointing", "compile") if getattr(args, flag)]
    if args.config_json:
        cmd += ["--config-json", args.config_json]
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
    if getattr(args, "config_json", ""):  # tests: override fields, e.g. '{"repeats": 1}'
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.config_json).items()}
        cfg = dataclasses.replace(cfg, **over)
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
    lora_from = ours["train_lora"].model
    lora_from.lora_names = ours["train_lora"].extra["lora_names"]
    theirs = build_cases(cfg, "theirs", args, sd, x, SHARED, lora_from)
    del sd
    result["params"] = sum(p.numel() for p in ours["forward"].model.parameters())
    result["lora_trainable"] = {"ours": ours["train_lora"].extra["lora_params"],
                                "theirs": theirs["train_lora"].extra["lora_params"]}
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
# Memory plan for the official size

GIB = 2 ** 30
GPUS_GB = (24, 48, 80)
PLAN_STAGES = ("warmup", "joint", "finetune")  # what trains: B | LoRA + B | B's scales; the base is frozen, bf16
PLAN_RESOLUTIONS = {512: (1024, 512), 1024: (4096, 512)}  # pixels: (x_t tokens = x_cond tokens, text tokens)


def plan_variants(hidden: int, heads: int) -> dict[str, SemanticConfig]:
    return {"all blocks": SemanticConfig(scheme="xattn"),
            "every:4, half width": SemanticConfig(scheme="xattn", blocks="every:4", inner_dim=hidden // 2,
                                                  num_heads=heads // 2)}


def stage_model(params: FluxParams, stage: str, sem_cfg: SemanticConfig, lora_rank: int = 16) -> Flux:
    """The transformer of one training stage as train.py builds it on a GPU: base bf16 and frozen, LoRA and the
    semantic module fp32; only the stage's parameters require grad. On the meta device when called under it."""
    model = Flux(params).to(torch.bfloat16)
    model.requires_grad_(False)
    if stage == "joint":
        from lora import inject_lora
        inject_lora(model, rank=lora_rank)  # new LoRA parameters: fp32, trainable
    mod = attach(model, sem_cfg, dtype=torch.float32)
    if stage == "finetune":
        mod.requires_grad_(False)
        for p in mod.strength_parameters():
            p.requires_grad_(True)
    return model


def saved_activation_bytes(stage: str, hidden: int, heads: int, grid: int, n_txt: int, variant: str,
                           checkpointing: bool = False) -> dict:
    """Bytes autograd keeps for the backward of one training step, split by where they are saved (double blocks,
    single blocks, semantic modules, the rest), on a small model under bf16 autocast. Each saved buffer counts once
    (views of one storage share it); parameters do not count. With checkpointing the blocks' insides are not kept:
    what is counted then is everything outside the checkpointed blocks."""
    hd = hidden // heads
    params = FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=hidden,
                        mlp_ratio=4.0, num_heads=heads, depth=2, depth_single_blocks=2,
                        axes_dim=[hd - 2 * (hd * 7 // 16), hd * 7 // 16, hd * 7 // 16], theta=10_000, qkv_bias=True,
                        guidance_embed=True)
    torch.manual_seed(0)
    model = stage_model(params, stage, plan_variants(hidden, heads)[variant])
    model.gradient_checkpointing = checkpointing
    model.train()
    n = grid * grid
    img = torch.randn(1, 2 * n, 64)
    ids = torch.cat([image_ids(1, grid, grid), image_ids(1, grid, grid, index=1)], dim=1)

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    fp32_weights = {tuple(p.shape) for p in model.parameters() if p.dtype == torch.float32 and p.ndim == 2}
    where = ["other"]
    seen: dict[int, tuple[str, int]] = {}
    held = []  # every saved storage stays referenced, so no freed address is reused and mistaken for a seen one

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        held.append(st)
        if st.data_ptr() not in param_storages and st.data_ptr() not in seen:
            # autocast's bf16 copy of an fp32 weight (LoRA, semantic) is kept for the backward too: it grows with
            # the weight, not with the tokens, so it is counted apart
            cast = t.dtype == torch.bfloat16 and t.ndim == 2 and {tuple(t.shape), tuple(t.shape)[::-1]} & fp32_weights
            seen[st.data_ptr()] = ("weight_casts" if cast else where[0], st.nbytes())
        return t

    def entering(name):
        def hook(module, args):
            where[0] = name
        return hook

    def leaving(module, args, out):
        where[0] = "other"

    groups = {"double": list(model.double_blocks), "single": list(model.single_blocks),
              "semantic": list(model.semantic.double_blocks.values()) + list(model.semantic.single_blocks.values())}
    handles = [h for name, mods in groups.items() for m in mods
               for h in (m.register_forward_pre_hook(entering(name)), m.register_forward_hook(leaving))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(img, ids, torch.randn(1, n_txt, 64), text_ids(1, n_txt), torch.tensor([0.5]),
                        torch.randn(1, 32), torch.tensor([3.5]), semantic=torch.randn(1, n, 64))
    finally:
        for h in handles:
            h.remove()
    del out
    totals = dict.fromkeys(["double", "single", "semantic", "other", "weight_casts"], 0)
    for name, nbytes in seen.values():
        totals[name] += nbytes
    L_img, L = 2 * n, 2 * n + n_txt
    n_fp32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32 and p.ndim == 2)
    return {"double_per_token": totals["double"] / (params.depth * L),  # per block, per joint token
            "single_per_token": totals["single"] / (params.depth_single_blocks * L),
            "semantic_per_img_token": totals["semantic"] / max(1, len(groups["semantic"])) / L_img,  # per module
            "other_per_token": totals["other"] / L,
            "cast_per_fp32_weight": totals["weight_casts"] / max(1, n_fp32),  # bytes per fp32 matrix element
            "hidden": hidden, "totals": totals}


def memory_plan(widths=(256, 512), grid: int = 12, n_txt: int = 16) -> dict:
    """Per stage and resolution, for flux-dev (Kontext-dev has the same layout) with scheme B: parameters,
    gradients, AdamW state and activations with and without gradient checkpointing, per GPU alone and per GPU
    under FSDP. Activation bytes per token are measured at two small widths (their ratio checks that they grow
    linearly with the width) and scaled from the larger one to dev's width."""
    dev = PRESETS["dev"]
    D = dev.hidden_size
    n_blocks = dev.depth + dev.depth_single_blocks
    keys = ("double_per_token", "single_per_token", "semantic_per_img_token", "other_per_token")
    rows, per_token, linearity = [], {}, {}
    for variant in plan_variants(D, dev.num_heads):
        for stage in PLAN_STAGES:
            small = [saved_activation_bytes(stage, w, w // 64, grid, n_txt, variant) for w in widths]
            per_token[(variant, stage)] = {k: small[-1][k] * D / small[-1]["hidden"] for k in keys}
            per_token[(variant, stage)]["cast_per_fp32_weight"] = small[-1]["cast_per_fp32_weight"]
            linearity[(variant, stage)] = {k: small[1][k] / small[0][k] * widths[0] / widths[1] for k in keys
                                           if small[0][k]}
            with torch.device("meta"):
                model = stage_model(dev, stage, plan_variants(D, dev.num_heads)[variant])
            base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("semantic.")
                       and ".lora_" not in n)
            fp32 = sum(p.numel() for n, p in model.named_parameters() if n.startswith("semantic.") or ".lora_" in n)
            fp32_matrices = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32 and p.ndim == 2)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            # the largest FSDP unit: a double block with its semantic module (all gathered at once, prefetch: 2)
            unit = max(sum(p.numel() * p.element_size() for p in blk.parameters()) for blk in model.double_blocks)
            unit += max((sum(p.numel() * 4 for p in m.parameters()) for m in model.semantic.double_blocks.values()),
                        default=0)
            n_sem = len(model.semantic.double_blocks) + len(model.semantic.single_blocks)
            weights, grads, optim = 2 * base + 4 * fp32, 4 * trainable, 8 * trainable  # AdamW: fp32 m and v
            for res, (n_xt, n_t) in PLAN_RESOLUTIONS.items():
                L_img, L = 2 * n_xt, 2 * n_xt + n_t
                pt = per_token[(variant, stage)]
                double, single = pt["double_per_token"] * L, pt["single_per_token"] * L  # one block's
                sem_act = n_sem * pt["semantic_per_img_token"] * L_img  # Flux._run does not checkpoint these
                other = pt["other_per_token"] * L + pt["cast_per_fp32_weight"] * fp32_matrices
                act = dev.depth * double + dev.depth_single_blocks * single + sem_act + other
                # checkpointing: every block keeps its input (L tokens x D, bf16), and one block's activations
                # live again while its backward runs
                act_ckpt = n_blocks * L * D * 2 + max(double, single) + sem_act + other
                # if the semantic modules were checkpointed with their blocks: their input is the block's output,
                # kept anyway; one module's activations come back in the backward
                act_ckpt_b = act_ckpt - sem_act + (sem_act / n_sem if n_sem else 0)
                states = weights + grads + optim
                fsdp = {k: states / k + 2 * unit + act_ckpt for k in (2, 4, 8)}
                rows.append({"variant": variant, "stage": stage, "resolution": res, "trainable": trainable,
                             "weights": weights, "grads": grads, "optim": optim, "act": act, "act_ckpt": act_ckpt,
                             "act_ckpt_with_b": act_ckpt_b, "act_semantic": sem_act,
                             "total": states + act, "total_ckpt": states + act_ckpt,
                             "total_ckpt_with_b": states + act_ckpt_b, "fits_ckpt_with_b": fits(states + act_ckpt_b),
                             "fits": fits(states + act), "fits_ckpt": fits(states + act_ckpt),
                             "fsdp_ckpt": fsdp, "fsdp_fits": {k: fits(v) for k, v in fsdp.items()}})
    return {"model": "flux-dev", "dtype": "base bf16 frozen; LoRA and semantic fp32; AdamW fp32 m, v",
            "per_token_bytes": {f"{v} / {s}": {k: round(x, 2) for k, x in d.items()}
                                for (v, s), d in per_token.items()},
            "linearity": {f"{v} / {s}": {k: round(x, 3) for k, x in d.items()} for (v, s), d in linearity.items()},
            "rows": rows}


def fits(nbytes: float) -> str:
    """The smallest card of GPUS_GB (sold as GB, reported as GiB: 24 GB = 24 GiB) that holds nbytes plus 10%
    (allocator fragmentation) and 1 GiB (CUDA context, library workspaces)."""
    need = nbytes * 1.1 + GIB
    return next((f"{g} GB" for g in GPUS_GB if need <= g * GIB), f"> {GPUS_GB[-1]} GB")


def plan_markdown(plan: dict) -> str:
    g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    lines = ["| scheme B | stage | image | trainable | weights | grads + AdamW | act. | act. ckpt | act. ckpt+B "
             "| total | total ckpt | fits | fits ckpt | fits ckpt+B | FSDP ckpt x2 | x4 | x8 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|"]
    for r in plan["rows"]:
        f = r["fsdp_ckpt"]
        lines.append(f"| {r['variant']} | {r['stage']} | {r['resolution']}² | {r['trainable'] / 1e6:,.0f}M "
                     f"| {g(r['weights'])} | {g(r['grads'] + r['optim'])} | {g(r['act'])} | {g(r['act_ckpt'])} "
                     f"| {g(r['act_ckpt_with_b'])} | {g(r['total'])} | {g(r['total_ckpt'])} | {r['fits']} "
                     f"| {r['fits_ckpt']} | {r['fits_ckpt_with_b']} | "
                     + " | ".join(f"{g(f[k])} ({r['fsdp_fits'][k]})" for k in sorted(f)) + " |")
    lines.append("")
    lines.append("GiB per GPU; fits: the smallest of 24 / 48 / 80 GB cards with 10% + 1 GiB to spare. act. ckpt: "
                 "gradient checkpointing of the FLUX blocks (Flux._run) as the code is now: the semantic modules are "
                 "not checkpointed and keep their activations. act. ckpt+B: if they were checkpointed with their "
                 "blocks. FSDP (full shard, per block): parameters, gradients and AdamW state divided over the GPUs, "
                 "two gathered blocks added, activations per GPU unchanged (ckpt as now).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time our FLUX transformer against diffusers (+ peft), same weights.")
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
    p.add_argument("--memory-plan", action="store_true", help="print the flux-dev memory plan and exit")
    p.add_argument("--config-json", default="", help=argparse.SUPPRESS)  # tests: override config fields
    p.add_argument("--memory-worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--cases", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args)
    if args.memory_plan:
        plan = memory_plan()
        print(plan_markdown(plan))
        print(json.dumps(plan))
        return plan
    result = run_benchmark(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
