"""
Scores comparable with published tables: the evaluation of ThermalGen (Xiao et al., NeurIPS 2025, arXiv:2509.24878;
its utils/metrics.py), run through the same library code (torchmetrics 1.6.2, the version ThermalGen pins).

    PSNR   torchmetrics PeakSignalNoiseRatio(data_range=1.0), updated batch by batch: ONE PSNR of the squared error
           pooled over every pixel of every image, 10 log10(1 / mean(SE)). metrics.psnr (our tables) is the mean of
           per-image PSNRs instead; the pooled value is never higher (log is concave).
    SSIM   torchmetrics StructuralSimilarityIndexMeasure(data_range=1.0): 11x11 Gaussian window (sigma 1.5), K1 0.01,
           K2 0.03, population (co)variances, the image mirror-padded by 5 px and the SSIM map averaged over the
           WHOLE image. scikit-image (and metrics.ssim) use the same window and constants but average over the region
           5 px in from every border; on that region the two maps agree. Mean over images.
    LPIPS  torchmetrics LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True): grey repeated to 3
           channels, [0, 1] -> [-1, 1], AlexNet features (torchvision's ImageNet weights) compared by the LPIPS v0.1
           linear layers (shipped inside torchmetrics). Mean over images.
    FID    torchmetrics FrechetInceptionDistance(normalize=True), 2048 features: grey repeated to 3 channels,
           (x * 255).byte() (truncated, as torchmetrics does), torch-fidelity's port of the TensorFlow FID Inception
           (resizing to 299 as TF 1.x did; pytorch-fid resizes differently, so its FIDs are not these). Real: the
           ground truth; fake: the predictions.

Inputs: IR images [B, 1, H, W] (or [B, H, W]) in [0, 1], prediction and ground truth of the same size; anything
non-finite or outside [0, 1] is refused (ThermalGen clamps its outputs to [0, 1] before scoring).

Which scores: any of psnr, ssim, lpips, fid. By default psnr and ssim, plus lpips when its weight file is given and
fid when its weight file (or a feature network) is given, so a CPU install with torchmetrics alone scores PSNR and
SSIM. A score asked for whose package or file is missing is an error, never left out.

Nothing is downloaded. LPIPS needs torchvision's alexnet-owt-7be5be79.pth and FID torch-fidelity's
weights-inception-2015-12-05-6726825d.pth: pass their paths, or put them in torch's hub cache
(<torch.hub.get_dir()>/checkpoints/) and ask for the score by name. The packages are in requirements-extras.txt;
each missing piece is one line saying what to install or which file to get from where. Each package is imported on
its own, and a failure names the package that actually fails: torchmetrics imports torchvision (and transformers)
whenever they are installed, so a torchvision built for another torch breaks even PSNR and SSIM, and is named.
"""

import contextlib
import importlib
import os
import tempfile
import traceback
from pathlib import Path

import torch
from torch import Tensor, nn

from checkpoint import load_torch_state

SCORES = ("psnr", "ssim", "lpips", "fid")
ALEXNET = ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
INCEPTION = ("weights-inception-2015-12-05-6726825d.pth",
             "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
             "weights-inception-2015-12-05-6726825d.pth")
INSTALL = "pip install -r requirements-extras.txt"
CPU_WHEELS = "a CPU-only torch takes the CPU wheels of https://download.pytorch.org/whl/cpu"


def default_scores(lpips_weights=None, fid_weights=None, fid_model=None) -> tuple[str, ...]:
    """The scores asked for when none are named: PSNR and SSIM (torchmetrics alone), LPIPS when its weight file is
    given, FID when its weight file or a feature network is given."""
    return (("psnr", "ssim") + (("lpips",) if lpips_weights else ())
            + (("fid",) if fid_weights or fid_model is not None else ()))


def _failing_package(e: BaseException, package: str) -> str:
    """The package whose import raised `e`: the innermost module whose top-level code was running. Importing
    torchmetrics runs torchvision's __init__ when torchvision is installed, so its failure is torchvision's."""
    running = [frame.f_globals.get("__name__", "") for frame, _ in traceback.walk_tb(e.__traceback__)
               if frame.f_code.co_name == "<module>"]
    return running[-1].split(".")[0] if running and running[-1] else package


def _need(package: str, what: str):
    """Import one package the protocol needs, or one line naming the package that fails: `package` not installed,
    a module it imports not installed, or a package that raises on import (torchvision built for another torch:
    PyPI's CUDA wheel beside a CPU-only torch raises a RuntimeError)."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name == package:
            raise ValueError(f"{what} needs the {package} package, which is not installed: {INSTALL}") from None
        raise ValueError(f"{what} needs {package}, which imports {e.name or 'a module'}, not installed: {INSTALL}"
                         ) from None
    except Exception as e:
        first = str(e).strip().split("\n")[0]
        culprit = _failing_package(e, package)
        if culprit == package:
            raise ValueError(f"{what} needs {package}, which does not load with torch {torch.__version__} "
                             f"({first}): install the {package} build made for this torch ({CPU_WHEELS})") from None
        raise ValueError(f"{what} needs {package}, which imports the installed {culprit}, and {culprit} does not load "
                         f"with torch {torch.__version__} ({first}): install the {culprit} build made for this torch "
                         f"({CPU_WHEELS}), or uninstall {culprit} if nothing you run needs it") from None


def _weights(path, name_url: tuple[str, str], what: str, flag: str) -> Path:
    """The local weight file (`path`, else torch's hub cache), checked to hold only tensors (no pickled objects)."""
    name, url = name_url
    file = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / name
    if not file.is_file():
        raise ValueError(f"{what} needs {name} ({url}): {file} is not there; download it yourself and pass "
                         f"{flag} FILE, or put it in {Path(torch.hub.get_dir()) / 'checkpoints'} (nothing is "
                         "downloaded here)")
    load_torch_state(file)  # a CheckpointError naming the file if it is not a plain tensor dict
    return file


@contextlib.contextmanager
def _hub_holding(file: Path, name: str):
    """torch's hub cache pointed, for the block, at a folder where `name` is `file`: torchvision then loads it
    instead of downloading."""
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        os.symlink(file.resolve(), Path(hub) / "checkpoints" / name)
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


def _grey_batch(x, name: str) -> Tensor:
    """[B, H, W] | [B, 1, H, W] in [0, 1] -> float32 [B, 1, H, W]; refuses other shapes and values."""
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{name}: expected IR images [B, 1, H, W], got {tuple(x.shape)}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf): nothing is scored")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{name} spans {x.min().item():.4g}..{x.max().item():.4g}, outside [0, 1]")
    return x


