"""tools/memory_plan.py: the stage models' bytes come from their tensors, the op-by-op count of live bytes follows the
allocator, the plan of a small stage model is within 10% of the measured peak of its real training step on this CPU
(torch.profiler's allocation events, not the resident set), and the tables, targets and command line."""

import functools
import json
import re

import pytest
import torch
from torch import nn

from extras.schemes import parameter_count
from flux_model import PRESETS
from lora import DEFAULT_TARGETS
from tools import measure
from tools import memory_plan as mp

SMALL = mp.small_params(128, 2, 2, 2)
DEV = PRESETS["dev"]


# ----------------------------------------------------------------------------------------------------------------
# What is resident: counted from the stage model's tensors (meta device)


def base_linears(model) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("semantic.")
            and ".lora_" not in n and not n.endswith(("lora_A", "lora_B"))]


def test_stage_models_of_dev_are_counted_from_their_tensors():
    cfgs = mp.b_configs(DEV.hidden_size, DEV.num_heads)
    base = 11_901_408_320  # FLUX.1-dev's parameters
    warm = {name: mp.stage_model(DEV, "warmup", cfg, "bf16") for name, cfg in cfgs.items()}
    for name, model in warm.items():
        s = mp.state_bytes(model)
        assert all(p.is_meta for p in model.parameters())
        assert s["trainable"] == parameter_count(cfgs[name], DEV)  # warmup trains the whole semantic module
        assert s["weights"] == 2 * base + 4 * s["trainable"]  # base bf16, semantic fp32
        assert s["grads"] == 4 * s["trainable"] and s["adamw"] == 2 * s["grads"]
    counts = {name: mp.state_bytes(m)["trainable"] for name, m in warm.items()}
    assert 2.16e9 < counts[mp.FULL_B] < 2.17e9 and 22.7e6 < counts[mp.LEAN_B] < 22.9e6
    assert 1.6e6 < counts["decoupled, shared K/V, 256-dim"] < 1.7e6

    # the fp8 base: every base Linear weight one byte with a float32 scale per output row, the rest bf16
    lean = cfgs[mp.LEAN_B]
    bf16 = warm[mp.LEAN_B]
    linears = base_linears(bf16)
    w_lin = sum(m.weight.numel() for m in linears)
    rows = sum(m.out_features for m in linears)
    fp8 = mp.state_bytes(mp.stage_model(DEV, "warmup", lean, "fp8"))
    assert fp8["weights"] == w_lin + 4 * rows + 2 * (base - w_lin) + 4 * counts[mp.LEAN_B]

    # joint adds LoRA rank 16 on lora.py's targets (fp32, trainable); finetune keeps it frozen and trains the scales
    patterns = [re.compile(p) for p in DEFAULT_TARGETS]
    lora = sum(16 * (m.in_features + m.out_features) for n, m in bf16.named_modules()
               if isinstance(m, nn.Linear) and any(p.fullmatch(n) for p in patterns))
    joint = mp.state_bytes(mp.stage_model(DEV, "joint", lean, "fp8"))
    assert joint["trainable"] == counts[mp.LEAN_B] + lora
    assert joint["weights"] == fp8["weights"] + 4 * lora
    fine = mp.state_bytes(mp.stage_model(DEV, "finetune", lean, "fp8"))
    assert fine["trainable"] == 57 and fine["weights"] == joint["weights"]  # one scale per block
    # FSDP2's largest unit: a double block (bf16 here: 2 bytes each) with its semantic module
    assert mp.state_bytes(warm[mp.FULL_B])["unit"] > 2 * sum(p.numel() for p in bf16.double_blocks[0].parameters())


# ----------------------------------------------------------------------------------------------------------------
# Live bytes, op by op


def test_live_tensor_bytes_counts_new_storages_until_they_are_freed():
    live = mp.LiveTensorBytes()
    with live:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100)
        a.add_(1)  # a view and an in-place result add nothing
        c = torch.ones(500) * 2  # 2000 more, and a 2000-byte temporary that is freed
        del a, b
    live.close()
    assert live.peak["forward_backward"] == 4000 + 2000 + 2000 and live.now == 2000
    assert c.numel() == 500


def test_live_tensor_bytes_agrees_with_the_allocator_on_a_training_step():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(128, 256)

    def step():
        y = torch.nn.functional.gelu(x @ w)
        (y @ w).square().mean().backward()  # w is used twice: its two gradients are summed

    live = mp.LiveTensorBytes([w])
    with live:
        step()
    live.close()
    assert live.grads == 256 * 256 * 4 == live.now  # what stays: the gradient, told apart as one
    w.grad = None
    assert live.peak["forward_backward"] == measure.allocated_peak_bytes(step)


