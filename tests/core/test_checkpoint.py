"""checkpoint.py: truncated/corrupt files are refused by name, strict loading lists every bad key, writes are
atomic, and a fuzz test over the safetensors header/metadata parser finds no crash other than CheckpointError.
Then every form of the FLUX transformer checkpoint users have (flux_loading.load_flux), each built in its exact
layout from one set of random weights and loaded to the same model as the official file: prefixes, ComfyUI's
all-in-one checkpoint, scaled fp8 (both ComfyUI forms), diffusers' sharded folder, its index, a snapshot, one file."""

import json
import os
import pickle
import re
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from safetensors.torch import save_file
from torch import nn

import checkpoint
from checkpoint import (CheckpointError, check_keys, read_header, read_metadata, read_safetensors, load_strict,
                        save_atomic, save_torch_atomic, load_torch_state, strip_prefix, read_sharded, header_keys,
                        split_prefix)


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
# Every form of the FLUX transformer checkpoint (flux_loading.load_flux)

from tools import bench  # noqa: E402
from extras import checkpoint_forms as flux_loading  # noqa: E402
from extras import fp8  # noqa: E402
from conftest import kontext_batch, small_flux_params  # noqa: E402
from extras.checkpoint_forms import detect_preset, load_flux  # noqa: E402
from flux_model import PRESETS, Flux  # noqa: E402
from extras.fp8 import quantize  # noqa: E402

FLUX = small_flux_params()  # hidden 64, 2 double + 2 single blocks, guidance (a dev-like model)


def flux_weights(params=FLUX, seed=0) -> dict[str, torch.Tensor]:
    return bench.random_weights(params, seed)


def linear_names(params=FLUX) -> set[str]:
    with torch.device("meta"):
        return {n for n, m in Flux(params).named_modules() if isinstance(m, nn.Linear)}


def velocity(model, params=FLUX) -> torch.Tensor:
    x = kontext_batch(params)
    x.pop("semantic")
    with torch.no_grad():
        return model(**x)


def assert_same_model(model, reference):
    """The same tensors under the same official names, and so the same output."""
    a, b = model.state_dict(), reference.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(velocity(model), velocity(reference))


@pytest.fixture
def official(tmp_path):
    """(weights, the model loaded from the official single file, fp32)."""
    sd = flux_weights()
    save_file(sd, str(tmp_path / "official.safetensors"))
    return sd, load_flux(tmp_path / "official.safetensors", FLUX, dtype=torch.float32)


@pytest.mark.parametrize("vae,text", [("vae.", "text_encoders."), ("first_stage_model.", "cond_stage_model.")])
def test_a_comfy_all_in_one_checkpoint_loads_its_transformer_and_says_what_it_left_out(tmp_path, official, capsys,
                                                                                        vae, text):
    sd, reference = official
    g = torch.Generator().manual_seed(3)
    others = {f"{vae}decoder.conv_out.weight": torch.randn(3, 4, 3, 3, generator=g),
              f"{vae}decoder.conv_out.bias": torch.randn(3, generator=g),
              f"{text}clip_l.transformer.text_model.final_layer_norm.weight": torch.randn(8, generator=g)}
    path = tmp_path / "flux1-dev-fp16-all-in-one.safetensors"
    save_file({**{"model.diffusion_model." + k: v for k, v in sd.items()}, **others}, str(path))
    capsys.readouterr()
    assert_same_model(load_flux(path, FLUX, dtype=torch.float32), reference)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "all-in-one" in lines[0]
    assert f"{len(sd)} tensors under model.diffusion_model." in lines[0]
    assert f"{vae}* (2 tensors)" in lines[0] and f"{text}* (1 tensors)" in lines[0]
    assert detect_preset(path) == "dev"
    # strict still: a key outside the transformer prefix and outside the known parts is named
    save_file({**{"model.diffusion_model." + k: v for k, v in sd.items()}, **others, "stray.weight": torch.ones(1)},
              str(path))
    with pytest.raises(CheckpointError, match="1 unexpected: stray.weight"):
        load_flux(path, FLUX, dtype=torch.float32)


def test_a_file_of_other_pipeline_parts_only_is_named(tmp_path):
    save_file({"vae.decoder.conv_out.bias": torch.ones(3), "text_encoders.t5xxl.shared.weight": torch.ones(2, 2)},
              str(tmp_path / "parts.safetensors"))
    with pytest.raises(CheckpointError, match="other parts of a pipeline .*no transformer"):
        load_flux(tmp_path / "parts.safetensors", FLUX, dtype=torch.float32)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_prefixed_single_files_load(tmp_path, official, prefix):
    sd, reference = official
    save_file({prefix + k: v for k, v in sd.items()}, str(tmp_path / "prefixed.safetensors"))
    assert_same_model(load_flux(tmp_path / "prefixed.safetensors", FLUX, dtype=torch.float32), reference)


