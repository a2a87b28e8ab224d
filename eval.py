"""
Make the design's claims measurable: generate the IR image for every held-out pair and score it.

    python eval.py --data DIR --ckpt PATH [--steps N] [--limit K] [--seed S]     # one model
    python eval.py --data DIR --base                                             # the base model, no semantics
    python eval.py --ablation [--train-steps N] [--steps N] [--out runs/ablation] # train + score every scheme
    python eval.py --ablation --schemes xattn-double,xattn-every2,xattn-half    # scheme B's cheaper options

Protocol (metrics.py has the exact definitions): each test pair is generated at its own size with --steps Euler
steps (default 20), seed --seed + index, the run's own guidance; the prediction is compared with the ground-truth IR
in [0, 1]: PSNR, SSIM, per-class intensity error, and over the regions of the semantic map the hallucination rate
(cold in the ground truth, hot in the prediction) and the miss rate (hot in the ground truth, cold in the
prediction). Decoy classes (default: poster, car_parked, which look exactly like hot classes in RGB) get their own
hallucination rate. FID needs a user-supplied feature network (--fid-model, a TorchScript file; nothing downloads).
A NaN or infinite prediction stops the evaluation with an error naming the pair: it is never scored.

The ablation trains each conditioning scheme (`train.run`) with the same data, --train-steps, seed and LoRA (stage `joint`: LoRA on the
backbone + the scheme's semantic modules; `none` is LoRA alone on RGB, `overlay` LoRA alone on RGB blended with the
semantic colours), evaluates all of them on the same held-out set, and writes table.md, results.json and figures.
A scheme whose <out>/<scheme>/final.safetensors exists is reused only if it was trained with exactly this
invocation's settings (the train_args its metadata records); otherwise eval.py names the setting that differs and
stops before any training: pass --retrain, or a new --out.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data
import metrics
import train
from checkpoint import read_metadata
from flux_model import PRESETS
from pipeline import ROOT, attention_maps, command, find_setup, generate, is_trained_key, load_pipeline
from run_state import differing
from synth import TEST_SET, TRAIN_SET, ensure_set
from viz import attention_figure, grid, loss_curves, to_pil_gray, to_pil_rgb

DECOY_NAMES = ("poster", "car_parked")
ABLATION = ("none", "overlay", "zeroconv", "xattn", "adapter")
LABELS = {"none": "none (RGB only)", "overlay": "overlay (pixel fusion)", "zeroconv": "A: zero-conv",
          "xattn": "B: cross-attention", "adapter": "C: gated adapter",
          "xattn-double": "B, double blocks only", "xattn-every2": "B, every 2nd block", "xattn-half": "B, half width"}
# scheme B's cheaper options (bench.py measures what each saves; the ablation what each costs in quality):
# TrainConfig fields on top of scheme xattn. Half width: half the heads at the same head dim.
B_OPTIONS = {"xattn-double": lambda p: {"sem_blocks": "double"},
             "xattn-every2": lambda p: {"sem_blocks": "every:2"},
             "xattn-half": lambda p: {"sem_inner_dim": p.hidden_size // 2, "sem_heads": max(1, p.num_heads // 2)}}
COUNT_FLAGS = ("steps", "train_steps", "limit", "batch_size", "lora_rank")  # must be >= 1 when given
# the ablation flag behind each TrainConfig field that train_config sets from the command line
TRAIN_FLAGS = {"data": "--train-data", "steps": "--train-steps", "batch_size": "--batch-size", "seed": "--seed",
               "lora_rank": "--lora-rank", "lora_alpha": "--lora-rank", "lr": "--lr"}
NOT_COMPARED = ("out", "progress", "resume", "overwrite")  # where a run lives, how it reports and was started


def decoy_ids(classes, names=None) -> list[int]:
    """The ids of the decoy classes `names` (None: the defaults the dataset has); a name that is not one of the
    dataset's classes is an error listing them."""
    known = [c.name for c in classes]
    if names is None:
        names = [n for n in DECOY_NAMES if n in known]
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"--decoys {','.join(unknown)}: not a class of the dataset; its classes are "
                         f"{', '.join(known)}")
    return [c.id for c in classes if c.name in names]


