"""
Generate the infrared image for a visible image and its semantic map.

    python sample.py rgb.png sem.png [-o ir.png] [--ckpt PATH] [--lora FILE[:SCALE] ...] [--steps N] [--guidance G]
                     [--seed S] [--attn PATH]

The steps (pipeline.py builds the model and runs them; flow.py is the sampler):
    data.load_pair     -> rgb, sem [3, H, W] in [-1, 1] and the class ids, checked (same size, multiples of 16;
                          --size S: about SxS pixels at the pair's own aspect ratio, as training serves its pairs)
    load_pipeline      -> base transformer + autoencoder, the trained semantic module / LoRA from --ckpt, then each
                          --lora file (a LoRA trained elsewhere: kohya / ComfyUI, diffusers, ai-toolkit) at its scale
    generate           -> x_cond tokens, seeded noise, Euler over FLUX's shifted schedule, VAE decode -> IR [1, H, W]
    --attn             -> the cross-attention maps at mid-denoising for one query pixel per class (viz.py)

The semantic palette is --classes, else the one the checkpoint was trained with (its run config), else the
synthetic one. One note says what --size crops, and one when the image holds more than twice or less than half the
pixels of every size the checkpoint was trained at (data.size_note). Every flag and output name is checked before
anything loads; outputs are written by rename.
"""

import argparse
import math
import sys
from pathlib import Path

import data
from extras.fp8 import BASE_DTYPES
from checkpoint import command, run_config, trained_file
from pipeline import (SAMPLE_STEPS, SEM_GUIDANCE, SEM_STRENGTH, attention_maps, check_attention_maps, check_not_lora,
                      default_ckpt, find_setup, generate, load_pipeline, parse_lora, resolve_device, run_classes)
from viz import attention_figure, check_image_out, save_image, to_pil_gray

MAX_SEED = 2 ** 63 - 1


def check_args(args: argparse.Namespace) -> None:
    """One-line errors naming the flag, before anything loads."""
    if args.base and args.ckpt:
        raise ValueError("--base samples the base model without trained weights and --ckpt names them: pick one")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be at least 1")
    if args.size is not None and (args.size <= 0 or args.size % data.MULTIPLE):
        raise ValueError(f"--size {args.size}: must be a positive multiple of {data.MULTIPLE}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed {args.seed}: must be in 0..{MAX_SEED}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance {args.guidance}: must be a finite number")
    for flag, v in (("--sem-strength", args.sem_strength), ("--sem-guidance", args.sem_guidance)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{flag} {v}: must be a finite number >= 0")
    args.loras = [parse_lora(text) for text in args.lora or []]  # FILE[:SCALE]: the file exists, the scale is a number
    check_image_out(args.out, "-o")
    if args.attn:
        check_image_out(args.attn, "--attn")
        if Path(args.attn).absolute() == Path(args.out).absolute():
            raise ValueError(f"--attn {args.attn}: is also the -o image; give it another name")


def semantic_classes(args: argparse.Namespace, ckpt) -> tuple[tuple[data.SemClass, ...], str]:
    """(classes, where they come from): --classes, else the checkpoint's run config, else the synthetic palette."""
    if args.classes:
        return data.load_classes(args.classes), args.classes
    recorded = run_classes(run_config(ckpt), ckpt) if ckpt else None
    if recorded is not None:
        return recorded, f"{ckpt} (its training classes)"
    return data.DEFAULT_CLASSES, "the synthetic palette (pass --classes for another)"


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("rgb", help="visible image")
    ap.add_argument("sem", help="semantic map (colour image in the class palette, or label-id image)")
    ap.add_argument("-o", "--out", default="ir.png", help="output infrared image (8-bit; .png, .jpg, .bmp or .tif)")
    ap.add_argument("--ckpt", default=None, help="train.py output, or its run folder (default: runs/warmup, else the "
                                                 "demo weights)")
    ap.add_argument("--base", action="store_true", help="sample the base model without semantic weights")
    ap.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                    help="a LoRA file from another tool (kohya / ComfyUI, diffusers, ai-toolkit, or a run's lora_*."
                         "safetensors), applied to the base transformer at SCALE (default 1.0) on top of --ckpt: "
                         "merged into the base weights (an fp8 base: as LoRA layers beside them); repeatable")
    ap.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    ap.add_argument("--guidance", type=float, default=None, help="guidance input (dev/Kontext bases)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sem-strength", type=float, default=SEM_STRENGTH,
                    help="multiplier on the learned semantic scales/gates (0: the base alone)")
    ap.add_argument("--sem-guidance", type=float, default=SEM_GUIDANCE,
                    help="semantic classifier-free guidance w: v = v_without + w (v_with - v_without); "
                         "w != 1 doubles the sampling time")
    ap.add_argument("--size", type=int, default=None,
                    help="serve the pair at about SxS pixels at its own aspect ratio, sides multiples of 16, as "
                         "train.py --size S serves its pairs (default: the stored size, sides multiples of 16)")
    ap.add_argument("--classes", default=None,
                    help="classes.json of the semantic palette (default: the checkpoint's, else synthetic)")
    ap.add_argument("--attn", default=None, help="also write a picture of the semantic cross-attention maps")
    ap.add_argument("--device", default=None)
    ap.add_argument("--base-dtype", default=None, choices=list(BASE_DTYPES),
                    help="how the base is stored: fp8 (1 byte per linear weight) | bf16 | fp32")
    args = ap.parse_args(argv)
    check_args(args)
    device = resolve_device(args.device)
    setup = find_setup()
    ckpt = None if args.base else (trained_file(args.ckpt) if args.ckpt else default_ckpt(setup))
    if args.ckpt:
        check_not_lora(ckpt, "--ckpt", f"--lora {ckpt}[:SCALE]")
    classes, source = semantic_classes(args, ckpt)
    rgb, sem, ids = data.load_pair(args.rgb, args.sem, classes, args.size)  # [3, H, W] x 2, [H, W]
    if crop := data.crop_note([data.image_size(args.rgb)], args.size):
        print(f"note: {crop}")
    pipe = load_pipeline(ckpt, device, setup=setup, base_dtype=args.base_dtype, loras=args.loras)
    print(f"semantic weights: {ckpt or 'none (base model)'} (scheme {pipe.scheme}); classes: {source}")
    if far := data.size_note([(rgb.shape[-1], rgb.shape[-2])], data.trained_sizes(pipe.cfg)):
        print(f"note: {far}")
    if pipe.guidance is not None or args.guidance is not None:
        print(f"guidance input: {args.guidance if args.guidance is not None else pipe.guidance}"
              + ("" if args.guidance is not None else " (the base's sampling default; --guidance to change it)"))
    if args.attn:
        check_attention_maps(pipe)
    ir = generate(pipe, rgb[None], sem[None], steps=args.steps, seed=args.seed, guidance=args.guidance,
                  progress=True, sem_strength=args.sem_strength, sem_guidance=args.sem_guidance)  # [1, 1, H, W]
    save_image(to_pil_gray(ir[0]), args.out, "-o")
    print(f"wrote {args.out} ({ir.shape[-1]}x{ir.shape[-2]})")
    if args.attn:
        maps = attention_maps(pipe, rgb[None], sem[None], seed=args.seed, steps=args.steps)
        save_image(attention_figure(maps, rgb, sem, ids, {c.id: c.name for c in classes}), args.attn, "--attn")
        print(f"wrote {args.attn}")


if __name__ == "__main__":
    sys.exit(main())
