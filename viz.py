"""
Pictures: tensors to images, writing them safely (name checked before the work, written by rename), grids, the
attention figure and loss curves (PIL only: no plotting library).
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from PIL import Image, ImageDraw

import data
from checkpoint import write_atomic


def to_pil_gray(ir: Tensor) -> Image.Image:
    """[1, H, W] in [0, 1] -> 8-bit grayscale."""
    return Image.fromarray((ir[0].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8), "L")


def to_pil_rgb(x: Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB."""
    arr = ((x.clamp(-1, 1).permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def heat(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a black-red-yellow-white ramp (reads as 'hot')."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 0], [180, 20, 10], [255, 170, 0], [255, 255, 255]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    f = pos - i
    return (stops[i[..., 0]] * (1 - f) + stops[i[..., 0] + 1] * f).astype(np.uint8)


def grid(images: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Rows of pictures on one canvas (each enlarged `scale` times), with optional column labels. Every cell is as
    large as the largest picture; a smaller one sits in its cell's top-left corner (pairs of several sizes)."""
    if scale != 1:
        images = [[im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in row] for row in images]
    w, h = max(im.width for row in images for im in row), max(im.height for row in images for im in row)
    top = 12 if labels else 0
    cols = max(len(r) for r in images)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, top + len(images) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels or []):
        draw.text((pad + j * (w + pad) + 2, 0), label, fill=(0, 0, 0))
    for i, row in enumerate(images):
        for j, im in enumerate(row):
            canvas.paste(im.convert("RGB"), (pad + j * (w + pad), top + pad + i * (h + pad)))
    return canvas


def check_image_out(path, flag: str = "-o") -> str:
    """Before any work: `path` can be written as a picture (a file name with an image extension, in a folder that
    exists or can be made). Returns the image format PIL writes for it. Nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name such as {path / 'ir.png'}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if path.suffix.lower() not in data.IMAGE_EXTS or fmt is None:
        raise ValueError(f"{flag} {path}: unknown image extension {path.suffix!r} (use one of "
                         f"{', '.join(data.IMAGE_EXTS)})")
    check_can_make(path.absolute().parent, f"{flag} {path}")
    return fmt


def check_can_make(folder: Path, what: str) -> None:
    """`folder` exists or can be made: the nearest folder of it that exists is writable. Nothing is created; a
    problem is a ValueError starting with `what` (the flag and its value)."""
    while not folder.exists():  # the nearest existing folder is where the missing ones will be made
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what}: the folder {folder} is not writable")


def save_image(img: Image.Image, path, flag: str = "-o") -> None:
    """Write to a temporary file in the same folder, then rename: a failure (a full disk) never truncates an
    existing file, and is a one-line CheckpointError naming `path`."""
    fmt = check_image_out(path, flag)
    write_atomic(path, lambda tmp: img.save(tmp, format=fmt))


# ----------------------------------------------------------------------------------------------------------------
# Where the semantic cross-attention looks


def query_points(sem_ids: Tensor, max_points: int = 4) -> list[tuple[int, int, int]]:
    """(class, row, col): one query pixel per class (the region pixel nearest the class centroid), smallest classes
    first, so small objects such as people and posters are always shown."""
    pts = []
    for c in torch.unique(sem_ids).tolist():
        ys, xs = torch.nonzero(sem_ids == c, as_tuple=True)
        cy, cx = ys.float().mean(), xs.float().mean()
        k = int(((ys - cy) ** 2 + (xs - cx) ** 2).argmin())
        pts.append((int(ys.numel()), c, int(ys[k]), int(xs[k])))
    pts.sort()
    return [(c, y, x) for _, c, y, x in pts[:max_points]]


def attention_figure(maps: dict[str, Tensor], rgb: Tensor, sem: Tensor, sem_ids: Tensor, names: dict[int, str],
                     max_blocks: int = 3) -> Image.Image:
    """A few blocks (rows) x one query pixel per class (columns): each block's attention over the semantic tokens
    (`maps`: name -> [L_img, N], from pipeline.attention_maps) as a heat map over the RGB image [3, H, W]."""
    H, W = rgb.shape[-2:]
    h, w = H // 16, W // 16
    names_sorted = sorted(maps, key=lambda k: (k.split(".")[0] != "double", int(k.split(".")[1])))
    pick = [names_sorted[round(i * (len(names_sorted) - 1) / max(1, max_blocks - 1))] for i in range(max_blocks)]
    pick = list(dict.fromkeys(pick))
    base = np.asarray(to_pil_rgb(rgb)).astype(np.float32)
    points = query_points(sem_ids)
    rows = []
    for name in pick:
        amap = maps[name]  # [L_img, N]; the first h*w queries are the x_t tokens
        row = [to_pil_rgb(sem)]
        for c, py, px in points:
            q = (py // 16) * w + (px // 16)
            a = amap[q].float().reshape(h, w).cpu().numpy()
            a = a / max(a.max(), 1e-8)
            a = np.kron(a, np.ones((16, 16)))  # token grid -> pixels
            im = Image.fromarray((0.35 * base + 0.65 * heat(a)).astype(np.uint8))
            d = ImageDraw.Draw(im)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], outline=(0, 255, 0), width=2)
            row.append(im)
        rows.append(row)
    labels = ["semantic"] + [names.get(c, str(c)) for c, _, _ in points]
    canvas = grid(rows, labels)
    d = ImageDraw.Draw(canvas)
    for i, name in enumerate(pick):  # block names down the left edge of each row
        d.text((4, 12 + 2 + i * (H + 2) + 2), name, fill=(0, 255, 0))
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# Training curves


def loss_curves(logs: dict[str, Path], out: Path, width=640, height=320, smooth=10):
    """Training loss per run (from each run's log.jsonl), moving-average smoothed, log-scaled y."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    series = {}
    for name, path in logs.items():
        rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
        rows = [r for r in rows if "loss" in r]  # not the validation lines (train.py --val-data)
        if rows:
            x = np.array([r["step"] for r in rows], float)
            y = np.log10(np.maximum([r["loss"] for r in rows], 1e-8))
            k = min(smooth, len(y))
            series[name] = (x, np.convolve(y, np.ones(k) / k, mode="valid"), k)
    if not series:
        return None
    xmax = max(s[0].max() for s in series.values())
    ymin = min(s[1].min() for s in series.values())
    ymax = max(s[1].max() for s in series.values())
    pad = 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, 10, width - 10, height - pad], outline=(0, 0, 0))

    def xy(x, y):
        return (pad + (width - pad - 10) * x / max(xmax, 1),
                height - pad - (height - pad - 10) * (y - ymin) / max(ymax - ymin, 1e-6))
    for i, (name, (x, y, k)) in enumerate(series.items()):
        c = colours[i % len(colours)]
        pts = [xy(xx, yy) for xx, yy in zip(x[k - 1:], y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        d.text((pad + 8, 14 + 12 * i), name, fill=c)
    d.text((pad, height - pad + 6), "0", fill=(0, 0, 0))
    d.text((width - 60, height - pad + 6), f"step {int(xmax)}", fill=(0, 0, 0))
    d.text((2, 10), f"{10 ** ymax:.3g}", fill=(0, 0, 0))
    d.text((2, height - pad - 10), f"{10 ** ymin:.3g}", fill=(0, 0, 0))
    d.text((2, height // 2), "loss", fill=(0, 0, 0))
    img.save(out)
    return out


def line_panels(x: list[float], panels: dict[str, list[float]], xlabel: str, out, size=(260, 200)):
    """One small line plot per entry of `panels` (name -> y values at x), side by side, axes labelled with their
    ranges; points marked."""
    w, h = size
    pad = 34
    img = Image.new("RGB", (w * len(panels), h), "white")
    d = ImageDraw.Draw(img)
    for p, (name, ys) in enumerate(panels.items()):
        ox = p * w
        ok = [(a, b) for a, b in zip(x, ys) if b is not None and np.isfinite(b)]
        d.rectangle([ox + pad, 18, ox + w - 8, h - pad], outline=(0, 0, 0))
        d.text((ox + pad, 4), name, fill=(0, 0, 0))
        d.text((ox + pad, h - pad + 16), xlabel, fill=(0, 0, 0))
        if not ok:
            continue
        xs, vs = np.array([a for a, _ in ok], float), np.array([b for _, b in ok], float)
        x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-6)
        y0, y1 = vs.min(), max(vs.max(), vs.min() + 1e-6)
        pt = lambda a, b: (ox + pad + (w - pad - 8) * (a - x0) / (x1 - x0),  # noqa: E731
                           h - pad - (h - pad - 18) * (b - y0) / (y1 - y0) * 0.9 - 4)
        pts = [pt(a, b) for a, b in zip(xs, vs)]
        if len(pts) > 1:
            d.line(pts, fill=(31, 119, 180), width=2)
        for q in pts:
            d.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill=(31, 119, 180))
        d.text((ox + 2, 18), f"{y1:.3g}", fill=(0, 0, 0))
        d.text((ox + 2, h - pad - 12), f"{y0:.3g}", fill=(0, 0, 0))
        d.text((ox + pad, h - pad + 3), f"{x0:g}", fill=(0, 0, 0))
        d.text((ox + w - 30, h - pad + 3), f"{x1:g}", fill=(0, 0, 0))
    img.save(out)
    return out


def sweep_figure(values: list[float], summaries: list[dict], xlabel: str, out):
    """PSNR, miss rate and decoy hallucination rate (metrics.summarize results) against a sampling setting."""
    pct = lambda r: None if r is None or not np.isfinite(r) else 100 * r  # noqa: E731
    return line_panels(values, {"PSNR (dB)": [s["psnr"] for s in summaries],
                                "miss rate (%)": [pct(s["all"]["miss_rate"]) for s in summaries],
                                "decoy hallucination (%)": [pct(s["decoy"]["hallucination_rate"]) for s in summaries]},
                       xlabel, out)
