"""LoRA: identity at init, merge/unmerge, training touches only LoRA, and file parity with diffusers' own loaders
(PEFT layout, kohya layout, PEFT-trained files with a distinct A per q/k/v), plus clear errors for foreign files."""

import inspect
import math

import pytest
import torch
from torch import nn
from safetensors.torch import save_file

from lora import (LoRALinear, DEFAULT_TARGETS, inject_lora, lora_parameters, lora_state_dict, load_lora_state_dict,
                  merge_lora, unmerge_lora, save_lora, load_lora, lora_modules)
from checkpoint import CheckpointError, read_metadata, read_safetensors
from flux_model import Flux, image_ids, text_ids
from tests.test_flux_model import small_params, random_checkpoint, diffusers_from_original

PARAMS = small_params()  # hidden 64, 4 heads, 2 double + 2 single blocks, guidance


def base_model(params=PARAMS, seed=0) -> Flux:
    model = Flux(params)
    model.load_state_dict(random_checkpoint(params, seed))
    return model.eval()


def make_inputs(params=PARAMS, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, h, w, n_txt = 2, 3, 4, 5
    return dict(img=torch.randn(B, h * w, params.in_channels, generator=g), img_ids=image_ids(B, h, w),
                txt=torch.randn(B, n_txt, params.context_in_dim, generator=g), txt_ids=text_ids(B, n_txt),
                timesteps=torch.tensor([0.3, 0.8]), y=torch.randn(B, params.vec_in_dim, generator=g),
                guidance=torch.tensor([3.5, 2.0]) if params.guidance_embed else None)


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


def run_diffusers(ref, x) -> torch.Tensor:
    with torch.no_grad():  # diffusers takes 2-D ids shared across the batch
        return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                   timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                   guidance=x["guidance"], return_dict=False)[0]


