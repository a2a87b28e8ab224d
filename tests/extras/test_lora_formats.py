"""extras/lora_formats.py: LoRA files: our layout round trip and strength, and parity with diffusers' own loaders (PEFT
layout, kohya layout through diffusers' kohya converter, PEFT-trained files with a distinct A per q/k/v), the BFL <->
diffusers name table checked against diffusers' model, clear errors for foreign files, text-encoder tensors skipped
and counted, a file applied on top of a model (merged, or stacked beside a LoRA), and a run's exports (bf16 by
default, the sampling settings in their metadata, the model card)."""

import inspect

import pytest
import torch
from safetensors.torch import save_file

from tools import bench
from conftest import small_flux_params
from lora import DEFAULT_TARGETS, inject_lora, merge_lora, unmerge_lora, lora_modules, base_linears
from extras.lora_formats import (add_lora_file, diffusers_parts, load_lora, merge_lora_file, read_lora, save_lora)
from checkpoint import CheckpointError, read_metadata, read_safetensors
from flux_model import Flux
from pipeline import SAMPLING_DEFAULTS
from tests.core.test_lora import PARAMS, base_model, make_inputs, run, randomize_lora, base_weights


def run_diffusers(ref, x) -> torch.Tensor:
    with torch.no_grad():  # diffusers takes 2-D ids shared across the batch
        return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                   timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                   guidance=x["guidance"], return_dict=False)[0]


