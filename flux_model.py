"""
The FLUX.1 transformer, written from its formulas.

References: black-forest-labs/flux, src/flux/model.py, modules/layers.py and math.py (the architecture and the
checkpoint key names); Esser et al. 2024, "Scaling Rectified Flow Transformers" (MM-DiT); Su et al. 2021, RoPE.

Module attribute names ARE the official checkpoint keys (`double_blocks.3.img_attn.qkv.weight`), so
flux1-dev / flux1-schnell / flux1-kontext-dev safetensors load with no renaming table (checkpoint.load_flux_official).

Dimension letters used in the shape comments:
    B batch, L sequence length (L_txt text tokens, L_img image tokens), D hidden size (3072 for dev),
    H attention heads (24), Dh head dim (128), C packed latent channels (64 = 16 latent channels x 2 x 2).

Data flow (512x512 RGB with Kontext conditioning, dev sizes):
    latents [B,16,64,64] --flow.pack--> tokens [B,1024,64]; cat(x_t, x_cond) -> [B,2048,64] --img_in--> [B,2048,3072]
    T5 [B,512,4096] --txt_in--> [B,512,3072];  t, guidance, CLIP pooled y -> vec [B,3072]
    19 double blocks (separate img/txt weights, joint attention) -> 38 single blocks on cat(txt, img) [B,2560,3072]
    -> drop text -> final_layer -> velocity [B,2048,64]; the caller keeps the first 1024 (the x_t tokens).

The one hook: `Extra`. An optional mechanism changes a forward only at the four points that class names (the
image tokens before img_in, the keys and values of each block's attention, what the image queries add to their
attention output, each block's image output). The semantic module (sem_cross_attn.py) attaches itself as
`flux.semantic` and gives one per forward; extras/ hold the others. With no extra, the model and its state dict
are exactly the official ones.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from einops import rearrange

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class FluxParams:
    in_channels: int  # packed latent channels in (64; 128 for canny/depth, 384 for fill)
    out_channels: int  # packed channels out (64)
    vec_in_dim: int  # CLIP pooled width (768)
    context_in_dim: int  # T5 width (4096)
    hidden_size: int  # D
    mlp_ratio: float
    num_heads: int
    depth: int  # double-stream blocks
    depth_single_blocks: int
    axes_dim: list[int]  # RoPE split of the head dim over the 3 id axes
    theta: int
    qkv_bias: bool
    guidance_embed: bool  # dev / Kontext are guidance-distilled; schnell is not


def _official(guidance_embed: bool) -> FluxParams:
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                      mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                      theta=10_000, qkv_bias=True, guidance_embed=guidance_embed)


PRESETS: dict[str, FluxParams] = {
    "dev": _official(guidance_embed=True),
    "schnell": _official(guidance_embed=False),
    "kontext": _official(guidance_embed=True),  # Kontext-dev: same weights layout as dev, trained with cond tokens
    # CPU-sized: same structure, ~3M parameters. Text widths are small because the tiny default runs without T5/CLIP.
    "tiny": FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=128,
                       mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=[8, 12, 12],
                       theta=10_000, qkv_bias=True, guidance_embed=False),
}

# ----------------------------------------------------------------------------------------------------------------
# Embeddings: sinusoidal timestep, MLP, rotary positions


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000, time_factor: float = 1000.0) -> Tensor:
    """[B] (t in [0,1], or a guidance value) -> [B, dim] as concat(cos, sin); t is scaled by 1000 first."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for one id axis: [B, L] -> [B, L, dim/2, 2, 2] (float32).
    omega_k = theta^(-2k/dim); angle = pos * omega_k; R = [[cos, -sin], [sin, cos]]."""
    assert dim % 2 == 0
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # [dim/2]
    angle = pos.double()[..., None] * omega  # [B, L, dim/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)  # [B, L, dim/2, 4]
    return rearrange(rot, "b l d (i j) -> b l d i j", i=2, j=2).float()


class EmbedND(nn.Module):
    """3-axis RoPE: ids [B, L, 3] -> pe [B, 1, L, Dh/2, 2, 2]; head dims split as axes_dim (16 + 56 + 56)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        pe = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return pe.unsqueeze(1)  # [B, 1, L, Dh/2, 2, 2]: broadcast over heads


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate ADJACENT pairs (x[2k], x[2k+1]) of x [B, H, L, Dh] by pe [B, 1, L, Dh/2, 2, 2], in float32."""
    x_ = x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 1, 2)  # [B, H, L, Dh/2, 1, 2]: each pair as a row
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]  # R[i,0] x0 + R[i,1] x1: [B, H, L, Dh/2, 2]
    return out.reshape(*x.shape).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v, no mask (FLUX masks nothing, text padding included):
    rotated q [B, H, Lq, Dh], k and v [B, H, Lk, Dh] -> [B, Lq, H*Dh]."""
    x = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, Dh]
    return rearrange(x, "B H L D -> B L (H D)")


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and modulation


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the last dim; statistics in float32, the normalised x rounded to
    x's dtype before the scale (as BFL's)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D]
        xf = x.float()
        rrms = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + 1e-6)  # [..., 1]
        return (xf * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """RMSNorm of q and k per head: keeps attention logits bounded at bf16 and large widths."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


@dataclass
class ModulationOut:
    shift: Tensor  # [B, 1, D]
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """vec -> (shift, scale, gate) once (single blocks) or twice (double blocks: attention and MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # [B, D] -> k x [B, 1, D]
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.is_double else None)


# ----------------------------------------------------------------------------------------------------------------
# The hook


class Extra:
    """Where an optional mechanism plugs into a forward. Flux.forward and the blocks call these four methods at
    fixed points; each default changes nothing, so a forward with no extra is exactly the official model.
    `name` is the block's: "double.3", "single.0".
    sem_cross_attn.SemanticContext (the default scheme B) implements image_attention; extras/ implement the rest
    (extras/schemes.py: on_input, after_block; extras/condition_cache.py: keys_values)."""

    def on_input(self, img: Tensor) -> Tensor:
        """The image tokens [B, L_img, 64] before img_in."""
        return img

    def keys_values(self, name: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The rotated keys and the values every query of the block attends to, [B, H, L, Dh] each."""
        return k, v

    def image_attention(self, name: str, q: Tensor) -> Tensor | None:
        """The image tokens' rotated queries [B, H, L_img, Dh] -> what to add to their attention output
        [B, L_img, D] before the block's output projection, or None."""
        return None

    def after_block(self, name: str, img: Tensor) -> Tensor:
        """The block's image tokens [B, L_img, D] after its update."""
        return img


# ----------------------------------------------------------------------------------------------------------------
# Blocks


class SelfAttention(nn.Module):
    """Holds the per-stream weights of a double block's attention; the attention itself is joint (see below)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L, D] -> q, k, v [B, H, L, Dh] each, q and k RMS-normed; qkv.weight rows are [all q | all k | all v]."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one attention over both: (img, txt) -> (img, txt)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = mlp(hidden_size, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, extra: Extra | None = None,
                name: str = "") -> tuple[Tensor, Tensor]:
        """img [B, L_img, D], txt [B, L_txt, D], vec [B, D], pe [B, 1, L_txt + L_img, Dh/2, 2, 2]."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        # prepare image and text for attention: modulated LayerNorm, then q, k, v per stream
        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + img_mod1.scale) * self.img_norm1(img) + img_mod1.shift)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + txt_mod1.scale) * self.txt_norm1(txt) + txt_mod1.shift)

        # joint attention over cat(txt, img): text first, matching the order of the ids (and so of pe)
        q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)  # [B, H, L_txt + L_img, Dh]
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
        v = torch.cat((txt_v, img_v), dim=2)
        if extra is not None:
            k, v = extra.keys_values(name, k, v)
        attn = attention(q, k, v)  # [B, L_txt + L_img, D]
        txt_attn, img_attn = attn.split((txt.shape[1], img.shape[1]), dim=1)
        if extra is not None and (sem := extra.image_attention(name, q[:, :, txt.shape[1]:])) is not None:
            img_attn = img_attn + sem  # [B, L_img, D]

        # the two residual branches of each stream, gated
        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        if extra is not None:
            img = extra.after_block(name, img)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence, with one fused input and one fused output linear."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # qkv | mlp in
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # attn out | mlp out
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, L_txt: int, extra: Extra | None = None,
                name: str = "") -> Tensor:
        """x = cat(txt, img) [B, L_txt + L_img, D]; the image part is x[:, L_txt:]."""
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp_in = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)  # [B, H, L, Dh] each
        q, k = self.norm(q, k, v)
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        if extra is not None:
            k, v = extra.keys_values(name, k, v)
        attn = attention(q, k, v)  # [B, L, D]
        if extra is not None and (sem := extra.image_attention(name, q[:, :, L_txt:])) is not None:
            attn = torch.cat((attn[:, :L_txt], attn[:, L_txt:] + sem), dim=1)  # only the image part reads it
        x = x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp_in)), dim=-1))
        if extra is not None:
            x = torch.cat((x[:, :L_txt], extra.after_block(name, x[:, L_txt:])), dim=1)
        return x


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # (shift, scale) in this order: [B, D] each
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