def test_cuda_layer_norms_run_in_float32_under_autocast():
    model = mp.cuda_layer_norms_(nn.Sequential(nn.LayerNorm(8), nn.LayerNorm(8, elementwise_affine=False)))
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model[0](x).dtype == torch.float32 and model[1](x).dtype == torch.float32
    assert model(x).dtype == torch.bfloat16  # without autocast: the input's dtype
    assert torch.allclose(model[0](x.float()), nn.functional.layer_norm(x.float(), (8,), model[0].weight,
                                                                         model[0].bias))


# ----------------------------------------------------------------------------------------------------------------
# The plan against a real step


@pytest.mark.parametrize("stage, b, base, ckpt", [("joint", mp.FULL_B, "fp8", True),
                                                   ("warmup", mp.LEAN_B, "bf16", False)])
def test_plan_of_a_small_stage_is_within_10_percent_of_its_measured_step(stage, b, base, ckpt):
    cfg = mp.b_configs(SMALL.hidden_size, SMALL.num_heads)[b]
    planned = mp.plan_stage(SMALL, stage, cfg, base, sides=(12,), n_txt=32, checkpointing=(ckpt,), policy="cpu")[0]
    measured = mp.measured_step(SMALL, stage, cfg, base, side=12, n_txt=32, checkpointing=ckpt)
    assert planned["resident"] == measured["resident"]  # weights, AdamW state and batch: the same tensors
    assert abs(planned["total"] / measured["total"] - 1) <= 0.10, (planned["total"], measured)
    assert abs(planned["step"] / measured["step"] - 1) <= 0.10, (planned["step"], measured)


# ----------------------------------------------------------------------------------------------------------------
# Tables, targets, command line


@pytest.fixture(scope="module")
def small_plan():
    """dev_plan's rows for the small model (token grids of side 4 and 6 standing in for 512² and 1024²)."""
    rows = mp.dev_plan([mp.FULL_B, mp.LEAN_B], ("warmup", "joint"), mp.BASES, params=SMALL,
                       resolutions={512: 4, 1024: 6}, progress=False)
    return {"model": "small", "rows": rows, "targets": mp.targets(rows)}


def test_plan_rows_and_tables(small_plan):
    rows = small_plan["rows"]
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # B forms x stages x bases x sizes x checkpointing
    by = {(r["b"], r["stage"], r["resolution"], r["base"], r["checkpointing"]): r for r in rows}
    for (b, stage, res, base, ckpt), r in by.items():
        assert r["total"] == r["resident"] + r["step"] and r["step"] >= r["peak_optimizer"]
        assert r["resident"] == r["weights"] + r["optimizer_state"] + r["batch"]
        assert r["optimizer_state"] >= r["adamw"]  # m and v, and the step counters
        if not ckpt:
            assert by[(b, stage, res, base, True)]["step"] < r["step"]
        assert r["fsdp"][8] < r["fsdp"][4] < r["fsdp"][2]
        if base == "bf16":
            assert by[(b, stage, res, "fp8", ckpt)]["weights"] < r["weights"]
        if res == 512:
            assert by[(b, stage, 1024, base, ckpt)]["step"] > r["step"]
    plan_table, gpu_table = mp.markdown_plan(rows), mp.markdown_gpus(rows)
    assert sum(line.startswith("| ") for line in plan_table.splitlines()) == 1 + 2 * 2 * 2
    assert sum(line.startswith("| ") for line in gpu_table.splitlines()) == 1 + 2 * 2 * 2
    t = small_plan["targets"]
    assert [x["target"] for x in t] == [x[0] for x in mp.TARGETS]
    for x in t:
        assert x["met"] == all(c["spare_gib"] >= 0 for c in x["cases"])
        assert all(c["need_gib"] == pytest.approx(c["peak_gib"] * 1.1 + 1, abs=0.02) for c in x["cases"])


def test_fits_names_the_smallest_card_with_room_to_spare():
    gib = mp.GIB
    assert mp.fits(13 * gib) == "16 GB"  # 13 * 1.1 + 1 = 15.3 GiB
    assert mp.fits(14 * gib) == "24 GB"  # 16.4 GiB
    assert mp.fits(21 * gib) == "48 GB"  # 24.1 GiB
    assert mp.fits(100 * gib) == "> 80 GB"