@torch.no_grad()
def predict(pipe, ds, steps: int, seed: int, limit: int | None, batch_size: int = 8, progress: bool = True):
    """Yield (index, item, prediction [1, H, W]) for the first `limit` pairs; pair i is sampled with seed + i.
    A prediction with a NaN or infinite pixel raises ValueError naming the pair."""
    from tqdm import tqdm
    n = len(ds) if not limit else min(limit, len(ds))
    bar = tqdm(total=n, desc="evaluating", disable=not progress)
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        groups = [items] if len({tuple(it["rgb"].shape) for it in items}) == 1 else [[it] for it in items]
        i = start
        for group in groups:  # one batch per image size
            pred = generate(pipe, torch.stack([it["rgb"] for it in group]), torch.stack([it["sem"] for it in group]),
                            steps=steps, seed=[seed + i + k for k in range(len(group))]).cpu()
            for k, it in enumerate(group):
                if not bool(torch.isfinite(pred[k]).all()):
                    raise ValueError(f"{ds.root}: the prediction for pair {i + k} ({it['name']}) is not finite "
                                     "(NaN or inf): the model's weights or sampling diverged; nothing is scored")
                yield i + k, it, pred[k]
            i += len(group)
            bar.update(len(group))
    bar.close()


def evaluate(pipe, ds, steps=20, seed=0, limit=None, decoys=None, save_dir: Path | None = None,
             progress=True) -> dict:
    """Score a pipeline on a dataset: metrics.summarize over every pair (+ the slice of the decoy classes
    `decoys`; None: DECOY_NAMES where the dataset has them)."""
    hot = data.hot_ids(ds.classes)
    decoy = decoy_ids(ds.classes, decoys)
    records = []
    for i, item, pred in predict(pipe, ds, steps, seed, limit, progress=progress):
        records.append(metrics.evaluate_image(pred[0].double(), item["ir"][0].double(), item["sem_ids"]))
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            to_pil_gray(pred).save(save_dir / f"{item['name']}.png")
    return metrics.summarize(records, hot_ids=hot, decoy_ids=decoy)


def fid_score(pipe, ds, model_path, steps, seed, limit) -> float:
    """FID between generated and real IR with a user-supplied TorchScript feature network (e.g. Inception-v3)."""
    net = torch.jit.load(str(model_path), map_location="cpu").eval()
    real, fake = [], []
    for _, item, pred in predict(pipe, ds, steps, seed, limit, progress=False):
        real.append(item["ir"])
        fake.append(pred)
    fr = metrics.fid_features_from_model(net, torch.stack(real))
    ff = metrics.fid_features_from_model(net, torch.stack(fake))
    return metrics.fid(fr, ff)


def summary_line(name: str, s: dict, extra: dict | None = None) -> dict:
    """The JSON line: headline numbers only (per-class errors stay in results.json)."""
    out = {"name": name, "n_images": s["n_images"], "psnr": round(s["psnr"], 4), "ssim": round(s["ssim"], 5),
           "hallucination_rate": s["all"]["hallucination_rate"], "miss_rate": s["all"]["miss_rate"],
           "decoy_hallucination_rate": s["decoy"]["hallucination_rate"],
           "target_miss_rate": s["target"]["miss_rate"],
           "counts": {k: s["all"][k] for k in ("hallucinated", "gt_cold", "missed", "gt_hot")} |
           {"decoy_hallucinated": s["decoy"]["hallucinated"], "decoy_cold": s["decoy"]["gt_cold"]}}
    return out | (extra or {})


def jsonable(x):
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def comparison_figure(pipes: dict, ds, indices: list[int], steps: int, seed: int, out: Path, scale: int = 2):
    """RGB | semantic | ground truth | each method's prediction, one row per test pair."""
    rows = []
    for i in indices:
        item = ds[i]
        row = [to_pil_rgb(item["rgb"]), to_pil_rgb(item["sem"]), to_pil_gray(item["ir"])]
        for pipe in pipes.values():
            pred = generate(pipe, item["rgb"][None], item["sem"][None], steps=steps, seed=seed + i)  # [1, 1, H, W]
            row.append(to_pil_gray(pred[0]))
        rows.append(row)
    labels = ["RGB", "semantic", "ground truth"] + [LABELS.get(n, n).split(" (")[0] for n in pipes]
    grid(rows, labels, scale=scale).save(out)
    return out


