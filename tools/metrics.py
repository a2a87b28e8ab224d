"""
Evaluation metrics for visible -> infrared generation: image quality, semantic faithfulness, FID.

Protocol (what every number in the README means):
- Images are single-channel IR in [0, 1], compared at the ground truth's resolution, one image at a time.
  Accepted shapes: [H, W], [B, H, W] or [B, 1, H, W]. All arithmetic is float64. A NaN or infinite pixel
  (or feature) is an error, never a score: NaN compares as "not hot" and would count as a perfect prediction.
- PSNR = 10 log10(data_range^2 / MSE) per image, then the mean over images (identical images give +inf).
- SSIM follows Wang et al. 2004 exactly as scikit-image computes it with
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)`:
  an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma -> radius 5), K1 = 0.01, K2 = 0.03,
  population (co)variances, and the SSIM map averaged over the region 5 pixels in from every border.
- Semantic faithfulness uses the semantic map that conditioned the generation. A *region* is one
  4-connected component of one class with at least `min_pixels` (16) pixels. A region is *hot* when its
  mean intensity is strictly above HOT_THRESHOLD (0.6; tools/synth.py chooses its scene temperatures around it).
  hallucination rate = (#regions cold in the ground truth but hot in the prediction) / (#regions cold in GT)
  miss rate          = (#regions hot in the ground truth but cold in the prediction) / (#regions hot in GT)
  Over a data set the counts are summed first and divided once (never a mean of per-image rates);
  a rate with a zero denominator is NaN, not 0. The same rates restricted to a set of classes give the
  "target" (hot classes) and "decoy" (cold objects that resemble hot ones) slices.
- Per-class error is the mean absolute intensity error over the class's pixels, pooled over pixels
  (a class's pixels in every image count equally, whatever the image).
- FID is the Frechet distance between Gaussians fitted to features of real and generated images. This
  file never downloads anything: the caller supplies the feature network (e.g. an Inception-v3 exported
  as TorchScript, or a module whose weights it loads from a local safetensors file). Numbers are only
  comparable with published FIDs when that network is the pytorch-fid Inception with its own resizing.

Connected components are labelled here (numpy union-find), so runtime needs no scipy / scikit-image;
the tests check every function against scikit-image / scipy as independent oracles.
"""

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

HOT_THRESHOLD = 0.6      # a region whose mean intensity is above this is a hot target (tools/synth.py builds around it)
MIN_REGION_PIXELS = 16   # smaller components are label noise / slivers, too small to call hot or cold reliably

# -----------------------------------------------------------------------------
# shapes and values


