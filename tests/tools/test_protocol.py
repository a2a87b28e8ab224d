"""tools/protocol.py, ThermalGen's scores through torchmetrics: how its PSNR and SSIM relate to ours (pooled PSNR; the SSIM
map averaged over the whole mirror-padded image, where ours leaves out a 5-px border), and LPIPS and FID run through
the library's own code on small random networks equal a computation by hand. The real AlexNet / Inception weights
(and a torchvision that loads with the CPU torch) cannot be had here; every missing piece is one line."""

import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointError
from tools import metrics, protocol

tm = pytest.importorskip("torchmetrics", reason="torchmetrics is in requirements-test.txt")


def ir_pairs(n=6, h=40, w=56, seed=0):
    """Ground truths and predictions in [0, 1] whose error differs from image to image."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 1, h, w, generator=g)
    noise = torch.randn(n, 1, h, w, generator=g) * torch.linspace(0.02, 0.2, n).view(n, 1, 1, 1)
    return (target + noise).clamp(0, 1), target


def test_thermalgen_psnr_is_the_pooled_mse_not_our_mean_of_per_image_psnrs():
    pred, target = ir_pairs()
    got = protocol.thermalgen_scores(pred, target, scores=("psnr",), batch_size=4)  # two updates, pooled
    pooled = 10 * math.log10(1 / (pred.double() - target.double()).pow(2).mean().item())
    assert got["psnr"] == pytest.approx(pooled, abs=1e-4) and got["n_images"] == 6
    ours = metrics.psnr(pred, target)  # [6] per image
    per_image = tm.functional.image.peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3),
                                                            reduction="none")
    torch.testing.assert_close(per_image.double(), ours, atol=1e-4, rtol=0)  # per image they agree
    assert got["psnr"] < ours.mean().item() - 0.1  # the pooled PSNR is lower: the protocols differ


def gaussian_ssim_map(x, y, pad_mode=None):
    """The SSIM map by hand in float64: 11x11 Gaussian (sigma 1.5), K1 0.01, K2 0.03, population moments; optionally
    the images mirror-padded by 5 first (then the map covers every pixel)."""
    x, y = x.double(), y.double()
    if pad_mode:
        x, y = (F.pad(t, (5, 5, 5, 5), mode=pad_mode) for t in (x, y))
    d = torch.arange(-5, 6, dtype=torch.float64)
    g = torch.exp(-d ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]  # [1, 1, 11, 11]
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx, syy, sxy = F.conv2d(x * x, k) - mu_x ** 2, F.conv2d(y * y, k) - mu_y ** 2, F.conv2d(x * y, k) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (2 * mu_x * mu_y + c1) * (2 * sxy + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))


def test_thermalgen_ssim_averages_the_whole_padded_image_ours_the_inner_region():
    pred, target = ir_pairs()
    got = protocol.thermalgen_scores(pred, target, scores=("ssim",), batch_size=4)["ssim"]
    padded = gaussian_ssim_map(pred, target, pad_mode="reflect")  # [6, 1, 40, 56]: every pixel
    assert got == pytest.approx(padded.mean(dim=(1, 2, 3)).mean().item(), abs=1e-5)
    # the same window on the inner region (5 px in from each border) is ours, which equals scikit-image
    _, tm_map = tm.functional.image.structural_similarity_index_measure(pred, target, data_range=1.0,
                                                                         return_full_image=True)
    inner = tm_map[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)).double()
    torch.testing.assert_close(inner, metrics.ssim(pred, target), atol=1e-5, rtol=0)
    torch.testing.assert_close(gaussian_ssim_map(pred, target).mean(dim=(1, 2, 3)), metrics.ssim(pred, target),
                               atol=1e-10, rtol=0)
    assert abs(got - metrics.ssim(pred, target).mean().item()) > 1e-4  # the border changes the number


def small_feature_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def fid_by_hand(f_real, f_fake) -> float:
    """|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^1/2), unbiased covariances, scipy's matrix square root."""
    import scipy.linalg
    mu_r, mu_f = f_real.mean(0), f_fake.mean(0)
    s_r, s_f = torch.cov(f_real.T), torch.cov(f_fake.T)
    covmean = scipy.linalg.sqrtm((s_r @ s_f).numpy()).real
    return float((mu_r - mu_f) @ (mu_r - mu_f) + torch.trace(s_r) + torch.trace(s_f) - 2 * covmean.trace())


