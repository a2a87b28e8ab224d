"""train.py under torchrun (gloo processes on the CPU): 2-process DDP equals 1 process; --fsdp (extras/fsdp.py,
FSDP2) equals DDP bit for bit with a frozen base in fp32 or fp8 (extras/fp8.py), resumes exactly, is the
single-process run in one process and refuses --compile in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from checkpoint import read_metadata, read_safetensors

ROOT = Path(__file__).resolve().parents[2]


def test_two_process_ddp_equals_one_process(env, tmp_path):
    """torchrun with 2 gloo processes and batch 2 each == 1 process with batch 4 (same global batch)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--stage", "warmup", "--data", str(env / "synth"), "--no-progress", "--sample-steps", "0",
              "--steps", "3", "--warmup-steps", "1", "--device", "cpu"]
    assert train.main(common + ["--out", str(one), "--batch-size", "4"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *common, "--out", str(two), "--batch-size", "2"]
    res = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    a, b = read_safetensors(one / "final.safetensors"), read_safetensors(two / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def fsdp_common(env, *args) -> list[str]:
    """The joint stage (semantic module + LoRA train, the base is frozen) for a few steps on the CPU."""
    return ["--stage", "joint", "--lora-rank", "4", "--data", str(env / "synth"), "--no-progress", "--sample-steps",
            "0", "--warmup-steps", "1", "--device", "cpu", *args]


def torchrun(*args, procs: int = 2):
    """train.py under torchrun with `procs` gloo processes (one thread each); the result, its output checked."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           str(ROOT / "train.py"), *args]
    res = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def assert_same_weights(a: Path, b: Path, exact: bool = False):
    sa, sb = read_safetensors(a), read_safetensors(b)
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("base_dtype", ["fp32", "fp8"])
def test_fsdp_two_processes_equal_ddp_and_one_process(env, tmp_path, base_dtype):
    """2 FSDP processes with batch 2 each: the same trained weights as 2 DDP processes, bit for bit, and as 1 process
    with batch 4 to the DDP test's tolerance (a batch of 4 and two of 2 round differently in float32); the frozen
    base stored in fp32 or fp8 (fp8.Fp8Linear's float8 weights are sharded as well)."""
    one, ddp, two = tmp_path / "one", tmp_path / "ddp", tmp_path / "two"
    common = fsdp_common(env, "--steps", "3", "--base-dtype", base_dtype)
    assert train.main(common + ["--out", str(one), "--batch-size", "4"]) == 0
    torchrun(*common, "--out", str(ddp), "--batch-size", "2")
    torchrun(*common, "--out", str(two), "--batch-size", "2", "--fsdp")
    for name in ("final.safetensors", "latest.safetensors"):
        assert_same_weights(ddp / name, two / name, exact=True)
        assert_same_weights(one / name, two / name)
    assert read_metadata(two / "final.safetensors")["config"] == read_metadata(one / "final.safetensors")["config"]
    # the resume state has the single process's structure: weight names, optimiser groups, state shapes
    s1, s2 = (torch.load(d / "resume.pt", weights_only=True) for d in (one, two))
    shapes = lambda s: {i: {k: v.shape for k, v in st.items()} for i, st in s["optimizer"]["state"].items()}  # noqa
    assert s1["weights"].keys() == s2["weights"].keys() and shapes(s1) == shapes(s2)
    assert s1["optimizer"]["param_groups"] == s2["optimizer"]["param_groups"]


def test_fsdp_resume_equals_uninterrupted(env, tmp_path):
    """An FSDP run stopped at step 2 and resumed to step 4 == an uninterrupted FSDP run of 4 steps, bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = fsdp_common(env, "--batch-size", "2", "--ckpt-every", "2", "--fsdp")
    torchrun(*common, "--steps", "4", "--out", str(full))
    torchrun(*common, "--steps", "2", "--out", str(part))
    res = torchrun(*common, "--steps", "4", "--out", str(part), "--resume")
    assert "resumed from" in res.stdout
    assert_same_weights(full / "final.safetensors", part / "final.safetensors", exact=True)


def test_fsdp_in_one_process_is_the_single_process_run(run_train, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(a, "--stage", "joint", "--lora-rank", "2", "--steps", "2") == 0
    capsys.readouterr()
    assert run_train(b, "--stage", "joint", "--lora-rank", "2", "--steps", "2", "--fsdp") == 0
    assert "nothing to shard" in capsys.readouterr().out
    assert_same_weights(a / "final.safetensors", b / "final.safetensors", exact=True)


def test_fsdp_with_compile_is_refused_in_one_line(run_train, tmp_path, capsys):
    out = tmp_path / "x"
    assert run_train(out, "--stage", "warmup", "--steps", "1", "--fsdp", "--compile") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--fsdp" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