def assert_close_to(out, expected):
    scale = expected.abs().max().item()
    assert scale > 0.1, "reference output is degenerate: the comparison would prove nothing"
    err = (out - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"max abs diff {err:.3g} (output scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------------------------
# Our layout: exact round trip, strength, a file of another rank

def test_ours_round_trip_is_exact_and_strength_scales(tmp_path):
    model, x = base_model(), make_inputs()
    inject_lora(model, rank=3, alpha=5)
    randomize_lora(model)
    save_lora(model, tmp_path / "ours.safetensors", metadata={"trigger": "infrared"})
    assert read_metadata(tmp_path / "ours.safetensors")["trigger"] == "infrared"
    fresh = base_model()
    names = load_lora(fresh, tmp_path / "ours.safetensors")  # injects with the file's rank and alpha
    assert set(names) == set(lora_modules(model))
    assert fresh.double_blocks[0].img_attn.qkv.alpha == 5 and fresh.double_blocks[0].img_attn.qkv.rank == 3
    assert torch.equal(run(fresh, x), run(model, x))

    half = base_model()
    load_lora(half, tmp_path / "ours.safetensors", strength=0.5)
    full_delta = model.single_blocks[0].linear1.delta_weight()
    torch.testing.assert_close(half.single_blocks[0].linear1.delta_weight(), 0.5 * full_delta)


def test_file_with_another_rank_into_injected_model_gets_a_hint(tmp_path):
    src = base_model()
    inject_lora(src, rank=2)
    save_lora(src, tmp_path / "r2.safetensors", format="kohya")
    target = base_model()
    inject_lora(target, rank=4)
    with pytest.raises(CheckpointError, match=r"(?s)lora_A.weight \(file \(2, 64\), model \(4, 64\)\).*without LoRA"):
        load_lora(target, tmp_path / "r2.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers' own LoRA loading

def diffusers_model(params, base_sd):
    """diffusers' FluxTransformer2DModel on the same weights, converted by diffusers' own converter."""
    return bench.build_diffusers(params, base_sd).eval()


def diffusers_with_lora(params, base_sd, path):
    """diffusers' FluxTransformer2DModel with the file loaded by FluxPipeline's own LoRA loader (no pipeline)."""
    from diffusers import FluxPipeline
    ref = diffusers_model(params, base_sd)
    state, alphas, metadata = FluxPipeline.lora_state_dict(str(path.parent), weight_name=path.name,
                                                           return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=ref, metadata=metadata)
    return ref


def peft_layers(ref) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return sum(isinstance(m, BaseTunerLayer) for m in ref.modules())


@pytest.mark.parametrize("targets,modulation,rank,alpha", [
    (DEFAULT_TARGETS, False, 4, 8),
    ((r".*",), True, 2, 3),  # every Linear: embedders, modulation, final layer (its adaLN halves are swapped)
], ids=["default-targets", "every-linear"])
def test_diffusers_layout_parity(tmp_path, targets, modulation, rank, alpha):
    base_sd, x = bench.random_weights(PARAMS), make_inputs()
    model = base_model()
    names = inject_lora(model, rank=rank, alpha=alpha, targets=targets, include_modulation=modulation)
    randomize_lora(model)
    path = tmp_path / "diffusers.safetensors"
    save_lora(model, path, format="diffusers")
    ref = diffusers_with_lora(PARAMS, base_sd, path)
    # fused qkv -> 3 layers, linear1 -> 4: every file layer became a PEFT layer (diffusers only warns otherwise)
    n_qkv = sum(n.endswith("qkv") for n in names)
    n_linear1 = sum(n.endswith("linear1") for n in names)
    assert peft_layers(ref) == len(names) + 2 * n_qkv + 3 * n_linear1
    expected = run_diffusers(ref, x)
    assert (expected - run_diffusers(diffusers_model(PARAMS, base_sd), x)).abs().max() > 1e-2  # sensitive
    assert_close_to(run(model, x), expected)

    back = base_model()
    load_lora(back, path)  # parts that share one A come back at rank r, not 3r
    assert back.double_blocks[0].img_attn.qkv.rank == rank and back.single_blocks[0].linear1.rank == rank
    assert_close_to(run(back, x), expected)


def kohya_converter(params):
    """diffusers' own kohya -> diffusers converter; it hard-codes the single-block linear1 split for width 3072,
    so that one value is patched for small widths (as tests/test_flux_model.py does for the transformer)."""
    from diffusers.loaders import lora_conversion_utils as lcu
    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    assert "dims=[3072, 3072, 3072, 12288]" in src
    D, mlp = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    ns = dict(vars(lcu))
    exec(src.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{D}, {D}, {D}, {mlp}]"), ns)
    return ns["_convert_kohya_flux_lora_to_diffusers"]


def test_kohya_layout_round_trip_and_diffusers_converter(tmp_path):
    from diffusers import FluxPipeline
    base_sd, x = bench.random_weights(PARAMS), make_inputs()
    model = base_model()
    inject_lora(model, rank=4, alpha=8, include_modulation=True)
    randomize_lora(model)
    path = tmp_path / "kohya.safetensors"
    save_lora(model, path, format="kohya")
    file = read_safetensors(path)
    assert file["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 8
    assert file["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * 64 + 256, 4)

    fresh = base_model()
    inject_lora(fresh, rank=4, alpha=1, include_modulation=True)  # alpha is taken from the file
    load_lora(fresh, path)
    merge_lora(model), merge_lora(fresh)
    for k, v in base_weights(model).items():
        assert torch.equal(base_weights(fresh)[k], v), k
    unmerge_lora(model)

    ref = diffusers_model(PARAMS, base_sd)
    converted = kohya_converter(PARAMS)(dict(file))  # folds alpha/r into lora_A/lora_B
    FluxPipeline.load_lora_into_transformer(converted, network_alphas=None, transformer=ref)
    assert peft_layers(ref) == len(converted) // 2
    assert_close_to(run(model, x), run_diffusers(ref, x))


def test_peft_trained_file_with_distinct_A_loads_exactly(tmp_path):
    """A file written by diffusers' own training path (PEFT adapter on FluxTransformer2DModel, save_lora_weights with
    its adapter metadata): q, k, v have different A's, proj_mlp is not trained. Ours holds it exactly as a rank-3r
    LoRA on the fused layers; re-saved (now with mixed ranks), diffusers reads it back to the same output."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    base_sd, x = bench.random_weights(PARAMS), make_inputs()
    ref = diffusers_model(PARAMS, base_sd)
    torch.manual_seed(3)
    targets = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2"]  # diffusers' train_dreambooth_lora_flux.py defaults
    ref.add_adapter(LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=targets))  # random A, B
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict(),
                                   weight_name="peft.safetensors")
    expected = run_diffusers(ref, x)
    assert (expected - run_diffusers(diffusers_model(PARAMS, base_sd), x)).abs().max() > 1e-2

    model = base_model()
    load_lora(model, tmp_path / "peft.safetensors")
    qkv, linear1 = model.double_blocks[1].txt_attn.qkv, model.single_blocks[0].linear1
    assert (qkv.rank, linear1.rank, model.double_blocks[0].img_attn.proj.rank) == (6, 6, 2)
    assert qkv.scale == pytest.approx(1.5)
    assert not linear1.delta_weight()[3 * 64:].any()  # the MLP rows (proj_mlp was not trained) stay zero
    assert_close_to(run(model, x), expected)

    save_lora(model, tmp_path / "resaved.safetensors", format="diffusers")
    assert_close_to(run_diffusers(diffusers_with_lora(PARAMS, base_sd, tmp_path / "resaved.safetensors"), x),
                    expected)


# ---------------------------------------------------------------------------------------------------------------
# A file on top of a model that has a LoRA of its own: merged, or stacked beside it

def test_a_file_on_top_merged_or_stacked_gives_the_same_output(tmp_path):
    """A kohya file (rank 2, alpha 5) at scale 0.7 on a model with its own LoRA (rank 3): merged into the base
    weights, or stacked with the own LoRA into one rank-5 branch (the base weights untouched), the same output; an
    fp8 base refuses the merge before any layer changes."""
    import copy
    from extras.fp8 import quantize_
    src = base_model()
    inject_lora(src, rank=2, alpha=5)
    randomize_lora(src, seed=4)
    save_lora(src, tmp_path / "file.safetensors", format="kohya")
    own, x = base_model(), make_inputs()
    inject_lora(own, rank=3, alpha=4)
    randomize_lora(own)
    merged, stacked = copy.deepcopy(own), copy.deepcopy(own)
    merge_lora_file(merged, read_lora(merged, tmp_path / "file.safetensors"), 0.7)
    add_lora_file(stacked, read_lora(stacked, tmp_path / "file.safetensors"), 0.7)
    qkv = stacked.double_blocks[0].img_attn.qkv
    assert (qkv.rank, qkv.scale) == (5, 1.0) and torch.equal(qkv.weight, own.double_blocks[0].img_attn.qkv.weight)
    assert (run(merged, x) - run(own, x)).abs().max() > 1e-2  # the file acts
    assert_close_to(run(stacked, x), run(merged, x))

    quantize_(own)
    before = {k: v.clone() for k, v in own.state_dict().items()}
    with pytest.raises(ValueError, match="cannot merge into 20 layers .*fp8"):
        merge_lora_file(own, read_lora(own, tmp_path / "file.safetensors"), 0.7)
    assert all(torch.equal(v, own.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------------------------
# The BFL <-> diffusers name table

def test_diffusers_parts_names_every_linear_of_diffusers_model():
    """Every Linear of our FLUX maps onto Linears of diffusers' FluxTransformer2DModel with the same input width,
    whose output rows add up to ours: the table is checked against diffusers itself."""
    ref = dict(diffusers_model(PARAMS, bench.random_weights(PARAMS)).named_modules())
    covered = set()
    for name, lin in base_linears(base_model()).items():
        parts = diffusers_parts(name, lin.in_features, lin.out_features)
        assert parts is not None, name
        assert sum(rows for _, rows in parts) == lin.out_features, name
        for dname, rows in parts:
            theirs = ref[dname]
            assert (theirs.in_features, theirs.out_features) == (lin.in_features, rows), (name, dname)
            covered.add(dname)
    assert covered == {n for n, m in ref.items() if isinstance(m, torch.nn.Linear)}
    D = PARAMS.hidden_size
    assert diffusers_parts("single_blocks.1.linear1", D, 7 * D) == [
        ("single_transformer_blocks.1.attn.to_q", D), ("single_transformer_blocks.1.attn.to_k", D),
        ("single_transformer_blocks.1.attn.to_v", D), ("single_transformer_blocks.1.proj_mlp", 4 * D)]
    assert diffusers_parts("semantic.proj", D, D) is None and diffusers_parts("double_blocks.0.img_norm", D, D) is None


# ---------------------------------------------------------------------------------------------------------------
# Foreign and broken files

def test_lora_for_another_model_size_is_named(tmp_path):
    src = base_model()
    inject_lora(src, rank=2)
    save_lora(src, tmp_path / "h64.safetensors")
    wide = Flux(small_flux_params(hidden=96, heads=4, axes=(8, 8, 8)))
    with pytest.raises(CheckpointError, match="(?s)mis-shaped.*double_blocks.0.img_attn.qkv.lora_A.weight.*"
                                              "hidden size is 96"):
        load_lora(wide, tmp_path / "h64.safetensors")
    assert not lora_modules(wide)  # nothing was injected by the failed load


def test_lora_naming_blocks_the_model_lacks(tmp_path):
    src = base_model()
    inject_lora(src, rank=2)
    save_lora(src, tmp_path / "d2.safetensors", format="diffusers")
    shallow = Flux(small_flux_params(depth=1, single=1))
    with pytest.raises(CheckpointError, match=r"(?s)unexpected: single_transformer_blocks.1.attn.*, "
                                              r"transformer_blocks.1.attn.*does not have \(1 double and 1 single"):
        load_lora(shallow, tmp_path / "d2.safetensors")


def test_stable_diffusion_lora_gets_a_hint(tmp_path):
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}
    save_file(sd, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="(?s)lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
                                              ".*Stable Diffusion"):
        load_lora(base_model(), tmp_path / "sdxl.safetensors")


def test_garbage_and_non_lora_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04PK" + bytes(100))
    with pytest.raises(CheckpointError):
        load_lora(base_model(), tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_lora(base_model(), tmp_path / "missing.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(192, 64)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(CheckpointError, match="load_flux"):
        load_lora(base_model(), tmp_path / "full.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(CheckpointError, match="empty.safetensors .* the file holds no LoRA layers"):
        load_lora(base_model(), tmp_path / "empty.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Exporting a training run's LoRA for other tools

def write_run(folder, stage="joint", preset="tiny", lora=True, trained=True, sample_guidance=None):
    """A final.safetensors written as train.py writes it (train.write_weights: semantic + LoRA keys, the run config
    in the metadata); returns (path, the trained model)."""
    import json
    import train
    from sem_cross_attn import SemanticConfig, attach
    model = base_model()
    attach(model, SemanticConfig())
    cfg = {"stage": stage, "scheme": "xattn", "base_preset": preset, "base_file": "flux1-dev.safetensors",
           "prompt": "a thermal infrared image", "semantic": SemanticConfig().to_dict(),
           "sample_guidance": sample_guidance}
    if lora:
        inject_lora(model, rank=4, alpha=8)
        cfg |= {"lora_rank": 4, "lora_alpha": 8.0}
        if trained:
            randomize_lora(model)
    meta = {"config": json.dumps(cfg), "base": cfg["base_file"], "ae": "ae.safetensors",
            "train_args": json.dumps({"data": "data/flir", "steps": 1000, "batch_size": 8, "lr": 5e-5}),
            "sampling": json.dumps(SAMPLING_DEFAULTS)}
    path = folder / "final.safetensors"
    train.write_weights(path, model, stage, meta)
    return path, model


def lora_only(model):
    """The base with the trained model's LoRA and nothing else: what the exported files must reproduce."""
    from lora import lora_state_dict, load_lora_state_dict
    ref = base_model()
    inject_lora(ref, rank=4, alpha=8)
    load_lora_state_dict(ref, lora_state_dict(model))
    return ref


# bf16 keeps 8 significant bits: each exported A and B entry is within 2^-9 of its value (relative), so the update
# B A is within about 2^-8 of itself, and the output moves by about that fraction of what the LoRA changes (measured
# on this test's model over 3 input seeds: 0.20% to 0.29% of the LoRA's effect). 2^-7 (0.78%) leaves a 2x margin.
BF16_SHARE = 2 ** -7


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_exported_run_loads_in_diffusers_and_ours_with_the_same_output(tmp_path, dtype):
    """The exports, bf16 by default (fp32 on request), load through diffusers' own loader and ours with the same
    output; against the trained fp32 LoRA, a bf16 file is off by bf16's rounding only (BF16_SHARE of the LoRA's
    effect), an fp32 file not at all (1e-5)."""
    from extras.lora_formats import export_run
    path, model = write_run(tmp_path / "run")
    assert any(k.startswith("semantic.") for k in read_safetensors(path))  # the run file holds more than LoRA
    kohya, diffusers, card = export_run(tmp_path / "run", **({} if dtype == "bf16" else {"dtype": dtype}))
    assert (kohya.name, diffusers.name, card.name) == ("lora_kohya.safetensors", "lora_diffusers.safetensors",
                                                       "README.md")
    assert kohya.parent == card.parent == path.parent
    want = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for f in (kohya, diffusers):
        sd = read_safetensors(f)
        assert not any("semantic" in k for k in sd)  # only the LoRA leaves the project
        assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {want}
    x, base_sd = make_inputs(), bench.random_weights(PARAMS)
    expected = run(lora_only(model), x)
    effect = (expected - run(base_model(), x)).abs().max().item()

    back = base_model()
    assert set(load_lora(back, kohya)) == set(lora_modules(model))
    ours = run(back, x)
    ref = diffusers_with_lora(PARAMS, base_sd, diffusers)
    out = run_diffusers(ref, x)
    assert (out - run_diffusers(diffusers_model(PARAMS, base_sd), x)).abs().max() > 1e-2  # the LoRA acts
    assert_close_to(out, ours)  # diffusers and ours read the exported numbers alike
    if dtype == "fp32":
        assert torch.equal(ours, expected)  # A, B and alpha as trained: the same numbers
        assert_close_to(out, expected)
    else:
        err = (out - expected).abs().max().item()
        assert 0 < err <= BF16_SHARE * effect, f"bf16 export moves the output by {err:.3g}, LoRA effect {effect:.3g}"


@pytest.mark.parametrize("preset,model_id,arch", [
    ("kontext", "black-forest-labs/FLUX.1-Kontext-dev", "flux-1-kontext-dev/lora"),
    ("dev", "black-forest-labs/FLUX.1-dev", "flux-1-dev/lora"),
    ("schnell", "black-forest-labs/FLUX.1-schnell", "flux-1-schnell/lora"),
    ("tiny", None, "flux-1/lora"),
])
def test_exported_files_name_the_base_model(tmp_path, preset, model_id, arch):
    from extras.lora_formats import export_run
    path, _ = write_run(tmp_path / "run", preset=preset)
    out = tmp_path / "exported"
    files = export_run(path, out)
    assert [f.parent for f in files] == [out] * 3  # the two LoRA files and the model card
    for f in files[:2]:
        meta = read_metadata(f)
        assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == arch
        assert meta["ss_sd_model_name"] == meta["base_file"] == "flux1-dev.safetensors"
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
        assert meta.get("base_model") == model_id
    assert read_metadata(out / "lora_diffusers.safetensors")["lora_adapter_metadata"]  # diffusers' own key kept


@pytest.mark.parametrize("stage,lora", [("warmup", False), ("finetune", True)], ids=["warmup", "finetune-of-warmup"])
def test_run_without_a_trained_lora_is_one_clear_error(tmp_path, capsys, stage, lora):
    from extras import lora_formats
    path, _ = write_run(tmp_path / "run", stage=stage, lora=lora, trained=False)  # finetune of a warmup: B = 0
    with pytest.raises(ValueError, match="no LoRA to export.*semantic modules.*need this project") as e:
        lora_formats.export_run(path)
    assert "\n" not in str(e.value)
    assert lora_formats.export_if_lora(path) == []  # train.py's hook: nothing to do, no error
    assert lora_formats.main(["export", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final.safetensors"]


def test_export_cli_prints_the_written_paths(tmp_path, capsys):
    from extras import lora_formats
    path, _ = write_run(tmp_path / "run")
    names = [*lora_formats.EXPORTS.values(), "README.md"]
    assert lora_formats.main(["export", str(path), "--out", str(tmp_path / "o"), "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "o" / n) for n in names]
    assert read_safetensors(tmp_path / "o" / "lora_kohya.safetensors")[
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].dtype == torch.float32
    assert [p.name for p in lora_formats.export_if_lora(path)] == names


def test_exports_record_the_sampling_settings(tmp_path):
    """The guidance (the run config's sample_guidance), the steps, semantic strength and semantic guidance the run
    recorded (train.py: pipeline.SAMPLING_DEFAULTS) are in both files' metadata."""
    from extras.lora_formats import export_run
    path, _ = write_run(tmp_path / "run", preset="kontext", sample_guidance=2.5)
    for f in export_run(path)[:2]:
        meta = read_metadata(f)
        assert meta["sample_guidance"] == "2.5"
        assert (meta["sample_steps"], meta["sample_sem_strength"], meta["sample_sem_guidance"]) == (
            f"{SAMPLING_DEFAULTS['steps']:g}", f"{SAMPLING_DEFAULTS['sem_strength']:g}",
            f"{SAMPLING_DEFAULTS['sem_guidance']:g}")


def test_model_card_names_the_run_and_how_to_load_it(tmp_path):
    """README.md beside the exports: base model, stage, data folder, the scores of these weights from the run's
    scores.json (not those of earlier weights), the ComfyUI and diffusers instructions, the semantic modules'
    caveat; a second export rewrites its own card."""
    import json
    from extras.lora_formats import CARD_MARKER, export_run
    path, _ = write_run(tmp_path / "run", preset="kontext", sample_guidance=2.5)
    this = {"split": "aligned", "data": "/d/test", "weights": path.stat().st_mtime_ns,
            "sampling": {"steps": 20, "sem_strength": 1.5, "sem_guidance": 1.0}}
    earlier = this | {"weights": 1, "split": "earlier-weights"}
    summary = {"psnr": 25.2934, "ssim": 0.81012, "all": {"miss_rate": 0.33}, "decoy": {"hallucination_rate": 0.017}}
    (path.parent / "scores.json").write_text(json.dumps({json.dumps(k): summary for k in (this, earlier)}))
    card = export_run(path)[-1]
    text = card.read_text()
    assert text.startswith("---\nbase_model: black-forest-labs/FLUX.1-Kontext-dev\n") and CARD_MARKER in text
    for says in ("joint, xattn", "`data/flir`", "rank 4, alpha 8", "stored in bf16", "guidance 2.5",
                 "| aligned | `/d/test` | 20 | 1.5 | 1.0 | 25.29 | 0.8101 | 33.0% | 1.7% |",
                 "ComfyUI/models/loras/",
                 'FluxKontextPipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev"',
                 'weight_name="lora_diffusers.safetensors"', "guidance_scale=2.5, num_inference_steps=20",
                 "need this project"):
        assert says in text, says
    assert "earlier-weights" not in text
    card.write_text(card.read_text() + "stale line\n")
    assert export_run(path)[-1] == card and "stale line" not in card.read_text()


def test_a_foreign_readme_is_left_alone(tmp_path, capsys):
    from extras.lora_formats import EXPORTS, export_run
    path, _ = write_run(tmp_path / "run")
    readme = path.parent / "README.md"
    readme.write_text("# my notes on this run\n")
    written = export_run(path)
    assert [p.name for p in written] == list(EXPORTS.values())
    assert readme.read_text() == "# my notes on this run\n"
    assert "README.md is not the model card this exporter writes" in capsys.readouterr().out


def test_base_stage_output_is_not_a_lora(tmp_path):
    from extras import lora_formats
    path, _ = write_run(tmp_path / "base", stage="base", lora=False)
    with pytest.raises(ValueError, match="whole transformer, not a LoRA"):
        lora_formats.export_run(path)
    assert lora_formats.export_if_lora(path) == []