# ----------------------------------------------------------------------------------------------------------------


def train_config(scheme: str, args, run: Path) -> train.TrainConfig:
    """The ablation protocol as one train.py config: stage joint (LoRA on the backbone + the scheme's modules), the
    same data, steps, batch, seed, learning rate and LoRA for every scheme; scheme B's options on top. A scheme
    is trained only when it has no final weights or --retrain asks for it, so its run starts over (overwrite)."""
    options = B_OPTIONS[scheme](PRESETS[find_setup().preset]) if scheme in B_OPTIONS else {}
    return train.TrainConfig(stage="joint", scheme=scheme.split("-")[0], data=str(Path(args.train_data).resolve()),
                             steps=args.train_steps, batch_size=args.batch_size, seed=args.seed, out=str(run),
                             lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank), sample_steps=0, lr=args.lr,
                             progress=args.progress, overwrite=True, **options)


def check_reusable(final: Path, want: train.TrainConfig) -> dict:
    """The train_args `final` records, if they equal `want` (but for NOT_COMPARED); else ValueError naming the
    first setting that differs."""
    try:
        recorded = json.loads(read_metadata(final)["train_args"])
    except (KeyError, json.JSONDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{final} records no readable train_args, so its settings are unknown; pass --retrain to "
                         "train it again, or a new --out")
    now = asdict(want)
    if changed := differing(recorded, now, NOT_COMPARED):
        name = changed[0]
        flag = f" ({TRAIN_FLAGS[name]})" if name in TRAIN_FLAGS else ""
        raise ValueError(f"{final} was trained with {name}={recorded.get(name, '(not recorded)')!r}, this run asks "
                         f"for {now[name]!r}{flag}; pass --retrain to train it again, or a new --out")
    return recorded


