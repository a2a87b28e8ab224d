"""
The FLUX.1 transformer, written from its formulas.

References: black-forest-labs/flux (src/flux/model.py, modules/layers.py, math.py) for the architecture and the
checkpoint key names; ../shared/design/FLUX_SPEC.md §1-2 and §5 for every constant used here.

Module attribute names ARE the official checkpoint keys (`double_blocks.3.img_attn.qkv.weight`), so
flux1-dev / flux1-schnell / flux1-kontext-dev safetensors load with no renaming table.

Dimension letters used in the shape comments:
    B batch, L sequence length (L_txt text tokens, L_img image tokens), D hidden size (3072 for dev),
    H attention heads (24), Dh head dim (128), C packed latent channels (64 = 16 latent channels x 2 x 2).

Data flow (512x512 RGB with Kontext conditioning, dev sizes):
    latents [B,16,64,64] --flow.pack--> tokens [B,1024,64]; cat(x_t, x_cond) -> [B,2048,64] --img_in--> [B,2048,3072]
    T5 [B,512,4096] --txt_in--> [B,512,3072];  t, guidance, CLIP pooled y -> vec [B,3072]
    19 double blocks (separate img/txt weights, joint attention) -> 38 single blocks on cat(txt, img) [B,2560,3072]
    -> drop text -> final_layer -> velocity [B,2048,64]; the caller keeps the first 1024 (the x_t tokens).

Semantic conditioning (sem_cross_attn.py) attaches itself as `flux.semantic`; with no module attached the model
and its state dict are exactly the official ones.

A forward is two parts: `fix` (what depends on neither x_t nor t: the text embedding, RoPE, the semantic tokens and
their keys and values) and `step` (the rest). The sampler (flow.denoise) calls fix once per image and step at every
denoising step, and its last block computes outputs only for the x_t tokens the caller keeps: the exact reuse, the
same numbers as a whole forward per step. `condition_cache = True` is another model, trained so (OminiControl2 /
EasyControl): the condition tokens get the modulation of t = 0 and attend only to themselves, so fix runs them
through the blocks once (the condition pass) and every step runs the text and x_t tokens alone, attending to the
cached condition keys and values as well:
    Kontext:          each step  cat(txt, x_t, x_cond) [B, 512 + 2048, D] through 57 blocks
    condition cache:  once       x_cond [B, 1024, D] alone at t = 0 -> its K/V per block [B, 24, 1024, 128]
                      each step  cat(txt, x_t) [B, 512 + 1024, D], keys and values [txt, x_t | cached x_cond]

Every formula below is written plainly first. Four have a second form beside them, a small named function that
computes the same maths with less memory or in one pass: RMSNorm's backward, the RoPE rotation (with the
column-major storage of pe it views), and the gated residual and modulation (fused multiply-adds). `FAST`
(nanoGPT's `self.flash`, for the whole module) picks them; it is on by default, and the results and weights of this
repository were computed with it. `flux_model.FAST = False` runs the plain formulas only: the same values up to
rounding (tests/test_flux_model.py checks that both forms agree, forward and gradients).
The percentages in comments were measured on a CPU, on a FLUX of hidden 512, 8 heads, 2 double + 4 single blocks,
128 text + 2 x 256 image tokens, fp32 unless said: "forward peak" is the memory a no-grad forward allocates above
what is resident, "training activations" the bytes autograd keeps for the backward of a training step. None of the
fast forms changes the time of a forward or a training step measurably there (all within +-4%, the noise).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from einops import rearrange


FAST = True  # the fast forms beside the plain formulas (see the module docstring); False: plain formulas only

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
        if FAST:  # each 2x2 matrix stored column by column: apply_rope_complex views its first column in place
            pe = pe.transpose(-1, -2).contiguous().transpose(-1, -2)
        return pe.unsqueeze(1)  # [B, 1, L, Dh/2, 2, 2]: broadcast over heads


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate ADJACENT pairs (x[2k], x[2k+1]) of x [B, H, L, Dh] by pe [B, 1, L, Dh/2, 2, 2], in float32."""
    if FAST and not torch.compiler.is_compiling():
        return apply_rope_complex(x, pe)
    x_ = x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 1, 2)  # [B, H, L, Dh/2, 1, 2]: each pair as a row
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]  # R[i,0] x0 + R[i,1] x1: [B, H, L, Dh/2, 2]
    return out.reshape(*x.shape).type_as(x)


