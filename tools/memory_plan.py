"""
GPU memory of one training step of FLUX.1-dev / Kontext-dev (one layout) with scheme B, per stage,
at 512x512 and 1024x1024 pixels, and the card each needs.

    python -m tools.memory_plan          # the plan, the which-GPU table and the targets, then one JSON line (~10 min)
    python -m tools.memory_plan --quick  # fp8 base + checkpointing only: the which-GPU table and the targets (~4 min)
    python -m tools.memory_plan --check  # the same code against real training steps of small models on this CPU

No GPU and no checkpoint are needed. How the plan is made:
- the stage model is built as train.py builds it (pipeline.build_model's order: the base in bf16, or with its
  Linear weights in fp8 through extras.fp8.quantize_, float32 scales per row; the semantic module, then for joint
  and finetune LoRA rank 16, both fp32; select_trainable marks what the stage trains; make_optimizer: train.py's
  AdamW), on the meta device: parameter, buffer, gradient and AdamW bytes are counted from its tensors;
- then a whole training step as train.py runs it (flow.flow_loss under bf16 autocast, backward, gradient clipping,
  AdamW; the optimizer state allocated as after a first step) runs on tensors without data (torch's
  FakeTensorMode: shapes, dtypes, strides, no storage), and LiveTensorBytes counts every storage an operator returns
  from that operator until its last reference goes. The peak is the most alive at once, op by op: what
  torch.cuda.max_memory_allocated reports for the same operators, less the allocator's rounding and what kernels
  allocate inside themselves. Nothing is scaled from another size: dev's step is traced as it is (5 to 15 s per
  step on a CPU; the full plan traces 96).
The trace follows what the code does: autocast's casts and its cache of trainable fp32 weights' casts, gradient
checkpointing (Flux.run recomputes each block with its semantic module), the bf16 copies fp8 weights are
dequantized to (and that autograd keeps for the backward), gradients as they accumulate, AdamW's temporaries.
For a GPU it assumes:
- CUDA autocast runs layer_norm in float32 (the CPU's does not): cuda_layer_norms_ makes the model's LayerNorms do
  so under the trace's CPU autocast; every other operator of the step is in the same autocast class on both;
- AdamW as torch picks it for CUDA tensors (foreach): a float32 temporary the size of the trainable parameters;
- autograd sums two gradients of one tensor in place (as it does without a dispatch mode; under one it adds out of
  place): LiveTensorBytes takes the sum as the first gradient's storage;
- flash attention: its outputs (result, log-sum-exp) are traced, the float32 dq accumulator its backward allocates
  inside the kernel is added (4 bytes x tokens x hidden);
- a card holds the peak + 10% (allocator fragmentation) + 1 GiB (CUDA context, library workspaces): fits();
- latents and prompt embeddings cached (train.py encodes the data once): no VAE, T5 or CLIP on the GPU; batch 1,
  512 text tokens.
FSDP2 (fully_shard per block, its semantic module in the block's unit): weights, AdamW state and the accumulated
gradients divided over the GPUs; the largest unit gathered twice (the running one, the prefetched one) with its
unsharded gradients, the parameters outside the blocks gathered whole; activations per GPU as traced.

`--check` plans small models (hidden 128 and 256, a few hundred tokens) with the same code and the CPU's own
autocast (policy "cpu", which also counts the temporaries CPU kernels allocate to cast mixed-dtype operands) and sets
each against the real peak of the same training step on this CPU: real tensors, PyTorch's allocator, its allocation
events read through torch.profiler (measure.allocated_peak_bytes), so neither other processes nor the C library's
heap enter it. What the trace cannot see there: buffers the CPU flash-attention kernel allocates inside itself.
"""

import argparse
import dataclasses
import json
import sys
import time
import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from extras import fp8
from extras.schemes import attach
from flow import flow_loss, make_condition, text_ids
from flux_model import PRESETS, Flux, FluxParams
from lora import inject_lora
from sem_cross_attn import DEFAULT_B, SemanticConfig
from tools.measure import allocated_peak_bytes, tensor_bytes

GIB = 2 ** 30
GPUS_GB = (16, 24, 48, 80)
STAGES = ("warmup", "joint", "finetune")  # what trains: B | LoRA + B | B's scales; the base is frozen
BASES = ("bf16", "fp8")
RESOLUTIONS = {512: 32, 1024: 64}  # pixels -> side of the x_t token grid (x_cond: as many tokens again)
N_TXT = 512  # T5 tokens of FLUX.1-dev / Kontext-dev
FSDP_GPUS = (2, 4, 8)
# What train.py does that a step's memory depends on, stated once here:
LORA_RANK, LORA_ALPHA = 16, 16.0  # its LoRA (joint, finetune)
SEM_DROP_JOINT = 0.1  # the joint stage's condition dropout: a per-sample semantic strength of 0 or 1


FULL_B = "full width (separate)"
LEAN_B = "decoupled, 64-dim tokens (default)"