def test_cli_prints_the_tables_then_one_json_line(monkeypatch, capsys, small_plan):
    monkeypatch.setattr(mp, "plan", lambda quick=False, jobs=1: small_plan)
    result = mp.main([])
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    body = "\n".join(lines[:-1])
    assert mp.markdown_plan(small_plan["rows"]) in body and mp.markdown_gpus(small_plan["rows"]) in body
    assert mp.markdown_targets(small_plan["targets"]) in body


def test_cli_check_prints_the_comparison(monkeypatch, capsys):
    few = functools.partial(mp.check, b_names=[mp.LEAN_B], stages=("warmup",), bases=("fp8",), checkpointing=(True,),
                            progress=False)
    monkeypatch.setattr(mp, "check", lambda models=None, b_names=None: few(models=models))
    monkeypatch.setattr(mp, "CHECK_MODELS", {"tiny": (64, 1, 1, 1, 4, 8)})
    result = mp.main(["--check"])
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    (row,) = result["check"]
    assert abs(row["error_total"]) <= 0.10
    assert "\n".join(lines[:-1]) == mp.markdown_check(result["check"])


# ----------------------------------------------------------------------------------------------------------------
# tools.bench --stage-peaks: the same cases measured on a GPU


def test_bench_stage_peaks_refuses_without_cuda_in_one_line(capsys):
    from tools import bench
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the refusal is for machines without one")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--stage-peaks"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tools.bench --stage-peaks: no CUDA device here")


def test_bench_stage_peak_cases_are_built_on_the_meta_device():
    from tools import bench
    cases = bench.stage_peak_cases()
    assert len(cases) == 2 * 2 * 3 * 3  # sizes x bases x scheme B forms x stages
    assert len({(c["b"], c["stage"], c["base"], c["resolution"]) for c in cases}) == len(cases)
    assert set(bench.STAGE_PEAK_B) <= set(mp.b_configs(DEV.hidden_size, DEV.num_heads))
    assert all(c["checkpointing"] and c["side"] == mp.RESOLUTIONS[c["resolution"]] for c in cases)
    model = bench.stage_peak_model(cases[0])
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))  # nothing allocated
    assert not torch.cuda.is_initialized()


# ----------------------------------------------------------------------------------------------------------------
# train.py's defaults on a GPU: the largest batch the plan fits on the card


def fake_plan(resident_gib: float, per_sample_gib: dict):
    """A plan whose total is what is resident plus the batch times one sample's activations (GiB)."""
    calls = []

    def plan(batch):
        calls.append(batch)
        return {ckpt: {"resident": resident_gib * mp.GIB, "total": (resident_gib + batch * a) * mp.GIB}
                for ckpt, a in per_sample_gib.items()}
    return plan, calls


def test_the_largest_batch_that_fits_is_chosen_checkpointing_only_where_needed():
    plan, calls = fake_plan(10, {False: 8, True: 1})
    assert mp.choose(80 * mp.GIB, plan) == mp.Choice(8, True, 18 * mp.GIB)  # batch 8 only with checkpointing
    assert 2 not in calls  # batches the estimate rules out are not planned
    plan, _ = fake_plan(10, {False: 2, True: 1})
    assert mp.choose(80 * mp.GIB, plan) == mp.Choice(8, False, 26 * mp.GIB)  # fits without: no recompute
    assert mp.choose(80 * mp.GIB, plan, batches=(8,), checkpointing=(True,)) == mp.Choice(8, True, 18 * mp.GIB)
    plan, _ = fake_plan(30, {False: 8, True: 1})
    assert mp.choose(24 * mp.GIB, plan) == mp.Choice(None, True, 31 * mp.GIB)  # batch 1 + checkpointing: too big
    assert mp.need(20 * mp.GIB) == 23 * mp.GIB  # +10% and 1 GiB


def test_the_chosen_batch_is_one_whose_traced_plan_fits_the_card():
    """choose on the real tracer (a small model: FLUX.1-dev's own choices are `python -m tools.memory_plan
    --defaults`, 518 s of tracing, quoted in docs/speed_and_memory.md): on a card just too small for batch 8 without
    checkpointing, the choice is a batch whose own plan fits, and that plan is the one choose reports."""
    plan = mp.plan_for(SMALL, "warmup", mp.DEFAULT_B, "fp8", 12, n_txt=32)
    card = mp.need(plan(8)[False]["total"]) - 1  # a byte short of batch 8 without checkpointing
    choice = mp.choose(card, plan)
    assert (choice.batch, choice.checkpointing) != (8, False) and choice.batch in mp.BATCHES
    assert mp.need(choice.total) <= card and choice.total == plan(choice.batch)[choice.checkpointing]["total"]