def _check_finite(x: torch.Tensor, name: str) -> None:
    """Refuse NaN / inf values: every metric below would turn them into a plausible-looking number."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf) of {x.numel()}; metrics need finite "
                         "inputs")


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """[H, W] | [B, H, W] | [B, 1, H, W] -> [B, H, W] float64 (a copy never aliases the caller's tensor)."""
    x = torch.as_tensor(x)
    if x.dim() == 2:
        x = x[None]                      # [H, W] -> [1, H, W]
    elif x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected a single-channel IR image [B, 1, H, W], got {tuple(x.shape)}")
        x = x[:, 0]                      # [B, 1, H, W] -> [B, H, W]
    elif x.dim() != 3:
        raise ValueError(f"expected [H, W], [B, H, W] or [B, 1, H, W], got {tuple(x.shape)}")
    return x.to(torch.float64)


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both images as [B, H, W] float64 on pred's device, plus whether the input was a single [H, W] image."""
    single = torch.as_tensor(pred).dim() == 2
    p, t = _as_batch(pred), _as_batch(target)
    _check_finite(p, "pred")
    _check_finite(t, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ; resize before comparing")
    return p, t.to(p.device), single


def _single_image(x, name: str) -> np.ndarray:
    """One image ([H, W], [1, H, W] or [1, 1, H, W]) as a float64 numpy [H, W]: the semantic metrics are per image."""
    x = torch.as_tensor(x)
    while x.dim() > 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"{name}: semantic metrics take one image at a time, got {tuple(x.shape)}")
    _check_finite(x, name)
    return x.detach().to("cpu", torch.float64).numpy()


def _sem_map(sem_ids) -> np.ndarray:
    """A semantic id map ([H, W], [1, H, W] or [1, 1, H, W]) as an int64 numpy [H, W]."""
    s = torch.as_tensor(sem_ids)
    while s.dim() > 2 and s.shape[0] == 1:
        s = s[0]
    if s.dim() != 2:
        raise ValueError(f"sem_ids must be one [H, W] map, got {tuple(s.shape)}")
    if s.is_floating_point():
        raise ValueError("sem_ids must hold integer class ids")
    return s.detach().to("cpu", torch.int64).numpy()

# -----------------------------------------------------------------------------
# image quality: PSNR, SSIM


def psnr(pred, target, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: a scalar tensor for [H, W] inputs, else [B].
    MSE 0 gives +inf (not an error): an exact reconstruction is a legitimate, if rare, outcome."""
    p, t, single = _pair(pred, target)
    mse = ((p - t) ** 2).flatten(1).mean(1)                            # [B, H, W] -> [B]
    # log10(R^2 / 0) -> +inf in IEEE arithmetic; that is the value we want, so no special case needed
    out = 10.0 * torch.log10(data_range ** 2 / mse)
    return out[0] if single else out


SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5, computed as scipy.ndimage does -> an 11x11 window


def _gaussian_1d(sigma: float, radius: int, device=None) -> torch.Tensor:
    # scipy.ndimage's kernel: exp(-x^2 / 2 sigma^2) on integer offsets, normalised to sum exactly 1 (not the
    # continuous normalisation constant), so the window weights match scikit-image bit for bit
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * x ** 2 / sigma ** 2)
    return k / k.sum()                                                  # [2r+1]


def _filter_valid(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter keeping only outputs whose window lies inside the image.
    [B, 1, H, W] -> [B, 1, H-2r, W-2r]."""
    K = k.numel()
    x = F.conv2d(x, k.view(1, 1, K, 1))                                 # along H
    return F.conv2d(x, k.view(1, 1, 1, K))                              # along W


def ssim(pred, target, data_range: float = 1.0, K1: float = 0.01, K2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004 / scikit-image protocol, see the file docstring):
    a scalar tensor for [H, W] inputs, else [B]. Both sides must be at least 11 pixels."""
    p, t, single = _pair(pred, target)
    B, H, W = p.shape
    r = SSIM_RADIUS
    if H < 2 * r + 1 or W < 2 * r + 1:
        raise ValueError(f"SSIM needs images of at least {2 * r + 1}x{2 * r + 1}, got {H}x{W}")
    k = _gaussian_1d(SSIM_SIGMA, r, device=p.device)
    # scikit-image filters the whole image (mode 'reflect') and then crops pad = (11 - 1) // 2 = 5 pixels from
    # every border before averaging. The filter radius is also 5, so no surviving pixel ever reads the padding:
    # a 'valid' convolution gives exactly the cropped map, and the border mode cannot matter.
    x, y = p[:, None], t[:, None]                                       # [B, 1, H, W]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=0)              # [5B, 1, H, W]: one conv for all five moments
    mx, my, mxx, myy, mxy = _filter_valid(stack, k).split(B, dim=0)    # each [B, 1, H-10, W-10]
    vx = mxx - mx * mx                                                  # population variance (use_sample_covariance=False)
    vy = myy - my * my
    vxy = mxy - mx * my
    C1 = (K1 * data_range) ** 2                                         # keep the ratios finite on flat patches
    C2 = (K2 * data_range) ** 2
    s = ((2 * mx * my + C1) * (2 * vxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))
    out = s.flatten(1).mean(1)                                          # [B, 1, H-10, W-10] -> [B]
    return out[0] if single else out

# -----------------------------------------------------------------------------
# semantic faithfulness: per-class error, connected regions, hallucination / miss rates


def connected_components(sem_ids) -> torch.Tensor:
    """Label the 4-connected components of each class of a [H, W] id map.

    Returns a [H, W] int64 tensor with labels 0..n-1, numbered in raster order of each component's first pixel.
    Two pixels share a label iff they are 4-neighbours-linked through pixels of the same class.

    Method: union-find run in parallel over all edges with numpy (hook each root to its smallest neighbouring
    root, then pointer-jump until every pixel points at its root). A pure-Python flood fill is ~100x slower
    at 512x512; this needs only a handful of vectorised rounds."""
    sem = _sem_map(sem_ids)
    H, W = sem.shape
    idx = np.arange(H * W, dtype=np.int64).reshape(H, W)
    # edges between 4-neighbours of the same class (diagonals are NOT neighbours: connectivity=1)
    same_h = sem[:, :-1] == sem[:, 1:]                                  # [H, W-1]
    same_v = sem[:-1, :] == sem[1:, :]                                  # [H-1, W]
    u = np.concatenate([idx[:, :-1][same_h], idx[:-1, :][same_v]])      # [E]
    v = np.concatenate([idx[:, 1:][same_h], idx[1:, :][same_v]])        # [E]

    parent = np.arange(H * W, dtype=np.int64)
    # invariant at the top of each round: parent[i] is i's root, and a root is the smallest index in its tree
    # (we only ever hook a larger root under a smaller one, so parent[i] <= i and no cycle can form)
    while True:
        ru, rv = parent[u], parent[v]
        cross = ru != rv                                                # edges still joining two different trees
        if not cross.any():
            break
        lo = np.minimum(ru[cross], rv[cross])
        hi = np.maximum(ru[cross], rv[cross])
        np.minimum.at(parent, hi, lo)                                   # each root hooks under its smallest neighbour root
        while True:                                                     # pointer jumping: flatten every path to its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    # roots are the smallest pixel index of each component, so sorting them is raster order of first pixels
    _, labels = np.unique(parent, return_inverse=True)
    return torch.from_numpy(labels.reshape(H, W).astype(np.int64))


def per_class_error(pred, target, sem_ids, class_ids: Iterable[int] | None = None) -> dict[int, dict]:
    """Per-class intensity statistics of one image.

    Returns {class_id: {"pixels", "mae", "pred_mean", "target_mean"}}: the mean absolute error and the mean
    pred / target intensity over the class's pixels. `class_ids` picks which classes to report (a class absent
    from the image is reported with pixels 0 and NaN means); by default every class present."""
    p, t = _single_image(pred, "pred"), _single_image(target, "target")
    sem = _sem_map(sem_ids)
    if not (p.shape == t.shape == sem.shape):
        raise ValueError(f"pred {p.shape}, target {t.shape} and sem_ids {sem.shape} must have the same [H, W]")
    ids = np.unique(sem).tolist() if class_ids is None else list(class_ids)
    out = {}
    for c in ids:
        m = sem == c                                                    # [H, W] bool
        n = int(m.sum())
        nan = float("nan")
        out[int(c)] = {
            "pixels": n,
            "mae": float(np.abs(p[m] - t[m]).mean()) if n else nan,
            "pred_mean": float(p[m].mean()) if n else nan,
            "target_mean": float(t[m].mean()) if n else nan,
        }
    return out


def region_stats(pred, target, sem_ids, threshold: float = HOT_THRESHOLD, min_pixels: int = MIN_REGION_PIXELS,
                 ignore_ids: Iterable[int] = ()) -> list[dict]:
    """The regions of one image and whether each is hot in the ground truth and in the prediction.

    A region is one 4-connected component of one class with at least `min_pixels` pixels; classes in
    `ignore_ids` (e.g. a void label) give no regions. Returns a list of
    {"class_id", "pixels", "gt_mean", "pred_mean", "gt_hot", "pred_hot"} in raster order of first pixel,
    so callers can slice by class (see region_rates)."""
    p, t = _single_image(pred, "pred"), _single_image(target, "target")
    sem = _sem_map(sem_ids)
    if not (p.shape == t.shape == sem.shape):
        raise ValueError(f"pred {p.shape}, target {t.shape} and sem_ids {sem.shape} must have the same [H, W]")
    labels = connected_components(sem).numpy().ravel()                  # [H*W], 0..n-1
    n = int(labels.max()) + 1
    pixels = np.bincount(labels, minlength=n)                           # [n]
    gt_sum = np.bincount(labels, weights=t.ravel(), minlength=n)       # [n]
    pred_sum = np.bincount(labels, weights=p.ravel(), minlength=n)     # [n]
    first = np.full(n, labels.size, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(labels.size))                # any pixel would do; the first is cheap
    cls = sem.ravel()[first]                                            # [n] class of each region
    ignore = {int(c) for c in ignore_ids}
    out = []
    for i in range(n):
        if pixels[i] < min_pixels or int(cls[i]) in ignore:
            continue
        gm, pm = gt_sum[i] / pixels[i], pred_sum[i] / pixels[i]
        out.append({"class_id": int(cls[i]), "pixels": int(pixels[i]), "gt_mean": float(gm), "pred_mean": float(pm),
                    "gt_hot": bool(gm > threshold), "pred_hot": bool(pm > threshold)})
    return out


def _rate(num: int, den: int) -> float:
    return num / den if den else float("nan")  # NaN, not 0: "no cold regions" is not "no hallucination"


def region_rates(regions: Iterable[dict], class_ids: Iterable[int] | None = None) -> dict:
    """Hallucination and miss counts and rates over a list of regions (one image, or many concatenated).

    `class_ids` restricts to regions of those classes (None = all). Returns
    {"hallucinated", "gt_cold", "hallucination_rate", "missed", "gt_hot", "miss_rate"} where
    hallucination_rate = hallucinated / gt_cold and miss_rate = missed / gt_hot, NaN when the denominator is 0."""
    keep = None if class_ids is None else {int(c) for c in class_ids}
    hall = cold = miss = hot = 0
    for r in regions:
        if keep is not None and r["class_id"] not in keep:
            continue
        if r["gt_hot"]:
            hot += 1
            miss += not r["pred_hot"]
        else:
            cold += 1
            hall += r["pred_hot"]
    return {"hallucinated": int(hall), "gt_cold": cold, "hallucination_rate": _rate(hall, cold),
            "missed": int(miss), "gt_hot": hot, "miss_rate": _rate(miss, hot)}

# -----------------------------------------------------------------------------
# one image -> a record; many records -> a summary; summaries -> a Markdown table


def evaluate_image(pred, target, sem_ids, threshold: float = HOT_THRESHOLD, min_pixels: int = MIN_REGION_PIXELS,
                   ignore_ids: Iterable[int] = (), data_range: float = 1.0) -> dict:
    """Every per-image metric as plain Python values: {"psnr", "ssim", "per_class", "regions"}.
    The record keeps raw regions and pixel counts (not just rates) so summarize() can pool them correctly."""
    p, t = torch.as_tensor(_single_image(pred, "pred")), torch.as_tensor(_single_image(target, "target"))
    return {
        "psnr": float(psnr(p, t, data_range)),
        "ssim": float(ssim(p, t, data_range)),
        "per_class": per_class_error(p, t, sem_ids),
        "regions": region_stats(p, t, sem_ids, threshold, min_pixels, ignore_ids),
    }


def summarize(records: list[dict], hot_ids: Iterable[int] = (), decoy_ids: Iterable[int] = ()) -> dict:
    """Pool per-image records (from evaluate_image) over a data set.

    PSNR / SSIM: mean over images. Per-class error: pooled over pixels (sum |err| / sum pixels).
    Rates: counts summed over all regions, then divided once. Slices:
      "all"    every region;
      "target" regions of the hot target classes `hot_ids` (their miss rate is the headline "missed targets");
      "decoy"  regions of `decoy_ids`, cold classes that resemble targets (their hallucination rate is
               "decoy hallucination": did the model paint a mannequin or a parked-car shadow hot?).
    The top-level "hallucination_rate" / "miss_rate" repeat the "all" slice."""
    if not records:
        raise ValueError("summarize() needs at least one record")
    hot_ids, decoy_ids = sorted({int(c) for c in hot_ids}), sorted({int(c) for c in decoy_ids})
    pooled: dict[int, list[float]] = {}                                 # class -> [pixels, sum|err|, sum pred, sum target]
    for rec in records:
        for c, s in rec["per_class"].items():
            if s["pixels"] == 0:
                continue
            acc = pooled.setdefault(int(c), [0, 0.0, 0.0, 0.0])
            acc[0] += s["pixels"]                                       # means * pixels recovers the exact sums
            acc[1] += s["mae"] * s["pixels"]
            acc[2] += s["pred_mean"] * s["pixels"]
            acc[3] += s["target_mean"] * s["pixels"]
    per_class = {c: {"pixels": n, "mae": e / n, "pred_mean": sp / n, "target_mean": st / n}
                 for c, (n, e, sp, st) in sorted(pooled.items())}
    regions = [r for rec in records for r in rec["regions"]]
    all_rates = region_rates(regions)
    return {
        "n_images": len(records),
        "psnr": float(np.mean([rec["psnr"] for rec in records])),      # +inf if any image is reproduced exactly
        "ssim": float(np.mean([rec["ssim"] for rec in records])),
        "per_class": per_class,
        "n_regions": len(regions),
        "all": all_rates,
        "target": region_rates(regions, hot_ids),
        "decoy": region_rates(regions, decoy_ids),
        "hot_ids": hot_ids,
        "decoy_ids": decoy_ids,
        "hallucination_rate": all_rates["hallucination_rate"],
        "miss_rate": all_rates["miss_rate"],
    }


def _fmt_rate(num: int, den: int) -> str:
    # the counts travel with the percentage so a reader can tell 1/2 from 500/1000
    return "n/a (0/0)" if den == 0 else f"{100.0 * num / den:.1f}% ({num}/{den})"


def fmt_value(v) -> str:
    """A table cell: nothing for None, an int with thousands separators, a float to 4 significant digits."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def format_table(results: dict[str, dict], extra_columns: dict[str, dict[str, object]] | None = None,
                 decoy: bool = False) -> str:
    """A Markdown table, one row per method: PSNR, SSIM, hallucination rate, miss rate (with counts),
    optionally the decoy hallucination rate, then any extra columns, e.g.
    extra_columns={"ours": {"trainable params": 12_345_678, "s/step": 0.81}}. Missing extras are left blank."""
    extra_columns = extra_columns or {}
    extra_names: list[str] = []
    for cols in extra_columns.values():                                 # union of extra keys, first-seen order
        extra_names += [k for k in cols if k not in extra_names]
    header = ["Method", "PSNR (dB)", "SSIM", "Hallucination", "Miss"] + (["Decoy halluc."] if decoy else []) + extra_names
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, s in results.items():
        a = s["all"]
        row = [name, f"{s['psnr']:.2f}", f"{s['ssim']:.4f}",
               _fmt_rate(a["hallucinated"], a["gt_cold"]), _fmt_rate(a["missed"], a["gt_hot"])]
        if decoy:
            row.append(_fmt_rate(s["decoy"]["hallucinated"], s["decoy"]["gt_cold"]))
        row += [fmt_value(extra_columns.get(name, {}).get(k)) for k in extra_names]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# FID


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] features -> (mean [D], covariance [D, D]) in float64, with the unbiased (N-1) covariance that
    pytorch-fid's np.cov(rowvar=False) uses."""
    f = torch.as_tensor(features).to(torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features, got {tuple(f.shape)}")
    _check_finite(f, "features")
    mu = f.mean(0)                                                      # [N, D] -> [D]
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)                               # [D, D]