def randomize_lora(model, seed=2, b_std=0.1):
    """Non-zero A and B, so every LoRA layer changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) / math.sqrt(m.in_features))
            m.lora_B.weight.copy_(b_std * torch.randn(m.lora_B.weight.shape, generator=g))


def assert_close_to(out, expected):
    scale = expected.abs().max().item()
    assert scale > 0.1, "reference output is degenerate: the comparison would prove nothing"
    err = (out - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"max abs diff {err:.3g} (output scale {scale:.3g})"


def base_weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# ---------------------------------------------------------------------------------------------------------------
# The layer and injection

def test_identity_at_init_even_with_dropout_in_train_mode():
    model, x = base_model(), make_inputs()
    expected = run(model, x)
    names = inject_lora(model, rank=8, alpha=16, dropout=0.9)  # dropout only ever touches the (zero) LoRA branch
    assert len(names) == 2 * 8 + 2 * 2  # 8 per double block, 2 per single block
    assert torch.equal(run(model, x), expected)
    model.train()
    assert torch.equal(run(model, x), expected)


def test_official_keys_unchanged_and_base_parameters_reused():
    model = base_model()
    before = dict(model.named_parameters())
    inject_lora(model, rank=4, include_modulation=True)
    after = model.state_dict()
    assert {k for k in after if ".lora_" not in k} == set(before)  # official checkpoint keys still load as they are
    qkv = model.double_blocks[1].txt_attn.qkv
    assert isinstance(qkv, LoRALinear) and isinstance(qkv, nn.Linear)
    assert qkv.weight is before["double_blocks.1.txt_attn.qkv.weight"]  # same Parameter: no copy
    assert qkv.bias is before["double_blocks.1.txt_attn.qkv.bias"]
    assert qkv.lora_A.weight.dtype == torch.float32 and not qkv.lora_B.weight.any()  # zero B
    assert "double_blocks.0.img_mod.lin.lora_A.weight" in after
    assert "single_blocks.1.modulation.lin.lora_B.weight" in after
    assert not isinstance(model.final_layer.linear, LoRALinear)  # not a default target


def test_default_targets_leave_modulation_and_semantic_alone():
    model = base_model()
    # a stand-in for the semantic module that sem_cross_attn.py attaches, with Linear names like FLUX's
    model.semantic = nn.ModuleDict({"double_blocks": nn.ModuleList([nn.ModuleDict({"img_attn": nn.ModuleDict(
        {"qkv": nn.Linear(8, 24)})})])})
    names = inject_lora(model, rank=2)
    assert not any(n.startswith("semantic.") or "_mod." in n or "modulation" in n for n in names)
    assert set(names) == {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    other = base_model()
    other.semantic = nn.Linear(8, 8)
    assert inject_lora(other, rank=2, targets=(r"semantic",)) == ["semantic"]  # only when asked


def test_inject_errors():
    model = base_model()
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(model, targets=("nothing_like_this",))
    inject_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has"):
        inject_lora(model, rank=2)


def test_merge_unmerge_round_trip():
    model, x = base_model(), make_inputs()
    original = base_weights(model)
    inject_lora(model, rank=4, alpha=8, include_modulation=True)
    randomize_lora(model)
    unmerged = run(model, x)
    assert (unmerged - run(base_model(), x)).abs().max() > 1e-2  # the LoRA does something
    merge_lora(model)
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.merged and not torch.allclose(qkv.weight, original["double_blocks.0.img_attn.qkv.weight"])
    torch.testing.assert_close(run(model, x), unmerged, rtol=1e-5, atol=1e-5 * unmerged.abs().max().item())
    unmerge_lora(model)
    for k, v in base_weights(model).items():
        torch.testing.assert_close(v, original[k], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run(model, x), unmerged, rtol=1e-5, atol=1e-6)


def test_bf16_base_with_fp32_lora():
    """The branch runs in the LoRA dtype under a bf16 base; merging rounds once into bf16."""
    layer = nn.Linear(32, 48).to(torch.bfloat16)
    lo = LoRALinear.from_linear(layer, rank=4, alpha=4)
    nn.init.normal_(lo.lora_B.weight, std=0.1)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = lo(x)
    assert y.dtype == torch.bfloat16 and lo.lora_A.weight.dtype == torch.float32
    lo.merge()
    assert lo.weight.dtype == torch.bfloat16
    torch.testing.assert_close(lo(x).float(), y.float(), rtol=0.05, atol=0.05)


def test_one_step_trains_only_lora():
    model, x = base_model(), make_inputs()
    model.requires_grad_(False)  # freeze the base first; the LoRA parameters are created trainable
    names = inject_lora(model, rank=4, alpha=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names) == len(lora_parameters(model))
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    assert sum(p.numel() for p in trainable) == sum(4 * (m.in_features + m.out_features)
                                                    for m in lora_modules(model).values())
    frozen = base_weights(model)
    before = run(model, x)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
    model.train()
    model(**x).square().mean().backward()
    opt.step()
    model.eval()
    assert all(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(model).values())
    assert (run(model, x) - before).abs().max() > 1e-5
    assert all(torch.equal(v, frozen[k]) for k, v in base_weights(model).items())


# ---------------------------------------------------------------------------------------------------------------
# Files: our layout, strength, strict loading

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


def test_strict_state_dict_loading_lists_problems():
    model = base_model()
    inject_lora(model, rank=4)
    sd = lora_state_dict(model)
    partial = {k: v for k, v in sd.items() if not k.startswith("single_blocks.1.linear2")}
    with pytest.raises(CheckpointError, match="(?s)missing: single_blocks.1.linear2.lora_A.weight.*hint"):
        load_lora_state_dict(model, partial)
    wrong_rank = dict(sd, **{"double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(8, 64)})
    with pytest.raises(CheckpointError, match="(?s)mis-shaped: double_blocks.0.img_attn.proj.lora_A.*ranks differ"):
        load_lora_state_dict(model, wrong_rank)
    with pytest.raises(CheckpointError, match="unexpected: img_in.weight"):
        load_lora_state_dict(model, dict(sd, **{"img_in.weight": torch.zeros(64, 64)}))


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

def diffusers_with_lora(params, base_sd, path):
    """diffusers' FluxTransformer2DModel with the file loaded by FluxPipeline's own LoRA loader (no pipeline)."""
    from diffusers import FluxPipeline
    ref = diffusers_from_original(base_sd, params)
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
    base_sd, x = random_checkpoint(PARAMS), make_inputs()
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
    assert (expected - run_diffusers(diffusers_from_original(base_sd, PARAMS), x)).abs().max() > 1e-2  # sensitive
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
    base_sd, x = random_checkpoint(PARAMS), make_inputs()
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

    ref = diffusers_from_original(base_sd, PARAMS)
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
    base_sd, x = random_checkpoint(PARAMS), make_inputs()
    ref = diffusers_from_original(base_sd, PARAMS)
    torch.manual_seed(3)
    targets = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2"]  # diffusers' train_dreambooth_lora_flux.py defaults
    ref.add_adapter(LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=targets))  # random A, B
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict(),
                                   weight_name="peft.safetensors")
    expected = run_diffusers(ref, x)
    assert (expected - run_diffusers(diffusers_from_original(base_sd, PARAMS), x)).abs().max() > 1e-2

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
# Foreign and broken files

def test_lora_for_another_model_size_is_named(tmp_path):
    src = base_model()
    inject_lora(src, rank=2)
    save_lora(src, tmp_path / "h64.safetensors")
    wide = Flux(small_params(hidden=96, heads=4, axes=(8, 8, 8)))
    with pytest.raises(CheckpointError, match="(?s)mis-shaped.*double_blocks.0.img_attn.qkv.lora_A.weight.*"
                                              "hidden size is 96"):
        load_lora(wide, tmp_path / "h64.safetensors")
    assert not lora_modules(wide)  # nothing was injected by the failed load


def test_lora_naming_blocks_the_model_lacks(tmp_path):
    src = base_model()
    inject_lora(src, rank=2)
    save_lora(src, tmp_path / "d2.safetensors", format="diffusers")
    shallow = Flux(small_params(depth=1, single=1))
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
