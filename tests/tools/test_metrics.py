"""
Tests for tools/metrics.py. scikit-image and scipy are the independent oracles (test-only dependencies):
SSIM vs skimage.metrics.structural_similarity, connected components vs skimage.measure.label,
FID vs the pytorch-fid formula with scipy.linalg.sqrtm. Rates are checked on scenes whose answer is known
by construction.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import linalg
from skimage.measure import label as sk_label
from skimage.metrics import structural_similarity

from tools import metrics as M


def sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


# -----------------------------------------------------------------------------
# PSNR

def test_psnr_constant_offset_is_exactly_20db():
    # MSE of a 0.1 offset is 0.01 -> 10 log10(1 / 0.01) = 20 dB, by hand
    t = torch.rand(32, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.8
    assert float(M.psnr(t + 0.1, t)) == pytest.approx(20.0, abs=1e-9)


def test_psnr_matches_hand_formula_per_image_in_a_batch():
    g = torch.Generator().manual_seed(1)
    p, t = torch.rand(3, 1, 16, 24, generator=g), torch.rand(3, 1, 16, 24, generator=g)
    out = M.psnr(p, t, data_range=2.0)
    assert out.shape == (3,)
    for i in range(3):
        mse = np.mean((p[i, 0].double().numpy() - t[i, 0].double().numpy()) ** 2)
        assert float(out[i]) == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-12)


def test_psnr_identical_images_is_inf_not_an_error():
    t = torch.rand(8, 8)
    assert math.isinf(float(M.psnr(t, t))) and float(M.psnr(t, t)) > 0


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        M.psnr(torch.rand(8, 8), torch.rand(8, 9))


# -----------------------------------------------------------------------------
# SSIM

def _images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64] / 64.0
    smooth = 0.5 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy)
    checker = ((np.indices((40, 40)).sum(0) // 5) % 2).astype(np.float64)
    cases = {
        "random": (rng.random((32, 32)), rng.random((32, 32))),
        "random_nonsquare": (rng.random((23, 57)), rng.random((23, 57))),
        "smooth_vs_noisy": (smooth, np.clip(smooth + 0.05 * rng.standard_normal(smooth.shape), 0, 1)),
        "shifted_copy": (smooth, np.roll(smooth, 3, axis=1)),
        "inverted": (smooth, 1 - smooth),
        "checker_vs_blur": (checker, 0.5 * checker + 0.25),
        "constant_vs_constant": (np.full((20, 30), 0.2), np.full((20, 30), 0.7)),
        "minimum_size": (rng.random((11, 11)), rng.random((11, 11))),
    }
    return cases


@pytest.mark.parametrize("name", list(_images()))
def test_ssim_matches_skimage_wang_protocol(name):
    a, b = _images()[name]
    ours = float(M.ssim(torch.from_numpy(a), torch.from_numpy(b)))
    assert ours == pytest.approx(sk_ssim(a, b), abs=1e-6)


def test_ssim_identical_is_one_and_batch_matches_singles():
    rng = np.random.default_rng(2)
    a, b = rng.random((4, 1, 24, 30)), rng.random((4, 1, 24, 30))
    assert float(M.ssim(torch.from_numpy(a[0, 0]), torch.from_numpy(a[0, 0]))) == pytest.approx(1.0, abs=1e-12)
    batch = M.ssim(torch.from_numpy(a), torch.from_numpy(b))
    assert batch.shape == (4,)
    for i in range(4):
        assert float(batch[i]) == pytest.approx(sk_ssim(a[i, 0], b[i, 0]), abs=1e-6)


def test_ssim_float32_inputs_still_match_float64_oracle():
    # float32 images (what a model emits) are accepted and compared in float64 against the float64 oracle
    rng = np.random.default_rng(3)
    a = rng.random((64, 64)).astype(np.float32)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    ours = float(M.ssim(torch.from_numpy(a), torch.from_numpy(b)))
    assert ours == pytest.approx(sk_ssim(a.astype(np.float64), b.astype(np.float64)), abs=1e-6)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError):
        M.ssim(torch.rand(10, 20), torch.rand(10, 20))


# -----------------------------------------------------------------------------
# connected components

def _same_partition(ours: np.ndarray, theirs: np.ndarray) -> bool:
    # equal up to renaming: the label pairs form a bijection
    pairs = np.unique(np.stack([ours.ravel(), theirs.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(ours)) == len(np.unique(theirs))


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 24), w=st.integers(1, 24), k=st.integers(1, 4), seed=st.integers(0, 2 ** 31 - 1))
def test_connected_components_match_skimage_4_connectivity(h, w, k, seed):
    sem = np.random.default_rng(seed).integers(0, k, (h, w))
    ours = M.connected_components(torch.from_numpy(sem)).numpy()
    theirs = sk_label(sem + 1, connectivity=1, background=0)  # +1: skimage treats 0 as background
    assert _same_partition(ours, theirs)
    assert ours.min() == 0 and ours.max() + 1 == theirs.max()


def test_connected_components_large_map_and_raster_numbering():
    sem = np.random.default_rng(5).integers(0, 3, (256, 256))
    ours = M.connected_components(torch.from_numpy(sem)).numpy()
    assert _same_partition(ours, sk_label(sem + 1, connectivity=1, background=0))
    # labels are numbered by the raster position of each component's first pixel
    _, first = np.unique(ours.ravel(), return_index=True)
    assert np.all(np.diff(first) > 0)


def test_connected_components_diagonal_touch_is_two_regions_and_snake_is_one():
    diag = np.array([[1, 0], [0, 1]])
    lab = M.connected_components(torch.from_numpy(diag)).numpy()
    assert lab[0, 0] != lab[1, 1] and lab[0, 1] != lab[1, 0]  # 4-connectivity: 4 components
    # a serpentine path is the worst case for label propagation; union-find must still find one component
    n = 64
    snake = np.zeros((n, n), dtype=np.int64)
    snake[::2] = 1
    for i in range(1, n, 2):
        snake[i, n - 1 if (i // 2) % 2 == 0 else 0] = 1
    lab = M.connected_components(torch.from_numpy(snake)).numpy()
    assert len(np.unique(lab[snake == 1])) == 1


# -----------------------------------------------------------------------------
# per-class error, regions, rates

def _scene():
    """A 32x32 scene: background (0) plus a person (1, hot in GT) and a car (2, cold in GT) of 8x8 each."""
    sem = torch.zeros(32, 32, dtype=torch.long)
    sem[4:12, 4:12] = 1
    sem[20:28, 20:28] = 2
    gt = torch.full((32, 32), 0.2, dtype=torch.float64)  # float64 so "exactly 0.6" below is exact
    gt[sem == 1] = 0.9
    gt[sem == 2] = 0.3
    return sem, gt


def test_per_class_error_matches_hand_computation():
    sem, gt = _scene()
    pred = gt.clone()
    pred[sem == 1] = 0.5          # person under-predicted by 0.4
    pred[sem == 0] += 0.05        # background off by 0.05
    pc = M.per_class_error(pred, gt, sem, class_ids=[0, 1, 2, 7])
    assert pc[1]["pixels"] == 64 and pc[1]["mae"] == pytest.approx(0.4, abs=1e-6)
    assert pc[1]["pred_mean"] == pytest.approx(0.5, abs=1e-6) and pc[1]["target_mean"] == pytest.approx(0.9, abs=1e-6)
    assert pc[0]["pixels"] == 32 * 32 - 128 and pc[0]["mae"] == pytest.approx(0.05, abs=1e-6)
    assert pc[2]["mae"] == pytest.approx(0.0, abs=1e-9)
    assert pc[7]["pixels"] == 0 and math.isnan(pc[7]["mae"])   # asked-for class absent from the image


def test_cold_region_painted_hot_is_one_hallucination_out_of_cold_regions():
    sem, gt = _scene()
    pred = gt.clone()
    pred[sem == 2] = 0.95  # the cold car comes out hot
    regions = M.region_stats(pred, gt, sem)
    assert sorted(r["class_id"] for r in regions) == [0, 1, 2]
    rates = M.region_rates(regions)
    # GT cold regions: background and car -> 1 of 2 hallucinated; the one hot region (person) is kept
    assert (rates["hallucinated"], rates["gt_cold"]) == (1, 2) and rates["hallucination_rate"] == 0.5
    assert (rates["missed"], rates["gt_hot"]) == (0, 1) and rates["miss_rate"] == 0.0
    car = M.region_rates(regions, class_ids=[2])
    assert car["hallucination_rate"] == 1.0 and math.isnan(car["miss_rate"])  # no hot cars in GT: NaN, not 0


def test_hot_region_rendered_cold_is_a_miss():
    sem, gt = _scene()
    pred = gt.clone()
    pred[sem == 1] = 0.4
    rates = M.region_rates(M.region_stats(pred, gt, sem), class_ids=[1])
    assert (rates["missed"], rates["gt_hot"], rates["miss_rate"]) == (1, 1, 1.0)
    assert rates["gt_cold"] == 0 and math.isnan(rates["hallucination_rate"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_never_scored(bad):
    # a NaN prediction is "not hot" everywhere: scored, it would be a 0% hallucination rate
    sem, gt = _scene()
    pred = gt.clone()
    pred[0, 0] = bad
    for score in (M.psnr, M.ssim, M.evaluate_image, M.region_stats, M.per_class_error):
        args = (pred, gt, sem) if score not in (M.psnr, M.ssim) else (pred, gt)
        with pytest.raises(ValueError, match="pred has 1 non-finite"):
            score(*args)
        args = (gt, pred, sem) if score not in (M.psnr, M.ssim) else (gt, pred)
        with pytest.raises(ValueError, match="target has 1 non-finite"):
            score(*args)
    feats = torch.randn(4, 3, dtype=torch.float64)
    feats[1, 2] = bad
    with pytest.raises(ValueError, match="features has 1 non-finite"):
        M.fid(feats, torch.randn(4, 3))
    with pytest.raises(ValueError, match="sigma1 has"):
        M.fid_from_features(torch.zeros(2), torch.full((2, 2), bad), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="images has"):
        M.fid_features_from_model(torch.nn.Identity(), pred.float()[None, None])


def test_hot_threshold_is_strict_and_exported():
    assert M.HOT_THRESHOLD == 0.6
    sem, gt = _scene()
    pred = gt.clone()
    pred[sem == 2] = 0.5  # exactly at the threshold (0.5 is exact in binary, so its mean is too): not hot
    car = [r for r in M.region_stats(pred, gt, sem, threshold=0.5) if r["class_id"] == 2][0]
    assert car["pred_mean"] == 0.5 and car["pred_hot"] is False and car["gt_hot"] is False
    gt_at = gt.clone()
    gt_at[sem == 2] = 0.5  # the same rule on the ground-truth side
    assert [r["gt_hot"] for r in M.region_stats(pred, gt_at, sem, threshold=0.5) if r["class_id"] == 2] == [False]
    car = [r for r in M.region_stats(pred, gt, sem, threshold=0.49) if r["class_id"] == 2][0]
    assert car["pred_hot"] is True
    # the default threshold is HOT_THRESHOLD: 0.55 is cold under it, hot under 0.5
    pred[sem == 2] = 0.55
    assert [r["pred_hot"] for r in M.region_stats(pred, gt, sem) if r["class_id"] == 2] == [False]


def test_two_components_of_one_class_are_two_regions_and_small_ones_are_dropped():
    sem = torch.zeros(20, 20, dtype=torch.long)
    sem[1:6, 1:6] = 1        # 25 px: a region
    sem[10:15, 10:15] = 1    # 25 px: a second region of the same class
    sem[18:20, 0:3] = 1      # 6 px: below min_pixels, ignored
    gt = torch.full((20, 20), 0.1)
    gt[1:6, 1:6] = 0.9
    pred = gt.clone()
    pred[10:15, 10:15] = 0.9  # the second (cold) person region hallucinated, the first kept hot
    regions = M.region_stats(pred, gt, sem)
    people = [r for r in regions if r["class_id"] == 1]
    assert [r["pixels"] for r in people] == [25, 25]
    assert [(r["gt_hot"], r["pred_hot"]) for r in people] == [(True, True), (False, True)]
    assert len([r for r in M.region_stats(pred, gt, sem, min_pixels=6) if r["class_id"] == 1]) == 3
    assert all(r["class_id"] != 0 for r in M.region_stats(pred, gt, sem, ignore_ids=[0]))


def test_region_means_match_direct_computation():
    rng = np.random.default_rng(7)
    sem = torch.from_numpy(rng.integers(0, 3, (40, 40)).repeat(4, 0).repeat(4, 1)[:40, :40])  # blocky map
    gt, pred = torch.from_numpy(rng.random((40, 40))), torch.from_numpy(rng.random((40, 40)))
    lab = M.connected_components(sem).numpy()
    regions = M.region_stats(pred, gt, sem, min_pixels=1)
    assert len(regions) == lab.max() + 1
    for i, r in enumerate(regions):  # raster order of first pixel == label order
        m = lab == i
        assert r["pixels"] == m.sum() and r["class_id"] == int(sem.numpy()[m][0])
        assert r["gt_mean"] == pytest.approx(gt.numpy()[m].mean(), abs=1e-12)
        assert r["pred_mean"] == pytest.approx(pred.numpy()[m].mean(), abs=1e-12)


def test_empty_denominators_are_nan():
    r = M.region_rates([])
    assert math.isnan(r["hallucination_rate"]) and math.isnan(r["miss_rate"])
    assert (r["hallucinated"], r["gt_cold"], r["missed"], r["gt_hot"]) == (0, 0, 0, 0)


# -----------------------------------------------------------------------------
# aggregation and the table

def _record(hallucinate_car: bool, n_cold_extra: int):
    """A scene with a person (hot) and a car (cold), plus `n_cold_extra` cold class-3 blocks."""
    sem, gt = _scene()
    for j in range(n_cold_extra):
        sem[0:3, 14 + 5 * j:14 + 5 * j + 4] = 3    # 12 px blocks: need min_pixels <= 12
        gt[0:3, 14 + 5 * j:14 + 5 * j + 4] = 0.25
    pred = gt.clone()
    if hallucinate_car:
        pred[sem == 2] = 0.9
    return M.evaluate_image(pred, gt, sem, min_pixels=12)


def test_summarize_pools_counts_not_rates():
    a = _record(hallucinate_car=True, n_cold_extra=0)   # cold: background, car -> 1/2 hallucinated
    b = _record(hallucinate_car=False, n_cold_extra=3)  # cold: background, car, 3 blocks -> 0/5
    assert M.region_rates(a["regions"])["hallucination_rate"] == 0.5
    assert M.region_rates(b["regions"])["hallucination_rate"] == 0.0
    s = M.summarize([a, b], hot_ids=[1], decoy_ids=[2])
    # pooled: 1 / 7, not the mean of per-image rates (0.25)
    assert (s["all"]["hallucinated"], s["all"]["gt_cold"]) == (1, 7)
    assert s["hallucination_rate"] == pytest.approx(1 / 7)
    assert s["decoy"]["hallucination_rate"] == 0.5 and (s["decoy"]["hallucinated"], s["decoy"]["gt_cold"]) == (1, 2)
    assert s["target"]["miss_rate"] == 0.0 and s["target"]["gt_hot"] == 2
    assert math.isnan(s["target"]["hallucination_rate"])  # no cold person regions anywhere
    assert s["n_images"] == 2 and s["ssim"] == pytest.approx((a["ssim"] + b["ssim"]) / 2)


def test_summarize_weights_per_class_error_by_pixels():
    sem1 = torch.zeros(16, 16, dtype=torch.long)       # 256 class-0 pixels, error 0.1
    sem2 = torch.ones(16, 16, dtype=torch.long)
    sem2[:4, :4] = 0                                    # 16 class-0 pixels, error 0.5
    t = torch.full((16, 16), 0.3)
    r1 = M.evaluate_image(t + 0.1, t, sem1)
    r2 = M.evaluate_image(t + 0.5 * (sem2 == 0), t, sem2)
    s = M.summarize([r1, r2])
    expected = (256 * 0.1 + 16 * 0.5) / (256 + 16)     # pixel-pooled, not (0.1 + 0.5) / 2
    assert s["per_class"][0]["pixels"] == 272
    assert s["per_class"][0]["mae"] == pytest.approx(expected, abs=1e-6)
    assert s["per_class"][0]["pred_mean"] == pytest.approx((256 * 0.4 + 16 * 0.8) / 272, abs=1e-6)
    assert s["per_class"][1]["mae"] == pytest.approx(0.0, abs=1e-6)


def test_format_table_has_one_aligned_row_per_method_with_extras():
    a = M.summarize([_record(True, 0)], decoy_ids=[2])
    b = M.summarize([_record(False, 2)], decoy_ids=[2])
    b["all"]["gt_hot"], b["all"]["missed"] = 0, 0       # force an empty denominator to see it rendered
    table = M.format_table({"pixel fusion": a, "cross-attn": b},
                           extra_columns={"cross-attn": {"trainable params": 1234567, "s/step": 0.8125}}, decoy=True)
    lines = table.splitlines()
    assert len(lines) == 4
    assert all(l.count("|") == lines[0].count("|") for l in lines)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Method", "PSNR (dB)", "SSIM", "Hallucination", "Miss", "Decoy halluc.", "trainable params", "s/step"]
    assert "50.0% (1/2)" in lines[2]        # pixel fusion: background ok, car hallucinated
    assert "n/a (0/0)" in lines[3] and "1,234,567" in lines[3] and "0.8125" in lines[3]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "pixel fusion" and cells[-2:] == ["", ""]  # missing extras are blank
    assert cells[2] == f"{a['ssim']:.4f}"


# -----------------------------------------------------------------------------
# FID

def _scipy_fid(mu1, s1, mu2, s2):
    # the pytorch-fid formula, with scipy's general (non-symmetric) matrix square root
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("dim,seed", [(4, 0), (16, 1), (32, 2)])
def test_fid_matches_scipy_sqrtm(dim, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, dim)) @ rng.standard_normal((dim, dim))
    y = rng.standard_normal((300, dim)) @ rng.standard_normal((dim, dim)) + 0.5
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    ours = M.fid_from_features(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-7)
    # feature_statistics reproduces np.cov(rowvar=False) and fid() chains the two
    m, s = M.feature_statistics(torch.from_numpy(x))
    np.testing.assert_allclose(s.numpy(), s1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.numpy(), mu1, rtol=1e-12)
    assert M.fid(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ours, rel=1e-10)


def test_fid_identical_statistics_is_zero_even_when_singular():
    rng = np.random.default_rng(4)
    feats = torch.from_numpy(rng.standard_normal((10, 32)))  # N < D: covariance has rank 9
    mu, s = M.feature_statistics(feats)
    assert abs(M.fid_from_features(mu, s, mu, s)) < 1e-8
    # a pure mean shift of c in every dim costs exactly D c^2
    assert M.fid_from_features(mu, s, mu + 0.5, s) == pytest.approx(32 * 0.25, abs=1e-6)


def test_fid_features_from_model_repeats_gray_to_rgb_and_batches():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))

        def forward(self, x):  # [b, 3, H, W] -> list with [b, 3, 1, 1], like pytorch-fid's block list
            seen.append(tuple(x.shape))
            assert not self.training
            return [(x.mean((2, 3)) * self.w)[:, :, None, None]]

    imgs = torch.rand(7, 1, 8, 8)
    model = Probe().train()
    f = M.fid_features_from_model(model, imgs, batch_size=3)
    assert seen == [(3, 3, 8, 8), (3, 3, 8, 8), (1, 3, 8, 8)]
    assert f.shape == (7, 3) and f.dtype == torch.float64
    m = imgs.mean((1, 2, 3)).double()
    torch.testing.assert_close(f, torch.stack([m, 2 * m, 3 * m], 1), rtol=1e-6, atol=1e-7)
    assert model.training  # the caller's mode is restored
