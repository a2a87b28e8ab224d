"""LoRA layer: identity at init, official keys kept, merge/unmerge, training touches only LoRA, and strict loading of
a LoRA state dict; a variant of the layer plugs in without lora.py knowing it. LoRA files (layouts, parity with
diffusers' own loaders) are tests/extras/test_lora_formats.py, the LoRA over an fp8 base tests/extras/test_fp8.py."""

import math

import pytest
import torch
from torch import nn

from tools import bench
from conftest import kontext_batch, small_flux_params
from lora import (LoRALinear, inject_lora, lora_parameters, lora_state_dict, load_lora_state_dict, merge_lora,
                  unmerge_lora, lora_modules)
from checkpoint import CheckpointError
from flux_model import Flux

PARAMS = small_flux_params()  # hidden 64, 4 heads, 2 double + 2 single blocks, guidance


def base_model(params=PARAMS, seed=0) -> Flux:
    """A FLUX with every weight random (bench.random_weights), so a LoRA on any layer changes the output."""
    return bench.build_ours(params, bench.random_weights(params, seed)).eval()


def make_inputs(params=PARAMS, seed=1) -> dict:
    x = kontext_batch(params, seed=seed)
    x.pop("semantic")  # the plain FLUX has no semantic module
    return x


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


def randomize_lora(model, seed=2, b_std=0.1):
    """Non-zero A and B, so every LoRA layer changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) / math.sqrt(m.in_features))
            m.lora_B.weight.copy_(b_std * torch.randn(m.lora_B.weight.shape, generator=g))


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
# Strict loading of a LoRA state dict

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
    with pytest.raises(CheckpointError, match="(?s)unexpected: img_in.weight.*a full FLUX checkpoint"):
        load_lora_state_dict(model, dict(sd, **{"img_in.weight": torch.zeros(64, 64)}))


def test_strict_state_dict_loading_copies_exactly_and_refuses_merged_or_plain_models():
    src, model = base_model(), base_model()
    inject_lora(src, rank=4, include_modulation=True)
    inject_lora(model, rank=4, include_modulation=True)
    randomize_lora(src)
    load_lora_state_dict(model, lora_state_dict(src))
    assert all(torch.equal(v, lora_state_dict(src)[k]) for k, v in lora_state_dict(model).items())
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_lora_state_dict(model, lora_state_dict(src))
    with pytest.raises(ValueError, match="no LoRA layers"):
        load_lora_state_dict(base_model(), lora_state_dict(src))


class ScaledLoRALinear(LoRALinear):
    """A LoRA variant over ScaledLinear: its own base product, and it cannot merge."""
    merge_refusal = "a gained base cannot take the update"

    def base_forward(self, x):
        return super().base_forward(x) * self.gain


class ScaledLinear(nn.Linear):
    """A base layer with a buffer of its own that names its LoRA variant (as extras.fp8.Fp8Linear does)."""
    lora_class = ScaledLoRALinear

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("gain", torch.full((self.out_features,), 2.0))

    def forward(self, x):
        return super().forward(x) * self.gain


def test_a_variant_plugs_in_through_lora_class_base_forward_and_merge_refusal():
    """from_linear builds the base's lora_class and carries its buffers; the variant's base product is used; merge_lora
    refuses before any layer changes when one layer cannot merge, and merges a model of plain layers."""
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(8, 6), nn.Linear(6, 4))
    x = torch.randn(3, 8)
    before = model(x)
    assert inject_lora(model, rank=2, targets=(r"\d",)) == ["0", "1"]
    assert type(model[0]) is ScaledLoRALinear and type(model[1]) is LoRALinear
    assert set(model[0].state_dict()) == {"weight", "bias", "gain", "lora_A.weight", "lora_B.weight"}
    assert torch.equal(model(x), before)  # B = 0: the base, through the variant's own product
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"merge_lora: 1 LoRA layers \(e.g. 0\) cannot merge: a gained base"):
        merge_lora(model)
    assert not any(m.merged for m in lora_modules(model).values())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="a gained base"):
        model[0].merge()
    plain, h = nn.Sequential(model[1]), torch.randn(3, 6)
    y = plain(h)
    merge_lora(plain)
    assert model[1].merged
    torch.testing.assert_close(plain(h), y)
