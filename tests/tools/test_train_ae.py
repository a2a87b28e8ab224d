"""tools/train_ae.py: it writes a loadable autoencoder, keeps the Ctrl-C / SIGTERM promise (a resume state after the
current step, and --resume continues bit for bit), and never silently loses or misuses a stopped run's state."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from checkpoint import read_safetensors, save_state
from tools import train_ae
from vae import load_ae

ROOT = Path(__file__).resolve().parents[2]


def ae_args(world, out, *args) -> list[str]:
    return ["--data", str(world / "synth"), "--out", str(out), "--batch-size", "2", "--crop", "32",
            "--warmup-steps", "2", "--no-progress", *args]


def test_autoencoder_training_writes_a_loadable_autoencoder(env, tmp_path):
    assert train_ae.main(["--data", str(env / "synth"), "--steps", "2", "--batch-size", "2", "--crop", "32",
                          "--out", str(tmp_path), "--no-progress"]) == 0
    ae = load_ae(tmp_path / "ae.safetensors")
    assert ae.params.scale_factor > 0 and ae.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 4, 4)


def test_a_set_of_several_image_shapes_trains_one_shape_a_batch(tmp_path, capsys):
    """Frames of two published sets' shapes at --size 96: each served at its own aspect ratio (data.served_size), one
    stack per shape, every batch from one stack, and the run trains on both."""
    from conftest import make_real_size_set
    root = make_real_size_set(tmp_path / "set", {"msrs": (640, 480), "pst900": (1280, 720)}, per_set=2)
    stacks = train_ae.load_images(train_ae.parse_args(["--data", str(root), "--size", "96"]))
    assert sorted(tuple(s.shape) for s in stacks) == [(6, 3, 64, 128), (6, 3, 80, 112)]  # 3 images a pair
    g = torch.Generator().manual_seed(0)
    assert {tuple(train_ae.draw(stacks, 3, g).shape) for _ in range(20)} == {(3, 3, 64, 128), (3, 3, 80, 112)}
    assert train_ae.main(["--data", str(root), "--size", "96", "--steps", "2", "--batch-size", "2", "--crop", "32",
                          "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "crops the centre" in capsys.readouterr().out


def test_sigterm_writes_ae_resume_state_and_resume_reproduces(env, tmp_path, capsys):
    """Kill a run from the test (SIGTERM) once its loop runs, resume, compare with an uninterrupted run."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = "200"
    assert train_ae.main(ae_args(env, full, "--steps", steps)) == 0
    cmd = [sys.executable, "-m", "tools.train_ae", *ae_args(env, killed, "--steps", steps)]
    # same thread count as this process, so the float reductions (and so the weights) are bit-identical
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads()),
                                                             "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while not any("training the autoencoder" in line for line in seen):  # printed once the signal handler is in
        line = proc.stdout.readline()
        assert line, "".join(seen)  # the process ended before its loop
        seen.append(line)
    proc.send_signal(signal.SIGTERM)
    output = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by signal" in output and not (killed / "ae.safetensors").exists()
    stopped_at = torch.load(killed / train_ae.RESUME_NAME, weights_only=True)["step"]
    assert 0 < stopped_at < int(steps)
    capsys.readouterr()
    assert train_ae.main(ae_args(env, killed, "--steps", steps, "--resume")) == 0
    assert f"at step {stopped_at}" in capsys.readouterr().out
    a, b = read_safetensors(full / "ae.safetensors"), read_safetensors(killed / "ae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_ae(full / "ae.safetensors").params == load_ae(killed / "ae.safetensors").params
    assert not (killed / train_ae.RESUME_NAME).exists()  # the run is complete: nothing left to resume


def test_a_stopped_runs_state_is_never_lost_or_misused(env, tmp_path, capsys):
    """--resume needs a state; a new run over one, or a resume with other flags, is refused unless --overwrite."""
    out = tmp_path / "ae"

    def fails(*args) -> str:
        assert train_ae.main(ae_args(env, out, *args)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        return err

    assert "--resume: no " in fails("--steps", "3", "--resume")
    state = out / train_ae.RESUME_NAME
    ae = load_ae(env / "weights" / "demo" / "ae.safetensors").train()
    save_state(state, 1, ae.state_dict(), torch.optim.AdamW(ae.parameters()), torch.Generator(),
               train_ae.run_args(train_ae.parse_args(ae_args(env, out, "--steps", "3"))))
    written = state.read_bytes()
    assert "--overwrite" in fails("--steps", "3")  # a new run would destroy the stopped one
    assert "--steps 3 -> 4" in fails("--steps", "4", "--resume")  # bit for bit needs the same run
    assert state.read_bytes() == written and not (out / "ae.safetensors").exists()
    state.write_bytes(b"not a torch.save file")
    assert str(state) in fails("--steps", "3", "--resume")
    assert train_ae.main(ae_args(env, out, "--steps", "3", "--overwrite")) == 0
    assert (out / "ae.safetensors").is_file() and not state.exists()


def test_a_finished_autoencoder_is_not_replaced_without_overwrite_nor_ever_when_it_is_the_init(env, tmp_path,
                                                                                                capsys):
    out = tmp_path / "ae"
    assert train_ae.main(ae_args(env, out, "--steps", "2")) == 0
    first = (out / "ae.safetensors").read_bytes()
    capsys.readouterr()
    assert train_ae.main(ae_args(env, out, "--steps", "2", "--seed", "1")) == 2
    assert "holds a finished run" in capsys.readouterr().err
    init = str(out / "ae.safetensors")
    assert train_ae.main(ae_args(env, out, "--steps", "2", "--init", init, "--overwrite")) == 2
    assert "--overwrite would replace" in capsys.readouterr().err
    assert (out / "ae.safetensors").read_bytes() == first and sorted(p.name for p in out.iterdir()) == ["ae.safetensors"]
    assert train_ae.main(ae_args(env, tmp_path / "next", "--steps", "2", "--init", init)) == 0  # another --out
    assert train_ae.main(ae_args(env, out, "--steps", "2", "--seed", "1", "--overwrite")) == 0
    assert (out / "ae.safetensors").read_bytes() != first and not (out / ".replaced").exists()
