"""run_state.py: a run folder is claimed by one live process, an earlier run's files are never touched without
--resume or --overwrite, settings changes are named, the resume command is the one that was used, and the log keeps
no line past the state a run continues from."""

import json
import os
import subprocess
import sys

import pytest
import torch

import run_state


def test_claim_refuses_earlier_files_and_live_owners_and_overwrite_removes_them(tmp_path):
    out = tmp_path / "run"
    lock = run_state.claim(out, ("state.pt", "final.bin"), "final.bin", resume=False, overwrite=False)
    assert lock.read_text().strip() == str(os.getpid())
    (out / "state.pt").write_text("x")
    with pytest.raises(ValueError, match="holds a stopped run.*--resume.*--overwrite"):
        run_state.claim(out, ("state.pt", "final.bin"), "final.bin", resume=False, overwrite=False)
    (out / "final.bin").write_text("y")
    with pytest.raises(ValueError, match="holds a finished run"):
        run_state.claim(out, ("state.pt", "final.bin"), "final.bin", resume=False, overwrite=False)
    with pytest.raises(ValueError, match="contradict"):
        run_state.claim(out, ("state.pt",), "final.bin", resume=True, overwrite=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{other.pid}\n")
        with pytest.raises(ValueError, match=f"another run \\(pid {other.pid}\\)"):
            run_state.claim(out, ("state.pt",), "final.bin", resume=True, overwrite=False)
    finally:
        other.kill()
        other.wait()
    run_state.claim(out, ("state.pt", "final.bin"), "final.bin", resume=False, overwrite=True)  # a dead owner
    assert not (out / "state.pt").exists() and not (out / "final.bin").exists()


def test_state_round_trip_and_changed_settings(tmp_path):
    w = {"a": torch.randn(3)}
    opt = torch.optim.AdamW([torch.nn.Parameter(w["a"].clone())])
    g = torch.Generator().manual_seed(3)
    run_state.save_state(tmp_path / "s.pt", 7, w, opt, g, {"lr": 1e-3, "steps": 10}, t_bins=[[0.0, 0]])
    state = run_state.load_state(tmp_path / "s.pt", ["a"], extra=("t_bins",))
    assert state["step"] == 7 and torch.equal(state["weights"]["a"], w["a"]) and state["settings"]["lr"] == 1e-3
    with pytest.raises(ValueError, match="other trainable weights"):
        run_state.load_state(tmp_path / "s.pt", ["b"])
    assert run_state.changed_settings({"lr": 1e-3, "steps": 10}, {"lr": 2e-3, "steps": 20}, ("steps",)) == \
        ["--lr 0.001 -> 0.002"]


def test_the_resume_command_is_the_one_used(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--stage", "joint", "--resume"])
    assert run_state.resume_command("train.py", 1) == "python train.py --stage joint --resume"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert run_state.resume_command("train.py", 4) == "torchrun --nproc_per_node 4 train.py --stage joint --resume"


def test_trim_log_drops_lines_past_the_state(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    run_state.trim_log(log, 2)
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [1, 2]
