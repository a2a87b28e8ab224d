"""
What an fp8 base (extras/fp8.py) costs in accuracy: one velocity call of a FLUX with random weights, the fp8 base
against the bf16 model and both against fp32, and the bytes each holds. One JSON line:

    python -m tools.fp8_error                          # the tiny demo preset, 8x8 grid
    python -m tools.fp8_error --config medium          # bench's medium size (hidden 768, 4 + 8 blocks, 32x32)
    python -m tools.fp8_error --per tensor --outer-full --compute fp32
"""

import argparse
import copy
import json

import torch
from torch import Tensor

from extras.fp8 import BASE_DTYPES, OUTER_LAYERS, quantize_
from flow import kontext_ids, text_ids
from flux_model import PRESETS, Flux
from tools.sizes import CONFIGS
from tools.measure import tensor_bytes


def rel_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| over all elements, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def measure_error(params, per: str = "row", skip=(), grid: tuple[int, int] = (8, 8), n_txt: int = 8,
                  seed: int = 0, compute: torch.dtype = torch.bfloat16) -> dict:
    """One velocity call of a FLUX with random weights (every tensor N(0, 1/its last dim), norm scales
    1 + N(0, 0.04)), Kontext layout (2 h*w image tokens, n_txt text tokens, batch 1, t = 0.5): the output's relative
    error of the fp8 base (quantized from the bf16 weights) against the bf16 model, both computing in `compute`
    (bf16 as on a GPU; fp32 isolates what the stored weights cost), and of both against the fp32 model; and the
    bytes of parameters and buffers of the bf16 and fp8 models. A random FLUX is far more sensitive than a trained
    one can afford to be (its gates and modulation are O(1)): read bf16_vs_fp32 as the yardstick of that."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref = Flux(params).eval()
        for k, p in ref.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if k.endswith(".scale")
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        stored = copy.deepcopy(ref).to(torch.bfloat16)  # the bf16 base
        stored_bytes = tensor_bytes(stored)
        quantize_(stored, per, skip)  # the fp8 base: fp8 Linear weights, the rest bf16
        bf16 = copy.deepcopy(ref).to(torch.bfloat16).to(compute)  # weights rounded to bf16, computing in `compute`
        low = copy.deepcopy(bf16)
        quantize_(low, per, skip)
        h, w = grid
        x = dict(img=torch.randn(1, 2 * h * w, params.in_channels, generator=g), img_ids=kontext_ids(1, h, w),
                 txt=torch.randn(1, n_txt, params.context_in_dim, generator=g), txt_ids=text_ids(1, n_txt),
                 timesteps=torch.tensor([0.5]), y=torch.randn(1, params.vec_in_dim, generator=g),
                 guidance=torch.tensor([3.5]) if params.guidance_embed else None)
        half = {k: v.to(compute) if v is not None and v.is_floating_point() else v for k, v in x.items()}
        y32, y16, y8 = ref(**x), bf16(**half), low(**half)
    return {"fp8_vs_bf16": rel_error(y8, y16), "bf16_vs_fp32": rel_error(y16, y32), "fp8_vs_fp32": rel_error(y8, y32),
            "bytes_bf16": stored_bytes, "bytes_fp8": tensor_bytes(stored), "per": per,
            "outer_layers": "full precision" if skip else "fp8", "compute": str(compute).removeprefix("torch.")}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.fp8_error",
                                 description="fp8 base vs bf16: output relative error of one velocity call on "
                                             "random weights (one JSON line)")
    ap.add_argument("--config", choices=("tiny", "medium"), default="tiny",
                    help="tiny: the demo preset (8x8 grid); medium: tools/bench.py's (hidden 768, 4 + 8 blocks, "
                         "32x32)")
    ap.add_argument("--per", choices=("row", "tensor"), default="row")
    ap.add_argument("--outer-full", action="store_true", help="keep img_in, txt_in, time/vector/guidance_in and "
                                                               "final_layer in bf16 (skip=OUTER_LAYERS)")
    ap.add_argument("--compute", choices=("bf16", "fp32"), default="bf16",
                    help="the dtype both models compute in (fp32: what the stored weights alone cost)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.config == "tiny":
        params, grid, n_txt = PRESETS["tiny"], (8, 8), 8
    else:
        cfg = CONFIGS["medium"]
        params, grid, n_txt = cfg.params(), cfg.grid, cfg.n_txt
    result = measure_error(params, args.per, OUTER_LAYERS if args.outer_full else (), grid, n_txt, args.seed,
                           BASE_DTYPES[args.compute])
    print(json.dumps({"config": args.config, **result}))


if __name__ == "__main__":
    main()
