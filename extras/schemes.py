"""
The other schemes of the ablation, beside the default scheme B of sem_cross_attn.py:

- scheme A, "zeroconv": a ControlNet-style zero-initialised convolution on the packed semantic latents, added to
  the x_cond tokens (the last N image tokens in Kontext order) before img_in          (Extra.on_input)
- scheme B, separate form (attention "separate"): a cross-attention of its own after every chosen block, queries
  from the image tokens, keys/values from the semantic tokens, QK RMSNorm, RoPE on (row, col) of both sides, a
  LayerNorm on the output and a scale initialised to 0:
      img <- img + strength * scale * LN(CrossAttn(img, sem))                            (Extra.after_block)
- scheme C, "adapter": after every chosen block a gated adapter (semantic self-attention, image -> semantic
  cross-attention, feed-forward):  img <- img + strength * gate * Adapter(img, sem), gate initialised to 0
- options of scheme B's decoupled form: one key/value projection shared by every block (shared_kv), a light CNN
  encoder straight from pixels (encoder "cnn"), a choice of blocks (blocks double | single | every:K)
- the baselines without a module: "overlay" (sem_cross_attn.overlay, pixel fusion) and "none" (the plain model).

Every scheme is exactly the identity at initialisation. SchemeModule is sem_cross_attn.SemanticModule with its
make_/chosen_ methods chosen by the config, so state-dict keys keep one layout (`semantic.encoder.*`,
`semantic.double_blocks.{i}.*`, `semantic.zeroconv.*`).
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from einops import rearrange

from flux_model import EmbedND, Flux, FluxParams, RMSNorm, apply_rope
from sem_cross_attn import (DEFAULT_B, DecoupledSemanticAttention, LatentProjection, SemanticConfig, SemanticContext,
                            SemanticModule, attach_module, kv_projection)

BASELINES = ("overlay", "none")  # no module: the semantic image blended into the RGB input, or not used at all
# each scheme with a module, as train.py starts from it (the --sem-* flags override fields)
PRESETS: dict[str, SemanticConfig] = {
    "xattn": DEFAULT_B,
    "zeroconv": SemanticConfig(scheme="zeroconv", attention="separate", token_dim=0),
    "adapter": SemanticConfig(scheme="adapter", attention="separate", token_dim=0),
}


def chosen_blocks(blocks: str, n_double: int, n_single: int) -> tuple[list[int], list[int]]:
    """Which double and single blocks get a semantic module: all | double | single | every:K."""
    if blocks == "all":
        return list(range(n_double)), list(range(n_single))
    if blocks == "double":
        return list(range(n_double)), []
    if blocks == "single":
        return [], list(range(n_single))
    k = int(blocks.split(":")[1])
    return list(range(0, n_double, k)), list(range(0, n_single, k))


# ----------------------------------------------------------------------------------------------------------------
# Parts


class CNNEncoder(nn.Module):
    """A light trainable encoder straight from pixels, same token grid as the VAE path (/16):
    [B, 3, H, W] -> [B, T, H/16, W/16] -> [B, N, T]."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(chans[-1], dim, 3, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[-1] % 16 or image.shape[-2] % 16:
            raise ValueError("the cnn semantic encoder takes the semantic image [B, 3, H, W] with sides multiples "
                             f"of 16, got {tuple(image.shape)}")
        feat = self.net(image)  # [B, 3, H, W] -> [B, T, H/16, W/16]
        return rearrange(feat, "b d h w -> b (h w) d"), tuple(feat.shape[-2:])