def b_configs(hidden: int, heads: int) -> dict[str, SemanticConfig]:
    """Scheme B's separate form at full width, the default (decoupled, 64-dim tokens: sem_cross_attn.DEFAULT_B), the
    decoupled form with one shared key/value projection, and the narrowest separate form."""
    separate = SemanticConfig(attention="separate", token_dim=0)
    return {FULL_B: separate,
            LEAN_B: dataclasses.replace(DEFAULT_B),
            "decoupled, shared K/V, 256-dim": SemanticConfig(attention="decoupled", token_dim=256, shared_kv=True),
            "every:4, half width": dataclasses.replace(separate, blocks="every:4", inner_dim=hidden // 2,
                                                       num_heads=heads // 2)}


# ----------------------------------------------------------------------------------------------------------------
# The stage model and what is resident before a step


def stage_model(params: FluxParams, stage: str, sem_cfg: SemanticConfig, base: str = "fp8",
                lora_rank: int = LORA_RANK) -> Flux:
    """The transformer of one training stage as train.py builds it, on the meta device (nothing allocated): the base
    frozen in bf16, or with its Linear weights in fp8 (float32 scale per row; biases and norms bf16); the semantic
    module and (joint, finetune) LoRA in fp32; requires_grad as select_trainable sets it for the stage."""
    if base not in BASES:
        raise ValueError(f"base {base!r}: choose from {BASES}")
    with torch.device("meta"):
        model = Flux(params).to(torch.bfloat16)
        if base == "fp8":
            fp8.quantize_(model)
        attach(model, sem_cfg, dtype=torch.float32)  # on meta its parameters are created in fp32 already
        if stage in ("joint", "finetune"):  # the finetune stage starts from joint's output: LoRA is there, frozen
            inject_lora(model, rank=lora_rank, alpha=LORA_ALPHA, dtype=torch.float32)
    select_trainable(model, stage)
    return model


def select_trainable(model: Flux, stage: str) -> list[nn.Parameter]:
    """What each stage trains, as train.py chooses it (the base stays frozen): warmup the semantic module, joint the
    semantic module and LoRA, finetune the semantic module's strength scales. Sets requires_grad; returns them."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: choose from {STAGES}")
    strengths = {id(p) for p in model.semantic.strength_parameters()}
    trains = {"warmup": lambda n, p: n.startswith("semantic."),
              "joint": lambda n, p: n.startswith("semantic.") or ".lora_" in n,
              "finetune": lambda n, p: id(p) in strengths}[stage]
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if trains(n, p)]
    for p in params:
        p.requires_grad_(True)
    return params


def fsdp_units(model: Flux) -> dict:
    """FSDP2 with one unit per block (its semantic module in it): bytes of the largest unit's parameters, of its
    trainable parameters' gradients, and of the parameters outside the blocks (the root unit)."""
    sem = model.semantic
    units = [list(b.parameters()) + (list(sem.double_blocks[str(i)].parameters())
                                     if str(i) in getattr(sem, "double_blocks", {}) else [])
             for i, b in enumerate(model.double_blocks)]
    units += [list(b.parameters()) + (list(sem.single_blocks[str(i)].parameters())
                                      if str(i) in getattr(sem, "single_blocks", {}) else [])
              for i, b in enumerate(model.single_blocks)]
    in_units = {id(p) for u in units for p in u}
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return {"unit": max(nbytes(u) for u in units),
            "unit_grads": max(nbytes([p for p in u if p.requires_grad]) for u in units),
            "root": nbytes([p for p in model.parameters() if id(p) not in in_units])}


def state_bytes(model: Flux) -> dict:
    """What the model holds before a step, counted from its tensors: parameters and buffers as stored, and the
    gradients and AdamW state (m and v in the parameter's dtype) of what trains."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return {"weights": tensor_bytes(model), "trainable": sum(p.numel() for p in trainable), "grads": grads,
            "adamw": 2 * grads, **fsdp_units(model)}


def materialize_(model: nn.Module, make) -> nn.Module:
    """Every parameter and buffer replaced by make(tensor) (same shape and dtype, another device or kind of tensor),
    requires_grad kept, shared tensors kept shared."""
    made = {}
    for mod in model.modules():
        for store, param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in made:
                    made[id(t)] = nn.Parameter(make(t), requires_grad=t.requires_grad) if param else make(t)
                store[name] = made[id(t)]
    return model


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Values for a materialized model (memory does not depend on them; small ones keep the step's numbers finite):
    weights N(0, 0.02^2), norm scales 1, fp8 weights quantized from such weights with their scales."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight.dtype in fp8.FP8_DTYPES:
            w = torch.empty(mod.weight.shape, device=mod.weight.device).normal_(0, 0.02, generator=g)
            q, s = fp8.quantize(w, "row" if mod.weight_scale.ndim else "tensor")
            mod.weight.copy_(q)
            mod.weight_scale.copy_(s)
    for name, p in model.named_parameters():
        if p.dtype in fp8.FP8_DTYPES:
            continue
        if name.endswith("scale") and p.numel() > 1:
            p.fill_(1.0)
        else:
            p.copy_(torch.empty(p.shape, device=p.device).normal_(0, 0.02, generator=g))
    return model


# ----------------------------------------------------------------------------------------------------------------
# One training step, as train.py runs it


def training_batch(params: FluxParams, side: int, n_txt: int, stage: str, device="cpu", batch: int = 1) -> tuple:
    """What train.py feeds one step: cached latents x0 and x_cond and the semantic latents in bf16 (a side x side
    token grid each), fp32 noise and t, the cached prompt embedding (bf16), guidance; the joint stage's condition
    dropout as a per-sample strength. Returns (x0, noise, t, cond, guidance)."""
    n, bf16 = side * side, torch.bfloat16
    x0 = torch.randn(batch, n, 64, device=device).to(bf16)
    noise = torch.randn(batch, n, 64, device=device)
    t = torch.rand(batch, device=device)
    text = (torch.randn(1, n_txt, params.context_in_dim, device=device).to(bf16), text_ids(1, n_txt, device=device),
            torch.randn(1, params.vec_in_dim, device=device).to(bf16))
    cond = make_condition(torch.randn(batch, n, 64, device=device).to(bf16),
                          torch.randn(batch, n, 64, device=device).to(bf16), text, side, side)
    if stage == "joint":
        cond.sem_strength = torch.rand(batch, device=device) >= SEM_DROP_JOINT
    guidance = torch.full((batch,), 3.5, device=device) if params.guidance_embed else None
    return x0, noise, t, cond, guidance


def batch_bytes(batch: tuple) -> int:
    """Bytes of the batch's tensors (each storage once: the text is expanded views)."""
    x0, noise, t, cond, guidance = batch
    ts = [x0, noise, t, guidance, *(getattr(cond, f.name) for f in dataclasses.fields(cond))]
    storages = {x.untyped_storage()._cdata: x.untyped_storage().nbytes() for x in ts if isinstance(x, Tensor)}
    return sum(storages.values())


def make_optimizer(model: Flux, stage: str) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """train.py's AdamW over the stage's trainable parameters, in its two parameter groups (the strength scales
    apart: they get a larger learning rate), with the implementation torch picks for CUDA tensors (foreach, which
    works group by group), whatever the device here; its state allocated as after a first step."""
    params = select_trainable(model, stage)
    strengths = {id(p) for p in model.semantic.strength_parameters()}
    groups = [[p for p in params if id(p) not in strengths], [p for p in params if id(p) in strengths]]
    opt = torch.optim.AdamW([{"params": g} for g in groups if g], lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                            foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt, params


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))


def training_step(model: Flux, batch: tuple, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                  before_optimizer=None) -> None:
    """train.py's step with one micro-batch (the gradients were set to None at the end of the last one): the flow
    loss under bf16 autocast, backward, clipping to norm 1, AdamW."""
    x0, noise, t, cond, guidance = batch
    device = x0.device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        per_sample = flow_loss(model, x0, noise, t, cond, guidance)  # [B]
    loss = per_sample.mean()
    loss.backward()
    del loss
    if before_optimizer is not None:
        before_optimizer()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# Counting live bytes op by op


def _tensors(x):
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


_ELEMENTWISE = {"add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "addcmul", "addcmul_",
                "addcdiv", "addcdiv_", "lerp", "lerp_", "where"}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages alive, op by op, and the most at once. Every storage an operator returns that is not
    one of its inputs' (a view, an in-place result) is counted from then until the storage is freed (a weak
    reference on it says when); storages that existed before the mode was entered are not counted (the caller adds
    them). Gradients of `params` are told apart once accumulated (post-accumulate-grad hooks), so that a sharded
    plan can divide them. `phase` ("forward_backward" or "optimizer", set by the caller) says which peak to raise."""

    def __init__(self, params=(), shards=FSDP_GPUS, cpu_temporaries: bool = False):
        super().__init__()
        self.cpu_temporaries = cpu_temporaries
        self.size: dict[int, int] = {}  # counted storages: address -> bytes
        self.refs: dict[int, weakref.ref] = {}
        self.grad_keys: set[int] = set()
        self.now = 0  # bytes of the counted storages alive
        self.grads = 0  # of which: accumulated gradients of params
        self.phase = "forward_backward"
        self.peak = {"forward_backward": 0, "optimizer": 0}
        self.peak_sharded = dict.fromkeys(shards, 0)  # forward/backward: the most of (now - grads) + grads / k
        self.hooks = [p.register_post_accumulate_grad_hook(self._grad) for p in params]

    def _freed(self, key: int, ref=None):
        n = self.size.pop(key)
        self.refs.pop(key, None)
        self.now -= n
        if key in self.grad_keys:
            self.grad_keys.discard(key)
            self.grads -= n

    def _grad(self, p: Tensor):
        key = p.grad.untyped_storage()._cdata
        if key in self.size and key not in self.grad_keys:
            self.grad_keys.add(key)
            self.grads += self.size[key]

    def close(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _temporary(self, func, args) -> int:
        """Bytes a CPU kernel allocates inside an elementwise op whose tensor operands have different dtypes:
        TensorIterator casts each operand of another dtype than the common one to a copy, and computes a result that
        must end in another dtype (in place, e.g. fp8 dequantization's bf16 weight times its float32 row scales)
        into a temporary that it copies back. CUDA kernels cast element by element and allocate neither."""
        if func.overloadpacket.__name__ not in _ELEMENTWISE:
            return 0
        ts = [a for a in args if isinstance(a, Tensor)]
        if len(ts) < 2 or len({t.dtype for t in ts}) == 1:
            return 0
        common, ndim = ts[0].dtype, ts[0].ndim
        for t in ts[1:]:  # a tensor of more than 0 dims decides within its kind (float over int), as TensorIterator
            common = torch.result_type(torch.empty((1,) * ndim, dtype=common, device="meta"), t)
            ndim = max(ndim, t.ndim)
        extra = sum(t.numel() * common.itemsize for t in ts if t.ndim and t.dtype != common)
        if func.overloadpacket.__name__.endswith("_") and ts[0].dtype != common:
            extra += ts[0].numel() * common.itemsize  # the in-place result's temporary
        return extra

    def _raise(self, now: int):
        if now > self.peak[self.phase]:
            self.peak[self.phase] = now
        if self.phase == "forward_backward":
            other = now - self.grads
            for k, v in self.peak_sharded.items():
                if other + self.grads / k > v:
                    self.peak_sharded[k] = other + self.grads / k

    @staticmethod
    def _accumulation(func, args, kwargs) -> bool:
        """autograd's engine summing two gradients of one tensor (a tensor used twice): under a dispatch mode, and
        for tensor subclasses such as FakeTensor, it adds out of place (old + new); without one, as on a GPU, it adds
        into the first gradient when nothing else holds it (InputBuffer::accumulate), allocating nothing. Told
        apart as an add of two alike tensors inside backward with grad mode off (checkpointing's recomputation runs
        with it on)."""
        return (func is torch.ops.aten.add.Tensor and not kwargs and len(args) == 2
                and torch._C._current_graph_task_id() != -1 and not torch.is_grad_enabled()
                and isinstance(args[1], Tensor) and args[0].shape == args[1].shape
                and args[0].dtype == args[1].dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._accumulation(func, args, kwargs):
            # the sum takes the first gradient's place: counted from now on, but no peak of both at once
            self._count(out)
            return out
        if self._count(out, args, kwargs):
            self._raise(self.now)
        if self.cpu_temporaries and (extra := self._temporary(func, args)):
            self._raise(self.now + extra)  # inputs and result alive, and the kernel's temporaries with them
        return out

    def _count(self, out, args=(), kwargs=None) -> bool:
        """Count the storages of `out` that are new (not counted yet, not an input's); True if there were any."""
        new = [t for t in _tensors(out) if t.untyped_storage()._cdata not in self.size]
        if not new:
            return False
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in new:
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in self.size:
                continue
            self.size[key] = st.nbytes()
            self.now += self.size[key]
            self.refs[key] = weakref.ref(st, partial(self._freed, key))
        return True


def cuda_layer_norms_(model: nn.Module) -> nn.Module:
    """Every nn.LayerNorm of the model runs as CUDA autocast runs layer_norm: under autocast its floating inputs are
    cast to float32 and so is its result (CUDA's autocast lists layer_norm among its float32 operators; the CPU's
    keeps it in the input's dtype). The other operators of a FLUX step are in the same autocast class on both
    (matrix products and attention in bf16, the rest as they come). Patched per instance, so gradient
    checkpointing's recomputation (which restores the autocast state) runs them the same way."""
    for norm in model.modules():
        if isinstance(norm, nn.LayerNorm):
            def forward(x: Tensor, norm=norm) -> Tensor:
                if not torch.is_autocast_enabled(x.device.type):
                    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                up = lambda t: None if t is None else t.float()  # noqa: E731
                with torch.autocast(x.device.type, enabled=False):
                    return F.layer_norm(x.float(), norm.normalized_shape, up(norm.weight), up(norm.bias), norm.eps)
            norm.forward = forward
    return model


# ----------------------------------------------------------------------------------------------------------------
# The plan of one stage model


def _give_grid(model: Flux, side: int):
    """The semantic module reads its token grid from the values of the ids (SemanticModule.prepare); tensors without
    data have none, so the grid is given: the vae encoder's tokens lie on the target's side x side grid."""
    encoder = model.semantic.encoder
    encode = type(encoder).forward.__get__(encoder)
    encoder.forward = lambda s: (encode(s)[0], (side, side))


def plan_stage(params: FluxParams, stage: str, sem_cfg: SemanticConfig, base: str, sides=(32, 64),
               n_txt: int = N_TXT, checkpointing=(False, True), policy: str = "cuda", batch: int = 1,
               lora_rank: int = LORA_RANK) -> list[dict]:
    """The plan of one stage model: for every token grid side and checkpointing choice, the bytes resident before
    the step (weights, AdamW state, batch) and the step's peak on top, traced op by op (see the module docstring),
    at `batch` samples per step.
    policy: "cuda" (layer_norm in float32 as a GPU's autocast runs it, flash attention's backward workspace added)
    or "cpu" (CPU autocast as it is, and the CPU kernels' cast temporaries: what `--check` measures)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = stage_model(params, stage, sem_cfg, base, lora_rank)
    counts = state_bytes(model)
    rows = []
    with FakeTensorMode():
        materialize_(model, lambda t: torch.empty(t.shape, dtype=t.dtype))
        if policy == "cuda":
            cuda_layer_norms_(model)
        opt, trainable = make_optimizer(model, stage)
        resident = tensor_bytes(model) + optimizer_bytes(opt)
        model.train()
        for side in sides:
            inputs = training_batch(params, side, n_txt, stage, batch=batch)
            _give_grid(model, side)
            for ckpt in checkpointing:
                model.gradient_checkpointing = ckpt
                live = LiveTensorBytes(trainable, cpu_temporaries=policy == "cpu")
                try:
                    with live:
                        training_step(model, inputs, trainable, opt,
                                      before_optimizer=lambda: setattr(live, "phase", "optimizer"))
                finally:
                    live.close()
                n_img, n_all = 2 * side * side, 2 * side * side + n_txt
                # flash attention's backward: a float32 accumulator of dq inside the kernel (CUDA), for one block
                workspace = 4 * n_all * params.hidden_size if policy == "cuda" else 0
                static = resident + batch_bytes(inputs)
                fb = live.peak["forward_backward"] + workspace
                step = max(fb, live.peak["optimizer"])
                row = {"stage": stage, "base": base, "side": side, "image_tokens": n_img, "text_tokens": n_txt,
                       "checkpointing": ckpt, "policy": policy, **counts, "resident": static,
                       "optimizer_state": optimizer_bytes(opt), "batch": batch_bytes(inputs),
                       "peak_forward_backward": live.peak["forward_backward"],
                       "peak_optimizer": live.peak["optimizer"], "workspace": workspace,
                       "step": step, "total": static + step}
                # FSDP2 over k GPUs: weights, AdamW state and accumulated gradients sharded; the largest unit
                # gathered twice with its unsharded gradients, the root unit whole; activations as traced
                row["fsdp"] = {k: max((counts["weights"] + row["optimizer_state"]) / k + row["batch"]
                                      + live.peak_sharded[k] + workspace + 2 * counts["unit"] + counts["unit_grads"]
                                      + counts["root"],
                                      (static - row["batch"] + live.peak["optimizer"]) / k + row["batch"])
                               for k in FSDP_GPUS}
                rows.append(row)
    return rows


def dev_plan(b_names=None, stages=STAGES, bases=BASES, checkpointing=(False, True), resolutions=RESOLUTIONS,
             params: FluxParams | None = None, progress: bool = True) -> list[dict]:
    """plan_stage for FLUX.1-dev (Kontext-dev has the same layout; `params` another model), for every scheme B
    configuration, stage and base named, at each resolution (pixels -> token grid side)."""
    dev = params or PRESETS["dev"]
    configs = b_configs(dev.hidden_size, dev.num_heads)
    rows = []
    for name in b_names or configs:
        for stage in stages:
            for base in bases:
                t0 = time.perf_counter()
                for r in plan_stage(dev, stage, configs[name], base, tuple(resolutions.values()),
                                    checkpointing=checkpointing):
                    res = next(k for k, v in resolutions.items() if v == r["side"])
                    rows.append({"b": name, "resolution": res, **r})
                if progress:
                    print(f"planned {name} / {stage} / {base} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return rows


def need(nbytes: float) -> float:
    """What a step of `nbytes` (a plan's total) needs of a card: 10% more (allocator fragmentation) and 1 GiB (CUDA
    context, library workspaces)."""
    return nbytes * 1.1 + GIB


def fits(nbytes: float) -> str:
    """The smallest card of GPUS_GB (sold as GB, reported as GiB: 24 GB = 24 GiB) that holds need(nbytes)."""
    return next((f"{g} GB" for g in GPUS_GB if need(nbytes) <= g * GIB), f"> {GPUS_GB[-1]} GB")


# ----------------------------------------------------------------------------------------------------------------
# train.py's defaults on a GPU: the largest batch the plan fits on the card

BATCHES = (8, 4, 2, 1)  # what train.py tries, largest first (8: the demo's batch)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A batch size and checkpointing for one card, with the plan's total bytes for them; batch None: nothing of
    BATCHES fits, not even batch 1 with checkpointing (its total is given)."""
    batch: int | None
    checkpointing: bool
    total: float


def choose(card_bytes: float, plan, batches=BATCHES, checkpointing=(False, True)) -> Choice:
    """The largest of `batches` whose planned step fits the card (need(total) <= card), without gradient
    checkpointing where that batch fits so, else with it (FLUX trainers checkpoint by default: it costs about a third
    more compute, and buys a larger batch); `checkpointing` limits the choice (a flag the user gave). `plan(batch)`
    -> {checkpointing: plan row} (plan_for's). A batch is planned only when an estimate from batch 1 (what is
    resident, plus the batch times one sample's activations) does not already rule it out by more than 20%: the
    answer needs few traces."""
    one = plan(1)
    for b in batches:
        for ckpt in checkpointing:
            resident, per_sample = one[ckpt]["resident"], one[ckpt]["total"] - one[ckpt]["resident"]
            if need(0.8 * (resident + b * per_sample)) > card_bytes:
                continue  # far too large: not worth a trace
            total = plan(b)[ckpt]["total"]
            if need(total) <= card_bytes:
                return Choice(b, ckpt, total)
    return Choice(None, checkpointing[-1], plan(batches[-1])[checkpointing[-1]]["total"])


def default_choices(stages=("warmup", "joint"), bases=BASES, resolutions=RESOLUTIONS, cards=(24, 48, 80)) -> list[dict]:
    """What train.py chooses for FLUX.1-dev with the default scheme B, for each stage, base, resolution and card."""
    rows = []
    for stage in stages:
        for base in bases:
            for res, side in resolutions.items():
                plan = plan_for(PRESETS["dev"], stage, DEFAULT_B, base, side)
                for card in cards:
                    c = choose(card * GIB, plan)
                    rows.append({"stage": stage, "base": base, "resolution": res, "card_gb": card,
                                 "batch": c.batch, "checkpointing": c.checkpointing, "total": c.total})
    return rows


def markdown_defaults(rows: list[dict]) -> str:
    lines = ["| stage | base | resolution | 24 GB | 48 GB | 80 GB |", "|---|---|---|---|---|---|"]
    cell = lambda r: ("nothing fits" if r["batch"] is None else  # noqa: E731
                      f"{r['batch']}{' + ckpt' if r['checkpointing'] else ''} ({_gib(r['total'])})")
    for key in dict.fromkeys((r["stage"], r["base"], r["resolution"]) for r in rows):
        cells = [cell(r) for r in rows if (r["stage"], r["base"], r["resolution"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]}x{key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_for(params: FluxParams, stage: str, sem_cfg: SemanticConfig, base: str, side: int, n_txt: int = N_TXT,
             lora_rank: int = LORA_RANK):
    """choose's `plan`: batch -> {checkpointing: plan_stage's row} of this stage model at this token grid side, each
    batch traced once."""
    cache = {}

    def plan(batch: int) -> dict[bool, dict]:
        if batch not in cache:
            rows = plan_stage(params, stage, sem_cfg, base, (side,), n_txt, batch=batch, lora_rank=lora_rank)
            cache[batch] = {r["checkpointing"]: r for r in rows}
        return cache[batch]
    return plan


# ----------------------------------------------------------------------------------------------------------------
# The check: the plan of small models against their real steps on this CPU


def small_params(hidden: int, heads: int, depth: int, single: int) -> FluxParams:
    hd = hidden // heads
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=hidden,
                      mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single,
                      axes_dim=[hd - 2 * (hd * 7 // 16), hd * 7 // 16, hd * 7 // 16], theta=10_000, qkv_bias=True,
                      guidance_embed=True)


# (hidden, heads, double blocks, single blocks, token grid side, text tokens)
CHECK_MODELS = {"hidden 128, 2+2 blocks, 288+32 tokens": (128, 2, 2, 2, 12, 32),
                "hidden 256, 2+4 blocks, 512+64 tokens": (256, 4, 2, 4, 16, 64)}


def measured_step(params: FluxParams, stage: str, sem_cfg: SemanticConfig, base: str, side: int, n_txt: int,
                  checkpointing: bool) -> dict:
    """The same stage model with real tensors on this CPU: a first step allocates AdamW's state, then the bytes
    resident (counted from the tensors) and the peak of a second step above them (measure.allocated_peak_bytes)."""
    model = randomize_(materialize_(stage_model(params, stage, sem_cfg, base),
                                    lambda t: torch.empty(t.shape, dtype=t.dtype)))
    model.train()
    model.gradient_checkpointing = checkpointing
    opt, trainable = make_optimizer(model, stage)
    torch.manual_seed(0)
    batch = training_batch(params, side, n_txt, stage)
    training_step(model, batch, trainable, opt)  # as after step 1 (AdamW's state was allocated by make_optimizer)
    resident = tensor_bytes(model) + optimizer_bytes(opt) + batch_bytes(batch)
    step = allocated_peak_bytes(lambda: training_step(model, batch, trainable, opt))
    return {"resident": resident, "step": step, "total": resident + step}


def check(models=None, b_names=None, stages=STAGES, bases=BASES, checkpointing=(False, True),
          progress: bool = True) -> list[dict]:
    """Plan (policy "cpu") against measurement for small models: one row per model, B configuration, stage, base
    and checkpointing choice, with the relative error of the total and of the step's part above what is resident."""
    rows = []
    for label in models or CHECK_MODELS:
        hidden, heads, depth, single, side, n_txt = CHECK_MODELS[label]
        params = small_params(hidden, heads, depth, single)
        configs = b_configs(hidden, heads)
        for name in b_names or configs:
            for stage in stages:
                for base in bases:
                    planned = plan_stage(params, stage, configs[name], base, (side,), n_txt, checkpointing, "cpu")
                    for p in planned:
                        m = measured_step(params, stage, configs[name], base, side, n_txt, p["checkpointing"])
                        rows.append({"model": label, "b": name, "stage": stage, "base": base,
                                     "checkpointing": p["checkpointing"], "plan_total": p["total"],
                                     "measured_total": m["total"], "plan_step": p["step"], "measured_step": m["step"],
                                     "resident": p["resident"], "measured_resident": m["resident"],
                                     "error_total": p["total"] / m["total"] - 1,
                                     "error_step": p["step"] / m["step"] - 1})
                    if progress:
                        print(f"checked {label} / {name} / {stage} / {base}", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Tables


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def _cell(nbytes: float) -> str:
    return f"{_gib(nbytes)} ({fits(nbytes)})"


def _by_case(rows: list[dict]) -> dict:
    return {(r["b"], r["stage"], r["resolution"], r["base"], r["checkpointing"]): r for r in rows}


def markdown_plan(rows: list[dict]) -> str:
    """One row per scheme B configuration, stage and image size: what trains, the weights as stored, gradients +
    AdamW state, and the peak of a step (GiB, with the card it needs) for each base and checkpointing choice."""
    by = _by_case(rows)
    cols = [(base, ckpt) for base in BASES for ckpt in (False, True)]
    lines = ["| scheme B | stage | image | trainable | weights bf16 / fp8 | grads + AdamW | "
             + " | ".join(f"peak {b}{' + ckpt' if c else ''}" for b, c in cols) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(cols)]
    keys = dict.fromkeys((r["b"], r["stage"], r["resolution"]) for r in rows)
    for b, stage, res in keys:
        got = {c: by.get((b, stage, res, *c)) for c in cols}
        any_row = next(r for r in got.values() if r is not None)
        w = {base: next((r["weights"] for c, r in got.items() if r is not None and c[0] == base), None)
             for base in BASES}
        lines.append(f"| {b} | {stage} | {res}² | {any_row['trainable']:,} | "
                     + " / ".join(_gib(w[base]) if w[base] is not None else "-" for base in BASES)
                     + f" | {_gib(any_row['grads'] + any_row['adamw'])} | "
                     + " | ".join(_cell(got[c]["total"]) if got[c] is not None else "-" for c in cols) + " |")
    lines += ["", "GiB per GPU, batch 1, 512 text tokens; peak: resident weights, AdamW state and the cached inputs + "
              "the most a training step (forward, backward, clipping, AdamW) holds on top, traced op by op; (card): "
              "the smallest of 16 / 24 / 48 / 80 GB with 10% + 1 GiB to spare. ckpt: gradient checkpointing (each "
              "block recomputed with its semantic module)."]
    return "\n".join(lines)


def markdown_gpus(rows: list[dict]) -> str:
    """Which card each scheme B configuration needs per stage and image size, fp8 base + checkpointing + cached
    latents and prompt embeddings; FSDP2 over 2 / 4 / 8 GPUs for the full-width separate B."""
    lines = ["| scheme B | trainable | stage | image | 1 GPU | FSDP2 x2 | x4 | x8 |",
             "|---|---:|---|---|---|---|---|---|"]
    for r in rows:
        if r["base"] != "fp8" or not r["checkpointing"]:
            continue
        fsdp = [_cell(r["fsdp"][k]) if r["b"] == FULL_B else "" for k in FSDP_GPUS]
        lines.append(f"| {r['b']} | {r['trainable']:,} | {r['stage']} | {r['resolution']}² | {_cell(r['total'])} | "
                     + " | ".join(fsdp) + " |")
    lines += ["", "GiB per GPU (card: 10% + 1 GiB to spare); fp8 base (Linear weights float8 with float32 row "
              "scales), gradient checkpointing, latents and prompt embeddings cached (no VAE, T5 or CLIP on the GPU). "
              "FSDP2: one unit per block with its semantic module; weights, AdamW state and gradients sharded, the "
              "largest unit gathered twice (running + prefetched) with its unsharded gradients."]
    return "\n".join(lines)


# the targets: (what, scheme B, stages, image sizes, card GB, GPUs: 1 alone, else FSDP2 over that many)
TARGETS = ((f"{LEAN_B}: warmup and joint at 1024² on one 24 GB GPU", LEAN_B, ("warmup", "joint"), (1024,), 24, 1),
           (f"{LEAN_B}: warmup and joint at 512² on one 16 GB GPU", LEAN_B, ("warmup", "joint"), (512,), 16, 1),
           (f"{FULL_B}: warmup and joint with FSDP2 over 2 x 80 GB", FULL_B, ("warmup", "joint"),
            (512, 1024), 80, 2),
           (f"{FULL_B}: warmup and joint with FSDP2 over 8 x 24 GB", FULL_B, ("warmup", "joint"),
            (512, 1024), 24, 8))


def targets(rows: list[dict]) -> list[dict]:
    """Each target's cases (fp8 base + checkpointing) with the GiB a card must have (peak + 10% + 1 GiB) and what is
    left on the card (negative: missed by that much)."""
    by = _by_case(rows)
    out = []
    for what, b, stages, sizes, gb, gpus in TARGETS:
        cases = []
        for stage in stages:
            for res in sizes:
                r = by.get((b, stage, res, "fp8", True))
                if r is None:
                    continue
                peak = r["total"] if gpus == 1 else r["fsdp"][gpus]
                need = peak * 1.1 + GIB
                cases.append({"stage": stage, "resolution": res, "peak_gib": round(peak / GIB, 2),
                              "need_gib": round(need / GIB, 2), "spare_gib": round(gb - need / GIB, 2)})
        if cases:
            out.append({"target": what, "card_gb": gb, "gpus": gpus, "met": all(c["spare_gib"] >= 0 for c in cases),
                        "cases": cases})
    return out


def markdown_targets(result: list[dict]) -> str:
    """One line per target: met or not, and per case what the card must hold and what is left (or missing)."""
    lines = []
    for t in result:
        parts = [f"{c['stage']} {c['resolution']}²: peak {c['peak_gib']:.2f} GiB, needs {c['need_gib']:.2f}, "
                 + (f"{c['spare_gib']:.2f} GiB to spare" if c["spare_gib"] >= 0
                    else f"missed by {-c['spare_gib']:.2f} GiB") for c in t["cases"]]
        lines.append(f"- {t['target']}: {'met' if t['met'] else 'NOT met'} ({'; '.join(parts)})")
    return "\n".join(lines)


def markdown_check(rows: list[dict]) -> str:
    """The check's rows: plan and measurement of the total and of the step's part above what is resident."""
    lines = ["| model | scheme B | stage | base | ckpt | plan MiB | measured MiB | error | step: plan MiB "
             "| measured MiB | error |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    mib = lambda b: f"{b / 2 ** 20:.2f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['b']} | {r['stage']} | {r['base']} "
                     f"| {'yes' if r['checkpointing'] else 'no'} | {mib(r['plan_total'])} | {mib(r['measured_total'])} "
                     f"| {r['error_total']:+.1%} | {mib(r['plan_step'])} | {mib(r['measured_step'])} "
                     f"| {r['error_step']:+.1%} |")
    total, step = [r["error_total"] for r in rows], [r["error_step"] for r in rows]
    lines += ["", f"{len(rows)} cases: the plan (CPU autocast and CPU kernels' cast temporaries, as measured here) "
              "against the real peak of the same training steps on this CPU (torch.profiler's allocation events); "
              f"error of the total {min(total):+.1%} to {max(total):+.1%}, of the step's part above what is resident "
              f"{min(step):+.1%} to {max(step):+.1%}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


def _plan_job(job):
    name, stage, base, checkpointing = job
    return dev_plan([name], (stage,), (base,), checkpointing, progress=True)


def plan(quick: bool = False, jobs: int = 1) -> dict:
    """The dev plan: every scheme B configuration, stage, base (bf16, fp8) and checkpointing choice at 512² and
    1024² (quick: fp8 + checkpointing only, what the which-GPU table and the targets need)."""
    dev = PRESETS["dev"]
    names = list(b_configs(dev.hidden_size, dev.num_heads))
    bases, ckpt = (("fp8",), (True,)) if quick else (BASES, (False, True))
    work = [(n, s, b, ckpt) for n in names for s in STAGES for b in bases]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as pool:
            parts = list(pool.map(_plan_job, work))
    else:
        parts = [_plan_job(w) for w in work]
    rows = [r for part in parts for r in part]
    return {"model": "flux-dev (Kontext-dev has the same layout)", "batch": 1, "text_tokens": N_TXT,
            "assumptions": "base frozen (bf16, or fp8 Linear weights with float32 row scales); semantic module and "
                           "LoRA rank 16 fp32; AdamW fp32 m, v (foreach, as on CUDA); bf16 autocast with CUDA's "
                           "layer_norm policy; latents and prompt embeddings cached; card = peak + 10% + 1 GiB",
            "rows": rows, "targets": targets(rows)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tools.memory_plan",
                                     description="GPU memory per training stage of FLUX.1-dev with scheme B.")
    parser.add_argument("--check", action="store_true",
                        help="the planning code against real training steps of small models on this CPU")
    parser.add_argument("--quick", action="store_true",
                        help="plan: fp8 base + checkpointing only (the which-GPU table); check: fewer cases")
    parser.add_argument("--jobs", type=int, default=1, help="plan: processes tracing in parallel")
    parser.add_argument("--defaults", action="store_true",
                        help="the batch and checkpointing train.py chooses on a 24, 48 and 80 GB card (choose)")
    args = parser.parse_args(argv)
    if args.defaults:
        rows = default_choices()
        print(markdown_defaults(rows))
        result = {"defaults": rows}
    elif args.check:
        rows = check(models=list(CHECK_MODELS)[:1], b_names=[FULL_B, LEAN_B]) if args.quick else check()
        print(markdown_check(rows))
        result = {"check": rows}
    else:
        result = plan(quick=args.quick, jobs=args.jobs)
        if not args.quick:
            print(markdown_plan(result["rows"]))
            print()
        print(markdown_gpus(result["rows"]))
        print()
        print(markdown_targets(result["targets"]))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