def scaled_fp8_file(path, sd: dict, form: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`sd` written as ComfyUI writes scaled fp8, every Linear in fp8 (the outer ones too) with:
      scale_weight   `.scale_weight` fp32 scalar + a calibrated `.scale_input` + the `scaled_fp8` marker (dtype
                     float8_e4m3fn, shape [0]), biases fp8 unscaled, norm scales bf16: the layout of
                     comfyanonymous/flux_dev_scaled_fp8_test
      comfy_quant    `.weight_scale` fp32 scalar + `.comfy_quant` (the JSON bytes) + `.input_scale` 1.0
      rowwise        `.weight_scale` [out, 1] + `.comfy_quant` "float8_e4m3fn_rowwise"
    Returns the official-layout dict those tensors stand for (fp8 * scale, the rest upcast), in fp32."""
    out, meant = {}, {}
    linears = linear_names()
    quant = {"comfy_quant": "float8_e4m3fn", "rowwise": "float8_e4m3fn_rowwise"}.get(form)
    for k, v in sd.items():
        layer, _, kind = k.rpartition(".")
        if layer in linears and kind == "weight":
            q, s = quantize(v, "row" if form == "rowwise" else "tensor")
            out[k], meant[k] = q, q.float() * (s[:, None] if s.ndim else s)
            if form == "scale_weight":
                out[f"{layer}.scale_weight"], out[f"{layer}.scale_input"] = s, torch.tensor(0.37)
            else:
                out[f"{layer}.weight_scale"] = s[:, None] if s.ndim else s
                out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": quant}).encode()),
                                                           dtype=torch.uint8)
                if form == "comfy_quant":
                    out[f"{layer}.input_scale"] = torch.tensor(1.0)
        elif layer in linears:  # a bias: fp8, no scale
            out[k] = v.to(torch.float8_e4m3fn)
            meant[k] = out[k].float()
        else:
            out[k] = v.to(torch.bfloat16)
            meant[k] = out[k].float()
    if form == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file({prefix + k: v for k, v in out.items()}, str(path))
    return meant


@pytest.mark.parametrize("form", ["scale_weight", "comfy_quant", "rowwise"])
def test_comfy_scaled_fp8_loads_with_its_scales_applied(tmp_path, capsys, form):
    """weight = fp8 weight * scale, upcast (base_dtype None) or kept in fp8 (base_dtype fp8): both equal the
    official file of the weights it stands for. The input scales are ignored, and the info line says so."""
    meant = scaled_fp8_file(tmp_path / "scaled.safetensors", flux_weights(), form,
                            prefix="model.diffusion_model." if form == "scale_weight" else "")
    save_file(meant, str(tmp_path / "meant.safetensors"))
    reference = load_flux(tmp_path / "meant.safetensors", FLUX, dtype=torch.float32)
    capsys.readouterr()
    assert_same_model(load_flux(tmp_path / "scaled.safetensors", FLUX, dtype=torch.float32), reference)
    line = capsys.readouterr().out
    assert ("ComfyUI scaled fp8" if form == "scale_weight" else "comfy_quant") in line
    assert ("input scales ignored" in line) == (form != "rowwise")
    kept = load_flux(tmp_path / "scaled.safetensors", FLUX, dtype=torch.float32, base_dtype="fp8")
    qkv = kept.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == ((192,) if form == "rowwise" else ())
    # the stored weights stand exactly for the reference's; the outputs agree to float rounding (a GEMM over a
    # freshly upcast weight may take another blocking than over a loaded one when threads split it)
    assert torch.equal(fp8.dequantize(qkv.weight, qkv.weight_scale, torch.float32),
                       reference.double_blocks[0].img_attn.qkv.weight)
    torch.testing.assert_close(velocity(kept), velocity(reference), rtol=1e-6, atol=1e-6)
    assert detect_preset(tmp_path / "scaled.safetensors") == "dev"


def test_quantized_files_this_loader_cannot_read_are_refused_naming_the_problem(tmp_path):
    sd = flux_weights()
    path = tmp_path / "q.safetensors"
    meant = scaled_fp8_file(path, sd, "comfy_quant")
    base = dict(read_safetensors(path))

    def refused(changes: dict, match: str):
        save_file({**base, **changes}, str(path))
        with pytest.raises(CheckpointError, match=match):
            load_flux(path, FLUX, dtype=torch.float32)

    nvfp4 = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    refused({"img_in.comfy_quant": nvfp4}, r"stored as nvfp4 \(e\.g\. img_in\)")
    refused({"img_in.weight_scale": torch.ones(64, 4)}, "only per-tensor and per-row scales")  # block-wise [out, in/16]
    refused({"img_in.weight": meant["img_in.weight"].bfloat16()}, "a scale belongs to an fp8 weight")
    refused({"double_blocks.0.img_attn.qkv.weight_scale_2": torch.ones(())},
            "(?s)1 unexpected: double_blocks.0.img_attn.qkv.weight_scale_2.*quantization tensors of a format")
    refused({"img_in.input_scale": torch.ones(3)}, "an input scale is one number")


def test_key_hints_never_suggest_the_preset_already_chosen():
    """The hint said "use --preset dev" while loading as dev (a scaled file's guidance_in.*.scale_weight keys looked
    like guidance_in). Over every official preset's keys loaded as every preset, with and without stray
    quantization keys on guidance_in: a hint never names the chosen preset, and the guidance hints point the right
    way."""
    def keys(name):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in Flux(PRESETS[name]).state_dict().items()}
    stray = {"guidance_in.in_layer.weight_scale_2": (), "guidance_in.in_layer.scale_weight": ()}
    for chosen in ("dev", "schnell", "kontext"):
        model = keys(chosen)
        for file_preset in ("dev", "schnell", "kontext"):
            for extra in ({}, stray):
                found = {**keys(file_preset), **extra}
                missing, unexpected = set(model) - set(found), set(found) - set(model)
                hint = flux_loading._flux_hint(PRESETS[chosen])(missing, unexpected, [])
                assert f"--preset {chosen}" not in hint, (chosen, file_preset, extra, hint)
                if not extra and PRESETS[file_preset].guidance_embed != PRESETS[chosen].guidance_embed:
                    assert ("--preset schnell" if file_preset == "schnell" else "--preset dev or kontext") in hint
                    assert chosen in hint  # names the preset it compared with
                if extra:
                    assert "quantization tensors" in hint


def diffusers_snapshot(tmp_path, sd, params=FLUX, shard: str | None = "100KB"):
    """What a Hugging Face snapshot of FLUX.1-Kontext-dev holds under transformer/ (config.json, the shards and their
    index), written by diffusers' own save_pretrained from our weights through diffusers' own converter."""
    folder = tmp_path / "snapshot" / "transformer"
    model = bench.build_diffusers(params, sd)
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("given", ["folder", "index", "snapshot", "one-file"])
def test_a_diffusers_transformer_loads_converted_to_the_official_names(tmp_path, official, capsys, given):
    sd, reference = official
    folder = diffusers_snapshot(tmp_path, sd, shard=None if given == "one-file" else "100KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert (len(shards) == 1) == (given == "one-file")
    path = {"folder": folder, "index": folder / "diffusion_pytorch_model.safetensors.index.json",
            "snapshot": folder.parent, "one-file": folder / "diffusion_pytorch_model.safetensors"}[given]
    capsys.readouterr()
    assert_same_model(load_flux(path, FLUX, dtype=torch.float32), reference)
    assert "diffusers-format FluxTransformer2DModel" in capsys.readouterr().out
    assert detect_preset(path) == "dev"
    kept = load_flux(path, FLUX, dtype=torch.float32, base_dtype="fp8")  # bf16 / fp32 shards quantized at load
    assert kept.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn


def test_a_diffusers_transformer_of_another_preset_is_named_in_its_own_key_names(tmp_path):
    sd = flux_weights(small_flux_params(guidance=False))
    folder = diffusers_snapshot(tmp_path, sd, small_flux_params(guidance=False))
    with pytest.raises(CheckpointError) as e:
        load_flux(folder, FLUX, dtype=torch.float32)
    msg = str(e.value)
    assert "diffusers-format" in msg and "time_text_embed.guidance_embedder.linear_1.weight" in msg
    assert "--preset schnell" in msg
    assert detect_preset(folder) == "schnell"


def test_a_snapshot_folder_of_several_files_names_the_file_to_give(tmp_path, official):
    sd, _ = official
    folder = diffusers_snapshot(tmp_path, sd)
    root = folder.parent
    save_file(sd, str(root / "flux1-kontext-dev.safetensors"))
    save_file({"decoder.conv_out.bias": torch.ones(3)}, str(root / "ae.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 safetensors files \(ae.safetensors, flux1-kontext-dev.safetensors\)"
                                              r".*the transformer's own file or its transformer/ folder"):
        load_flux(root, FLUX, dtype=torch.float32)
    load_flux(root / "flux1-kontext-dev.safetensors", FLUX, dtype=torch.float32)
