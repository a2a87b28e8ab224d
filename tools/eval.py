"""
Make the project's claims measurable: generate the IR image for every held-out pair and score it.

    python -m tools.eval --data DIR --ckpt PATH [--steps N] [--limit K] [--seed S]   # one model
    python -m tools.eval --data DIR --ckpt PATH --lora FILE[:SCALE]                   # + a LoRA from another tool
    python -m tools.eval --data DIR --base                                           # the base, no semantics
    python -m tools.eval --ablation [--train-steps N] [--steps N] [--out runs/ablation]  # train + score each scheme
    python -m tools.eval --ablation --schemes xattn-double,xattn-every2,xattn-half  # scheme B's cheaper options

Protocol (tools/metrics.py has the exact definitions): each test pair is generated at its own size with --steps Euler
steps (default 20), seed --seed + index, the run's own guidance; the prediction is compared with the ground-truth IR
in [0, 1]: PSNR, SSIM, per-class intensity error, and over the regions of the semantic map the hallucination rate
(cold in the ground truth, hot in the prediction) and the miss rate (hot in the ground truth, cold in the
prediction). Decoy classes (default: poster, car_parked, which look exactly like hot classes in RGB) get their own
hallucination rate. FID needs a user-supplied feature network (--fid-model, a TorchScript file; nothing downloads),
loaded before the model and run on the same predictions. A NaN or infinite prediction stops the evaluation with an
error naming the pair: it is never scored. Every option is checked before the first sample, and the scores computed
are printed even when a later step (the protocol, FID, the ceiling) fails.

--ceiling adds the rows no model can beat: the autoencoder's reconstruction of the ground truth and, on a tools.synth
set (one with synth.json), the sampler's ceiling: a second draw of each scene (the parts no input shows drawn again)
and the scene's mean IR over MEAN_DRAWS draws, each through the autoencoder (docs/evaluation.md).

The test set is read with its own classes.json, else the classes the checkpoint was trained with (its run config),
else the synthetic ones; a test set whose classes.json differs from the checkpoint's classes is refused.

The ablation trains each conditioning scheme with the same data, --train-steps, seed and LoRA (stage `joint`: LoRA on
the backbone + the scheme's semantic modules; `none` is LoRA alone on RGB, `overlay` LoRA alone on RGB blended with
the semantic colours), each run one `python train.py` process started from the repository root, evaluates all of
them on the same held-out set, and writes table.md, results.json and figures. A scheme whose
<out>/<scheme>/seed<K>/final.safetensors exists is reused only if it was trained with this invocation's settings (the
train_args its metadata records, compared on every setting the ablation passes to train.py); otherwise the ablation
names the setting that differs and stops before any training: pass --retrain, or a new --out.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import data
from checkpoint import command, differing, read_metadata, run_config, trained_file
from extras.fp8 import BASE_DTYPES
from extras.schemes import parameter_count
from flux_model import PRESETS
from pipeline import (ROOT, SAMPLE_STEPS, SEM_GUIDANCE, SEM_STRENGTH, attention_maps, check_not_lora, find_setup,
                      generate, is_trained_key, load_pipeline, parse_lora, run_classes)
from sem_cross_attn import SemanticConfig
from viz import (attention_figure, check_can_make, check_image_out, grid, loss_curves, sweep_figure, to_pil_gray,
                 to_pil_rgb)
from tools import metrics
from tools.synth import (TEST_SET, TRAIN_SET, NotSynthSet, ensure_set, ir_read_back, mean_ir, redraw, render_scene,
                         set_scenes)

DECOY_NAMES = ("poster", "car_parked")
ABLATION = ("none", "overlay", "zeroconv", "xattn", "xattn-ip", "xattn-ip-shared", "adapter", "zeroconv+jitter",
            "xattn-ip+jitter")
LABELS = {"none": "none (RGB only)", "overlay": "overlay (pixel fusion)", "zeroconv": "A: zero-conv",
          "xattn": "B: separate cross-attention", "adapter": "C: gated adapter",
          "xattn-ip": "B (default): decoupled, 64-dim tokens", "xattn-ip-shared": "B: decoupled, shared K/V",
          "xattn-double": "B, double blocks only", "xattn-every2": "B, every 2nd block", "xattn-half": "B, half width"}
CEILING = "ceiling: autoencoder reconstruction"
# on a tools.synth test set, what an ideal model could score (docs/evaluation.md, "The sampler's ceiling"):
MEAN_DRAWS = 16  # redraws averaged into a scene's mean IR
SAMPLER_CEILING = "ceiling: second draw (ideal sampler)"
MEAN_CEILING = f"ceiling: mean IR of {MEAN_DRAWS} draws (ideal regressor)"
DRAW_STREAMS = {SAMPLER_CEILING: 1, MEAN_CEILING: 2}  # pair i's draws: np.random.default_rng([seed, i, stream])
# scheme B's cheaper options (tools.bench measures what each saves; the ablation what each costs in quality):
# train.py settings on top of scheme xattn. Half width: half the heads at the same head dim.
B_OPTIONS = {"xattn": lambda p: {"sem_attention": "separate", "sem_token_dim": 0},
             "xattn-double": lambda p: {"sem_blocks": "double", "sem_attention": "separate", "sem_token_dim": 0},
             "xattn-every2": lambda p: {"sem_blocks": "every:2", "sem_attention": "separate", "sem_token_dim": 0},
             "xattn-half": lambda p: {"sem_inner_dim": p.hidden_size // 2, "sem_heads": max(1, p.num_heads // 2),
                                      "sem_attention": "separate", "sem_token_dim": 0},
             "xattn-ip": lambda p: {"sem_attention": "decoupled", "sem_token_dim": 64},
             "xattn-ip-shared": lambda p: {"sem_attention": "decoupled", "sem_token_dim": 256,
                                           "sem_shared_kv": True}}
SHIFT_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # the misaligned split: pair i's map moves SHIFT_DIRS[i % 4] * s
COUNT_FLAGS = ("steps", "train_steps", "limit", "batch_size", "lora_rank")  # must be >= 1 when given
# the ablation flag behind each train.py setting that train_config takes from the command line
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


@dataclass(frozen=True)
class Sampling:
    """How each test pair is generated: Euler steps, seed (pair i: seed + i), the semantic strength and guidance,
    and the semantic map given to the model: as labelled, or misaligned (moved by `shift` pixels, pair i along
    SHIFT_DIRS[i % 4], then coarsened by `down`; data.misalign). Scores always use the true labels."""
    steps: int = 20
    seed: int = 0
    sem_strength: float = SEM_STRENGTH
    sem_guidance: float = SEM_GUIDANCE
    shift: int = 0
    down: int = 1

    def conditioning_map(self, item: dict, i: int, classes) -> Tensor:
        """The semantic image [3, H, W] the model sees for pair i."""
        if not self.shift and self.down == 1:
            return item["sem"]
        dy, dx = (self.shift * d for d in SHIFT_DIRS[i % len(SHIFT_DIRS)])
        return data.render_semantic(data.misalign(item["sem_ids"], dy, dx, self.down), classes)


@torch.no_grad()
def predict(pipe, ds, how: Sampling, limit: int | None, batch_size: int = 8, progress: bool = True):
    """Yield (index, item, prediction [1, H, W]) for the first `limit` pairs, generated as `how` says.
    A prediction with a NaN or infinite pixel raises ValueError naming the pair."""
    from tqdm import tqdm
    n = len(ds) if not limit else min(limit, len(ds))
    bar = tqdm(total=n, desc="evaluating", disable=not progress)
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        groups = [items] if len({tuple(it["rgb"].shape) for it in items}) == 1 else [[it] for it in items]
        i = start
        for group in groups:  # one batch per image size
            sem = torch.stack([how.conditioning_map(it, i + k, ds.classes) for k, it in enumerate(group)])
            pred = generate(pipe, torch.stack([it["rgb"] for it in group]), sem, steps=how.steps,
                            seed=[how.seed + i + k for k in range(len(group))], sem_strength=how.sem_strength,
                            sem_guidance=how.sem_guidance).cpu()
            for k, it in enumerate(group):
                if not bool(torch.isfinite(pred[k]).all()):
                    raise ValueError(f"{ds.root}: the prediction for pair {i + k} ({it['name']}) is not finite "
                                     "(NaN or inf): the model's weights or sampling diverged; nothing is scored")
                yield i + k, it, pred[k]
            i += len(group)
            bar.update(len(group))
    bar.close()


def evaluate(pipe, ds, how: Sampling = Sampling(), limit=None, decoys=None, save_dir: Path | None = None,
             progress=True, protocol=None, fid=None) -> dict:
    """Score a pipeline on a dataset: metrics.summarize over every pair (+ the slice of the decoy classes
    `decoys`; None: DECOY_NAMES where the dataset has them), regions on the true labels. `protocol`
    (protocol.ThermalGenProtocol) and `fid` (FidFeatures) are also given every pair."""
    def pairs():
        for _, item, pred in predict(pipe, ds, how, limit, progress=progress):
            if protocol is not None:
                protocol.update(pred[None], item["ir"][None])
            if fid is not None:
                fid.update(item, pred)
            yield item, pred
    return score(ds, pairs(), decoys, save_dir)


def score(ds, pairs, decoys=None, save_dir: Path | None = None) -> dict:
    """metrics.summarize over (item, prediction [1, H, W]) pairs."""
    records = []
    for item, pred in pairs:
        records.append(metrics.evaluate_image(pred[0].double(), item["ir"][0].double(), item["sem_ids"]))
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            to_pil_gray(pred).save(save_dir / f"{item['name']}.png")
    return metrics.summarize(records, hot_ids=data.hot_ids(ds.classes), decoy_ids=decoy_ids(ds.classes, decoys))


@torch.no_grad()
def reconstruct(ae, ir: Tensor) -> Tensor:
    """The autoencoder's encode -> decode of an IR image [B, 1, H, W] in [0, 1], read back as IR: what a perfect
    transformer (one that predicted the ground truth's own latents) would give."""
    rgb = data.ir_to_rgb(ir).to(ae_dtype(ae))
    return data.rgb_to_ir(ae.decode(ae.encode(rgb)).float().clamp(-1, 1))


def ae_dtype(ae) -> torch.dtype:
    return next(ae.parameters()).dtype


def ceiling(pipe, ds, limit=None, decoys=None, progress=True) -> dict:
    """The ceiling row: the ground truth's autoencoder reconstruction, scored like the models."""
    from tqdm import tqdm
    n = len(ds) if not limit else min(limit, len(ds))
    device = next(pipe.ae.parameters()).device
    pairs = ((ds[i], reconstruct(pipe.ae, ds[i]["ir"][None].to(device))[0].cpu())
             for i in tqdm(range(n), desc="ceiling", disable=not progress))
    return score(ds, pairs, decoys)


def ceiling_scenes(root, ds) -> dict[str, dict] | None:
    """The scenes of the test set `ds` read from `root` (synth.set_scenes: pair name -> scene), checked before any
    sampling; None, with a one-line note, when it is not a tools.synth set or is read at a --size other than its
    scenes'. A tools.synth set whose pairs do not re-render from their scenes is refused (DataError)."""
    try:
        scenes = set_scenes(root)
    except NotSynthSet as e:
        print(f"note: {e}; only the autoencoder ceiling is scored")
        return None
    sizes = {scene["size"] for scene in scenes.values()}
    if ds.size is not None and sizes != {ds.size}:
        print(f"note: {root} is read at --size {ds.size}, its scenes were drawn at {min(sizes)} px; only the "
              "autoencoder ceiling is scored")
        return None
    return scenes


@torch.no_grad()
def sampler_ceilings(pipe, ds, scenes, limit=None, decoys=None, seed=0, draws=MEAN_DRAWS, progress=True) -> dict:
    """The rows an ideal model reaches on a tools.synth test set (scenes: ceiling_scenes), each through the
    autoencoder like `reconstruct` and scored against the ground truth like a model's output: SAMPLER_CEILING, one
    second draw of each scene (synth.redraw: same RGB and labels, the unseen parts drawn again), and MEAN_CEILING, the
    scene's mean IR over `draws` redraws (synth.mean_ir). Pair i's draws come from np.random.default_rng([seed, i,
    DRAW_STREAMS[row]]): reproducible, and never the stream that drew the scene itself."""
    from tqdm import tqdm
    n = len(ds) if not limit else min(limit, len(ds))
    device = next(pipe.ae.parameters()).device
    preds = {SAMPLER_CEILING: [], MEAN_CEILING: []}  # row -> [(item, prediction [1, H, W])]
    for i in tqdm(range(n), desc="sampler ceiling", disable=not progress):
        item = ds[i]
        scene = scenes[item["name"]]
        rng = {row: np.random.default_rng([seed, i, k]) for row, k in DRAW_STREAMS.items()}
        irs = {SAMPLER_CEILING: ir_read_back(render_scene(redraw(scene, rng[SAMPLER_CEILING]))[2]),  # [H, W]
               MEAN_CEILING: mean_ir(scene, draws, rng[MEAN_CEILING])}                            # [H, W]
        for row, ir in irs.items():
            x = torch.from_numpy(ir)[None, None].to(device)                   # [H, W] -> [1, 1, H, W]
            preds[row].append((item, reconstruct(pipe.ae, x)[0].cpu()))       # [1, H, W]
    return {row: score(ds, pairs, decoys) for row, pairs in preds.items()}


def load_fid_model(path) -> torch.nn.Module:
    """The --fid-model feature network (TorchScript, e.g. Inception-v3), loaded before anything is sampled; a file
    that is missing or not TorchScript is a one-line ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--fid-model {path}: no such file (a TorchScript feature network, e.g. Inception-v3)")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, torch.jit.Error) as e:
        reason = str(e).strip().split("\n")[0].split(". ")[0]
        raise ValueError(f"--fid-model {path}: not a TorchScript file ({reason}); save the network with "
                         "torch.jit.script(net).save(path) or torch.jit.trace") from None


class FidFeatures:
    """FID between generated and real IR from the evaluation's own predictions: the --fid-model network's features
    of each pair, taken as the pair is scored (nothing is sampled twice). A network that fails on an image stops
    collecting and keeps the error for compute(), so the other scores still come out."""

    def __init__(self, net, path):
        self.net, self.path = net, path
        self.real, self.fake, self.error = [], [], None

    def update(self, item: dict, pred: Tensor):
        """One pair: the ground truth item["ir"] and the prediction, each [1, H, W] in [0, 1]."""
        if self.error is not None:
            return
        try:
            self.real.append(metrics.fid_features_from_model(self.net, item["ir"][None]))
            self.fake.append(metrics.fid_features_from_model(self.net, pred[None]))
        except (RuntimeError, ValueError, TypeError, torch.jit.Error) as e:  # a TorchScript failure's cause is
            reason = str(e).strip().split("\n")[-1]                             # its message's last line
            self.error = f"--fid-model {self.path}: the network failed on pair {item['name']} ({reason}); no FID"

    def compute(self) -> float:
        """The FID over every pair seen; a ValueError if the network failed or fewer than 2 pairs were seen."""
        if self.error is not None:
            raise ValueError(self.error)
        if len(self.real) < 2:
            raise ValueError(f"--fid-model: FID needs at least 2 pairs, this evaluation has {len(self.real)}")
        return metrics.fid(torch.cat(self.real), torch.cat(self.fake))


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


def comparison_figure(pipes: dict, ds, indices: list[int], how: Sampling, out: Path, scale: int = 2):
    """RGB | semantic | ground truth | each method's prediction, one row per test pair."""
    rows = []
    for i in indices:
        item = ds[i]
        row = [to_pil_rgb(item["rgb"]), to_pil_rgb(item["sem"]), to_pil_gray(item["ir"])]
        for pipe in pipes.values():
            pred = generate(pipe, item["rgb"][None], item["sem"][None], steps=how.steps, seed=how.seed + i,
                            sem_strength=how.sem_strength, sem_guidance=how.sem_guidance)  # [1, 1, H, W]
            row.append(to_pil_gray(pred[0]))
        rows.append(row)
    labels = ["RGB", "semantic", "ground truth"] + [LABELS.get(n, n).split(" (")[0] for n in pipes]
    grid(rows, labels, scale=scale).save(out)
    return out


# ----------------------------------------------------------------------------------------------------------------


def train_config(scheme: str, args, run: Path, seed: int) -> dict:
    """The ablation protocol as train.py settings (setting -> value; every other setting is train.py's default):
    stage joint (LoRA on the backbone + the scheme's modules), the same data, steps, batch, learning rate and LoRA for
    every scheme, this training seed; scheme B's options on top; "+jitter": trained on misaligned maps (train.py
    --sem-jitter). A scheme is trained only when it has no final weights or --retrain asks for it, so its run starts
    over (overwrite)."""
    name, jitter = scheme.removesuffix("+jitter"), scheme.endswith("+jitter")
    options = B_OPTIONS[name](PRESETS[find_setup().preset]) if name in B_OPTIONS else {}
    return {"stage": "joint", "scheme": name.split("-")[0], "data": str(Path(args.train_data).resolve()),
            "steps": args.train_steps, "batch_size": args.batch_size, "seed": seed, "out": str(run),
            "lora_rank": args.lora_rank, "lora_alpha": float(args.lora_rank), "sample_steps": 0, "lr": args.lr,
            "progress": args.progress, "overwrite": True, "sem_jitter": args.jitter if jitter else 0,
            "sem_drop": 0.0} | {"sem_attention": "separate", "sem_token_dim": 0} | options


def train_command(config: dict) -> list[str]:
    """The train.py command of one run: a flag per setting (--name value; a boolean as --name or --no-name)."""
    flags = []
    for name, value in config.items():
        flag = name.replace("_", "-")
        flags += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return [sys.executable, "train.py", *flags]


def train_run(config: dict) -> int:
    """One training run: train.py in its own process, started from the repository root; its exit status. Ctrl-C
    reaches train.py too (one process group): it writes its resume state and exits, and this waits for it."""
    with subprocess.Popen(train_command(config), cwd=ROOT) as proc:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue


def label(scheme: str) -> str:
    name = scheme.removesuffix("+jitter")
    return LABELS[name] + (", trained on misaligned maps" if name != scheme else "")


def check_reusable(final: Path, want: dict) -> dict:
    """The train_args `final` records, if they hold every setting of `want` (but for NOT_COMPARED) with its value;
    else ValueError naming the first setting that differs. Settings the ablation leaves to train.py's defaults are
    not compared, so a run recorded before train.py had some setting is reused."""
    try:
        recorded = json.loads(read_metadata(final)["train_args"])
    except (KeyError, json.JSONDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{final} records no readable train_args, so its settings are unknown; pass --retrain to "
                         "train it again, or a new --out")
    if changed := differing(recorded, want, NOT_COMPARED):
        name = changed[0]
        flag = f" ({TRAIN_FLAGS[name]})" if name in TRAIN_FLAGS else ""
        raise ValueError(f"{final} was trained with {name}={recorded.get(name, '(not recorded)')!r}, this run asks "
                         f"for {want[name]!r}{flag}; pass --retrain to train it again, or a new --out")
    return recorded


def splits(args) -> dict[str, Sampling]:
    """The conditions every model is scored under: the labelled maps, each --shifts misalignment, each --coarse."""
    how = Sampling(steps=args.steps, seed=args.seed, sem_strength=args.sem_strength, sem_guidance=args.sem_guidance)
    out = {"aligned": how}
    out |= {f"shift {k} px": replace(how, shift=k) for k in int_list(args.shifts, "--shifts")}
    out |= {f"coarse x{k}": replace(how, down=k) for k in int_list(args.coarse, "--coarse")}
    return out


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: a comma-separated list of whole numbers") from None
    if any(v < minimum for v in values):
        raise ValueError(f"{flag} {text!r}: every value must be at least {minimum}")
    return values


def scored(run: Path, pipe, test, name: str, how: Sampling, args, decoys) -> dict:
    """The run's score under `how`, cached in <run>/scores.json next to the weights it was computed from (reused
    only for the same weights, test data, limit and sampling)."""
    path = run / "scores.json"
    key = json.dumps({"split": name, "sampling": asdict(how), "data": str(Path(args.data).resolve()),
                      "limit": args.limit, "decoys": decoys,
                      "weights": (run / "final.safetensors").stat().st_mtime_ns}, sort_keys=True)
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cache:
        cache[key] = jsonable(evaluate(pipe, test, how, limit=args.limit, decoys=decoys, progress=args.progress))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    return cache[key]


HEADLINE = {"PSNR (dB)": lambda s: s["psnr"], "SSIM": lambda s: s["ssim"],
            "Miss": lambda s: s["all"]["miss_rate"], "Decoy halluc.": lambda s: s["decoy"]["hallucination_rate"],
            "Hallucination": lambda s: s["all"]["hallucination_rate"]}


def mean_sd(values: list[float], percent: bool) -> str:
    """'mean ± sd' over seeds (sample sd; one seed: the value alone); rates in percent."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float) * (100 if percent else 1)
    if not len(v):
        return "n/a"
    fmt = (lambda x: f"{x:.1f}%") if percent else (lambda x: f"{x:.2f}") if abs(v.mean()) > 2 else (
        lambda x: f"{x:.3f}")
    return fmt(v.mean()) + (f" ± {v.std(ddof=1):.{1 if percent else 2}f}" if len(v) > 1 else "")


def seed_table(rows: dict[str, list[dict]], extras: dict[str, dict], columns=HEADLINE) -> str:
    """Markdown: one row per method, each metric as mean ± sd over its seeds' summaries, then the extras."""
    extra_names = list(dict.fromkeys(k for e in extras.values() for k in e))
    header = ["Method"] + list(columns) + extra_names
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, summaries in rows.items():
        cells = [mean_sd([f(s) for s in summaries], percent=not col.endswith(("PSNR (dB)", "SSIM")))
                 for col, f in columns.items()]
        cells += [metrics.fmt_value(extras.get(name, {}).get(k)) for k in extra_names]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def run_ablation(args) -> int:
    schemes = args.schemes.split(",")
    if unknown := [s for s in schemes if s.removesuffix("+jitter") not in LABELS]:
        raise ValueError(f"unknown scheme(s) {unknown}; choose from {list(LABELS)}, each optionally with +jitter")
    if bad := [s for s in schemes if s.endswith("+jitter") and s.split("-")[0] in ("none", "overlay")]:
        raise ValueError(f"{bad}: +jitter moves a semantic module's input; the baselines have none")
    seeds = int_list(args.seeds, "--seeds", minimum=0)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {args.seeds!r}: one or more different training seeds")
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
    scenes = ceiling_scenes(test_data, test)
    conditions = splits(args)
    runs_of = {s: {seed: out / s / f"seed{seed}" for seed in seeds} for s in schemes}
    # every reused run is checked before any training, so a mismatch costs no time
    for scheme in schemes:
        for seed, run in runs_of[scheme].items():
            if not args.retrain and (run / "final.safetensors").is_file():
                check_reusable(run / "final.safetensors", train_config(scheme, args, run, seed))
    dev = PRESETS["dev"]
    base_pipe = load_pipeline(None, quiet=True)
    top = ceiling(base_pipe, test, args.limit, decoys, args.progress)
    tops = {CEILING: top} | (sampler_ceilings(base_pipe, test, scenes, args.limit, decoys, args.seed,
                                              progress=args.progress) if scenes else {})
    rows = {name: {row: [s] for row, s in tops.items()} for name in conditions}  # split -> method -> summaries
    extras, logs, pipes, per_seed, recorded = {}, {}, {}, {}, {}
    for scheme in schemes:
        name = label(scheme)
        per_seed[name] = {}
        for seed, run in runs_of[scheme].items():
            final = run / "final.safetensors"
            if args.score_only and not final.is_file():
                print(f"{scheme} seed {seed}: not trained, left out (--score-only)")
                continue
            if args.retrain or not final.is_file():
                t0 = time.time()
                rc = train_run(train_config(scheme, args, run, seed))
                if rc:
                    raise RuntimeError(f"training {scheme} (seed {seed}) failed: train.py exited with status {rc}")
                print(f"{scheme} seed {seed}: trained in {time.time() - t0:.0f} s")
                (run / "scores.json").unlink(missing_ok=True)
            recorded.setdefault(name, {})[seed] = check_reusable(final, train_config(scheme, args, run, seed))
            pipe = load_pipeline(final, quiet=True)
            aligned = scored(run, pipe, test, "aligned", conditions["aligned"], args, decoys)
            # a model without a semantic input scores the same under every split (it never sees the map)
            per_seed[name][seed] = {split: aligned if split == "aligned" or pipe.scheme == "none"
                                    else scored(run, pipe, test, split, how, args, decoys)
                                    for split, how in conditions.items()}
            for split in conditions:
                rows[split].setdefault(name, []).append(per_seed[name][seed][split])
            print(json.dumps(jsonable(summary_line(f"{scheme} seed {seed}", per_seed[name][seed]["aligned"]))))
            if seed == seeds[0]:
                pipes[scheme], logs[name] = pipe, run / "log.jsonl"
                log_rows = [r for l in (run / "log.jsonl").read_text().splitlines() if l.strip()
                            if "loss" in (r := json.loads(l))]  # the training lines (not validation lines)
                sps = float(np.median([r["steps_per_s"] for r in log_rows[1:]] or [log_rows[-1]["steps_per_s"]]))
                cfg = pipe.cfg.get("semantic")
                extras[name] = {
                    "trainable (tiny)": sum(v.numel() for k, v in pipe.model.state_dict().items() if is_trained_key(k)),
                    "semantic params at dev": parameter_count(SemanticConfig.from_dict(cfg), dev) if cfg else 0,
                    "s/step": round(1 / sps, 3)}
    table = seed_table(rows["aligned"], extras)
    robust_cols = {f"{split}: {col}": (lambda f, sp: (lambda s: f(s[sp])))(HEADLINE[col], split)
                   for split in conditions for col in ("PSNR (dB)", "Miss")}
    robust_rows = {name: [{sp: rows[sp][name][k] for sp in conditions} for k in range(len(rows["aligned"][name]))]
                   for name in rows["aligned"]}
    robust = seed_table(robust_rows, {}, robust_cols) if len(conditions) > 1 else ""
    (out / "table.md").write_text(table + "\n" + (f"\n{robust}\n" if robust else ""))
    (out / "results.json").write_text(json.dumps(jsonable({"protocol": {
        "train_pairs": len(data.PairedDataset(train_data)), "test_pairs": min(len(test), args.limit or len(test)),
        "train_steps": args.train_steps, "batch_size": args.batch_size, "lora_rank": args.lora_rank, "lr": args.lr,
        "seeds": seeds, "eval_steps": args.steps, "sampling": {k: asdict(v) for k, v in conditions.items()},
        "jitter": args.jitter,
        "base": str(setup.flux)},
        "ceiling": top, "ceilings": tops, "per_seed": per_seed, "extras": extras, "train_args": recorded}), indent=1))
    print(table + ("\n\n" + robust if robust else ""))
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
    shown = {k: pipes[k] for k in ("none", "overlay", "zeroconv", "xattn", "xattn-ip") if k in pipes}
    if shown:
        comparison_figure(shown, test, picks or [0, 1, 2], conditions["aligned"], out / "comparison.png")
    attending = next((k for k in ("xattn-ip", "xattn") if k in pipes), None)  # the default B, else the separate
    if attending and picks:
        item = test[picks[0]]
        maps = attention_maps(pipes[attending], item["rgb"][None], item["sem"][None], seed=args.seed, steps=args.steps)
        fig = attention_figure(maps, item["rgb"], item["sem"], item["sem_ids"], {c.id: c.name for c in test.classes})
        grid([[fig]], pad=0, scale=2).save(out / "attention.png")
    print(f"wrote {out / 'table.md'}, results.json, loss_curves.png, comparison.png, attention.png")
    return 0


def size_notes(ds, pipe) -> None:
    """A line saying what --size crops, and one when pairs are sampled far from the size the model was trained at
    (data.crop_note, data.size_note)."""
    for note in (ds.crop_note(), data.size_note(ds.served, data.trained_sizes(pipe.cfg))):
        if note:
            print(f"note: {note}")


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "synth-test"), help="held-out pairs (rgb/, sem/, ir/)")
    ap.add_argument("--ckpt", default=None, help="a train.py output, or its run folder (its final.safetensors)")
    ap.add_argument("--base", action="store_true", help="evaluate the base model without semantic weights")
    ap.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                    help="one model scored: a LoRA file from another tool applied to the base at SCALE (default 1.0) "
                         "on top of --ckpt, as sample.py --lora does; repeatable")
    ap.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="sampling (Euler) steps per image")
    ap.add_argument("--limit", type=int, default=None, help="only the first K pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None,
                    help="serve every pair at about SxS pixels at its own aspect ratio, sides multiples of 16, as "
                         "train.py --size S does (default: the stored sizes)")
    ap.add_argument("--base-dtype", default=None, choices=list(BASE_DTYPES),
                    help="how the base is stored: fp8 (1 byte per linear weight) | bf16 | fp32")
    ap.add_argument("--decoys", default=None, help="cold classes that look like hot ones, comma-separated "
                    f"(default: {','.join(DECOY_NAMES)} where the dataset has them)")
    ap.add_argument("--save", default=None,
                    help="also write the predictions to this folder (--sweep: the figure's file name)")
    ap.add_argument("--fid-model", default=None,
                    help="TorchScript feature network for FID (user-supplied), run on the evaluation's predictions")
    ap.add_argument("--protocol", default=None, choices=("thermalgen",),
                    help="also score as ThermalGen's evaluation does (tools/protocol.py; requirements-extras.txt)")
    ap.add_argument("--metrics", default=None, metavar="psnr,ssim[,lpips,fid]",
                    help="--protocol: the scores, comma-separated (default: psnr,ssim, plus lpips when "
                         "--lpips-weights is given and fid when --fid-weights is given)")
    ap.add_argument("--lpips-weights", default=None, help="--protocol: torchvision's alexnet-owt-7be5be79.pth")
    ap.add_argument("--fid-weights", default=None,
                    help="--protocol: torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    ap.add_argument("--sem-strength", type=float, default=SEM_STRENGTH,
                    help="multiplier on the learned semantic scales/gates")
    ap.add_argument("--sem-guidance", type=float, default=SEM_GUIDANCE, help="semantic classifier-free guidance w")
    ap.add_argument("--sem-shift", type=int, default=0,
                    help="condition on maps moved by this many pixels (the misaligned split; scored on true labels)")
    ap.add_argument("--sem-coarse", type=int, default=1, help="condition on maps coarsened by this factor")
    ap.add_argument("--ceiling", action="store_true",
                    help="also score the autoencoder's reconstruction of the ground truth (the ceiling row) and, on a "
                    "tools.synth set, a second draw of each scene and its mean IR (the sampler's ceiling)")
    ap.add_argument("--sweep", default=None, choices=("strength", "guidance"),
                    help="score --ckpt at each of --values of the semantic strength or guidance, with a figure")
    ap.add_argument("--values", default="0,0.5,1,1.5,2", help="--sweep: the settings, comma-separated")
    ap.add_argument("--ablation", action="store_true", help="train every scheme of --schemes, then score them")
    ap.add_argument("--schemes", default=",".join(ABLATION),
                    help=f"ablation: any of {','.join(LABELS)}; +jitter: trained on misaligned maps")
    ap.add_argument("--seeds", default="0,1,2", help="ablation: training seeds (mean ± sd over them)")
    ap.add_argument("--shifts", default="3,6", help="ablation: also score with maps moved by these pixels")
    ap.add_argument("--coarse", default="4", help="ablation: also score with maps coarsened by these factors")
    ap.add_argument("--jitter", type=int, default=4, help="ablation, +jitter schemes: train.py --sem-jitter")
    ap.add_argument("--train-steps", type=int, default=400, help="ablation: training steps per scheme")
    ap.add_argument("--train-data", default=str(ROOT / "data" / "synth"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    ap.add_argument("--batch-size", type=int, default=16, help="ablation: training batch")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--score-only", action="store_true",
                    help="ablation: train nothing; score the finished runs (a scheme's missing seeds are left out)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    for name in COUNT_FLAGS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    for flag in ("sem_strength", "sem_guidance"):
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
    if args.sem_shift < 0 or args.sem_coarse < 1:
        raise ValueError("--sem-shift must be 0 or more and --sem-coarse at least 1")
    if args.retrain and args.score_only:
        raise ValueError("--retrain and --score-only contradict each other")
    if args.ckpt and args.base:
        raise ValueError("--ckpt and --base: pick one (--ckpt scores a train.py output, --base the base model "
                         "without semantic weights)")
    if args.lora and args.ablation:
        raise ValueError("--lora applies to one model scored (--ckpt or --base), not to the ablation's runs")
    args.loras = [parse_lora(text) for text in args.lora or []]  # the files exist, the scales are numbers
    args.metrics = protocol_scores(args)
    if args.ablation:
        return run_ablation(args)
    if args.ckpt:
        args.ckpt = str(trained_file(args.ckpt))  # a run folder -> its final.safetensors; a resume.pt is refused
        check_not_lora(args.ckpt, "--ckpt", f"--lora {args.ckpt}[:SCALE]")
    return run_sweep(args) if args.sweep else run_eval(args)


def protocol_scores(args) -> list[str] | None:
    """--metrics as a list of score names (None: protocol.default_scores), checked against --protocol and the weight
    flags: a flag that changes nothing is refused rather than ignored. The names themselves are checked where the
    protocol is built, before any sampling."""
    given = [flag for flag, v in (("--metrics", args.metrics), ("--lpips-weights", args.lpips_weights),
                                  ("--fid-weights", args.fid_weights)) if v is not None]
    if given and not args.protocol:
        raise ValueError(f"{', '.join(given)}: no effect without --protocol thermalgen (add it to score its metrics)")
    if args.protocol and (args.sweep or args.ablation):
        raise ValueError("--protocol scores one model (--ckpt or --base), not a --sweep or the --ablation")
    if args.metrics is None:
        return None
    names = [n.strip().lower() for n in args.metrics.split(",") if n.strip()]  # ThermalGenProtocol checks them
    for flag, score in (("--lpips-weights", "lpips"), ("--fid-weights", "fid")):
        if getattr(args, flag[2:].replace("-", "_")) and score not in names:
            raise ValueError(f"{flag} is for {score.upper()}, which --metrics {args.metrics} leaves out: add {score} "
                             f"to --metrics or drop {flag}")
    return names


def decoy_names(args) -> list[str] | None:
    """--decoys as a list of names (None: the defaults)."""
    return None if args.decoys is None else [n.strip() for n in args.decoys.split(",") if n.strip()]


def class_rows(classes) -> list[tuple]:
    """A class table as comparable rows (id, name, colour, hot)."""
    return [(c.id, c.name, tuple(c.color), c.hot) for c in classes]


def eval_classes(root, ckpt) -> tuple[data.SemClass, ...]:
    """The classes a test set is read with: its classes.json, else the ones the checkpoint was trained with (its run
    config), else data.DEFAULT_CLASSES. A test set whose classes.json differs from the checkpoint's recorded classes
    is refused, naming both and the first difference: its scores would compare unrelated labels."""
    found = Path(root) / "classes.json"
    own = data.load_classes(found) if found.exists() or found.is_symlink() else None
    recorded = run_classes(run_config(ckpt), ckpt) if ckpt else None
    if own is not None and recorded is not None and class_rows(own) != class_rows(recorded):
        a, b = class_rows(own), class_rows(recorded)
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        first = (f"the test set has {len(a)} classes, the checkpoint {len(b)}" if k is None else
                 f"first difference: {a[k]} in the test set, {b[k]} in the checkpoint")
        raise ValueError(f"{found} and the classes {ckpt} was trained with differ ({first}); score a checkpoint on "
                         "a test set labelled with its own classes")
    return own or recorded or data.DEFAULT_CLASSES


def check_save_folder(path, flag: str = "--save") -> None:
    """Before any sampling: `path` can be the predictions folder (an existing folder, or one that can be made in a
    writable folder). Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file; the predictions are written into a folder")
    check_can_make(path.absolute(), f"{flag} {path}")


def run_eval(args) -> int:
    """One model (--ckpt, or --base) scored on --data: a table and a JSON line. Every option is checked, and the
    --fid-model network loaded, before the model loads; what was computed is printed even if a later step (the
    protocol, FID, the ceiling) fails, and that failure is then raised."""
    if not args.ckpt and not args.base:
        raise ValueError("pass --ckpt PATH (a train.py output) or --base")
    if args.save:
        check_save_folder(args.save)
    fid = FidFeatures(load_fid_model(args.fid_model), args.fid_model) if args.fid_model else None
    ds = data.PairedDataset(args.data, size=args.size, classes=eval_classes(args.data, args.ckpt))
    decoys = decoy_names(args)
    decoy_ids(ds.classes, decoys)  # a misspelt name is refused before the model loads
    scenes = None
    if args.ceiling:
        if Path(args.data).resolve() == (ROOT / "data" / "synth-test").resolve():
            ensure_set(args.data, TEST_SET)  # the demo's test set: given its synth.json if it predates them
        scenes = ceiling_scenes(args.data, ds)
    protocol = None
    if args.protocol:  # built first: a missing package or weight file fails before any generation
        from tools.protocol import SCORES, ThermalGenProtocol
        protocol = ThermalGenProtocol(args.metrics, lpips_weights=args.lpips_weights, fid_weights=args.fid_weights)
        left = [name for name in SCORES if name not in protocol.scores]
        print(f"--protocol thermalgen scores {','.join(protocol.scores)}"
              + (f" (not {','.join(left)}: ask with --metrics)" if left else ""))
    pipe = load_pipeline(args.ckpt, base_dtype=args.base_dtype, loras=args.loras)
    size_notes(ds, pipe)
    how = Sampling(args.steps, args.seed, args.sem_strength, args.sem_guidance, args.sem_shift, args.sem_coarse)
    summ = evaluate(pipe, ds, how, limit=args.limit, decoys=decoys, save_dir=Path(args.save) if args.save else None,
                    progress=args.progress, protocol=protocol, fid=fid)
    name = args.ckpt or "base"
    extra = {"ckpt": name} | asdict(how) | ({"loras": [[str(f), v] for f, v in args.loras]} if args.loras else {})
    rows = {name: summ}
    try:
        if protocol is not None:
            extra["thermalgen"] = protocol.compute()
        if fid is not None:
            extra["fid"] = fid.compute()
        if args.ceiling:
            rows = {CEILING: ceiling(pipe, ds, args.limit, decoys, args.progress)} | rows
            print(json.dumps(jsonable(summary_line("ceiling", rows[CEILING]))))
            if scenes is not None:
                tops = sampler_ceilings(pipe, ds, scenes, args.limit, decoys, args.seed, progress=args.progress)
                for row, s in tops.items():
                    print(json.dumps(jsonable(summary_line(row, s, {"seed": args.seed}))))
                rows = {CEILING: rows[CEILING]} | tops | {name: summ}
    finally:  # the scores already computed are printed whatever happened after them
        print(metrics.format_table(rows, decoy=True))
        print(json.dumps(jsonable(summary_line(name, summ, extra))))
    return 0


def run_sweep(args) -> int:
    """--sweep strength|guidance: one model scored at each setting; a table, a JSON line each and a figure of
    PSNR, miss and decoy hallucination against the setting."""
    if not args.ckpt:
        raise ValueError("--sweep needs --ckpt PATH (a train.py output with a semantic module)")
    try:
        values = [float(v) for v in args.values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--values {args.values!r}: a comma-separated list of numbers") from None
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ValueError(f"--values {args.values!r}: finite numbers >= 0")
    out = Path(args.save or f"sweep-{args.sweep}.png")
    check_image_out(out, "--save")  # the figure's name, checked before any sampling
    ds = data.PairedDataset(args.data, size=args.size, classes=eval_classes(args.data, args.ckpt))
    decoys = decoy_names(args)
    decoy_ids(ds.classes, decoys)
    net = load_fid_model(args.fid_model) if args.fid_model else None
    pipe = load_pipeline(args.ckpt, base_dtype=args.base_dtype, loras=args.loras)
    size_notes(ds, pipe)
    field = {"strength": "sem_strength", "guidance": "sem_guidance"}[args.sweep]
    base = Sampling(args.steps, args.seed, args.sem_strength, args.sem_guidance, args.sem_shift, args.sem_coarse)
    rows, lines, failed = {}, [], None
    for v in values:
        t0 = time.time()
        fid = FidFeatures(net, args.fid_model) if net is not None else None
        summ = evaluate(pipe, ds, replace(base, **{field: v}), limit=args.limit, decoys=decoys, progress=args.progress,
                        fid=fid)
        rows[f"{args.sweep} {v:g}"] = summ
        extra = {field: v, "seconds": round(time.time() - t0, 1)}
        if fid is not None:
            try:
                extra["fid"] = fid.compute()
            except ValueError as e:  # reported after the table: the other scores stand
                failed = failed or e
        lines.append(summary_line(f"{args.sweep} {v:g}", summ, extra))
        print(json.dumps(jsonable(lines[-1])))
    print(metrics.format_table(rows, decoy=True))
    sweep_figure(values, list(rows.values()), f"semantic {args.sweep}", out)
    Path(out).with_suffix(".json").write_text(json.dumps(jsonable(lines), indent=1))
    print(f"wrote {out} and {Path(out).with_suffix('.json')}")
    if failed is not None:
        raise failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