def apply_rope_complex(x: Tensor, pe: Tensor) -> Tensor:
    """apply_rope as one complex product: rotating (x0, x1) by R = [[cos, -sin], [sin, cos]] multiplies x0 + i x1
    by cos + i sin. None of the matrix form's temporaries: forward peak -6% in fp32 (nothing measurable in bf16).
    Eager only (Inductor generates no code for complex numbers)."""
    col = pe[..., 0]  # R's first column (cos, sin): [B, 1, L, Dh/2, 2], a complex number in place if pe is column-major
    rot = torch.view_as_complex(col) if col.stride(-1) == 1 else torch.complex(col[..., 0], col[..., 1])
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))  # [B, H, L, Dh/2] complex64
    return torch.view_as_real(x_ * rot).reshape(*x.shape).type_as(x)  # [B, H, L, Dh]


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention with RoPE and no mask (FLUX masks nothing, text padding included).
    q, k, v [B, H, L, Dh] -> [B, L, H*Dh]."""
    return attend(apply_rope(q, pe), apply_rope(k, pe), v)


def attend(q: Tensor, k: Tensor, v: Tensor, cached: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v on rotated q [B, H, Lq, Dh] and k, v [B, H, Lk, Dh] -> [B, Lq, H*Dh].
    cached: the condition cache's keys and values of this block ([B, H, L_c, Dh] each, rotated), which every query
    also attends to (see Flux.fix)."""
    if cached is not None:
        k, v = torch.cat((k, cached[0]), dim=2), torch.cat((v, cached[1]), dim=2)  # [B, H, Lk + L_c, Dh]
    x = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, Dh]
    return rearrange(x, "B H L D -> B L (H D)")


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and modulation


