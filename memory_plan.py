"""
memory_plan.py: GPU memory per training stage of flux-dev (Kontext-dev has the same layout) with scheme B, at
512x512 and 1024x1024 pixels: a Markdown table, then the same numbers as one JSON line.

    python memory_plan.py                    # ~10 s on a CPU; no GPU and no checkpoint needed

Per stage (warmup: scheme B trains; joint: LoRA + B; finetune: B's scales) the base is frozen in bf16, LoRA and the
semantic module are fp32, AdamW keeps fp32 m and v, as train.py sets it up on a GPU. Per row:
- parameters, gradients and optimizer state: counted on the meta-device model of that stage (no memory used);
- activations: the bytes autograd saves for the backward, per token and per block, measured on the same model at two
  small widths with saved-tensor hooks under bf16 autocast, checked to grow linearly with the width (`linearity`),
  and scaled from the larger width to dev's. With gradient checkpointing every block keeps only its input, and one
  block's activations live again while its backward runs;
- fits: the smallest 24 / 48 / 80 GB card that holds the total with 10% and 1 GiB to spare; FSDP (full shard, per
  block): states divided over 2 / 4 / 8 GPUs, two gathered blocks added, activations per GPU unchanged.
"""

import argparse
import json

import torch
from torch import Tensor

from flow import kontext_ids, text_ids
from flux_model import Flux, FluxParams, PRESETS
from pipeline import is_trained_key
from sem_cross_attn import SemanticConfig, attach

GIB = 2 ** 30
GPUS_GB = (24, 48, 80)
STAGES = ("warmup", "joint", "finetune")  # what trains: B | LoRA + B | B's scales; the base is frozen, bf16
RESOLUTIONS = {512: (1024, 512), 1024: (4096, 512)}  # pixels: (x_t tokens = x_cond tokens, text tokens)


def variants(hidden: int, heads: int) -> dict[str, SemanticConfig]:
    """Scheme B on every block, and its cheapest option: every 4th block at half the width and heads."""
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


# ----------------------------------------------------------------------------------------------------------------
# Activations: measured on small widths


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
    model = stage_model(params, stage, variants(hidden, heads)[variant])
    model.gradient_checkpointing = checkpointing
    model.train()
    n = grid * grid
    img = torch.randn(1, 2 * n, 64)  # [x_t | x_cond] tokens
    ids = kontext_ids(1, grid, grid)

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    fp32_weights = {tuple(p.shape) for p in model.parameters() if p.dtype == torch.float32 and p.ndim == 2}
    where = ["other"]
    seen: dict[int, tuple[str, int]] = {}  # storage address -> (where it was saved, bytes)
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


# ----------------------------------------------------------------------------------------------------------------
# The plan for dev's size


def plan(widths=(256, 512), grid: int = 12, n_txt: int = 16) -> dict:
    """Per stage and resolution, for flux-dev with scheme B: parameters, gradients, AdamW state and activations with
    and without gradient checkpointing, per GPU alone and per GPU under FSDP. Activation bytes per token are measured
    at two small widths (their ratio checks that they grow linearly with the width) and scaled from the larger one
    to dev's width."""
    dev = PRESETS["dev"]
    D = dev.hidden_size
    n_blocks = dev.depth + dev.depth_single_blocks
    keys = ("double_per_token", "single_per_token", "semantic_per_img_token", "other_per_token")
    rows, per_token, linearity = [], {}, {}
    for variant in variants(D, dev.num_heads):
        for stage in STAGES:
            small = [saved_activation_bytes(stage, w, w // 64, grid, n_txt, variant) for w in widths]
            per_token[(variant, stage)] = {k: small[-1][k] * D / small[-1]["hidden"] for k in keys}
            per_token[(variant, stage)]["cast_per_fp32_weight"] = small[-1]["cast_per_fp32_weight"]
            linearity[(variant, stage)] = {k: small[1][k] / small[0][k] * widths[0] / widths[1] for k in keys
                                           if small[0][k]}
            with torch.device("meta"):
                model = stage_model(dev, stage, variants(D, dev.num_heads)[variant])
            base = sum(p.numel() for n, p in model.named_parameters() if not is_trained_key(n))  # bf16
            fp32 = sum(p.numel() for n, p in model.named_parameters() if is_trained_key(n))  # LoRA, semantic
            fp32_matrices = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32 and p.ndim == 2)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            # the largest FSDP unit: a double block with its semantic module (all gathered at once, prefetch: 2)
            unit = max(sum(p.numel() * p.element_size() for p in blk.parameters()) for blk in model.double_blocks)
            unit += max((sum(p.numel() * 4 for p in m.parameters()) for m in model.semantic.double_blocks.values()),
                        default=0)
            n_sem = len(model.semantic.double_blocks) + len(model.semantic.single_blocks)
            weights, grads, optim = 2 * base + 4 * fp32, 4 * trainable, 8 * trainable  # AdamW: fp32 m and v
            states = weights + grads + optim
            pt = per_token[(variant, stage)]
            for res, (n_xt, n_t) in RESOLUTIONS.items():
                L_img, L = 2 * n_xt, 2 * n_xt + n_t
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


def markdown(plan: dict) -> str:
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="GPU memory per training stage of flux-dev with scheme B.")
    parser.parse_args(argv)  # no options: --help only
    result = plan()
    print(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