# ----------------------------------------------------------------------------------------------------------------
# The model


class Flux(nn.Module):
    """Rectified-flow transformer on packed latent tokens: predicts the velocity (noise - x0)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"hidden_size {params.hidden_size} is not divisible by num_heads {params.num_heads}")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to the head dim {pe_dim}")
        if any(d % 2 for d in params.axes_dim):
            raise ValueError(f"axes_dim {params.axes_dim}: every entry must be even (RoPE rotates pairs)")
        self.in_channels, self.out_channels = params.in_channels, params.out_channels
        self.hidden_size, self.num_heads = params.hidden_size, params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(256, params.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels)
        self.semantic = None  # set by sem_cross_attn.attach(); None keeps the official model and keys
        self.gradient_checkpointing = False  # recompute each block in backward: memory for compute

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None, semantic: Tensor | None = None,
                semantic_ids: Tensor | None = None, semantic_strength: float | Tensor = 1.0,
                extra: Extra | None = None) -> Tensor:
        """
        img: [B, L_img, 64] packed latents (Kontext: cat(x_t, x_cond) with cond ids axis 0 = 1)
        img_ids: [B, L_img, 3]; txt: [B, L_txt, context_in_dim]; txt_ids: [B, L_txt, 3]
        timesteps: [B] in [0, 1] (1 = noise); y: [B, vec_in_dim]; guidance: [B] raw value (dev/Kontext)
        semantic: [B, N_sem, 64] packed semantic latents, semantic_ids [B, N_sem, 3] (needs an attached module)
        semantic_strength: a multiplier on the semantic module's learned scales/gates, a float or [B] (0 for a sample
        switches its semantic input off: training's condition dropout)
        extra: an Extra built by the caller (extras/condition_cache.py); the semantic module makes its own
        returns: [B, L_img, 64] velocity for every image token
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        if img_ids.shape[:2] != img.shape[:2] or txt_ids.shape[:2] != txt.shape[:2]:
            raise ValueError("ids must be [B, L, 3] matching their tokens: "
                             f"img {tuple(img.shape)} ids {tuple(img_ids.shape)}, txt {tuple(txt.shape)} "
                             f"ids {tuple(txt_ids.shape)}")
        if self.params.guidance_embed and guidance is None:
            raise ValueError("this is a guidance-distilled model (dev/Kontext): pass guidance, e.g. 3.5")
        if semantic is not None:
            if self.semantic is None:
                raise ValueError("semantic tokens were given but no semantic module is attached "
                                 "(see sem_cross_attn.attach)")
            if extra is not None:
                raise ValueError("pass the semantic input or an extra, not both (an extra wraps the semantic one)")
            extra = self.semantic.prepare(semantic, semantic_ids, img_ids, semantic_strength)

        # running on the image tokens and text tokens
        img = self.img_in(img if extra is None else extra.on_input(img))  # [B, L_img, D]
        vec = self.time_in(timestep_embedding(timesteps, 256))  # [B, D]
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)  # [B, L_txt, D]
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # [B, 1, L_txt + L_img, Dh/2, 2, 2]

        for i, block in enumerate(self.double_blocks):
            img, txt = self.run(block, img, txt, vec, pe, extra, f"double.{i}")
        L_txt = txt.shape[1]
        img = torch.cat((txt, img), dim=1)  # [B, L_txt + L_img, D]
        for i, block in enumerate(self.single_blocks):
            img = self.run(block, img, vec, pe, L_txt, extra, f"single.{i}")
        img = img[:, L_txt:]  # [B, L_img, D]
        return self.final_layer(img, vec)  # [B, L_img, out_channels]

    def run(self, block: nn.Module, *args):
        """block(*args); with gradient checkpointing while training, its activations are recomputed in backward
        (the block's extra included: a semantic module's work is part of the block)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
