"""tools/bench.py and tools/measure.py: the smoke run on a tiny config (ours and diffusers agree; every JSON field is
there and is a number), the same-work check, the fp8 product's GPU case (its plumbing only), and the measuring tools
(FLOPs of CPU attention, the matmul rate, peak memory). Times and memory figures are the benchmark's output, not the
tests' business: tests assert fields, counts and equal outputs, never a measured size."""

import gc
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extras import fp8
from tools import bench, measure
from tools.sizes import CONFIGS


@pytest.fixture
def one_thread():
    """The tiny config's calls are microseconds: one thread is faster and immune to a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------------------
# The smoke run


def test_tiny_sampling_benchmark_checks_the_base_and_reports_every_ratio(one_thread, capsys):
    bench.main(["--config", "tiny", "--sampling", "--threads", "1", "--repeats", "1", "--sample-steps", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "the benchmark prints ONE JSON line"
    r = json.loads(lines[0])
    # the base equals diffusers (sampling, and the training step's loss) before anything is timed
    assert set(r["check_max_rel_diff"]) == {"base_vs_diffusers", "train_full_loss"}
    assert all(v <= 1e-4 for v in r["check_max_rel_diff"].values())
    names = {"ours:kontext_per_step", "ours:cache", "ours:base_per_step", "ours:cache_base", "theirs:kontext",
             "ours:train_full", "theirs:train_full", "ours:train_full_cache"}
    assert set(r["cases"]) == names and all(is_number(r["cases"][n][k]) for n in names for k in ("s", "gflop"))
    assert all(is_number(v["time"]) and is_number(v["flops"]) for v in r["ratios"].values())
    # less work: the cache runs x_t and text only at each step; the base alone does diffusers' work
    assert r["ratios"]["cache_vs_per_step"]["flops"] < 0.8 and r["ratios"]["cache_base_vs_diffusers"]["flops"] < 0.8
    assert r["ratios"]["base_vs_diffusers"]["flops"] == pytest.approx(1, rel=1e-3)
    assert set(r["targets"]) == {*bench.SAMPLING_TARGETS, "train_full_memory"}
    assert all(isinstance(t["met"], bool) for t in r["targets"].values())


def test_tiny_benchmark_runs_and_reports_every_field(one_thread, capsys):
    bench.main(["--config", "tiny", "--threads", "1", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "the benchmark prints ONE JSON line"
    r = json.loads(lines[0])
    # the two sides computed the same outputs, losses and gradients before anything was timed
    assert set(r["check_max_rel_diff"]) == {"forward", "train_full", "train_full:grad", "train_lora",
                                            "train_lora:grad", "sample"}
    assert all(v <= 1e-4 for v in r["check_max_rel_diff"].values()), r["check_max_rel_diff"]
    assert is_number(r["matmul_peak"]["gflops"]) and all(is_number(g) for g in r["matmul_peak"]["runs_gflops"])
    fields = ("s", "spread", "gflop", "gflops", "of_peak", "peak_mb")
    for name in bench.SHARED:
        c = r["cases"][name]
        for side in ("ours", "theirs"):
            e = c[side]
            assert all(is_number(e[k]) for k in fields), e
            assert len(e["runs"]) == 1 and e["gflop"] > 0
        assert c["ratio"] == pytest.approx(c["ours"]["s"] / c["theirs"]["s"], abs=1e-3)  # rounded to 3 decimals
        assert isinstance(c["met_memory"], bool)
        # same work: the FLOP counts of the two sides agree (LoRA: peft's q, k, v each have their own A)
        assert c["ours"]["gflop"] == pytest.approx(c["theirs"]["gflop"], rel=0.05 if name == "train_lora" else 1e-3)
    for name in ("forward", "train_full", "train_lora"):
        assert r["cases"][name]["target_ratio"] == bench.TARGETS[name]
        assert isinstance(r["cases"][name]["met_time"], bool)
    for name in bench.STAGES:
        c = r["cases"][name]
        assert c["theirs"] is None and all(is_number(c["ours"][k]) for k in fields) and is_number(c["vs_train_full"])
    for v in bench.SEMANTIC_VARIANTS:
        for kind in ("forward", "train_full"):
            cost = r["semantic_cost"][v][kind]
            assert is_number(cost["s"]) and is_number(cost["time_overhead"]) and cost["flop_overhead"] > 0
    # every option costs less than B on every block
    full = r["semantic_cost"]["all"]["train_full"]["flop_overhead"]
    assert all(r["semantic_cost"][v]["train_full"]["flop_overhead"] < full for v in ("double", "every:2", "half-width"))
    assert r["lora_trainable"]["ours"] > 0 and r["lora_trainable"]["theirs"] > r["lora_trainable"]["ours"]


def test_same_work_check_catches_a_different_weight(one_thread):
    cfg = CONFIGS["tiny"]
    args = bench.parse_args(["--config", "tiny"])
    sd = bench.random_weights(cfg.params())
    x = bench.make_inputs(cfg, "cpu")
    ours = bench.build_cases(cfg, "ours", args, sd, x, ("forward",))
    theirs = bench.build_cases(cfg, "theirs", args, sd, x, ("forward",))
    assert bench.first_calls(ours, theirs, tol=1e-4)[1]["forward"] <= 1e-4
    with torch.no_grad():
        theirs["forward"].model.single_transformer_blocks[0].proj_out.weight.mul_(1.01)
    with pytest.raises(AssertionError, match="disagree"):
        bench.first_calls(ours, theirs, tol=1e-4)


def test_diffusers_fused_projections_option_gives_the_same_output(one_thread):
    """diffusers' own GPU option (fuse_qkv_projections) must not change what it computes, or the benchmark
    against it would compare different work when it is on."""
    cfg = CONFIGS["tiny"]
    sd = bench.random_weights(cfg.params())
    ref = bench.build_diffusers(cfg.params(), sd)
    x = bench.make_inputs(cfg, "cpu")
    with torch.no_grad():
        a = bench.call_theirs(ref, x)
        ref.fuse_qkv_projections()
        b = bench.call_theirs(ref, x)
        ours = bench.call_ours(bench.build_ours(cfg.params(), sd), x)
    assert bench.max_rel_diff(b, a) < 1e-5 and bench.max_rel_diff(ours, b) < 1e-5


def test_the_fp8_matmul_case_is_listed_at_flux_dev_shapes_and_skips_cleanly_without_a_gpu(capsys, monkeypatch):
    """--fp8-matmul times FLUX.1-dev's products (hidden 3072 over 4096 tokens; linear1 3072 -> 3 x 3072 q | k | v +
    4 x 3072 mlp). Without a GPU that multiplies fp8 it prints one line saying so, exits 0 and times nothing. Its
    fields are checked on the CPU with a fake clock (the device check made to pass; torch._scaled_mm runs on this
    CPU build): nothing is measured here."""
    assert bench.parse_args(["--fp8-matmul"]).fp8_matmul
    assert bench.fp8_matmul_cases() == {"attn_proj": (4096, 3072, 3072), "linear1": (4096, 3072, 21504)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--fp8-matmul"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device here" in json.loads(lines[0])["skipped"]
    monkeypatch.setattr(fp8, "fp8_matmul_device", lambda device: None)
    try:
        r = bench.measure_fp8_matmul("tiny", (32, 64, 48), 3, device="cpu", timer=lambda fn, k: [fn() is not None] * k)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on this CPU build ({e})")
    forms = {"bf16", "fp8_scaled_mm", "fp8_dequantize", "scaled_mm_product_only"}
    assert set(r["ms"]) == set(r["tflops"]) == forms and r["shape"] == [32, 64, 48] and r["repeats"] == 3
    assert set(r["scaled_mm_speedup"]) == {"vs_bf16", "vs_dequantize"} and fp8.SCALED_MM  # switched back on
    assert 0 < r["scaled_mm_vs_dequantize_max_rel_diff"] < 0.1  # the activation's fp8 rounding, nothing worse


# ---------------------------------------------------------------------------------------------------------------
# Measuring tools


def test_flop_counter_counts_cpu_flash_attention():
    q = torch.randn(2, 3, 40, 16, requires_grad=True)
    k, v = torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 16)
    fwd = 4 * 2 * 3 * 40 * 24 * 16  # QK^T and PV: 2 FLOPs per multiply-add
    assert measure.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == fwd
    n = measure.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    # flop_counter's backward: five matmuls of half the forward's size (the scores are recomputed, then dV, dP,
    # dQ, dK)
    assert n == fwd + 5 * fwd // 2


def test_matmul_peak_is_2n3_flops_over_the_median_call(monkeypatch):
    """On a fake clock whose three GEMMs take 1, 3 and 2 s, the rate is 2 n^3 FLOPs over the median, 2 s."""
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])
    monkeypatch.setattr(measure, "perf_counter", lambda: next(ticks))
    p = measure.matmul_peak("cpu", n=64, repeats=3)
    assert p == {"n": 64, "dtype": "float32", "gflops": 2 * 64 ** 3 / 2.0 / 1e9}


def test_seconds_is_the_time_between_two_clock_reads_with_gc_off(monkeypatch):
    ticks = iter([5.0, 7.5])
    monkeypatch.setattr(measure, "perf_counter", lambda: next(ticks))
    seen, was = [], gc.isenabled()
    assert measure.seconds(lambda: seen.append(gc.isenabled()), "cpu") == 2.5
    assert seen == [False] and gc.isenabled() == was  # off inside the call, as it was after


def test_peak_memory_warms_then_measures_one_call():
    calls = []
    case = bench.Case(nn.Linear(1, 1), lambda m: calls.append(torch.ones(1024).sum()))
    peak = bench.peak_memory(case, "cpu")
    assert isinstance(peak, int) and len(calls) == 2  # one warm call, one measured
