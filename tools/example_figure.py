"""
The README's example figure: the example pair, its ground truth, the RGB-only base and each given train.py output,
sampled as sample.py samples them (its defaults: 20 Euler steps, seed 0, semantic strength 1.5).

    python -m tools.example_figure                                          # -> assets/example.png (the demo)
    python -m tools.example_figure --ckpt runs/warmup/final.safetensors --label "quick-start warmup" -o fig.png
"""

import argparse
import sys

import data
from checkpoint import command
from pipeline import ROOT, generate, load_pipeline
from viz import check_image_out, grid, save_image, to_pil_gray, to_pil_rgb

EXAMPLES = ROOT / "examples"


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", action="append", help="a train.py output (repeatable; default: the shipped demo's)")
    ap.add_argument("--label", action="append", help="its column title (repeatable, in --ckpt order)")
    ap.add_argument("-o", "--out", default=str(ROOT / "assets" / "example.png"))
    args = ap.parse_args(argv)
    ckpts = args.ckpt or [str(ROOT / "weights" / "demo" / "xattn.safetensors")]
    labels = args.label or ["demo scheme B"] * len(ckpts)
    if len(labels) != len(ckpts):
        raise ValueError(f"{len(labels)} --label for {len(ckpts)} --ckpt: give one title per checkpoint")
    check_image_out(args.out)
    rgb, sem, _ = data.load_pair(EXAMPLES / "rgb.png", EXAMPLES / "sem.png", data.DEFAULT_CLASSES, None)
    truth = data.load_ir(EXAMPLES / "ir.png")  # [1, H, W] in [0, 1]
    row = [to_pil_rgb(rgb), to_pil_rgb(sem), to_pil_gray(truth)]
    for ckpt in [None, *ckpts]:  # None: the base alone
        ir = generate(load_pipeline(ckpt, quiet=True), rgb[None], sem[None])  # [1, 1, H, W]
        row.append(to_pil_gray(ir[0]))
    save_image(grid([row], ["RGB", "semantic", "ground truth", "base (RGB only)", *labels], scale=2), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