def _psd_eigvals(w: torch.Tensor) -> torch.Tensor:
    # eigenvalues of a PSD matrix below round-off (numpy.linalg.matrix_rank's tolerance) are exact zeros:
    # left as +-1e-16 their square roots would add ~1e-8 each, so singular covariances (N < D) give FID != 0
    tol = w.abs().max() * w.numel() * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    # symmetric PSD square root by eigendecomposition
    w, v = torch.linalg.eigh(0.5 * (a + a.T))
    return (v * _psd_eigvals(w).sqrt()) @ v.T


def fid_from_features(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
        |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^1/2).
    tr((s1 s2)^1/2) = tr((s1^1/2 s2 s1^1/2)^1/2), and the inner matrix is symmetric PSD, so we take its
    eigenvalues in float64: no scipy.linalg.sqrtm, no complex parts, and singular covariances (N < D) are fine."""
    mu1, mu2 = (torch.as_tensor(m).to(torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).to(torch.float64) for s in (sigma1, sigma2))
    for x, name in ((mu1, "mu1"), (mu2, "mu2"), (s1, "sigma1"), (s2, "sigma2")):
        _check_finite(x, name)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma {tuple(s1.shape)}/{tuple(s2.shape)}")
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = _psd_eigvals(torch.linalg.eigvalsh(0.5 * (inner + inner.T))).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


@torch.no_grad()
def fid_features_from_model(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 50,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """Run a caller-supplied feature extractor over images and return [N, D] float64 features.

    images: [N, 1, H, W] or [N, 3, H, W] floats in [0, 1]; single-channel IR is repeated to 3 channels, as
    every RGB Inception expects. The model receives [b, 3, H, W] in [0, 1] and must do its own resizing and
    input normalisation (pytorch-fid's InceptionV3 resizes to 299 and maps to [-1, 1] itself). It may return
    [b, D], [b, D, 1, 1], or a list/tuple whose last element is that (pytorch-fid returns a list of blocks).
    Nothing is downloaded: load the network yourself, e.g. torch.jit.load("inception.pt"), or build the module
    and load_state_dict from a local safetensors file."""
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {tuple(x.shape)}")
    _check_finite(x, "images")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    feats = []
    for i in range(0, x.shape[0], batch_size):
        b = x[i:i + batch_size].to(device, torch.float32)
        if b.shape[1] == 1:
            b = b.expand(-1, 3, -1, -1)                                 # [b, 1, H, W] -> [b, 3, H, W]
        out = model(b)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        feats.append(out.reshape(out.shape[0], -1).to("cpu", torch.float64))  # [b, D, 1, 1] -> [b, D]
    model.train(was_training)
    return torch.cat(feats)                                             # [N, D]


def fid(features_real: torch.Tensor, features_fake: torch.Tensor) -> float:
    """FID straight from two [N, D] feature sets."""
    return fid_from_features(*feature_statistics(features_real), *feature_statistics(features_fake))
