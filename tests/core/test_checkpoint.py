"""checkpoint.py: truncated/corrupt files are refused by name, strict loading lists every bad key, writes are
atomic, and a fuzz test over the safetensors header/metadata parser finds no crash other than CheckpointError.
BFL's own FLUX file loads from the core alone, with hints that name the real problem (the other forms of the
checkpoint: tests/extras/test_checkpoint_forms.py). A run folder is claimed by one live process, an earlier run's
files are never touched without --resume or --overwrite, settings changes are named, the resume command is the one
that was used, the log keeps no line past the state a run continues from, and numbered checkpoints keep the newest
K. Bad input is one line and exit 2."""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from safetensors.torch import save_file
from torch import nn

import checkpoint
from checkpoint import (CheckpointError, check_keys, read_header, read_metadata, read_safetensors, load_strict,
                        save_atomic, save_torch_atomic, load_torch_state, strip_prefix, read_sharded, header_keys,
                        split_prefix)
from conftest import small_flux_params
from flux_model import Flux


def valid_file(tmp_path, name="a.safetensors"):
    path = tmp_path / name
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}, str(path),
              metadata={"config": "{}"})
    return path


def test_roundtrip_and_metadata(tmp_path):
    path = valid_file(tmp_path)
    assert read_metadata(path) == {"config": "{}"}
    sd = read_safetensors(path, dtype=torch.float64)
    assert sd["w"].dtype == torch.float64 and sd["w"][1, 2] == 5


