"""
Tests for vae.py: diffusers parity on a random checkpoint, official shapes/counts, strict loading, input checks.

The oracle is diffusers' AutoencoderKL loaded through diffusers' own LDM -> diffusers converter
(`convert_ldm_vae_checkpoint`), so our key names and our maths are checked by code we did not write.
"""

import math

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from checkpoint import CheckpointError, save_atomic
from vae import AE_PRESETS, AutoEncoder, AutoEncoderParams, load_ae, save_ae

# Small, but with everything the official config has: 4 levels, a width change (nin_shortcut in encoder and
# decoder), 2 resnets per encoder level / 3 per decoder level, and every width a multiple of 32 (GroupNorm groups).
SMALL = AutoEncoderParams(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 2, 2], num_res_blocks=2,
                          z_channels=16, scale_factor=0.3611, shift_factor=0.1159)


def randomised(params: AutoEncoderParams, seed: int = 0) -> AutoEncoder:
    """An AE whose every tensor is random, GroupNorm affines included, at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    ae = AutoEncoder(params)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))  # 1/sqrt(fan_in)
    return ae.eval()


def diffusers_oracle(params: AutoEncoderParams, ldm_sd: dict) -> AutoencoderKL:
    """AutoencoderKL configured like `params`, loaded (strictly) through diffusers' converter."""
    n = len(params.ch_mult)
    config = dict(
        in_channels=params.in_channels, out_channels=params.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[params.ch * m for m in params.ch_mult], layers_per_block=params.num_res_blocks,
        latent_channels=params.z_channels, norm_num_groups=32, act_fn="silu", sample_size=params.resolution,
        use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=params.scale_factor, shift_factor=params.shift_factor,
    )
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(dict(ldm_sd), config)
    vae.load_state_dict(converted, strict=True)  # strict: the converter mapped every one of our keys, and only them
    return vae.eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    ae = randomised(SMALL)
    path = tmp_path_factory.mktemp("ae") / "small.safetensors"
    save_ae(ae, path)
    return path, ae


def test_encode_decode_match_diffusers_on_same_random_checkpoint(small_file):
    path, _ = small_file
    ours = load_ae(path, SMALL)
    ref = diffusers_oracle(SMALL, ours.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1  # non-square, so a transposed h/w would show
    z_in = torch.randn(2, 16, 8, 12, generator=g)
    s, t = SMALL.scale_factor, SMALL.shift_factor
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode_dist(x)
        assert_close(mean, dist.mean, "posterior mean")
        assert_close(logvar, dist.logvar, "posterior logvar")
        assert_close(ours.encode(x), (dist.mean - t) * s, "scaled latent")
        assert_close(ours.decode(z_in), ref.decode(z_in / s + t).sample, "decode")
    assert ours.encode(x).shape == (2, 16, 8, 12)


def test_official_preset_has_the_published_counts_and_shapes():
    with torch.device("meta"):
        ae = AutoEncoder(AE_PRESETS["flux"])
    sd = ae.state_dict()
    assert len(sd) == 244
    assert sum(v.numel() for v in sd.values()) == 83_819_683
    assert sum(p.numel() for p in ae.encoder.parameters()) == 34_274_208
    assert sum(p.numel() for p in ae.decoder.parameters()) == 49_545_475
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    # levels without a resolution change have no (down|up)sample keys, and there is no quant_conv
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample", "quant_conv",
                                 "post_quant_conv")) for k in sd)


def test_tiny_preset_gives_a_16_channel_latent_at_one_eighth():
    ae = AutoEncoder(AE_PRESETS["tiny"]).eval()
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 48, 32))
        assert z.shape == (1, 16, 6, 4)
        assert ae.decode(z).shape == (1, 3, 48, 32)


def test_save_then_load_gives_identical_tensors_and_requested_dtype(small_file):
    path, ae = small_file
    loaded = load_ae(path)  # params=None: read from the file's own metadata
    assert loaded.params == SMALL
    for k, v in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    half = load_ae(path, SMALL, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in half.parameters())
    assert not loaded.training


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae.", "ae."])
def test_load_strips_a_prefix_shared_by_all_keys(small_file, tmp_path, prefix):
    path, ae = small_file
    save_atomic({prefix + k: v for k, v in ae.state_dict().items()}, tmp_path / "p.safetensors")
    loaded = load_ae(tmp_path / "p.safetensors", SMALL)
    for k, v in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_truncated_file_is_reported_as_truncated(small_file, tmp_path):
    path, _ = small_file
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_ae(tmp_path / "cut.safetensors", SMALL)


