"""
A run's output folder: one owner at a time, a resume state that continues the SAME run, nothing of an earlier run
lost. train.py and train_ae.py both stand on it.

    claim(out, files, ...)   refuse a folder a live run writes to (OUT/run.lock holds its pid), or one that holds an
                             earlier run's files, unless --resume continues it or --overwrite starts over
    save_state / load_state  weights, optimiser, generator, step and the run's settings: tensors, numbers and strings
                             only, read back with torch.load(weights_only=True)
    changed_settings         what a --resume would change about the run (refused by the trainers)
    resume_command           the command that continues a stopped run (torchrun's under torchrun)
    trim_log                 log lines past the state a run continues from are dropped (no duplicate steps)
"""

import json
import os
import sys
from pathlib import Path

import torch

from checkpoint import CheckpointError, load_torch_state, save_torch_atomic

LOCK = "run.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def claim(out: Path, files: tuple[str, ...], finished: str, resume: bool, overwrite: bool,
          master: bool = True) -> Path | None:
    """Before any work: refuse `out` if another live process holds its lock, or if it holds any of `files` (an earlier
    run's; `finished` is the one a completed run writes) and neither `resume` nor `overwrite` is asked; with
    `overwrite` those files are removed. The master takes the lock (an unwritable folder fails here, as an OSError);
    returns the lock file, None on other ranks."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the stopped run, or start over")
    lock = out / LOCK
    if master and lock.is_file():
        owner = lock.read_text().strip()
        if owner.isdigit() and int(owner) != os.getpid() and pid_alive(int(owner)):
            raise ValueError(f"{out}: another run (pid {owner}) is writing here; wait for it to end or use another "
                             "--out")
    earlier = [n for n in files if (out / n).exists()]
    if earlier and not (resume or overwrite):
        what = "a finished run" if (out / finished).exists() else "a stopped run"
        raise ValueError(f"{out} holds {what} ({', '.join(earlier)}): continue it with --resume, or pass --overwrite "
                         "to start over")
    if not master:
        return None
    out.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"{os.getpid()}\n")
    if overwrite:
        for n in earlier:
            (out / n).unlink()
    return lock


def save_state(path: Path, step: int, weights: dict, opt: torch.optim.Optimizer, g: torch.Generator,
               settings: dict, **extra) -> None:
    """The resume state: `weights` (name -> tensor), the optimiser, the generator, the step, the run's settings
    (JSON) and any `extra` plain values; written atomically."""
    state = {"step": step, "weights": {k: v.detach().cpu() for k, v in weights.items()}, "optimizer": opt.state_dict(),
             "rng": g.get_state(), "settings": json.dumps(settings), **extra}
    save_torch_atomic(state, path)


def load_state(path: Path, weight_names, extra: tuple[str, ...] = ()) -> dict:
    """save_state's dict back, checked: every key present, the same weight names. A file another program or version
    wrote is a one-line CheckpointError naming it."""
    state = load_torch_state(path)  # a truncated, corrupt or pickled file is a one-line error naming it
    if missing := [k for k in ("step", "weights", "optimizer", "rng", "settings", *extra) if k not in state]:
        raise CheckpointError(f"{path}: not a resume state of this program (no {', '.join(missing)}); start over "
                              "with --overwrite")
    if sorted(state["weights"]) != sorted(weight_names):
        raise ValueError(f"{path} was written by a run with other trainable weights (another stage or scheme)")
    state["settings"] = json.loads(state["settings"])
    return state


def differing(was: dict, now: dict, may_change: tuple[str, ...]) -> list[str]:
    """The settings of `now` outside `may_change` that `was` records otherwise (or not at all)."""
    return [k for k, v in now.items() if k not in may_change and was.get(k, "(not recorded)") != v]


def changed_settings(was: dict, now: dict, may_change: tuple[str, ...]) -> list[str]:
    """`--flag old -> new` for every setting outside `may_change` that differs."""
    return [f"--{k.replace('_', '-')} {was.get(k)!r} -> {now[k]!r}" for k in differing(was, now, may_change)]


def resume_command(script: str, world: int = 1) -> str:
    """The command that continues this run (torchrun's when it runs under torchrun)."""
    args = " ".join(a for a in sys.argv[1:] if a not in ("--resume", "--overwrite"))
    launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)}" if world > 1 else "python"
    return f"{launcher} {script} {args} --resume"


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the resume state a run continues from), atomically."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, path)