def test_every_truncation_is_reported(tmp_path):
    data = valid_file(tmp_path).read_bytes()
    for cut in (0, 4, 8, 20, len(data) // 2, len(data) - 1):
        (tmp_path / "t.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="t.safetensors"):
            read_safetensors(tmp_path / "t.safetensors")


def test_pickle_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="Only safetensors"):
        read_safetensors(tmp_path / "model.safetensors")


def test_header_length_with_a_pickle_like_first_byte_is_fine(tmp_path):
    """A valid file whose header length's low byte is 0x80 (a pickle's first byte) must still load."""
    for pad in range(300):
        path = tmp_path / "p.safetensors"
        save_file({"w" + "x" * pad: torch.zeros(1)}, str(path))
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("could not make a header of the wanted length")
    assert "w" + "x" * pad in read_safetensors(path)


def test_strict_load_lists_every_problem():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    sd = {"0.weight": torch.zeros(3, 2), "1.weight": torch.zeros(2, 3), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        load_strict(model, sd, "toy", hint=lambda m, u, x: "a hint")
    msg = str(e.value)
    for part in ("0.bias", "1.bias", "extra", "1.weight (file (2, 3), model (1, 3))", "hint: a hint"):
        assert part in msg


def test_check_keys_is_the_one_strict_format():
    """check_keys lists every missing, unexpected and mis-shaped key by name (sorted, 20 shown per kind), honours
    allow_missing, names the problem and adds the hint; a matching dict passes silently."""
    expected = {"a": (2, 3), "b": (4,), "opt": (1,), **{f"k{i:02d}": (1,) for i in range(25)}}
    sd = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "zz": torch.zeros(1), "extra": torch.zeros(1)}
    seen = {}

    def hint(missing, unexpected, mismatched):
        seen.update(missing=missing, unexpected=unexpected, mismatched=mismatched)
        return "a hint"
    with pytest.raises(CheckpointError) as e:
        check_keys(expected, sd, "toy", hint=hint, allow_missing=lambda k: k == "opt", problem="the toy does not fit")
    lines = str(e.value).splitlines()
    assert lines[0] == "toy: the toy does not fit"
    assert lines[1] == "  25 missing: " + ", ".join(f"k{i:02d}" for i in range(20)) + " ... and 5 more"
    assert lines[2] == "  2 unexpected: extra, zz"
    assert lines[3] == "  1 mis-shaped: a (file (3, 2), model (2, 3))"
    assert lines[4] == "  hint: a hint" and len(lines) == 5
    assert seen == {"missing": {f"k{i:02d}" for i in range(25)}, "unexpected": {"extra", "zz"},
                    "mismatched": [("a", (3, 2), (2, 3))]}
    with pytest.raises(CheckpointError, match="^toy: the weights do not match the model\n  1 missing: b$"):
        check_keys({"a": (2, 3), "b": (4,)}, {"a": torch.zeros(2, 3)}, "toy", hint=lambda *_: "")
    check_keys({"a": (2, 3), "opt": (1,)}, {"a": torch.zeros(2, 3)}, "toy", allow_missing=lambda k: k == "opt")


def test_meta_model_takes_file_tensors_without_copy():
    with torch.device("meta"):
        model = nn.Linear(2, 3)
    sd = {"weight": torch.randn(3, 2), "bias": torch.randn(3)}
    load_strict(model, sd, "toy")
    assert model.weight.data_ptr() == sd["weight"].data_ptr()


def test_save_atomic_never_leaves_a_half_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_atomic({"a": torch.ones(2)}, path)

    def crash(*a, **k):
        raise KeyboardInterrupt  # a kill in the middle of writing
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(read_safetensors(path)["a"], torch.ones(2))  # the previous file is intact


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_written_files_get_the_umask_mode_not_the_writers(tmp_path, umask):
    """safetensors writes 0600 by itself; every file written here gets what a plain open() gives."""
    old = os.umask(umask)
    try:
        save_atomic({"a": torch.ones(2)}, tmp_path / "w.safetensors")
        save_torch_atomic({"a": torch.ones(2)}, tmp_path / "resume.pt")
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == want
    for name in ("w.safetensors", "resume.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def _fail_half_way(message_error):
    """A writer that gets part of the file onto the disk, then fails as a full disk makes it fail."""
    def write(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise message_error
    return write


TORCH_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
SAFETENSORS_FULL_DISK = checkpoint.SafetensorError("Error while serializing: I/O error: No space left on device")


@pytest.mark.parametrize("save, writer, error", [
    (save_torch_atomic, "torch.save", TORCH_FULL_DISK),
    (save_torch_atomic, "torch.save", OSError(28, "No space left on device")),
    (save_atomic, "save_file", SAFETENSORS_FULL_DISK),
], ids=["torch-unexpected-pos", "torch-enospc", "safetensors-enospc"])
def test_a_failed_write_leaves_no_tmp_and_names_the_file(tmp_path, monkeypatch, save, writer, error):
    path = tmp_path / "resume.pt"
    save({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    if writer == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", _fail_half_way(error))
    else:
        monkeypatch.setattr(checkpoint, "save_file", _fail_half_way(error))
    with pytest.raises(CheckpointError) as e:
        save({"a": torch.zeros(2)}, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: could not write it") and "disk full" in msg and "\n" not in msg
    assert msg.endswith("Any existing file is unchanged")
    assert "inline_container" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]  # no resume.pt.tmp
    assert path.read_bytes() == before


class _Code:
    def __reduce__(self):
        return (print, ("ran code",))


def test_a_bad_resume_state_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "resume.pt"
    state = {"step": 3, "params": {"w": torch.randn(2, 3)}, "rng": torch.Generator().get_state(), "t_bins": [[1.0]]}
    save_torch_atomic(state, path)
    back = load_torch_state(path)
    assert back["step"] == 3 and torch.equal(back["params"]["w"], state["params"]["w"])
    good = path.read_bytes()
    torch.save({"step": _Code()}, tmp_path / "objects.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = {b"": "truncated or corrupt", good[:10]: "truncated or corrupt",
             good[:len(good) // 2]: "truncated or corrupt", good[:-1]: "truncated or corrupt", b"garbage" * 9: "not a torch.save file, or corrupt",
             pickle.dumps(object()): "not a torch.save file, or corrupt",
             (tmp_path / "objects.pt").read_bytes(): r"holds a pickled Python object \(print\)",
             (tmp_path / "list.pt").read_bytes(): "holds a list, not a saved state"}
    for raw, message in cases.items():
        path.write_bytes(raw)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}[^\n]*$"):
            load_torch_state(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_torch_state(tmp_path / "absent.pt")


def test_prefix_and_shards(tmp_path):
    assert strip_prefix({"m.a": 1, "m.b": 2}, "m.") == {"a": 1, "b": 2}
    assert strip_prefix({"m.a": 1, "b": 2}, "m.") == {"m.a": 1, "b": 2}
    save_file({"x": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"y": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors", "z": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="absent from the shards"):
        read_sharded(tmp_path)
    assert split_prefix({"m.a": 1, "b": 2}, "m.") == ({"a": 1}, {"b": 2})


def test_an_index_is_read_from_its_folder_or_itself_and_never_as_safetensors(tmp_path):
    """diffusers names its index diffusion_pytorch_model.safetensors.index.json; given directly it used to be parsed
    as a safetensors header ("header claims 8387229874382703227 bytes")."""
    save_file({"x": torch.ones(1)}, str(tmp_path / "part-1.safetensors"))
    save_file({"y": torch.zeros(2)}, str(tmp_path / "part-2.safetensors"))
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}))
    for source in (tmp_path, index):
        assert sorted(read_sharded(source)) == ["x", "y"] and sorted(header_keys(source)) == ["x", "y"]
        assert list(read_sharded(source, keys=["y"])) == ["y"]
    assert list(read_sharded(tmp_path / "part-1.safetensors")) == ["x"]  # a plain file is its own one shard
    with pytest.raises(CheckpointError, match="a JSON text file, not safetensors"):
        read_header(index)
    index.write_text(json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        read_sharded(index)
    index.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        read_sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="2 safetensors indexes"):
        read_sharded(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        read_sharded(tmp_path / "absent")


def _file(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=4), payload=st.binary(max_size=64))
def test_fuzz_header_parser_random_json(tmp_path, header, payload):
    path = tmp_path / "f.safetensors"
    path.write_bytes(_file(header, payload))
    try:
        read_safetensors(path)
    except CheckpointError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_valid_files(tmp_path, data):
    """Flip, cut or insert bytes anywhere in a valid file (header, metadata, tensor data): only CheckpointError, or a
    successful read of correctly-sized tensors."""
    raw = bytearray(valid_file(tmp_path, "v.safetensors").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i:i + data.draw(st.integers(1, 16))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        entries, meta = read_header(path)
        sd = read_safetensors(path)
        for k, e in entries.items():
            assert list(sd[k].shape) == e["shape"]
    except CheckpointError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# BFL's own FLUX file, from the core alone

def random_flux_file(path, params, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in Flux(params).state_dict().items()}  # no zero tensor
    save_file(sd, str(path))
    return sd


def test_the_official_file_loads_from_the_core_alone(tmp_path):
    params = small_flux_params()
    sd = random_flux_file(tmp_path / "flux1-dev.safetensors", params)
    model = checkpoint.load_flux_official(tmp_path / "flux1-dev.safetensors", params, dtype=torch.float32)
    got = model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not any(t.is_meta for t in got.values())
    half = checkpoint.load_flux_official(tmp_path / "flux1-dev.safetensors", params)  # bf16 by default
    assert all(t.dtype == torch.bfloat16 for t in half.state_dict().values())
    assert checkpoint.flux_preset(header_keys(tmp_path / "flux1-dev.safetensors"), "f") == "dev"
    with pytest.raises(ValueError, match="unknown preset 'deev'"):
        checkpoint.load_flux_official(tmp_path / "flux1-dev.safetensors", "deev")


def test_the_official_loader_names_the_real_problem(tmp_path):
    schnell = tmp_path / "flux1-schnell.safetensors"
    random_flux_file(schnell, small_flux_params(guidance=False))
    assert checkpoint.flux_preset(header_keys(schnell), schnell) == "schnell"
    with pytest.raises(CheckpointError, match="(?s)guidance_in.in_layer.weight.*params='schnell'"):
        checkpoint.load_flux_official(schnell, small_flux_params(), dtype=torch.float32)
    dev = tmp_path / "flux1-dev.safetensors"
    random_flux_file(dev, small_flux_params())
    with pytest.raises(CheckpointError, match="params='dev'"):
        checkpoint.load_flux_official(dev, small_flux_params(guidance=False), dtype=torch.float32)
    with pytest.raises(CheckpointError, match="(?s)mis-shaped.*hidden size is 64, the preset's 96"):
        checkpoint.load_flux_official(dev, small_flux_params(hidden=96, heads=4, axes=(8, 8, 8)))
    save_file({"decoder.conv_out.bias": torch.ones(3)}, str(tmp_path / "ae.safetensors"))
    with pytest.raises(CheckpointError, match="an autoencoder"):
        checkpoint.load_flux_official(tmp_path / "ae.safetensors", small_flux_params())
    with pytest.raises(CheckpointError, match="not a FLUX transformer"):
        checkpoint.flux_preset(header_keys(tmp_path / "ae.safetensors"), tmp_path / "ae.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# A train.py output's run config; one-line errors

def test_run_config_is_read_from_the_metadata_or_refused_in_one_line(tmp_path):
    save_atomic({"x": torch.zeros(1)}, tmp_path / "a.safetensors", {"config": json.dumps({"scheme": "xattn"})})
    assert checkpoint.run_config(tmp_path / "a.safetensors") == {"scheme": "xattn"}
    for meta, match in (({}, "no 'config' metadata"), ({"config": "{"}, "corrupt config"),
                        ({"config": "[1]"}, "a list, not a JSON object")):
        save_atomic({"x": torch.zeros(1)}, tmp_path / "b.safetensors", meta)
        with pytest.raises(CheckpointError, match=match):
            checkpoint.run_config(tmp_path / "b.safetensors")


def test_command_turns_bad_input_into_one_line_and_exit_status_2(capsys):
    def main(argv):
        if argv == "value":
            raise ValueError("bad flag")
        if argv == "checkpoint":
            raise CheckpointError("x.safetensors: truncated")
        if argv == "os":
            raise PermissionError(13, "Permission denied", "out")
        if argv == "bug":
            raise KeyError("a bug is not bad input")
        return 3 if argv == "three" else None
    run = checkpoint.command(main)
    assert run.__name__ == "main" and run(None) == 0 and run("three") == 3
    for argv, text in (("value", "bad flag"), ("checkpoint", "truncated"), ("os", "Permission denied")):
        capsys.readouterr()
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err and err.count("\n") == 1
    with pytest.raises(KeyError):
        run("bug")


# ---------------------------------------------------------------------------------------------------------------
# A run's output folder

def test_claim_refuses_earlier_files_and_live_owners_and_overwrite_removes_nothing(tmp_path):
    out = tmp_path / "run"
    lock = checkpoint.claim(out, ("state.pt", "final.bin"), "final.bin", resume=False, overwrite=False)
    assert lock.read_text().strip() == str(os.getpid())
    (out / "state.pt").write_text("x")
    with pytest.raises(ValueError, match="holds a stopped run.*--resume.*--overwrite"):
        checkpoint.claim(out, ("state.pt", "final.bin"), "final.bin", resume=False, overwrite=False)
    (out / "final.bin").write_text("y")
    with pytest.raises(ValueError, match="holds a finished run"):
        checkpoint.claim(out, ("state.pt", "final.bin"), "final.bin", resume=False, overwrite=False)
    with pytest.raises(ValueError, match="contradict"):
        checkpoint.claim(out, ("state.pt",), "final.bin", resume=True, overwrite=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{other.pid}\n")
        with pytest.raises(ValueError, match=f"another run \\(pid {other.pid}\\)"):
            checkpoint.claim(out, ("state.pt",), "final.bin", resume=True, overwrite=False)
    finally:
        other.kill()
        other.wait()
    checkpoint.claim(out, ("state.pt", "final.bin"), "final.bin", resume=False, overwrite=True)  # a dead owner
    assert (out / "state.pt").read_text() == "x" and (out / "final.bin").read_text() == "y"  # set_aside moves them


def test_overwrite_refuses_to_replace_the_init_file(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "final.bin").write_text("y")
    with pytest.raises(ValueError, match="--init.*--overwrite would replace"):
        checkpoint.claim(out, ("final.bin",), "final.bin", resume=False, overwrite=True,
                         keep=(str(tmp_path / "run" / ".." / "run" / "final.bin"),))
    assert (out / "final.bin").read_text() == "y" and not (out / checkpoint.LOCK).exists()


def test_an_overwritten_run_comes_back_unless_the_new_run_wrote_a_checkpoint(tmp_path):
    files = ("state.pt", "final.bin", "log.jsonl")
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_text("old state")
    (out / "log.jsonl").write_text("old log\n")
    aside = checkpoint.set_aside(out, files)
    assert not (out / "state.pt").exists() and not (out / "log.jsonl").exists()
    (out / "log.jsonl").write_text("new log\n")  # the new run's first lines, then it fails
    checkpoint.restore(aside, files)
    assert (out / "state.pt").read_text() == "old state" and (out / "log.jsonl").read_text() == "old log\n"
    assert not aside.exists()
    aside = checkpoint.set_aside(out, files)
    (out / "state.pt").write_text("new state")  # the new run's first checkpoint
    checkpoint.settle(aside)
    checkpoint.restore(aside, files)  # nothing left to restore
    assert (out / "state.pt").read_text() == "new state" and not (out / "log.jsonl").exists()


def test_a_killed_overwrite_is_recovered_by_the_next_claim(tmp_path, capsys):
    files = ("state.pt", "final.bin")
    out = tmp_path / "run"
    out.mkdir()
    (out / "final.bin").write_text("old weights")
    checkpoint.set_aside(out, files)  # then a kill -9 before any checkpoint
    checkpoint.claim(out, files, "final.bin", resume=False, overwrite=True)
    assert (out / "final.bin").read_text() == "old weights" and not (out / checkpoint.REPLACED).exists()
    assert "back in place" in capsys.readouterr().out
    checkpoint.set_aside(out, files)
    (out / "state.pt").write_text("new state")  # killed after the new run's first checkpoint
    checkpoint.claim(out, files, "final.bin", resume=True, overwrite=False)
    assert not (out / "final.bin").exists() and (out / "state.pt").read_text() == "new state"
    assert not (out / checkpoint.REPLACED).exists()


def test_two_writers_of_one_path_use_their_own_temporary_files(tmp_path):
    target = tmp_path / "out.bin"
    seen = []

    def first(tmp):  # while the first writes, a second writer writes the same path to completion
        seen.append(tmp)
        checkpoint.write_atomic(target, lambda t2: (seen.append(t2), Path(t2).write_bytes(b"second")))
        Path(tmp).write_bytes(b"first")
    checkpoint.write_atomic(target, first)
    assert seen[0] != seen[1] and target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left


def test_state_round_trip_and_changed_settings(tmp_path):
    w = {"a": torch.randn(3)}
    opt = torch.optim.AdamW([torch.nn.Parameter(w["a"].clone())])
    g = torch.Generator().manual_seed(3)
    checkpoint.save_state(tmp_path / "s.pt", 7, w, opt, g, {"lr": 1e-3, "steps": 10}, t_bins=[[0.0, 0]])
    state = checkpoint.load_state(tmp_path / "s.pt", ["a"], extra=("t_bins",))
    assert state["step"] == 7 and torch.equal(state["weights"]["a"], w["a"]) and state["settings"]["lr"] == 1e-3
    with pytest.raises(ValueError, match="other trainable weights"):
        checkpoint.load_state(tmp_path / "s.pt", ["b"])
    assert checkpoint.changed_settings({"lr": 1e-3, "steps": 10}, {"lr": 2e-3, "steps": 20}, ("steps",)) == \
        ["--lr 0.001 -> 0.002"]


def test_the_resume_command_is_the_one_used(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--stage", "joint", "--resume"])
    assert checkpoint.resume_command("train.py", 1) == "python train.py --stage joint --resume"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert checkpoint.resume_command("train.py", 4) == "torchrun --nproc_per_node 4 train.py --stage joint --resume"
    monkeypatch.setattr(sys, "argv", ["train.py", "--out", "my runs/j 1", "--overwrite"])  # quoted for the shell
    assert checkpoint.resume_command("train.py", 1) == "python train.py --out 'my runs/j 1' --resume"


def test_trim_log_drops_lines_past_the_state(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    checkpoint.trim_log(log, 2)
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [1, 2]


def test_trim_log_drops_a_partial_last_line(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')  # a full disk cut the last line short
    checkpoint.trim_log(log, 5)
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [1]
    assert "dropped 1 unreadable line" in capsys.readouterr().out


def test_numbered_copies_keep_the_newest_k_by_number_and_nothing_else_goes(tmp_path):
    weights = tmp_path / "latest.safetensors"
    save_atomic({"w": torch.ones(2)}, weights, {"config": "{}"})
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")  # not a numbered checkpoint: never touched
    for step in (999_998, 999_999, 1_000_000, 1_000_001):  # numbers, not names, say which is newest
        path = checkpoint.write_numbered(weights, folder, step, keep=2)
        assert path.read_bytes() == weights.read_bytes() and read_metadata(path) == {"config": "{}"}
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "step_1000000.safetensors",
                                                         "step_1000001.safetensors"]
    for step in (6, 7, 8):
        checkpoint.write_numbered(weights, folder, step, keep=0)  # 0: every one stays
    assert len(list(folder.glob("step_*.safetensors"))) == 5
    assert not list(folder.glob(".*.tmp"))  # written by rename


def test_an_overwrite_puts_back_a_folder_of_checkpoints_and_refuses_an_init_inside_it(tmp_path):
    files = ("state.pt", "checkpoints")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_000002.safetensors").write_text("old")
    (out / "state.pt").write_text("old state")
    with pytest.raises(ValueError, match="checkpoints is or holds the file this run starts from"):
        checkpoint.claim(out, files, "final.bin", resume=False, overwrite=True,
                         keep=(str(out / "checkpoints" / "step_000002.safetensors"),))
    aside = checkpoint.set_aside(out, files)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step_000001.safetensors").write_text("new")  # the new run's, then it fails
    checkpoint.restore(aside, files)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002.safetensors"]
    assert (out / "state.pt").read_text() == "old state" and not aside.exists()