def test_garbage_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError):
        load_ae(tmp_path / "junk.safetensors", SMALL)


def test_diffusers_format_file_gets_the_diffusers_hint(small_file, tmp_path):
    path, ae = small_file
    n = len(SMALL.ch_mult)
    converted = convert_ldm_vae_checkpoint(ae.state_dict(), {"down_block_types": [0] * n, "up_block_types": [0] * n})
    save_atomic(converted, tmp_path / "diffusers.safetensors")
    with pytest.raises(CheckpointError, match="diffusers-format AutoencoderKL; use the original ae.safetensors"):
        load_ae(tmp_path / "diffusers.safetensors", SMALL)


def test_sd_vae_and_transformer_files_get_their_hints(small_file, tmp_path):
    path, ae = small_file
    sd = dict(ae.state_dict())
    sd["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    sd["encoder.conv_out.weight"] = torch.zeros(8, 64, 3, 3)  # 4 latent channels: mean + logvar = 8
    save_atomic(sd, tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match="(?s)quant_conv.*4-channel SD VAE"):
        load_ae(tmp_path / "sd.safetensors", SMALL)
    save_atomic({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="FLUX transformer checkpoint, not the autoencoder"):
        load_ae(tmp_path / "flux.safetensors", SMALL)


def test_missing_and_misshaped_keys_are_listed_by_name(small_file, tmp_path):
    path, ae = small_file
    sd = dict(ae.state_dict())
    del sd["decoder.up.0.block.1.norm2.bias"]
    sd["encoder.mid.attn_1.k.weight"] = torch.zeros(64, 64)  # a Linear-shaped k (diffusers keeps [C, C])
    save_atomic(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_ae(tmp_path / "bad.safetensors", SMALL)
    msg = str(e.value)
    assert "1 missing: decoder.up.0.block.1.norm2.bias" in msg
    assert "encoder.mid.attn_1.k.weight (file (64, 64), model (64, 64, 1, 1))" in msg


def test_loading_with_the_wrong_params_names_the_shape_mismatch(small_file):
    path, _ = small_file
    with pytest.raises(CheckpointError, match="(?s)mis-shaped.*pass the AutoEncoderParams the file was made with"):
        load_ae(path, AE_PRESETS["tiny"])


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 3, 64, 36), (1, 4, 64, 64), (3, 64, 64)])
def test_bad_image_shape_is_a_value_error_naming_the_shape(shape):
    ae = AutoEncoder(AE_PRESETS["tiny"])
    with pytest.raises(ValueError, match=str(list(shape)).replace("[", r"\[").replace("]", r"\]")):
        ae.encode(torch.zeros(shape))


def test_bad_latent_shape_is_a_value_error():
    ae = AutoEncoder(AE_PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"\[1, 4, 8, 8\]"):
        ae.decode(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("change, match", [
    (dict(ch=48), "multiple of 32"),
    (dict(ch=16, ch_mult=[2, 4, 8, 8]), "multiple of 32"),  # levels fine, but conv_in's width 16 is normed too
    (dict(z_channels=4), "z_channels must be 16"),
    (dict(ch_mult=[1, 2, 4]), "ch_mult must be 4"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(scale_factor=0.0), "scale_factor"),
])
def test_invalid_params_are_rejected_with_a_reason(change, match):
    with pytest.raises(ValueError, match=match):
        AutoEncoder(AutoEncoderParams(**{**vars(AE_PRESETS["tiny"]), **change}))


def test_encode_is_the_mean_and_sampling_draws_from_the_posterior(small_file):
    path, _ = small_file
    ae = load_ae(path, SMALL)
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.equal(z, ae.encode(x))  # deterministic
        mean, logvar = ae.encode_dist(x)
        s = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        again = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert s.shape == z.shape == (1, 16, 4, 5)
    assert torch.equal(s, again)  # the generator fully determines the draw
    assert (s - z).abs().max() > 1e-3
    # unscale the sample and recover the noise: it must be exactly the generator's N(0, I) draw
    eps = ((s / SMALL.scale_factor + SMALL.shift_factor) - mean) / torch.exp(0.5 * logvar)
    expected = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(eps, expected, rtol=1e-3, atol=1e-3)


def test_presets_are_not_mutated_through_a_model():
    ae = AutoEncoder(AE_PRESETS["tiny"])
    ae.params.ch_mult.append(8)
    ae.params.scale_factor = 1.0
    assert AE_PRESETS["tiny"].ch_mult == [1, 1, 2, 2] and AE_PRESETS["tiny"].scale_factor == 0.3611
