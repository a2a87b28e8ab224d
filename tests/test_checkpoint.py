"""checkpoint.py: truncated/corrupt files are refused by name, strict loading lists every bad key, writes are
atomic, and a fuzz test over the safetensors header/metadata parser finds no crash other than CheckpointError."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from safetensors.torch import save_file
from torch import nn

from checkpoint import (CheckpointError, check_keys, read_header, read_metadata, read_safetensors, load_strict,
                        save_atomic, strip_prefix, read_sharded)


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
    import checkpoint

    def crash(*a, **k):
        raise KeyboardInterrupt  # a kill in the middle of writing
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(read_safetensors(path)["a"], torch.ones(2))  # the previous file is intact


def test_prefix_and_shards(tmp_path):
    assert strip_prefix({"m.a": 1, "m.b": 2}, "m.") == {"a": 1, "b": 2}
    assert strip_prefix({"m.a": 1, "b": 2}, "m.") == {"m.a": 1, "b": 2}
    save_file({"x": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"y": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors", "z": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="absent from the shards"):
        read_sharded(tmp_path)


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
