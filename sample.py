"""
Generate the infrared image for a visible image and its semantic map.

    python sample.py rgb.png sem.png [-o ir.png] [--ckpt PATH] [--steps N] [--guidance G] [--seed S] [--attn PATH]

The steps (pipeline.py builds the model and runs them; flow.py is the sampler):
    data.load_pair     -> rgb, sem [3, H, W] in [-1, 1] and the class ids, checked (same size, multiples of 16)
    load_pipeline      -> base transformer + autoencoder, the trained semantic module / LoRA from --ckpt
    generate           -> x_cond tokens, seeded noise, Euler over FLUX's shifted schedule, VAE decode -> IR [1, H, W]
    --attn             -> the cross-attention maps at mid-denoising for one query pixel per class (viz.py)
"""

import argparse
import sys
from pathlib import Path

import data
from pipeline import attention_maps, command, default_ckpt, find_setup, generate, load_pipeline
from viz import attention_figure, to_pil_gray


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("rgb", help="visible image")
    ap.add_argument("sem", help="semantic map (colour image in the class palette, or label-id image)")
    ap.add_argument("-o", "--out", default="ir.png", help="output infrared image (8-bit PNG)")
    ap.add_argument("--ckpt", default=None, help="train.py output (default: runs/warmup, else the demo weights)")
    ap.add_argument("--base", action="store_true", help="sample the base model without semantic weights")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None, help="guidance input (dev/Kontext bases)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="resize shorter side to S and centre-crop to SxS")
    ap.add_argument("--classes", default=None, help="classes.json of the semantic palette (default: synthetic)")
    ap.add_argument("--attn", default=None, help="also write a picture of the semantic cross-attention maps")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    classes = data.load_classes(args.classes)
    rgb, sem, ids = data.load_pair(args.rgb, args.sem, classes, args.size)  # [3, H, W] x 2, [H, W]
    setup = find_setup()
    ckpt = None if args.base else (args.ckpt or default_ckpt(setup))
    pipe = load_pipeline(ckpt, args.device, setup=setup)
    print(f"semantic weights: {ckpt or 'none (base model)'} (scheme {pipe.scheme})")
    ir = generate(pipe, rgb[None], sem[None], steps=args.steps, seed=args.seed, guidance=args.guidance,
                  progress=True)  # [1, 1, H, W]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    to_pil_gray(ir[0]).save(args.out)
    print(f"wrote {args.out} ({ir.shape[-1]}x{ir.shape[-2]})")
    if args.attn:
        maps = attention_maps(pipe, rgb[None], sem[None], seed=args.seed, steps=args.steps)
        attention_figure(maps, rgb, sem, ids, {c.id: c.name for c in classes}).save(args.attn)
        print(f"wrote {args.attn}")


if __name__ == "__main__":
    sys.exit(main())