def test_fid_through_torchmetrics_on_a_random_network_equals_the_hand_computation():
    _, target = ir_pairs(n=24, h=32, w=32, seed=1)
    pred = (0.2 + 0.6 * target.flip(-1) ** 2).clamp(0, 1)  # another distribution: a FID well above 0
    net = small_feature_net()
    got = protocol.thermalgen_scores(pred, target, scores=("fid",), batch_size=10, fid_model=net)["fid"]
    with torch.no_grad():  # grey repeated to 3 channels, [0, 1] as given (a custom network gets no uint8 step)
        f_fake, f_real = (net(x.repeat(1, 3, 1, 1)).double() for x in (pred, target))
    expected = fid_by_hand(f_real, f_fake)
    assert expected > 1e-3
    assert got == pytest.approx(expected, rel=1e-5)
    assert got == pytest.approx(metrics.fid(f_real, f_fake), rel=1e-5)


ALEXNET_FEATURES_AT = (1, 4, 7, 9, 11)  # the ReLU outputs LPIPS compares (torchvision alexnet.features indices)


def alexnet_shaped(seed=0) -> nn.Sequential:
    """torchvision's alexnet().features layout with random weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(3, 2))


def lpips_by_hand(x, y, features, lins) -> float:
    """LPIPS (Zhang et al. 2018): grey -> 3 channels, [0, 1] -> [-1, 1], the fixed shift/scale, unit-normalised
    features per layer, squared differences weighted per channel, averaged over space, summed over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def layers(z):
        h, out = (z.repeat(1, 3, 1, 1) * 2 - 1 - shift) / scale, []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in ALEXNET_FEATURES_AT:
                out.append(h)
        return out

    with torch.no_grad():
        d = 0
        for a, b, w in zip(layers(x), layers(y), lins):
            a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
            d = d + ((a - b) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))  # [B]
    return d.mean().item()


def test_lpips_through_torchmetrics_on_a_random_alexnet_equals_the_hand_computation(tmp_path, monkeypatch):
    """torchmetrics' own LPIPS code and its shipped linear layers, with torchvision's ImageNet AlexNet replaced by a
    random network of the same layout (torchvision does not load here)."""
    import torchmetrics.functional.image.lpips as tm_lpips
    import torchmetrics.image.lpip as tm_lpip
    features = alexnet_shaped()
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setattr(tm_lpip, "_TORCHVISION_AVAILABLE", True)
    monkeypatch.setattr(tm_lpips, "_get_net", lambda net, pretrained: features)
    weights = tmp_path / "alexnet.pth"
    torch.save(features.state_dict(), weights)  # the file the protocol checks and hands to torchvision
    hub = torch.hub.get_dir()
    pred, target = ir_pairs(n=3, h=64, w=64, seed=2)
    got = protocol.thermalgen_scores(pred, target, lpips_weights=weights, scores=("lpips",), batch_size=2)["lpips"]
    assert torch.hub.get_dir() == hub  # the hub cache is pointed back where it was
    shipped = torch.load(Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth", weights_only=True,
                         map_location="cpu")
    lins = [shipped[f"lin{k}.model.1.weight"].flatten() for k in range(5)]
    expected = lpips_by_hand(pred, target, features, lins)
    assert expected > 1e-3
    assert got == pytest.approx(expected, rel=1e-5)


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


class Payload:
    """Any Python object: torch.save pickles it by reference to this class."""