def run_ablation(args) -> int:
    schemes = args.schemes.split(",")
    if unknown := [s for s in schemes if s not in LABELS]:
        raise ValueError(f"unknown scheme(s) {unknown}; choose from {list(LABELS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = find_setup()
    print(setup.describe())
    train_data = Path(args.train_data)
    test_data = Path(args.data)
    for d, which in ((train_data, TRAIN_SET), (test_data, TEST_SET)):
        if not d.is_dir() and setup.kind != "demo":
            raise ValueError(f"{d} does not exist (pass --train-data / --data)")
        ensure_set(d, which, args.progress)
    test = data.PairedDataset(test_data)
    decoys = decoy_names(args)
    decoy_ids(test.classes, decoys)
    # every reused run is checked before any training, so a mismatch costs no time
    reuse = {s: not args.retrain and (out / s / "final.safetensors").is_file() for s in schemes}
    for scheme in schemes:
        if reuse[scheme]:
            check_reusable(out / scheme / "final.safetensors", train_config(scheme, args, out / scheme))
    results, extras, logs, pipes, runs = {}, {}, {}, {}, {}
    for scheme in schemes:
        run = out / scheme
        final = run / "final.safetensors"
        if not reuse[scheme]:
            t0 = time.time()
            rc = train.run(train_config(scheme, args, run))
            if rc:
                raise RuntimeError(f"training {scheme} failed ({rc})")
            print(f"{scheme}: trained in {time.time() - t0:.0f} s")
        runs[LABELS[scheme]] = check_reusable(final, train_config(scheme, args, run))  # what was actually trained
        logs[LABELS[scheme]] = run / "log.jsonl"
        rows = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
        sps = float(np.median([r["steps_per_s"] for r in rows[1:]] or [rows[-1]["steps_per_s"]]))
        pipe = load_pipeline(final, quiet=True)
        trained = sum(v.numel() for k, v in pipe.model.state_dict().items() if is_trained_key(k))
        summ = evaluate(pipe, test, steps=args.steps, seed=args.seed, limit=args.limit, decoys=decoys,
                        progress=args.progress)
        results[LABELS[scheme]] = summ
        extras[LABELS[scheme]] = {"trainable params": trained, "s/step": round(1 / sps, 3)}
        pipes[scheme] = pipe
        line = summary_line(scheme, summ, extras[LABELS[scheme]])
        print(json.dumps(jsonable(line)))
    table = metrics.format_table(results, extras, decoy=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(jsonable({"protocol": {
        "train_pairs": len(data.PairedDataset(train_data)), "test_pairs": min(len(test), args.limit or len(test)),
        "train_steps": args.train_steps, "batch_size": args.batch_size, "lora_rank": args.lora_rank, "lr": args.lr,
        "eval_steps": args.steps, "seed": args.seed, "base": str(setup.flux)},
        "results": results, "extras": extras, "train_args": runs}), indent=1))
    print(table)
    loss_curves(logs, out / "loss_curves.png")
    # test scenes with decoys for the figure: a poster or a parked car, and a person
    ids = {c.name: c.id for c in test.classes}
    picks = []
    for i in range(len(test)):
        present = set(torch.unique(test[i]["sem_ids"]).tolist())
        if ids.get("poster") in present and ids.get("person") in present or ids.get("car_parked") in present:
            picks.append(i)
        if len(picks) == 4:
            break
    shown = {k: pipes[k] for k in ("none", "overlay", "xattn") if k in pipes}
    if shown:
        comparison_figure(shown, test, picks or [0, 1, 2], args.steps, args.seed, out / "comparison.png")
    if "xattn" in pipes and picks:
        item = test[picks[0]]
        maps = attention_maps(pipes["xattn"], item["rgb"][None], item["sem"][None], seed=args.seed, steps=args.steps)
        fig = attention_figure(maps, item["rgb"], item["sem"], item["sem_ids"], {c.id: c.name for c in test.classes})
        grid([[fig]], pad=0, scale=2).save(out / "attention.png")
    print(f"wrote {out / 'table.md'}, results.json, loss_curves.png, comparison.png, attention.png")
    return 0


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "synth-test"), help="held-out pairs (rgb/, sem/, ir/)")
    ap.add_argument("--ckpt", default=None, help="a train.py output")
    ap.add_argument("--base", action="store_true", help="evaluate the base model without semantic weights")
    ap.add_argument("--steps", type=int, default=20, help="sampling (Euler) steps per image")
    ap.add_argument("--limit", type=int, default=None, help="only the first K pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--decoys", default=None, help="cold classes that look like hot ones, comma-separated "
                    f"(default: {','.join(DECOY_NAMES)} where the dataset has them)")
    ap.add_argument("--save", default=None, help="also write the predictions to this folder")
    ap.add_argument("--fid-model", default=None, help="TorchScript feature network for FID (user-supplied)")
    ap.add_argument("--ablation", action="store_true", help="train every scheme of --schemes, then score them")
    ap.add_argument("--schemes", default=",".join(ABLATION))
    ap.add_argument("--train-steps", type=int, default=400, help="ablation: training steps per scheme")
    ap.add_argument("--train-data", default=str(ROOT / "data" / "synth"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    ap.add_argument("--batch-size", type=int, default=16, help="ablation: training batch")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    for name in COUNT_FLAGS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    return run_ablation(args) if args.ablation else run_eval(args)


def decoy_names(args) -> list[str] | None:
    """--decoys as a list of names (None: the defaults)."""
    return None if args.decoys is None else [n.strip() for n in args.decoys.split(",") if n.strip()]


def run_eval(args) -> int:
    if not args.ckpt and not args.base:
        raise ValueError("pass --ckpt PATH (a train.py output) or --base")
    ds = data.PairedDataset(args.data, size=args.size)
    decoys = decoy_names(args)
    decoy_ids(ds.classes, decoys)  # a misspelt name is refused before the model loads
    pipe = load_pipeline(None if args.base else args.ckpt)
    summ = evaluate(pipe, ds, steps=args.steps, seed=args.seed, limit=args.limit, decoys=decoys,
                    save_dir=Path(args.save) if args.save else None, progress=args.progress)
    extra = {"ckpt": args.ckpt or "base", "steps": args.steps, "seed": args.seed}
    if args.fid_model:
        extra["fid"] = fid_score(pipe, ds, args.fid_model, args.steps, args.seed, args.limit)
    print(metrics.format_table({args.ckpt or "base": summ}, decoy=True))
    print(json.dumps(jsonable(summary_line(args.ckpt or "base", summ, extra))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
