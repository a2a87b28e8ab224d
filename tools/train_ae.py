"""
Train the tiny demo's own autoencoder: the analog of FLUX's pretrained ae.safetensors for the CPU demo.

    python -m tools.train_ae --data data/synth --steps 3000 --batch-size 12 --crop 32 --out runs/ae-crops
    python -m tools.train_ae --data data/synth --steps 400 --batch-size 4 --crop 0 --lr 3e-4 --warmup-steps 20 \
        --init runs/ae-crops/ae.safetensors --out weights/demo --overwrite    # continue on whole images

One step, on a batch of the three kinds of image the transformer will see (visible, semantic, infrared as 3
channels), random crops of --crop pixels (a conv net: the size does not matter, the cost does):
    mean, logvar = encoder(x);  z = mean + exp(logvar / 2) * N(0, I);  rec = decoder(z)
    loss = L1(rec, x) + MSE(rec, x) + 1e-4 * KL(N(mean, var) || N(0, I))
At the end FLUX's latent shift and scale are re-estimated so this autoencoder's latents are zero-mean, unit-variance.

Ctrl-C / SIGTERM writes OUT/ae_resume.pt (weights, optimizer, step, generator) after the current step and exits
with 128 + the signal; the same command with --resume continues bit for bit. The state is removed when the run ends.
An OUT that holds a finished or stopped run is refused without --overwrite (as train.py does); with it, the earlier
run's files are removed only once this run has written its own (checkpoint.set_aside), never when --init is one.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from checkpoint import (changed_settings, claim, command, load_state, restore, resume_command, save_state,
                        set_aside, settle)
from pipeline import ROOT, Stopper, resolve_device
from vae import AE_PRESETS, AutoEncoder, load_ae, save_ae
from tools.synth import TRAIN_SET, ensure_set

RESUME_NAME = "ae_resume.pt"
RUN_FILES = (RESUME_NAME, "ae.safetensors")  # what a stopped or finished run leaves in OUT
NOT_THE_RUN = ("resume", "overwrite", "progress", "device", "log_every", "out")  # a resumed run may change these


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.train_ae", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default="", help="dataset folder (rgb/, sem/, ir/); default: the synthetic set")
    ap.add_argument("--size", type=int, default=0,
                    help="serve every image at about SxS pixels at its own aspect ratio (data.resize_pair); 0 keeps "
                         "the files' size")
    ap.add_argument("--out", default=str(ROOT / "runs" / "ae"), help="writes OUT/ae.safetensors")
    ap.add_argument("--init", default="", help="continue from this autoencoder")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64, help="random crops of this side; 0: whole images")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default="")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--resume", action="store_true", help=f"continue a stopped run from OUT/{RESUME_NAME}")
    ap.add_argument("--overwrite", action="store_true",
                    help=f"start afresh over a stopped or finished run in OUT ({', '.join(RUN_FILES)})")
    return ap.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """One-line errors naming the flag, before any work."""
    for flag, value, low in (("--steps", a.steps, 1), ("--batch-size", a.batch_size, 1),
                             ("--log-every", a.log_every, 1), ("--crop", a.crop, 0), ("--size", a.size, 0),
                             ("--warmup-steps", a.warmup_steps, 0), ("--seed", a.seed, 0)):
        if value < low:
            raise ValueError(f"{flag} {value}: must be at least {low}")
    for flag, value in (("--lr", a.lr), ("--grad-clip", a.grad_clip)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value}: must be a positive finite number")
    if not 0 <= a.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio {a.min_lr_ratio}: must be in [0, 1]")


def lr_at(step: int, a: argparse.Namespace) -> float:
    """Linear warmup, then cosine to lr * min_lr_ratio (the schedule train.py uses)."""
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    p = (step - a.warmup_steps) / max(1, a.steps - a.warmup_steps)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def run_args(a: argparse.Namespace) -> dict:
    """The flags that define the run: a resumed run must be given the same."""
    return {k: v for k, v in vars(a).items() if k not in NOT_THE_RUN}


def load_resume(path: Path, ae: AutoEncoder, opt, g: torch.Generator, a: argparse.Namespace) -> int:
    """A stopped run's state (checkpoint.save_state) back into the autoencoder, the optimizer and the generator;
    returns the step. Other flags than the stopped run's are refused."""
    state = load_state(path, list(ae.state_dict()))
    if changed := changed_settings(state["settings"], run_args(a), NOT_THE_RUN):
        raise ValueError(f"--resume: {path} was written by a run with other flags ({'; '.join(changed)}); "
                         "resume with the original flags, or pass --overwrite to start afresh")
    ae.load_state_dict(state["weights"])
    opt.load_state_dict(state["optimizer"])
    g.set_state(state["rng"])
    return int(state["step"])


def load_images(a: argparse.Namespace) -> list[torch.Tensor]:
    """Every visible, semantic and infrared (as 3 channels) image of the dataset, one stack per served size (a set of
    several image shapes, data.PairedDataset.buckets): [3N_b, 3, H_b, W_b] each, in [-1, 1]."""
    root = Path(a.data) if a.data else ensure_set(ROOT / "data" / "synth", TRAIN_SET, a.progress)
    ds = data.PairedDataset(root, size=a.size or None)
    if len(ds) == 0:
        raise ValueError(f"{root}: empty dataset")
    if ds.crop_note():
        print(f"note: {root}: {ds.crop_note()}")
    stacks = []
    for members in ds.buckets().values():  # the pairs served at one size
        images = []
        for i in members:
            it = ds[i]
            images += [it["rgb"], it["sem"], data.ir_to_rgb(it["ir"][None])[0]]
        stacks.append(torch.stack(images))
    return stacks


