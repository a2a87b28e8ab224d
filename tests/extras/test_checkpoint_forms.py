"""extras/checkpoint_forms.py: every form of the FLUX transformer checkpoint users have, each built in its exact
layout from one set of random weights and loaded to the same model as the official file: prefixes, ComfyUI's
all-in-one checkpoint, scaled fp8 (both ComfyUI forms), diffusers' sharded folder, its index, a snapshot, one file.
BFL's own file is the core's (checkpoint.load_flux_official; tests/core/test_checkpoint.py): load_flux hands it
that case."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from checkpoint import CheckpointError, load_flux_official, read_safetensors
from conftest import kontext_batch, small_flux_params
from extras import checkpoint_forms, fp8
from extras.checkpoint_forms import detect_preset, load_flux
from extras.fp8 import quantize
from flux_model import PRESETS, Flux
from tools import bench

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


def test_the_official_file_is_loaded_by_the_core_loader(tmp_path, official, capsys):
    """load_flux hands BFL's own file to checkpoint.load_flux_official: the same tensors, dtypes and output, and no
    info line (nothing non-official was done)."""
    sd, reference = official
    assert not capsys.readouterr().out
    assert_same_model(load_flux_official(tmp_path / "official.safetensors", FLUX, dtype=torch.float32), reference)
    a = load_flux(tmp_path / "official.safetensors", FLUX, base_dtype="bf16").state_dict()
    b = load_flux_official(tmp_path / "official.safetensors", FLUX, dtype=torch.bfloat16).state_dict()
    assert set(a) == set(b) and all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


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


def test_load_accepts_comfy_prefix(tmp_path, small_params):
    params = small_params()
    sd = bench.random_weights(params)
    path = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(path))
    model = load_flux(path, params, dtype=torch.float32)
    assert torch.equal(model.img_in.weight, sd["img_in.weight"])


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
                hint = checkpoint_forms._flux_hint(PRESETS[chosen])(missing, unexpected, [])
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