class ThermalGenProtocol:
    """Accumulates ThermalGen's scores over batches: update(preds, targets) ..., then compute().

    scores: which of psnr, ssim, lpips, fid (None: default_scores, PSNR and SSIM plus what weights are given for;
    PSNR and SSIM need torchmetrics only). lpips_weights / fid_weights: the local weight files (default: torch's hub
    cache). fid_model: a feature network [b, 3, H, W] in [0, 1] -> [b, D] used in place of the Inception (its FIDs
    are not ThermalGen's; for tests and other feature spaces)."""

    def __init__(self, scores=None, lpips_weights=None, fid_weights=None, device="cpu",
                 fid_model: nn.Module | None = None):
        scores = default_scores(lpips_weights, fid_weights, fid_model) if scores is None else tuple(scores)
        if unknown := [s for s in scores if s not in SCORES]:
            raise ValueError(f"unknown score(s) {', '.join(unknown)}; choose from {', '.join(SCORES)}")
        if not scores:
            raise ValueError(f"no score asked for; choose from {', '.join(SCORES)}")
        self.scores = tuple(s for s in SCORES if s in scores)  # each once, in the protocol's order
        # each package imported on its own, the ones the others import first, so a failure names the one that fails
        if "lpips" in scores:
            _need("torchvision", "ThermalGen's LPIPS (AlexNet)")
        _need("torchmetrics", "ThermalGen's scores (" + ", ".join(s.upper() for s in self.scores) + ")")
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
        self.device = torch.device(device)
        self.metrics = {}
        if "psnr" in scores:
            self.metrics["psnr"] = PeakSignalNoiseRatio(data_range=1.0)
        if "ssim" in scores:
            self.metrics["ssim"] = StructuralSimilarityIndexMeasure(data_range=1.0)
        if "lpips" in scores:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
            file = _weights(lpips_weights, ALEXNET, "ThermalGen's LPIPS", "--lpips-weights")
            with _hub_holding(file, ALEXNET[0]):
                self.metrics["lpips"] = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
        if "fid" in scores:
            if fid_model is not None:
                from torchmetrics.image.fid import FrechetInceptionDistance
                self.metrics["fid"] = FrechetInceptionDistance(feature=fid_model, normalize=True)
            else:
                _need("torch_fidelity", "ThermalGen's FID (torch-fidelity's Inception-v3)")
                from torchmetrics.image.fid import FrechetInceptionDistance
                file = _weights(fid_weights, INCEPTION, "ThermalGen's FID", "--fid-weights")
                self.metrics["fid"] = FrechetInceptionDistance(feature=2048, normalize=True,
                                                               feature_extractor_weights_path=str(file))
        for m in self.metrics.values():
            m.to(self.device)
        self.n_images = 0

    @torch.no_grad()
    def update(self, preds, targets):
        """One batch of predictions and ground truths, IR [B, 1, H, W] in [0, 1]."""
        pred, target = _grey_batch(preds, "predictions"), _grey_batch(targets, "targets")
        if pred.shape != target.shape:
            raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
        pred, target = pred.to(self.device), target.to(self.device)
        pred3, target3 = pred.repeat(1, 3, 1, 1), target.repeat(1, 3, 1, 1)  # [B, 3, H, W] for the RGB networks
        for name, m in self.metrics.items():
            if name in ("psnr", "ssim"):
                m.update(pred, target)
            elif name == "lpips":
                m.update(pred3, target3)
            else:
                m.update(pred3, real=False)
                m.update(target3, real=True)
        self.n_images += pred.shape[0]

    def compute(self) -> dict:
        """{"psnr", "ssim", "lpips", "fid" (those asked for), "n_images"} as floats."""
        if self.n_images < (2 if "fid" in self.metrics else 1):
            raise ValueError(f"{self.n_images} image(s) scored: FID needs at least 2, the others 1")
        return {name: float(m.compute()) for name, m in self.metrics.items()} | {"n_images": self.n_images}


def thermalgen_scores(preds, targets, lpips_weights=None, fid_weights=None, scores=None, device="cpu",
                      batch_size: int = 16, fid_model: nn.Module | None = None) -> dict:
    """ThermalGen's PSNR, SSIM, LPIPS and FID (those asked for; see default_scores) of predictions against ground
    truths: IR [N, 1, H, W] in [0, 1] (tensors, or sequences of [1, H, W] / [H, W] images of one size). See
    ThermalGenProtocol for the arguments."""
    preds, targets = (torch.stack(list(x)) if not torch.is_tensor(x) else x for x in (preds, targets))
    protocol = ThermalGenProtocol(scores, lpips_weights, fid_weights, device, fid_model)
    for i in range(0, len(preds), batch_size):
        protocol.update(preds[i:i + batch_size], targets[i:i + batch_size])
    return protocol.compute()
