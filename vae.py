"""
The FLUX.1 autoencoder: a KL-regularised conv VAE, images [B, 3, H, W] in [-1, 1] <-> latents [B, 16, H/8, W/8].

FLUX packs 2x2 patches of this latent into 64-channel tokens, so the latent must have 16 channels at H/8 x W/8.
Module attribute names are the keys of the official ae.safetensors (the LDM "first stage" layout), so that file
loads with no renaming: encoder.down.{l}.block.{j}.norm1, encoder.mid.attn_1.q, decoder.up.{l}.upsample.conv, ...

References:
- black-forest-labs/flux, src/flux/modules/autoencoder.py (architecture, AutoEncoderParams, scale/shift)
- Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the VAE design)
- diffusers AutoencoderKL + loaders/single_file_utils.py `convert_ldm_vae_checkpoint` (the oracle in tests/test_vae.py)

Shapes: B batch, H/W image height/width, ch base width, C a level's width (ch * ch_mult[l]), z = z_channels = 16.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from checkpoint import CheckpointError, load_strict, read_metadata, read_safetensors, save_atomic, strip_prefix

GROUPS = 32  # BFL hard-codes 32 GroupNorm groups, so every width must be a multiple of 32
LATENT_CHANNELS = 16  # 16 channels x 2x2 packing = FLUX's 64-channel image tokens
DOWNSAMPLE = 8  # 4 levels, 3 of them halve the resolution


@dataclass
class AutoEncoderParams:
    resolution: int  # training resolution; bookkeeping only, any multiple of 8 works
    in_channels: int  # image channels (3)
    ch: int  # base width; level l has ch * ch_mult[l] channels
    out_ch: int  # decoded image channels (3)
    ch_mult: list[int]  # one entry per level; len 4 gives the /8 latent
    num_res_blocks: int  # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int  # latent channels (16)
    scale_factor: float  # encode: z = scale_factor * (mean - shift_factor), making latents roughly unit variance
    shift_factor: float


AE_PRESETS = {
    # The official FLUX.1 ae.safetensors (dev, schnell, Kontext and Krea all share it).
    "flux": AutoEncoderParams(resolution=256, in_channels=3, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4],
                              num_res_blocks=2, z_channels=16, scale_factor=0.3611, shift_factor=0.1159),
    # CPU-sized, same latent interface. scale/shift are FLUX's placeholders until re-estimated on real latents.
    "tiny": AutoEncoderParams(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 2, 2],
                              num_res_blocks=1, z_channels=16, scale_factor=0.3611, shift_factor=0.1159),
}


def check_params(p: AutoEncoderParams) -> None:
    """Raise ValueError for params that cannot build a FLUX-compatible autoencoder."""
    if len(p.ch_mult) != 4 or any(int(m) != m or m < 1 for m in p.ch_mult):
        raise ValueError(f"ch_mult must be 4 positive ints (3 halvings give FLUX's /8 latent), got {p.ch_mult}")
    bad = [p.ch * m for m in [1, *p.ch_mult] if p.ch * m % GROUPS]
    if p.ch < 1 or bad:
        raise ValueError(f"every width ch * mult must be a positive multiple of {GROUPS} (GroupNorm groups); "
                         f"ch={p.ch}, ch_mult={p.ch_mult} gives {bad or [p.ch]}")
    if p.z_channels != LATENT_CHANNELS:
        raise ValueError(f"z_channels must be {LATENT_CHANNELS} (2x2 packing makes FLUX's 64-channel tokens), "
                         f"got {p.z_channels}")
    if p.num_res_blocks < 1 or p.in_channels < 1 or p.out_ch < 1:
        raise ValueError(f"num_res_blocks, in_channels and out_ch must be >= 1, got "
                         f"{p.num_res_blocks}, {p.in_channels}, {p.out_ch}")
    if not (math.isfinite(p.scale_factor) and p.scale_factor > 0 and math.isfinite(p.shift_factor)):
        raise ValueError(f"scale_factor must be finite and > 0 (decode divides by it) and shift_factor finite, "
                         f"got {p.scale_factor}, {p.shift_factor}")


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus the input (through a 1x1 conv when the width changes). No time embedding."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))  # [B, C_in, h, w] -> [B, C_out, h, w]
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)  # [B, C_in, h, w] -> [B, C_out, h, w]
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; q, k, v, proj_out are 1x1 convs (the checkpoint's layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        x_norm = self.norm(x)
        # one head whose dim is the full width, so SDPA's default scale is 1/sqrt(C)
        q, k, v = (rearrange(f(x_norm), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))  # [B, 1, h*w, C]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, h*w, C]
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)  # [B, 1, h*w, C] -> [B, C, h, w]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # asymmetric padding (right/bottom only), as the LDM checkpoints were trained with
        x = F.pad(x, (0, 1, 0, 1))  # [B, C, h, w] -> [B, C, h+1, w+1]
        return self.conv(x)  # -> [B, C, h/2, w/2]


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, h, w] -> [B, C, 2h, 2w]
        return self.conv(x)


def mid_block(channels: int) -> nn.Module:
    """The bottleneck shared by encoder and decoder: resnet, attention, resnet (keys mid.block_1/attn_1/block_2)."""
    mid = nn.Module()  # a bare container, only so the keys read mid.block_1 etc.
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def run_mid(mid: nn.Module, x: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        widths = [p.ch * m for m in p.ch_mult]
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, width in enumerate(widths):
            stage = nn.Module()  # bare container: keys down.{l}.block.{j}, down.{l}.downsample
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width))
                block_in = width
            stage.block = nn.ModuleList(blocks)
            if level != len(widths) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = mid_block(block_in)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)  # mean and logvar, stacked on channels

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> moments [B, 2z, H/8, W/8] (mean first, then logvar)."""
        h = self.conv_in(x)  # [B, 3, H, W] -> [B, ch, H, W]
        for stage in self.down:
            for block in stage.block:
                h = block(h)  # -> [B, C_l, h, w]
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)  # [B, C_l, h, w] -> [B, C_l, h/2, w/2]
        h = run_mid(self.mid, h)  # [B, C_3, H/8, W/8]
        return self.conv_out(swish(self.norm_out(h)))  # [B, C_3, H/8, W/8] -> [B, 2z, H/8, W/8]


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = mid_block(block_in)
        # Built deepest level first (the order it runs), but indexed by level, so up.0 is the full-resolution one.
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            stage = nn.Module()  # bare container: keys up.{l}.block.{j}, up.{l}.upsample
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[level]))
                block_in = widths[level]
            stage.block = nn.ModuleList(blocks)
            if level != 0:
                stage.upsample = Upsample(block_in)
            self.up.insert(0, stage)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z: unscaled latent [B, z, H/8, W/8] -> image [B, 3, H, W]."""
        h = self.conv_in(z)  # [B, z, H/8, W/8] -> [B, C_3, H/8, W/8]
        h = run_mid(self.mid, h)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)  # -> [B, C_l, h, w]
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)  # [B, C_l, h, w] -> [B, C_l, 2h, 2w]
        return self.conv_out(swish(self.norm_out(h)))  # [B, ch, H, W] -> [B, 3, H, W]


class AutoEncoder(nn.Module):
    """encode: image in [-1, 1] -> scaled latent; decode: scaled latent -> image. The latent is what FLUX denoises."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        check_params(params)
        self.params = replace(params, ch_mult=list(params.ch_mult))  # own copy: editing it must not edit a preset
        self.encoder = Encoder(self.params)
        self.decoder = Decoder(self.params)

    def _check_image(self, x: Tensor) -> None:
        c = self.params.in_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % DOWNSAMPLE or x.shape[3] % DOWNSAMPLE:
            raise ValueError(f"autoencoder input must be [B, {c}, H, W] with H and W multiples of {DOWNSAMPLE}, "
                             f"got shape {list(x.shape)}")

    def encode_dist(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The unscaled posterior N(mean, exp(logvar)): x [B, 3, H, W] -> (mean, logvar), each [B, z, H/8, W/8]."""
        self._check_image(x)
        moments = self.encoder(x)  # [B, 2z, H/8, W/8]
        mean, logvar = moments.chunk(2, dim=1)  # -> 2 x [B, z, H/8, W/8]
        # the LDM/diffusers clamp: keeps exp(0.5*logvar) finite for an untrained or diverging encoder
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> scale * (z - shift), [B, z, H/8, W/8].

        z is the posterior mean (deterministic, FLUX's default), or with sample=True a draw
        mean + exp(logvar/2) * eps, eps ~ N(0, I) from `generator` (which must live on x's device)."""
        mean, logvar = self.encode_dist(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent [B, z, h, w] -> image [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(f"decode expects a latent [B, {self.params.z_channels}, h, w], got shape {list(z.shape)}")
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


# ---------------------------------------------------------------------------------------------------------------------
# Weight files

PREFIXES = ("ae.", "first_stage_model.", "vae.")  # wrappers single-file checkpoints put around the AE keys
PARAMS_METADATA_KEY = "ae_params"  # save_ae stores the params as JSON here, so demo weights describe themselves


def _hint(missing: set, unexpected: set, mismatched: list) -> str:
    """One or two sentences saying which kind of file this is, when it is a well-known wrong one."""
    hints = []
    if any(k.startswith(("double_blocks.", "single_blocks.", "img_in.", "transformer_blocks.")) for k in unexpected):
        hints.append("this is a FLUX transformer checkpoint, not the autoencoder")
    if any(s in k for k in unexpected for s in ("down_blocks.", "up_blocks.", "mid_block.", "conv_norm_out.")):
        hints.append("this looks like a diffusers-format AutoencoderKL; use the original ae.safetensors "
                     "(LDM key layout: encoder.down.0.block.0 ...)")
    if any(k in unexpected for k in ("quant_conv.weight", "post_quant_conv.weight")):
        hints.append("this looks like an SD/SDXL VAE (it has quant_conv); FLUX's ae has none")
    shapes = {k: f for k, f, _ in mismatched}
    if shapes.get("encoder.conv_out.weight", (None,))[0] == 8 or shapes.get("decoder.conv_in.weight", (0, 0))[1] == 4:
        hints.append("a 4-channel SD VAE; FLUX needs 16 latent channels")
    elif mismatched and not hints:
        hints.append("the widths differ from the params given; pass the AutoEncoderParams the file was made with "
                     "(e.g. AE_PRESETS['tiny'])")
    return "; ".join(hints)


def load_ae(path: str | os.PathLike, params: AutoEncoderParams | None = None, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> AutoEncoder:
    """Load an autoencoder from safetensors, strictly, in `dtype` on `device`, in eval mode.

    params=None means the file's own `ae_params` metadata (written by save_ae), else AE_PRESETS["flux"]."""
    if params is None:
        meta = read_metadata(path)
        params = AE_PRESETS["flux"]
        if PARAMS_METADATA_KEY in meta:
            try:
                params = AutoEncoderParams(**json.loads(meta[PARAMS_METADATA_KEY]))
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{path}: unreadable {PARAMS_METADATA_KEY!r} metadata ({e})") from None
    sd = read_safetensors(path, dtype=dtype, device=device)
    for prefix in PREFIXES:
        sd = strip_prefix(sd, prefix)
    with torch.device("meta"):  # no memory and no init work: every parameter is replaced by a file tensor below
        ae = AutoEncoder(params)
    load_strict(ae, sd, f"autoencoder {path}", hint=_hint, assign=True)
    return ae.eval()


def save_ae(ae: AutoEncoder, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the weights in the official key layout (loadable by BFL's code and diffusers' single-file loader)."""
    meta = {PARAMS_METADATA_KEY: json.dumps(asdict(ae.params)), **(metadata or {})}
    save_atomic(ae.state_dict(), path, meta)


__all__ = ["AutoEncoderParams", "AE_PRESETS", "AutoEncoder", "Encoder", "Decoder", "load_ae", "save_ae",
           "check_params", "CheckpointError"]
