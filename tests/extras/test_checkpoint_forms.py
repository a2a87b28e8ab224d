"""extras/checkpoint_forms.py: every form of the FLUX transformer checkpoint users have, each built in its exact
layout from one set of random weights and loaded to the same model as the official file: prefixes, ComfyUI's
all-in-one checkpoint, scaled fp8 (both ComfyUI forms), diffusers' sharded folder, its index, a snapshot, one file.
BFL's own file is the core's (checkpoint.load_flux_official; tests/core/test_checkpoint.py): load_flux hands it
that case."""

import json
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import checkpoint
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
    like guidance_in; and there is no --preset flag: the commands read the preset from the file's keys). Over every
    official preset's keys loaded as every preset, with and without stray quantization keys on guidance_in: a hint
    never names the chosen preset, and the guidance hints point the right way."""
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
                assert f"params='{chosen}'" not in hint and "--preset" not in hint, (chosen, file_preset, extra, hint)
                if not extra and PRESETS[file_preset].guidance_embed != PRESETS[chosen].guidance_embed:
                    assert ("params='schnell'" if file_preset == "schnell" else "params='dev'") in hint
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
    assert "params='schnell'" in msg and "--preset" not in msg
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


def reshard(folder, dest, n: int, dtype=torch.bfloat16) -> dict[str, int]:
    """The one-file diffusers transformer in `folder` written to `dest` in `dtype` as n shards and their index. The
    parts of each official tensor are dealt round robin, from a shard that moves on per tensor: to_q, to_k, to_v
    (and a single block's proj_mlp) of one layer land in different shards. Returns {key: shard}."""
    sd = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    where = {d: (i + j) % n for i, parts in enumerate(diffusers_parts_by_official().values())
             for j, d in enumerate(parts)}
    assert set(where) == set(sd)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    dest.mkdir(parents=True)
    for i, name in enumerate(names):
        save_file({k: v.to(dtype) for k, v in sd.items() if where[k] == i}, str(dest / name))
    index = {"metadata": {}, "weight_map": {k: names[i] for k, i in where.items()}}
    (dest / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return where


def diffusers_parts_by_official(params=FLUX) -> dict[str, list[str]]:
    with torch.device("meta"):
        plan = checkpoint_forms._diffusers_plan(Flux(params))
    return {key: [d for d, _ in parts] for key, parts in plan.items()}


@pytest.fixture
def sharded(tmp_path, official):
    """(the weights, a bf16 diffusers folder of 3 shards, {diffusers key: shard}, the official file in bf16): q, k
    and v of an attention, and q, k, v and mlp of a single block's linear1, each in all three shards."""
    sd, _ = official
    one = diffusers_snapshot(tmp_path, sd, shard=None)
    where = reshard(one, tmp_path / "sharded", 3)
    parts = diffusers_parts_by_official()
    for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"):
        assert {where[d] for d in parts[key]} == {0, 1, 2}, key
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / "official-bf16.safetensors"))
    return sd, tmp_path / "sharded", where, tmp_path / "official-bf16.safetensors"


def uint8(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("base_dtype", ["fp8", "bf16", None])
def test_a_sharded_diffusers_folder_converts_shard_by_shard_to_exactly_the_one_shot_result(tmp_path, sharded,
                                                                                          base_dtype):
    """Read a shard at a time, with the parts of one layer in different shards: the same tensors, bit for bit, as the
    same weights from one diffusers file (every part at hand at once) and from the official file; quantized at load
    for base_dtype fp8 (the official file's fp8 load quantizes its bf16 weights the same way)."""
    sd, folder, _, official_bf16 = sharded
    one = tmp_path / "one"
    reshard(diffusers_snapshot(tmp_path / "again", sd, shard=None), one, 1)
    kw = dict(dtype=torch.float32, base_dtype=base_dtype)
    models = [load_flux(p, FLUX, **kw) for p in (folder, one, official_bf16)]
    states = [m.state_dict() for m in models]
    assert set(states[0]) == set(states[1]) == set(states[2])
    for k in states[0]:
        a, b, c = (st[k] for st in states)
        assert a.dtype == b.dtype == c.dtype and torch.equal(uint8(a), uint8(b)) and torch.equal(uint8(a), uint8(c)), k
    qkv = models[0].double_blocks[0].img_attn.qkv.weight
    assert qkv.dtype == {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, None: torch.float32}[base_dtype]


def test_a_sharded_diffusers_folder_loaded_as_fp8_holds_one_shard_and_the_converted_tensors_at_most(sharded,
                                                                                                   monkeypatch):
    """base_dtype fp8 over a bf16 folder (the whole bf16 model was held until it was quantized). Every tensor read
    from a shard is watched (weakrefs, through a wrapper around the shard reader). When a shard is read, the tensors
    still alive from the earlier ones are parts of layers not yet complete (another part is in this shard or a later
    one), nothing else: the loader holds one shard's tensors, those waiting parts and the converted model, never the
    whole file. After the load no tensor of the file is alive (every converted one is new: fp8 weights, fp32
    biases and norms). A loader that read every shard before converting fails both. (Loaded in its own dtype, a
    file's tensors ARE the result: no property to check.)"""
    _, folder, where, _ = sharded
    owner = {d: key for key, parts in diffusers_parts_by_official().items() for d in parts}
    last = {key: max(where[d] for d, k in owner.items() if k == key) for key in set(owner.values())}
    reads, waiting = [], []
    real = checkpoint.read_safetensors

    def watched(path, *args, **kwargs):
        shard = len(reads)
        alive = [k for refs in reads for k, r in refs.items() if r() is not None]  # from the earlier shards
        assert all(last[owner[k]] >= shard for k in alive), [k for k in alive if last[owner[k]] < shard]
        waiting.append(len(alive))
        out = real(path, *args, **kwargs)
        reads.append({k: weakref.ref(t) for k, t in out.items()})
        return out

    monkeypatch.setattr(checkpoint, "read_safetensors", watched)
    monkeypatch.setattr(checkpoint_forms, "read_safetensors", watched)
    model = load_flux(folder, FLUX, dtype=torch.float32, base_dtype="fp8")
    assert len(reads) == 3 and sum(len(r) for r in reads) == len(where)  # each shard read once, every tensor
    assert waiting[0] == 0 and all(n > 0 for n in waiting[1:])  # split layers' parts did wait for their last part
    assert all(r() is None for refs in reads for r in refs.values())
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