def draw(stacks: list[torch.Tensor], batch: int, g: torch.Generator) -> torch.Tensor:
    """A batch of one size: the stack drawn as train.py draws its buckets (data.draw_bucket), then `batch` of its
    images with replacement -> [B, 3, H, W]."""
    images = stacks[data.draw_bucket([len(s) for s in stacks], g)]
    return images[torch.randint(len(images), (batch,), generator=g)]


def run(a: argparse.Namespace) -> int:
    """Train as `a` says: 0 when done, 128 + signal when stopped by one (the resume state is written first)."""
    check_args(a)
    out = Path(a.out)
    resume_path = out / RESUME_NAME
    if a.resume and not resume_path.is_file():
        raise ValueError(f"--resume: no {resume_path} (was the stopped run started with --out {a.out}?)")
    lock = claim(out, RUN_FILES, "ae.safetensors", a.resume, a.overwrite, keep=(a.init,))
    stopper, aside = Stopper(), None  # a signal before the loop stops the command at once
    try:
        device = resolve_device(a.device)
        images = load_images(a)  # [3N_b, 3, H_b, W_b] per served size
        g = torch.Generator().manual_seed(a.seed)
        torch.manual_seed(a.seed)
        ae = (load_ae(a.init, device=device) if a.init else AutoEncoder(AE_PRESETS["tiny"])).to(device).train()
        opt = torch.optim.AdamW(ae.parameters(), lr=a.lr, weight_decay=0.0)
        start = load_resume(resume_path, ae, opt, g, a) if a.resume else 0
        if a.resume:
            print(f"resumed from {resume_path} at step {start}")
        ae.requires_grad_(True)
        from tqdm import tqdm
        if a.overwrite:
            aside = set_aside(out, RUN_FILES)  # the earlier run: removed once this one has written its own
        stopper.at_once = False
        print(f"training the autoencoder on {sum(len(s) for s in images)} images, steps {start}..{a.steps}")
        bar = tqdm(range(start, a.steps), desc="ae", initial=start, total=a.steps, disable=not a.progress)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, a)
            x = draw(images, a.batch_size, g)  # [B, 3, H, W]
            if a.crop and a.crop < min(x.shape[-2:]):
                top = torch.randint(0, x.shape[-2] - a.crop + 1, (1,), generator=g).item()
                left = torch.randint(0, x.shape[-1] - a.crop + 1, (1,), generator=g).item()
                x = x[..., top:top + a.crop, left:left + a.crop]
            x = x.to(device)
            mean, logvar = ae.encode_dist(x)  # [B, 16, h, w] each
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g).to(device)
            rec = ae.decoder(z)  # [B, 3, H, W]
            kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), a.grad_clip)
            opt.step()
            if step % a.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if stopper.signal is not None and step + 1 < a.steps:  # a signal during the last step: just finish
                save_state(resume_path, step + 1, ae.state_dict(), opt, g, run_args(a))
                settle(aside)
                aside = None
                print(f"\nstopped by signal {stopper.signal} at step {step + 1}; resume with "
                      f"`{resume_command('-m tools.train_ae')}`")
                return 128 + stopper.signal
        bar.close()
        finish(ae, images, a, device)  # a signal from here on waits: the remaining work is short
        settle(aside)
        aside = None
        resume_path.unlink(missing_ok=True)  # the run is complete
    except KeyboardInterrupt:  # a signal before the loop, or a second one in it
        when = "before training began: this run wrote nothing" if stopper.at_once else "at once by a second signal"
        print(f"\nstopped by signal {stopper.signal} {when}", file=sys.stderr)
        return 128 + (stopper.signal or 2)
    finally:
        stopper.close()
        restore(aside, RUN_FILES)  # ended before writing anything: the earlier run comes back
        lock.unlink(missing_ok=True)
    return 0


def finish(ae: AutoEncoder, images: list[torch.Tensor], a: argparse.Namespace, device) -> None:
    """FLUX's scale/shift make latents zero-mean, unit-variance: re-estimate them for this autoencoder over every
    image (each stack of one size), then write OUT/ae.safetensors."""
    with torch.no_grad():
        means = torch.cat([ae.encode_dist(s[i:i + 64].to(device))[0].flatten().cpu()  # [64 * 16 * h * w]
                           for s in images for i in range(0, len(s), 64)])
    ae.params.shift_factor = float(means.mean())
    ae.params.scale_factor = float(1.0 / means.std())
    if not (math.isfinite(ae.params.shift_factor) and math.isfinite(ae.params.scale_factor)):
        raise ValueError(f"the autoencoder's latents are not finite after {a.steps} steps (diverged: lower --lr?); "
                         "nothing written")
    target = Path(a.out) / "ae.safetensors"
    save_ae(ae, target, {"train_args": json.dumps(vars(a))})
    print(f"wrote {target} (shift {ae.params.shift_factor:.4f}, scale {ae.params.scale_factor:.4f})")


@command
def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