class CrossAttention(nn.Module):
    """Queries from x [B, L, D], keys/values from ctx [B, N, T]; QK RMSNorm and RoPE as FLUX's attention."""

    def __init__(self, dim: int, inner_dim: int, num_heads: int, ctx_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_kv = nn.Linear(ctx_dim or dim, 2 * inner_dim)
        self.q_norm = RMSNorm(inner_dim // num_heads)
        self.k_norm = RMSNorm(inner_dim // num_heads)
        self.proj = nn.Linear(inner_dim, dim)

    def qkv(self, x: Tensor, ctx: Tensor, q_pe: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q [B, H, L, Dh], rotated k and v [B, H, N, Dh]."""
        q = rearrange(self.to_q(x), "B L (H D) -> B H L D", H=self.num_heads)
        k, v = rearrange(self.to_kv(ctx), "B N (K H D) -> K B H N D", K=2, H=self.num_heads)
        return apply_rope(self.q_norm(q).to(v), q_pe), apply_rope(self.k_norm(k).to(v), k_pe), v

    def query_key(self, x: Tensor, ctx: Tensor, q_pe: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """What record_attention reads from a call."""
        return self.qkv(x, ctx, q_pe, k_pe)[:2]

    def forward(self, x: Tensor, ctx: Tensor, q_pe: Tensor, k_pe: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(*self.qkv(x, ctx, q_pe, k_pe))  # [B, H, L, Dh]
        return self.proj(rearrange(out, "B H L D -> B L (H D)"))  # [B, L, D]


class SemanticCrossAttention(nn.Module):
    """Scheme B, separate form, one block:  img <- img + strength * scale * LN(CrossAttn(img, sem)); scale starts
    at 0."""

    def __init__(self, dim: int, inner_dim: int, num_heads: int, token_dim: int | None = None):
        super().__init__()
        self.attn = CrossAttention(dim, inner_dim, num_heads, token_dim)
        self.norm = nn.LayerNorm(dim)
        self.scale = nn.Parameter(torch.zeros(1))

    @property
    def cross_attn(self) -> CrossAttention:
        """The image -> semantic attention (what record_attention looks at); `attn` in the checkpoint keys."""
        return self.attn

    def forward(self, img: Tensor, ctx: "SpatialContext") -> Tensor:
        """img [B, L_img, D] -> [B, L_img, D], in img's dtype: the fp32 scale (and a LayerNorm's fp32 output under
        CUDA autocast) cast where they meet the stream, which stays bf16 in a bf16 model."""
        h = self.norm(self.attn(img, ctx.tokens, ctx.q_pe, ctx.k_pe)).to(img.dtype)  # [B, L_img, D]
        return img + ctx.strength_as(img) * self.scale.to(img.dtype) * h


class SemanticAdapter(nn.Module):
    """Scheme C, one block: semantic self-attention, image -> semantic cross-attention, feed-forward;
    img <- img + strength * gate * adapter(img, sem); gate starts at 0."""

    def __init__(self, dim: int, inner_dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.sem_norm = nn.LayerNorm(dim)
        self.self_attn = CrossAttention(dim, inner_dim, num_heads)  # semantic tokens attend to themselves
        self.img_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.cross_attn = CrossAttention(dim, inner_dim, num_heads)
        self.ff_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, img: Tensor, ctx: "SpatialContext") -> Tensor:
        s = self.sem_norm(ctx.tokens)
        s = ctx.tokens + self.self_attn(s, s, ctx.k_pe, ctx.k_pe)  # [B, N, D]
        h = self.cross_attn(self.img_norm(img), s, ctx.q_pe, ctx.k_pe)  # [B, L_img, D]
        h = h + self.ff(self.ff_norm(h))
        return img + ctx.strength_as(img) * self.gate.to(img.dtype) * h.to(img.dtype)  # in img's dtype


class ZeroConv(nn.Module):
    """Scheme A: packed semantic latents on their grid -> conv -> zero conv -> added to the x_cond tokens.
    Only the last conv is zero-initialised (as ControlNet's), so gradients reach every weight from step 1."""

    def __init__(self, channels: int = 64, hidden: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.zero = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)
        self.scale = nn.Parameter(torch.ones(1))  # strength, the only thing the finetune stage adjusts

    def forward(self, raw: Tensor, grid: tuple[int, int]) -> Tensor:
        x = rearrange(raw, "b (h w) c -> b c h w", h=grid[0], w=grid[1])  # [B, N, 64] -> [B, 64, h, w]
        x = self.zero(F.silu(self.conv(x)))
        return self.scale.to(x.dtype) * rearrange(x, "b c h w -> b (h w) c")  # [B, N, 64], in x's dtype


# ----------------------------------------------------------------------------------------------------------------
# The contexts (flux_model.Extra) the schemes give a forward


@dataclass
class SpatialContext(SemanticContext):
    """Separate B and C: their own queries from the image tokens, rotated on (row, col); they act after a block."""
    q_pe: Tensor | None = None  # [B, 1, L_img, Dh/2, 2, 2]

    def image_attention(self, name: str, q: Tensor) -> Tensor | None:
        return None

    def after_block(self, name: str, img: Tensor) -> Tensor:
        block = self.module.block(name)
        return img if block is None else block(img, self)


@dataclass
class ZeroConvContext(SemanticContext):
    """Scheme A: acts on the input tokens only."""

    def image_attention(self, name: str, q: Tensor) -> Tensor | None:
        return None

    def on_input(self, img: Tensor) -> Tensor:
        """img: [x_t | x_cond] (Kontext order), or x_cond alone (the condition cache's condition pass)."""
        N = self.tokens.shape[1]
        if img.shape[1] < N:
            raise ValueError("scheme zeroconv adds to the x_cond tokens, which must follow x_t (Kontext order); "
                             f"got {img.shape[1]} image tokens for {N} semantic tokens")
        delta = self.module.zeroconv(self.tokens, self.grid)  # [B, N, 64]
        # [x_t | x_cond + zeroconv(sem)]: x_cond are the last N tokens; in img's dtype
        return torch.cat((img[:, :-N], img[:, -N:] + self.strength_as(img) * delta.to(img.dtype)), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The module


class SchemeModule(SemanticModule):
    """Every scheme and option beyond the default scheme B, chosen by its config."""

    def __init__(self, config: SemanticConfig, params: FluxParams):
        super().__init__(config, params)
        if config.scheme == "zeroconv":
            self.zeroconv = ZeroConv()

    def make_pe(self, params: FluxParams) -> EmbedND:
        if self.config.attention == "decoupled":  # the transformer's own 3-axis RoPE (the block's queries)
            return super().make_pe(params)
        # separate B / C / A: RoPE over (row, col) only; the first id axis (target 0 / condition 1) carries no
        # spatial meaning here, so x_t and x_cond queries both line up with the semantic token at their location
        head_dim = self.inner // self.heads
        return EmbedND(dim=head_dim, theta=params.theta, axes_dim=[head_dim // 2, head_dim // 2])

    def make_encoder(self) -> nn.Module | None:
        if self.config.scheme == "zeroconv":
            return None  # the packed latents themselves
        return CNNEncoder(self.token_dim) if self.config.encoder == "cnn" else LatentProjection(64, self.token_dim)

    def make_shared(self, dim: int) -> nn.Module | None:
        return kv_projection(self.token_dim, dim) if self.config.shared_kv else None

    def chosen_blocks(self, depth: int, depth_single: int) -> tuple[list[int], list[int]]:
        if self.config.scheme == "zeroconv":
            return [], []
        return chosen_blocks(self.config.blocks, depth, depth_single)

    def make_block(self, dim: int) -> nn.Module:
        if self.config.attention == "decoupled":
            return DecoupledSemanticAttention(self.token_dim, dim, self.heads, own_kv=not self.config.shared_kv)
        if self.config.scheme == "xattn":
            return SemanticCrossAttention(dim, self.inner, self.heads, self.token_dim)
        return SemanticAdapter(dim, self.inner, self.heads, self.config.mlp_ratio)

    def context(self, tokens: Tensor, grid: tuple[int, int], img_ids: Tensor, semantic_ids: Tensor,
                strength: float | Tensor) -> SemanticContext:
        if self.config.scheme == "zeroconv":
            return ZeroConvContext(self, tokens, grid, self.pe(semantic_ids[..., 1:]), strength)
        if self.config.attention == "decoupled":
            kv = self.shared(tokens) if self.shared is not None else None  # [B, N, T] -> [B, N, 2D], once
            return SemanticContext(self, tokens, grid, self.pe(semantic_ids), strength, kv)
        return SpatialContext(self, tokens, grid, self.pe(semantic_ids[..., 1:]), strength,
                              q_pe=self.pe(img_ids[..., 1:]))

    def recorded_attentions(self) -> dict[str, nn.Module]:
        return {name: getattr(b, "cross_attn", b) for name, b in self.blocks().items()}


def attach(model: Flux, config: SemanticConfig, dtype: torch.dtype | None = None) -> SemanticModule:
    """Any scheme's module, attached as model.semantic (the default scheme B: sem_cross_attn.attach's)."""
    config.validate(model.params.hidden_size, model.params.num_heads)
    module = SemanticModule(config, model.params) if config.is_core else SchemeModule(config, model.params)
    return attach_module(model, module, dtype)


def parameter_count(config: SemanticConfig, params: FluxParams) -> int:
    """Parameters of the semantic module `config` on a transformer of FluxParams `params` (e.g. PRESETS["dev"]),
    counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in attach(Flux(params), replace(config)).parameters())