def test_missing_packages_and_weights_are_one_line(tmp_path, monkeypatch):
    pred, target = ir_pairs(n=2)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    with pytest.raises(ValueError) as e:
        protocol.ThermalGenProtocol(scores=("lpips",))
    assert "torchvision package, which is not installed: pip install -r requirements-extras.txt" in one_line(e)

    broken = tmp_path / "site" / "torchvision"  # a CUDA build beside a CPU torch fails like this at import
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchvision")
    with pytest.raises(ValueError) as e:
        protocol.ThermalGenProtocol(scores=("lpips",))
    assert "does not load with torch" in one_line(e) and "torchvision::nms" in str(e.value)

    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError) as e:
        protocol.ThermalGenProtocol(scores=("lpips",))
    assert "alexnet-owt-7be5be79.pth (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)" in one_line(e)

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ValueError) as e:
        protocol.ThermalGenProtocol(scores=("fid",))
    assert "torch_fidelity package" in one_line(e)
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    with pytest.raises(ValueError) as e:
        protocol.ThermalGenProtocol(scores=("fid",))
    assert "weights-inception-2015-12-05-6726825d.pth" in one_line(e) and "--fid-weights" in str(e.value)

    evil = tmp_path / "evil.pth"  # a pickled object where weights should be: refused before any library sees it
    torch.save({"x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="pickled Python object"):
        protocol.ThermalGenProtocol(scores=("fid",), fid_weights=evil)

    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(ValueError) as e:
        protocol.ThermalGenProtocol(scores=("psnr",))
    assert "torchmetrics package" in one_line(e)


def fresh_imports(monkeypatch, *packages):
    """The packages (and their submodules) dropped from sys.modules for the test, so the next import runs their code
    again, as a new process would (monkeypatch puts the loaded ones back afterwards)."""
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            monkeypatch.delitem(sys.modules, name)


def broken_package(tmp_path, monkeypatch, name, error):
    """An installed `name` whose import raises `error`, as a torchvision built for another torch does."""
    folder = tmp_path / "site" / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(f"raise RuntimeError({error!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_psnr_and_ssim_need_torchmetrics_only_and_a_broken_torchvision_is_named(tmp_path, monkeypatch):
    """A CPU install: PSNR and SSIM score without torchvision, equal to the scores with every package loaded; a
    torchvision that does not load (torchmetrics imports it whenever it is installed) is named, not torchmetrics."""
    pred, target = ir_pairs()
    before = protocol.thermalgen_scores(pred, target, scores=("psnr", "ssim"), batch_size=4)
    assert protocol.ThermalGenProtocol().scores == ("psnr", "ssim")  # the default without weight files
    loaded = sys.modules["torchmetrics"]
    fresh_imports(monkeypatch, "torchmetrics", "lightning_utilities")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    assert protocol.thermalgen_scores(pred, target, batch_size=4) == before
    assert sys.modules["torchmetrics"] is not loaded  # imported again, without torchvision
    with pytest.raises(ValueError) as e:
        protocol.ThermalGenProtocol(scores=("psnr", "lpips"))
    assert one_line(e).startswith("ThermalGen's LPIPS (AlexNet) needs the torchvision package, which is not "
                                  "installed")

    fresh_imports(monkeypatch, "torchmetrics", "lightning_utilities")
    monkeypatch.delitem(sys.modules, "torchvision")
    broken_package(tmp_path, monkeypatch, "torchvision", "operator torchvision::nms does not exist")
    with pytest.raises(ValueError) as e:
        protocol.ThermalGenProtocol(scores=("psnr", "ssim"))
    text = one_line(e)
    assert text.startswith("ThermalGen's scores (PSNR, SSIM) needs torchmetrics, which imports the installed "
                           "torchvision, and torchvision does not load with torch")
    assert "(operator torchvision::nms does not exist): install the torchvision build" in text
    assert "uninstall torchvision" in text and "torchmetrics, which does not load" not in text


def test_an_import_failure_names_the_package_that_fails(tmp_path, monkeypatch):
    """A package that raises on import is named, also when another package imports it; a missing dependency is
    named as such."""
    broken_package(tmp_path, monkeypatch, "pkg_broken", "built for another torch")
    (tmp_path / "site" / "pkg_user").mkdir()
    (tmp_path / "site" / "pkg_user" / "__init__.py").write_text("import pkg_broken\n")
    (tmp_path / "site" / "pkg_needy").mkdir()
    (tmp_path / "site" / "pkg_needy" / "__init__.py").write_text("import pkg_absent_dependency\n")
    for package, expected in (
            ("pkg_broken", "X needs pkg_broken, which does not load with torch"),
            ("pkg_user", "X needs pkg_user, which imports the installed pkg_broken, and pkg_broken does not load"),
            ("pkg_needy", "X needs pkg_needy, which imports pkg_absent_dependency, not installed"),
            ("pkg_not_there", "X needs the pkg_not_there package, which is not installed")):
        with pytest.raises(ValueError) as e:
            protocol._need(package, "X")
        assert one_line(e).startswith(expected)


def test_the_default_scores_follow_the_weights_given():
    assert protocol.default_scores() == ("psnr", "ssim")
    assert protocol.default_scores(lpips_weights="a.pth") == ("psnr", "ssim", "lpips")
    assert protocol.default_scores(fid_weights="i.pth") == ("psnr", "ssim", "fid")
    assert protocol.default_scores(fid_model=small_feature_net()) == ("psnr", "ssim", "fid")
    assert protocol.ThermalGenProtocol(("ssim", "psnr", "ssim")).scores == ("psnr", "ssim")
    with pytest.raises(ValueError, match="no score asked for"):
        protocol.ThermalGenProtocol(())


def test_inputs_outside_the_protocol_are_refused():
    pred, target = ir_pairs(n=2)
    with pytest.raises(ValueError, match="outside"):
        protocol.thermalgen_scores(pred * 2, target, scores=("psnr",))
    with pytest.raises(ValueError, match="non-finite"):
        protocol.thermalgen_scores(pred.masked_fill(pred > 0.9, float("nan")), target, scores=("psnr",))
    with pytest.raises(ValueError, match="differ in shape"):
        protocol.thermalgen_scores(pred[:, :, :32], target, scores=("psnr",))
    with pytest.raises(ValueError, match="unknown score"):
        protocol.ThermalGenProtocol(scores=("psnr", "mse"))