def inv_rms(x: Tensor, eps: float = 1e-6) -> Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim: [..., D] -> [..., 1]."""
    return torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the last dim; statistics in float32, the normalised x rounded to
    x's dtype before the scale (as BFL's)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D]
        if FAST:
            return RMSNormKeepingInput.apply(x, self.scale)
        xf = x.float()
        return (xf * inv_rms(xf)).to(x.dtype) * self.scale


class RMSNormKeepingInput(torch.autograd.Function):
    """RMSNorm whose backward keeps only x and inv_rms [..., 1] and recomputes the normalised x n = x * inv_rms;
    autograd on the plain formula keeps n too, a second x-sized tensor per norm: training activations -9% (fp32,
    every weight trained), -15% (bf16 base, LoRA trained)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 (float64 stays float64: gradcheck)
        r = inv_rms(xf)  # [..., 1]
        ctx.save_for_backward(x, r, scale)
        return (xf * r).to(x.dtype) * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, r, scale = ctx.saved_tensors
        n = x.to(r.dtype) * r  # the normalised x, recomputed: [..., D]
        grad_x = grad_scale = None
        if ctx.needs_input_grad[1]:  # d/dscale = sum over tokens of g * n: [D]
            grad_scale = (g.to(n.dtype) * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(scale.dtype)
        if ctx.needs_input_grad[0]:  # d/dx with gn = g * scale: r * (gn - n * mean(gn * n))
            gn = g.to(n.dtype) * scale.to(n.dtype)
            grad_x = (r * (gn - n * (gn * n).mean(dim=-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_scale


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


def modulate(x: Tensor, norm: nn.Module, mod: ModulationOut) -> Tensor:
    """(1 + scale) * norm(x) + shift."""
    if FAST:
        return torch.addcmul(mod.shift, norm(x), 1 + mod.scale)  # one fused multiply-add (see gated_residual)
    return (1 + mod.scale) * norm(x) + mod.shift


def gated_residual(x: Tensor, gate: Tensor, fx: Tensor) -> Tensor:
    """x + gate * f(x): every block's update of its stream."""
    if FAST:
        # one fused multiply-add, rounded once: no time or memory measurable on a CPU, kept as the default because
        # the demo weights and results were computed with it (the plain form rounds twice: other low bits)
        return torch.addcmul(x, gate, fx)
    return x + gate * fx


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
        # qkv.weight rows are [all q | all k | all v], each head-major: [B, L, 3*D] -> 3 x [B, H, L, Dh]
        q, k, v = (rearrange(t, "B L (H D) -> B H L D", H=self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        # the norms keep their inputs for the backward: copies, so that the qkv output (v's third included) is
        # freed once v is used: training activations -1.6%
        q, k = self.norm(q.contiguous(), k.contiguous(), v)
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

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, sem_attn=None,
                cached: tuple[Tensor, Tensor] | None = None, return_kv: bool = False):
        """sem_attn: None, or a decoupled semantic attention (sem_cross_attn.DecoupledSemanticAttention) that reads the
        image queries [B, H, L_img, Dh] and their RoPE and returns [B, L_img, D] to add before the output projection.
        cached: the condition cache's keys and values for this block (see `attend`).
        Returns (img, txt), or with return_kv (img, txt, (k, v)): the image stream's own rotated keys and values
        [B, H, L_img, Dh], which the condition pass caches."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, self.img_norm1, img_mod1))  # [B, H, L_img, Dh]
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, self.txt_norm1, txt_mod1))  # [B, H, L_txt, Dh]
        # joint attention over cat(txt, img): text first, matching the order of the ids (and so of pe)
        q = torch.cat((txt_q, img_q), dim=2)  # [B, H, L_txt + L_img, Dh]
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        del img_q, img_k, img_v, txt_q, txt_k, txt_v  # free the parts before the attention: forward peak -12%
        L_txt = txt.shape[1]
        k = apply_rope(k, pe)
        attn = attend(apply_rope(q, pe), k, v, cached)  # [B, L_txt + L_img, D]
        txt_attn, img_attn = attn.split((L_txt, img.shape[1]), dim=1)
        if sem_attn is not None:  # image queries also attend to the semantic tokens (IP-Adapter's decoupled form)
            img_attn = img_attn + sem_attn(q[:, :, L_txt:], pe[:, :, L_txt:])  # [B, L_img, D]
        img = gated_residual(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = gated_residual(img, img_mod2.gate, self.img_mlp(modulate(img, self.img_norm2, img_mod2)))
        txt = gated_residual(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = gated_residual(txt, txt_mod2.gate, self.txt_mlp(modulate(txt, self.txt_norm2, txt_mod2)))
        return (img, txt, (k[:, :, L_txt:], v[:, :, L_txt:])) if return_kv else (img, txt)


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

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, sem_attn=None, L_txt: int = 0,
                cached: tuple[Tensor, Tensor] | None = None,
                keep: int | None = None, return_kv: bool = False):
        """sem_attn (see DoubleStreamBlock): added to the attention output of the image part, x[:, L_txt:].
        cached: the condition cache's keys and values (see `attend`).
        keep: outputs only for the first `keep` image tokens, x[:, L_txt:L_txt + keep] -> [B, keep, D] (the last
        block: the final layer reads nothing else); keys and values still come from every token.
        Returns x, or with return_kv (x, (k, v)): this block's own rotated keys and values [B, H, L, Dh] (the
        condition pass caches them)."""
        mod, _ = self.modulation(vec)
        D = self.hidden_size
        q, k, v, mlp_in = torch.split(self.linear1(modulate(x, self.pre_norm, mod)),
                                      [D, D, D, self.mlp_hidden_dim], dim=-1)  # [B, L, D] x 3, [B, L, 4D]
        q_pe = pe
        if keep is not None:  # queries, MLP and output for the kept tokens only: [B, keep, .]
            rows = slice(L_txt, L_txt + keep)
            x, q, mlp_in, q_pe, L_txt = x[:, rows], q[:, rows], mlp_in[:, rows], pe[:, :, rows], 0
        q, k, v = (rearrange(t, "B L (H D) -> B H L D", H=self.num_heads) for t in (q, k, v))
        q, k = self.norm(q, k, v)
        k = apply_rope(k, pe)
        attn = attend(apply_rope(q, q_pe), k, v, cached)  # [B, L, D]
        if sem_attn is not None:  # the image part's queries also attend to the semantic tokens
            attn = torch.cat((attn[:, :L_txt], attn[:, L_txt:] + sem_attn(q[:, :, L_txt:], q_pe[:, :, L_txt:])),
                             dim=1)
        mlp = self.mlp_act(mlp_in)  # [B, L, 4D]
        kv = (k, v) if return_kv else None
        del q, k, v, mlp_in  # the last views of linear1's output, freed before the cat: forward peak -31%
        x = gated_residual(x, mod.gate, self.linear2(torch.cat((attn, mlp), dim=-1)))
        return (x, kv) if return_kv else x


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


@dataclass
class Fixed:
    """What a forward computes from neither x_t nor t (Flux.fix). The sampler computes it once per image and reuses
    it at every denoising step (Flux.step): the exact reuse; one forward is fix + step."""
    txt: Tensor  # [B, L_txt, D] text tokens after txt_in
    guidance_vec: Tensor | None  # [B, D] guidance embedding (dev / Kontext), None without
    y_vec: Tensor  # [B, D] pooled text vector, embedded
    pe: Tensor  # [B, 1, L_txt + L_img, Dh/2, 2, 2] RoPE of the sequence each step runs
    sem: object | None  # sem_cross_attn.SemanticContext (its semantic keys and values computed once), or None
    x_cond: Tensor | None = None  # Kontext sampling: the condition tokens [B, L_c, 64], appended to x_t at each step
    cond_kv: list | None = None  # the condition cache: every block's condition keys and values (double, then single)


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
        self.gradient_checkpointing = False  # recompute block activations in backward: memory for compute
        # the condition cache (a training choice, stored in the run config; see `fix`): False is Kontext, the official
        # model, where the condition tokens ride through every block at every step
        self.condition_cache = False

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return activation_checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def fix(self, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, y: Tensor, guidance: Tensor | None = None,
            semantic: Tensor | None = None, semantic_ids: Tensor | None = None,
            semantic_strength: float | Tensor = 1.0, x_cond: Tensor | None = None) -> Fixed:
        """Everything of a forward that depends on neither x_t nor t (arguments as forward's).
        img_ids: the ids of the whole image sequence [B, L_img, 3], [x_t | x_cond] in Kontext order.
        x_cond: the condition tokens [B, L_c, 64] (the last L_c of the sequence), given when the sampler reuses the
        result at every step; then `step` takes x_t alone.
        With the condition cache (self.condition_cache) the condition tokens get the modulation of t = 0 and attend
        only to themselves, so every block's keys and values of theirs are the same at every step: they run through
        the blocks here (the condition pass), and each step's x_t and text tokens attend to those cached keys and
        values too. That is another model than Kontext's (trained so: train.py --condition-cache)."""
        if self.params.guidance_embed and guidance is None:
            raise ValueError("this is a guidance-distilled model (dev/Kontext): pass guidance, e.g. 3.5")
        sem = None
        if semantic is not None:
            if self.semantic is None:
                raise ValueError("semantic tokens were given but no semantic module is attached "
                                 "(see sem_cross_attn.attach)")
            sem = self.semantic.prepare(semantic, semantic_ids, img_ids, semantic_strength)
        g_vec = self.guidance_in(timestep_embedding(guidance, 256)) if self.params.guidance_embed else None
        fixed = Fixed(self.txt_in(txt), g_vec, self.vector_in(y), None, sem)  # txt: [B, L_txt, D]
        if not self.condition_cache:
            fixed.pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # [B, 1, L_txt + L_img, Dh/2, 2, 2]
            fixed.x_cond = x_cond
            return fixed
        if x_cond is None or not 0 < x_cond.shape[1] < img_ids.shape[1]:
            raise ValueError("the condition cache needs the condition tokens: img = cat(x_t, x_cond) with the "
                             "condition ids' first axis 1 (flow.kontext_ids)")
        L_x = img_ids.shape[1] - x_cond.shape[1]
        x_ids, cond_ids = img_ids[:, :L_x], img_ids[:, L_x:]
        fixed.pe = self.pe_embedder(torch.cat((txt_ids, x_ids), dim=1))  # [B, 1, L_txt + L_x, Dh/2, 2, 2]
        fixed.sem = sem.for_tokens(slice(0, L_x)) if sem is not None else None
        # the condition pass: x_cond alone, at t = 0, no text; every block's keys and values are kept (its last block
        # computes nothing else: keep=0)
        c = self.img_in(self.semantic.on_input(x_cond, sem) if sem is not None else x_cond)  # [B, L_c, D]
        vec0 = self.time_vector(torch.zeros(x_cond.shape[0], device=c.device, dtype=c.dtype), fixed)  # [B, D]
        c_sem = sem.for_tokens(slice(L_x, None)) if sem is not None else None
        _, fixed.cond_kv = self.run_blocks(c, fixed.txt[:, :0], vec0, self.pe_embedder(cond_ids), c_sem, keep=0,
                                           return_kv=True)
        return fixed

    def time_vector(self, timesteps: Tensor, fixed: Fixed) -> Tensor:
        """The modulation input: timestep (+ guidance) + pooled text embeddings, [B] -> [B, D]."""
        vec = self.time_in(timestep_embedding(timesteps, 256))  # [B, D]
        if fixed.guidance_vec is not None:
            vec = vec + fixed.guidance_vec
        return vec + fixed.y_vec

    def run_blocks(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, sem, cached: list | None = None,
                   keep: int | None = None, return_kv: bool = False) -> tuple[Tensor, list | None]:
        """The double blocks, then the single blocks on cat(txt, img): img [B, L_img, D], txt [B, L_txt, D] ->
        (the image tokens' outputs [B, L_img, D], or [B, keep, D] for the first `keep` (the last block computes only
        those), and with return_kv every block's own rotated image keys and values (double, then single))."""
        n_double, L_txt = len(self.double_blocks), txt.shape[1]
        cached = cached or [None] * (n_double + len(self.single_blocks))
        last = len(self.single_blocks) - 1

        # each block runs with its semantic module as one unit, so gradient checkpointing covers both
        def double(i: int, img: Tensor, txt: Tensor):
            inside = self.semantic.inside_double(i, sem) if sem is not None else None
            img, txt, *kv = self.double_blocks[i](img, txt, vec, pe, inside, cached[i], return_kv)
            return (self.semantic.after_double(i, img, sem) if sem is not None else img), txt, *kv

        def single(i: int, x: Tensor):
            inside = self.semantic.inside_single(i, sem) if sem is not None else None
            k = keep if i == last else None
            out = self.single_blocks[i](x, vec, pe, inside, L_txt, cached[n_double + i], k, return_kv)
            x, kv = out if return_kv else (out, None)
            if sem is not None:  # only the image part attends to the semantic tokens; text stays untouched
                if k is not None:  # x holds the kept image tokens only
                    x = self.semantic.after_single(i, x, sem.for_tokens(slice(0, k)))
                else:
                    x = torch.cat((x[:, :L_txt], self.semantic.after_single(i, x[:, L_txt:], sem)), dim=1)
            return (x, kv) if return_kv else x

        kvs = []
        for i in range(n_double):
            img, txt, *kv = self._run(double, i, img, txt)
            kvs += kv
        x = torch.cat((txt, img), dim=1)  # [B, L_txt + L_img, D]
        del txt, img  # forward peak -7%
        for i in range(len(self.single_blocks)):
            x = self._run(single, i, x)
            if return_kv:
                x, kv = x
                kvs.append(kv)
        img = x if keep is not None else x[:, L_txt:]  # [B, L_img or keep, D]
        return img, (kvs if return_kv else None)

    def step(self, x: Tensor, timesteps: Tensor, fixed: Fixed) -> Tensor:
        """The part of a forward that changes with x_t and t: x [B, L, 64], timesteps [B] -> velocity [B, L', 64].
        fixed.x_cond or fixed.cond_kv set (the sampler's fix, and the condition cache's forward): x is x_t alone and
        L' = L (the last block computes those tokens' outputs only). Otherwise x is the whole image sequence and L'
        its length."""
        img, keep = x, None
        if fixed.x_cond is not None:  # Kontext: [x_t | x_cond], and only x_t's outputs are read
            img, keep = torch.cat((x, fixed.x_cond), dim=1), x.shape[1]  # [B, L + L_c, 64]
        elif fixed.cond_kv is not None:  # the condition cache: x_t alone, the text tokens' outputs not needed
            keep = x.shape[1]
        if fixed.sem is not None and fixed.cond_kv is None:
            img = self.semantic.on_input(img, fixed.sem)  # scheme A adds to the condition tokens; identity otherwise
        img = self.img_in(img)  # [B, L_img, 64] -> [B, L_img, D]
        vec = self.time_vector(timesteps, fixed)  # [B, D]
        img, _ = self.run_blocks(img, fixed.txt, vec, fixed.pe, fixed.sem, fixed.cond_kv, keep)
        return self.final_layer(img, vec)  # [B, L', out_channels]

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None, semantic: Tensor | None = None,
                semantic_ids: Tensor | None = None, semantic_strength: float | Tensor = 1.0) -> Tensor:
        """
        img: [B, L_img, 64] packed latents (Kontext: cat(x_t, x_cond) with cond ids axis 0 = 1)
        img_ids: [B, L_img, 3]; txt: [B, L_txt, context_in_dim]; txt_ids: [B, L_txt, 3]
        timesteps: [B] in [0, 1] (1 = noise); y: [B, vec_in_dim]; guidance: [B] raw value (dev/Kontext)
        semantic: [B, N_sem, 64] packed semantic latents, semantic_ids [B, N_sem, 3] (needs an attached module)
        semantic_strength: a multiplier on the semantic module's learned scales/gates, a float or [B] (0 for a sample
        switches its semantic input off: training's condition dropout)
        returns: [B, L_img, 64] velocity for every image token; with the condition cache for the x_t tokens only
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        if img_ids.shape[:2] != img.shape[:2] or txt_ids.shape[:2] != txt.shape[:2]:
            raise ValueError("ids must be [B, L, 3] matching their tokens: "
                             f"img {tuple(img.shape)} ids {tuple(img_ids.shape)}, txt {tuple(txt.shape)} "
                             f"ids {tuple(txt_ids.shape)}")
        args = (img_ids, txt, txt_ids, y, guidance, semantic, semantic_ids, semantic_strength)
        if self.condition_cache:
            L_c = condition_tokens(img_ids)
            return self.step(img[:, :-L_c], timesteps, self.fix(*args, x_cond=img[:, -L_c:]))  # [B, L_x, 64]
        return self.step(img, timesteps, self.fix(*args))  # [B, L_img, 64]


def condition_tokens(img_ids: Tensor) -> int:
    """How many Kontext condition tokens (first id axis 1) end the image sequence: img_ids [B, L_img, 3] -> L_c."""
    marked = img_ids[0, :, 0] != 0  # [L_img]
    L_c = int(marked.sum())
    if L_c == 0 or not bool(marked[-L_c:].all()):
        raise ValueError("the condition cache needs Kontext's image sequence cat(x_t, x_cond), the condition tokens "
                         "last with their ids' first axis 1 (flow.kontext_ids)")
    return L_c
