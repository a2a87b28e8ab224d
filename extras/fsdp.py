"""
Sharded data parallelism for train.py (`torchrun ... train.py --fsdp`): FSDP2's wrapping of the transformer and
the full state dicts that the outputs and the resume state are written from. Without --fsdp, train.py wraps the
model in DDP (only the trainable weights synchronise) and none of this is used.

    shard(model, device)          torch.distributed.fsdp.fully_shard, in place: one unit per transformer block TOGETHER
                                  with its semantic module (they are separate modules of the tree, grouped with
                                  fully_shard([block, sem_block])), then the root (embeddings, final layer, the
                                  semantic encoder and the rest). Every parameter is sharded, frozen or trainable.
    full_tensors(sd)              name -> tensor with every DTensor shard gathered into the full tensor (on the CPU)
    full_optimizer_state(opt)     opt.state_dict() with its DTensor states gathered likewise
    like(param, full)             a full tensor as `param` holds it: its local shard when `param` is a DTensor
    shard_optimizer_state(opt, sd)  full_optimizer_state's dict as opt.load_state_dict takes it back

The gathered dicts have the keys and layout a single process writes (model.state_dict() names; the optimiser's
state by parameter index), so final.safetensors / latest.safetensors hold the same keys, dtypes and shapes and
resume.pt the same structure as without --fsdp (either resumes the other's run). Gathering is a collective: every
rank calls these, in the same order; the master writes. Without DTensors (no --fsdp) each is the identity.

What fully_shard requires of a unit, and what is done here (torch 2.13, _fsdp_param_group._init_mp_dtypes):
- The TRAINABLE parameters of a unit must share one dtype (and one reduce dtype); frozen ones may differ. Training
  keeps every trainable weight (semantic modules, LoRA lora_A / lora_B) in fp32, so each unit qualifies as is.
- Parameters of mixed dtypes (fp32 trainable, a bf16 / fp32 frozen base, fp8 Linear weights) are all-gathered in
  one collective through a uint8 view; requires_grad may mix (frozen parameters get no gradient and take no part in
  the reduce-scatter). So the frozen base is sharded too: it is what makes FSDP worth it here.
- MixedPrecisionPolicy keeps param_dtype None: each parameter is gathered in the dtype it is stored in, and bf16
  autocast computes exactly as without FSDP. A param_dtype would cast the fp8 weights (a floating dtype to torch)
  to it WITHOUT their weight_scale, and extras.fp8.base_weight would then use the unscaled weight: wrong outputs. The
  gradients are reduced in fp32, the trainable weights' own dtype.
- Buffers are not sharded (fp8's weight_scale stays whole on every rank, next to its layer).
Each rank builds (and --init loads) the whole model before it is sharded, so the peak at load is one full model per
process; the loop then holds a 1/N share of every weight, gradient and optimiser state, plus the gathered root and
the block unit(s) in use. Gradients are reduce-scattered at every micro-step of --grad-accum (DDP reduces once, at
the last).
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 over every rank of the default process group, in place. The model's parameters are replaced by new
    ones (DTensor shards): select what trains and build the optimiser after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    semantic = model.semantic
    for kind in ("double_blocks", "single_blocks"):
        own = getattr(semantic, kind, None) if semantic is not None else None  # scheme A has no per-block modules
        for i, block in enumerate(getattr(model, kind)):
            unit = [block] + ([own[str(i)]] if own is not None and str(i) in own else [])
            fully_shard(unit if len(unit) > 1 else block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def full_tensors(sd: dict) -> dict:
    """Every DTensor of `sd` gathered into its full tensor, on the CPU; other values unchanged."""
    return {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in sd.items()}


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with each DTensor state (AdamW's exp_avg / exp_avg_sq of a sharded weight) gathered."""
    sd = opt.state_dict()
    sd["state"] = {i: full_tensors(s) for i, s in sd["state"].items()}  # new dicts: opt's own state is untouched
    return sd


def like(param: Tensor, full: Tensor) -> Tensor:
    """`full` as `param` holds it: this rank's shard of it (a DTensor laid out as `param`) when `param` is a DTensor
    (no communication: every rank has read the full tensor), else `full` itself."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> dict:
    """A full optimiser state (full_optimizer_state's, or a single process's) laid out as `opt`'s parameters are:
    each state tensor of a parameter's shape becomes that parameter's shard. Parameters pair with the saved ids in
    order, as opt.load_state_dict pairs them (which also checks that the groups match)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    ids = [i for group in sd["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params))
    state = {}
    for i, s in sd["state"].items():
        p = by_id.get(i)
        state[i] = {k: like(p, v) if p is not None and k != "step" and isinstance(v, Tensor) and v.shape == p.shape
                    else v for k, v in s.items()}
    return {**sd, "state": state}


class GatheredOptimizer:
    """Stands in for an optimiser where only its state_dict() is read (checkpoint.save_state): the state gathered
    beforehand, on every rank, by full_optimizer_state."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state
