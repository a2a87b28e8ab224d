"""memory_plan.py: where autograd's saved bytes are counted, and the plan's rows and table (on small widths)."""

import functools
import json

import memory_plan


def test_activation_accounting_and_memory_plan():
    # every saved byte of a block is inside the block without checkpointing, and none is with it
    plain = memory_plan.saved_activation_bytes("warmup", 128, 2, 4, 8, "all blocks")
    ckpt = memory_plan.saved_activation_bytes("warmup", 128, 2, 4, 8, "all blocks", checkpointing=True)
    assert plain["totals"]["double"] > 0 and plain["totals"]["single"] > 0 and plain["totals"]["semantic"] > 0
    assert ckpt["totals"]["double"] == 0 and ckpt["totals"]["single"] == 0
    assert ckpt["totals"]["semantic"] == plain["totals"]["semantic"]  # Flux._run does not checkpoint B
    # LoRA makes the frozen linears keep their inputs
    joint = memory_plan.saved_activation_bytes("joint", 128, 2, 4, 8, "all blocks")
    assert joint["double_per_token"] > plain["double_per_token"]

    plan = memory_plan.plan(widths=(128, 256), grid=4, n_txt=8)
    rows = plan["rows"]
    assert len(rows) == 2 * len(memory_plan.STAGES) * len(memory_plan.RESOLUTIONS)
    for r in rows:
        assert r["weights"] >= 2 * 11_901_408_320  # the dev base in bf16
        assert r["act_ckpt_with_b"] < r["act_ckpt"] < r["act"]
        assert r["fsdp_ckpt"][8] < r["fsdp_ckpt"][4] < r["fsdp_ckpt"][2] < r["total_ckpt"]
        assert r["fits"] in ("24 GB", "48 GB", "80 GB", "> 80 GB")
    by = {(r["variant"], r["stage"], r["resolution"]): r for r in rows}
    assert by[("all blocks", "warmup", 1024)]["act"] > by[("all blocks", "warmup", 512)]["act"]
    assert by[("all blocks", "finetune", 512)]["trainable"] == 57  # one scale per block
    for d in plan["linearity"].values():  # bytes per token grow (about) linearly with the width
        assert all(0.85 < x < 1.1 for x in d.values()), d
    table = memory_plan.markdown(plan)
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1  # header + rows


def test_fits_names_the_smallest_card_with_room_to_spare():
    gib = memory_plan.GIB
    assert memory_plan.fits(20 * gib) == "24 GB"  # 20 * 1.1 + 1 = 23 GiB
    assert memory_plan.fits(21 * gib) == "48 GB"  # 24.1 GiB
    assert memory_plan.fits(100 * gib) == "> 80 GB"


def test_cli_prints_the_table_then_one_json_line(monkeypatch, capsys):
    monkeypatch.setattr(memory_plan, "plan", functools.partial(memory_plan.plan, widths=(128, 256), grid=4, n_txt=8))
    result = memory_plan.main([])
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    assert "\n".join(lines[:-1]) == memory_plan.markdown(result)
