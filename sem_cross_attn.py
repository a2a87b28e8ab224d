"""
Semantic conditioning: the semantic map as an independent control signal for FLUX (../shared/design/SEED_DESIGN.md).

The semantic image is encoded into tokens on the image's own token grid, and image tokens consult them:

    semantic image [B,3,H,W] --frozen FLUX VAE--> [B,16,H/8,W/8] --pack--> [B,N,64] --projection--> [B,N,D]
                             (or a light trainable CNN: [B,3,H,W] --4 stride-2 convs--> [B,D,H/16,W/16] -> [B,N,D])

Schemes (pick one with SemanticConfig.scheme); one module class each, all attached as `flux.semantic`:
- "xattn" (scheme B, the default), XAttnModule: a SemanticCrossAttention after every chosen double-stream block (on
  the image stream) and single-stream block (on the image part of the joint sequence; text tokens are untouched):
  queries from image tokens, keys/values from semantic tokens, QK RMSNorm as FLUX does, RoPE on BOTH sides with
  their (row, col) positions so a region attends to the class at its own location, LayerNorm on the output and a
  learnable scale initialised to 0.   img <- img + scale * LN(CrossAttn(img, sem))
- "zeroconv" (scheme A), ZeroConvModule: a ControlNet-style zero-initialised convolution on the packed semantic
  latents, added to the x_cond tokens (the last N image tokens in Kontext order) before img_in.
- "adapter" (scheme C), AdapterModule: after each chosen block a gated adapter (semantic self-attention,
  image->semantic cross-attention, feed-forward):   img <- img + gate * Adapter(img, sem), gate initialised to 0.
The baselines need no module: "overlay" is a data transform (see `overlay`), "none" is the plain model.

Every scheme is exactly the identity at initialisation, so training starts from the pretrained model.
The module's parameters are the only ones the `warmup` stage trains.
"""

import re
from dataclasses import dataclass, asdict, field, replace

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from einops import rearrange

from flow import pack
from flux_model import Flux, EmbedND, RMSNorm, apply_rope

SCHEMES = ("xattn", "zeroconv", "adapter")  # the schemes with a module (attach)
ATTENTION_FORMS = ("separate", "decoupled")  # scheme B's two forms (SemanticConfig.attention)
BASELINES = ("overlay", "none")  # no module: the semantic image blended into the RGB input, or not used at all


@dataclass
class SemanticConfig:
    scheme: str = "xattn"  # xattn (B) | zeroconv (A) | adapter (C)
    encoder: str = "vae"  # vae: FLUX-VAE latents + projection | cnn: light trainable CNN on the semantic image
    blocks: str = "all"  # all | double | single | every:K (every K-th block of each kind)
    num_heads: int = 0  # 0: the transformer's own head count
    inner_dim: int = 0  # attention width; 0: the transformer's hidden size. Smaller saves parameters.
    mlp_ratio: float = 2.0  # adapter feed-forward width (scheme C)
    # scheme B's form: "separate" (its own cross-attention after each chosen block) or "decoupled" (IP-Adapter: only
    # new keys/values, read by the block's own image queries inside its attention, through its output projection)
    attention: str = "separate"
    token_dim: int = 0  # width of the semantic tokens (the encoder's output); 0: the transformer's hidden size
    shared_kv: bool = False  # decoupled: one key/value projection for every chosen block (computed once per call)

    @property
    def takes_pixels(self) -> bool:
        """True: Flux.forward's `semantic=` is the semantic image [B, 3, H, W] in [-1, 1] (the cnn encoder).
        False: it is the packed VAE latents of the semantic image [B, N, 64] (the vae encoder, and scheme A)."""
        return self.encoder == "cnn" and self.scheme != "zeroconv"

    def to_dict(self) -> dict:
        return asdict(self)

    def attention_shape(self, hidden_size: int, num_heads: int) -> tuple[int, int]:
        """(heads, width) of the semantic attention for a transformer of this hidden size and head count."""
        heads, inner = self.num_heads or num_heads, self.inner_dim or hidden_size
        if inner % heads or (inner // heads) % 4:
            raise ValueError(f"inner_dim {inner} / num_heads {heads} must give a head dim that is a multiple of 4 "
                             "(RoPE rotates pairs on 2 spatial axes)")
        return heads, inner

    def validate(self, hidden_size: int | None = None, num_heads: int | None = None):
        """The options on their own; with the transformer's sizes, also the attention's shape."""
        if hidden_size is not None and self.scheme != "zeroconv":
            self.attention_shape(hidden_size, num_heads)
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; choose from {SCHEMES}")
        if self.encoder not in ("vae", "cnn"):
            raise ValueError(f"unknown semantic encoder {self.encoder!r}; choose vae or cnn")
        if self.scheme == "zeroconv" and self.encoder != "vae":
            raise ValueError("scheme zeroconv adds to the x_cond latent tokens, so it takes the VAE latents "
                             "(encoder vae)")
        if not re.fullmatch(r"all|double|single|every:[1-9]\d*", self.blocks):
            raise ValueError(f"blocks must be all, double, single or every:K, got {self.blocks!r}")
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"unknown semantic attention {self.attention!r}; choose from {ATTENTION_FORMS}")
        if self.attention == "decoupled" and self.scheme != "xattn":
            raise ValueError("the decoupled attention is a form of scheme B: it needs scheme xattn")
        if self.attention == "decoupled" and (self.num_heads or self.inner_dim):
            raise ValueError("the decoupled attention uses the block's own heads and width: leave num_heads and "
                             "inner_dim at 0 (token_dim sets the semantic tokens' width)")
        if self.shared_kv and self.attention != "decoupled":
            raise ValueError("shared_kv is an option of the decoupled attention")
        if self.token_dim < 0 or (self.token_dim and self.scheme != "xattn"):
            raise ValueError(f"token_dim {self.token_dim}: a positive width, for scheme xattn only (0: the "
                             "transformer's hidden size)")


# train.py's scheme B (the README's three-seed ablation: the decoupled form with 64-dim semantic tokens)
DEFAULT_B = SemanticConfig(attention="decoupled", token_dim=64)


def chosen_blocks(blocks: str, n_double: int, n_single: int) -> tuple[list[int], list[int]]:
    """Which double and single blocks get a semantic module."""
    if blocks == "all":
        return list(range(n_double)), list(range(n_single))
    if blocks == "double":
        return list(range(n_double)), []
    if blocks == "single":
        return [], list(range(n_single))
    k = int(blocks.split(":")[1])
    return list(range(0, n_double, k)), list(range(0, n_single, k))


# ----------------------------------------------------------------------------------------------------------------
# Semantic encoders


class LatentProjection(nn.Module):
    """Packed VAE latents of the semantic image -> semantic tokens: [B, N, 64] -> [B, N, D]."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, tokens: Tensor) -> tuple[Tensor, tuple[int, int] | None]:
        if tokens.ndim != 3:
            raise ValueError(f"the vae semantic encoder takes packed latents [B, N, 64], got {tuple(tokens.shape)}")
        return self.net(tokens), None


class CNNEncoder(nn.Module):
    """A light trainable encoder straight from pixels, same token grid as the VAE path (/16):
    [B, 3, H, W] -> [B, D, H/16, W/16] -> [B, N, D]."""

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
        feat = self.net(image)  # [B, 3, H, W] -> [B, D, H/16, W/16]
        return rearrange(feat, "b d h w -> b (h w) d"), tuple(feat.shape[-2:])


# ----------------------------------------------------------------------------------------------------------------
# Attention between image and semantic tokens


@dataclass
class SemanticContext:
    """Computed once per forward, shared by every block's module."""
    tokens: Tensor  # [B, N, D] semantic tokens (scheme A: the packed latents [B, N, 64] themselves)
    grid: tuple[int, int]  # (rows, cols) of the semantic token grid
    q_pe: Tensor | None  # [B, 1, L_img, Dh/2, 2, 2] RoPE of image tokens (spatial axes; None: decoupled, see there)
    k_pe: Tensor  # [B, 1, N, Dh/2, 2, 2] RoPE of semantic tokens (decoupled: the transformer's 3 axes)
    strength: float | Tensor = 1.0  # multiplies every learned scale/gate: a float, or [B, 1, 1] per sample
    kv: Tensor | None = None  # decoupled, shared: the semantic keys/values of every block [B, N, 2D], computed once
    memo: dict = field(default_factory=dict)  # what `once` keeps: each module's semantic keys and values

    def once(self, key, make):
        """make(), kept in this context when no gradient is taken: the sampler uses one context for every denoising
        step (Flux.fix), so the semantic keys and values are computed once per image. With gradients every call
        computes (training builds a new context per forward, and checkpointing replays the computation)."""
        if torch.is_grad_enabled():
            return make()
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def for_tokens(self, rows: slice) -> "SemanticContext":
        """This context for a part of the image sequence (the image queries' RoPE of those rows; the memo shared)."""
        return self if self.q_pe is None else replace(self, q_pe=self.q_pe[:, :, rows])


def attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """The softmax that the fused attention applies, written out in float32 so it can be looked at:
    q [B, H, Lq, Dh], k [B, H, N, Dh] -> softmax(q k^T / sqrt(Dh)) [B, H, Lq, N]."""
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)


class CrossAttention(nn.Module):
    """Queries from x [B, L, D], keys/values from ctx [B, N, D]; QK RMSNorm and RoPE as FLUX's attention."""

    def __init__(self, dim: int, inner_dim: int, num_heads: int, ctx_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_kv = nn.Linear(ctx_dim or dim, 2 * inner_dim)
        self.q_norm = RMSNorm(inner_dim // num_heads)
        self.k_norm = RMSNorm(inner_dim // num_heads)
        self.proj = nn.Linear(inner_dim, dim)

    def kv(self, ctx: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """The context's rotated keys and values: [B, N, D_ctx] -> 2 x [B, H, N, Dh]."""
        k, v = rearrange(self.to_kv(ctx), "B N (K H D) -> K B H N D", K=2, H=self.num_heads)  # 2 x [B, H, N, Dh]
        return apply_rope(self.k_norm(k).to(v), k_pe), v

    def qkv(self, x: Tensor, ctx: Tensor, q_pe: Tensor, k_pe: Tensor,
            kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """kv: self.kv(ctx, k_pe) if already computed."""
        q = rearrange(self.to_q(x), "B L (H D) -> B H L D", H=self.num_heads)  # [B, H, L, Dh]
        k, v = kv if kv is not None else self.kv(ctx, k_pe)
        return apply_rope(self.q_norm(q).to(v), q_pe), k, v

    def forward(self, x: Tensor, ctx: Tensor, q_pe: Tensor, k_pe: Tensor,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        q, k, v = self.qkv(x, ctx, q_pe, k_pe, kv)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, Dh]
        return self.proj(rearrange(out, "B H L D -> B L (H D)"))  # [B, L, D]


class SemanticCrossAttention(nn.Module):
    """Scheme B, one injection point:  img <- img + scale * LN(CrossAttn(img, sem)); scale starts at 0."""

    def __init__(self, dim: int, inner_dim: int, num_heads: int, token_dim: int | None = None):
        super().__init__()
        self.attn = CrossAttention(dim, inner_dim, num_heads, token_dim)
        self.norm = nn.LayerNorm(dim)
        self.scale = nn.Parameter(torch.zeros(1))

    @property
    def cross_attn(self) -> CrossAttention:
        """The image->semantic attention (what record_attention looks at); `attn` in the checkpoint keys."""
        return self.attn

    def forward(self, img: Tensor, ctx: SemanticContext) -> Tensor:
        kv = ctx.once(self, lambda: self.attn.kv(ctx.tokens, ctx.k_pe))  # per image: the same at every step
        return img + ctx.strength * self.scale * self.norm(self.attn(img, ctx.tokens, ctx.q_pe, ctx.k_pe, kv))


class DecoupledSemanticAttention(nn.Module):
    """Scheme B, decoupled (IP-Adapter's construction), one block: inside the block's attention, its own image
    queries (QK-normed; RoPE'd with the block's ids) also attend to the semantic tokens, whose keys (RMSNorm, RoPE
    from their own grid) and values are the only new projections; the result joins the block's attention output
    before its own output projection:   attn_img <- attn_img + scale * SDPA(q_img, k_sem, v_sem).
    The value projection starts at zero (the block is unchanged at init; the values get gradient at step 1)."""

    def __init__(self, token_dim: int, dim: int, num_heads: int, own_kv: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.to_kv = kv_projection(token_dim, dim) if own_kv else None  # None: the module's shared projection
        self.k_norm = RMSNorm(dim // num_heads)
        self.scale = nn.Parameter(torch.ones(1))

    @property
    def cross_attn(self) -> "DecoupledSemanticAttention":
        """What record_attention watches: this module itself (its forward takes the block's queries)."""
        return self

    def kv(self, ctx: SemanticContext) -> tuple[Tensor, Tensor]:
        """The semantic tokens' rotated keys and values, 2 x [B, H, N, Dh]."""
        kv = ctx.kv if self.to_kv is None else self.to_kv(ctx.tokens)  # [B, N, 2D]
        k, v = rearrange(kv, "B N (K H D) -> K B H N D", K=2, H=self.num_heads)  # 2 x [B, H, N, Dh]
        return apply_rope(self.k_norm(k).to(v), ctx.k_pe), v

    def qkv(self, q: Tensor, q_pe: Tensor, ctx: SemanticContext) -> tuple[Tensor, Tensor, Tensor]:
        """The block's queries q [B, H, L_img, Dh] and their RoPE -> rotated q, and the semantic k, v [B, H, N, Dh]."""
        k, v = ctx.once(self, lambda: self.kv(ctx))  # per image: the same at every step
        return apply_rope(q, q_pe), k, v

    def forward(self, q: Tensor, q_pe: Tensor, ctx: SemanticContext) -> Tensor:
        out = F.scaled_dot_product_attention(*self.qkv(q, q_pe, ctx))  # [B, H, L_img, Dh]
        return ctx.strength * self.scale * rearrange(out, "B H L D -> B L (H D)")  # [B, L_img, D]


def kv_projection(token_dim: int, dim: int) -> nn.Linear:
    """Semantic tokens -> keys | values [.., 2D], the value half zero (see DecoupledSemanticAttention)."""
    lin = nn.Linear(token_dim, 2 * dim)
    with torch.no_grad():
        lin.weight[dim:].zero_()
        lin.bias[dim:].zero_()
    return lin


class SemanticAdapter(nn.Module):
    """Scheme C, one injection point: semantic self-attention, image->semantic cross-attention, feed-forward;
    img <- img + gate * adapter(img, sem); gate starts at 0."""

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

    def forward(self, img: Tensor, ctx: SemanticContext) -> Tensor:
        def semantic_side():  # the semantic tokens' self-attention, and their keys and values: per image
            s = self.sem_norm(ctx.tokens)
            s = ctx.tokens + self.self_attn(s, s, ctx.k_pe, ctx.k_pe)  # [B, N, D]
            return s, self.cross_attn.kv(s, ctx.k_pe)
        s, kv = ctx.once(self, semantic_side)
        h = self.cross_attn(self.img_norm(img), s, ctx.q_pe, ctx.k_pe, kv)  # [B, L_img, D]
        h = h + self.ff(self.ff_norm(h))
        return img + ctx.strength * self.gate * h


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
        return self.scale * rearrange(x, "b c h w -> b (h w) c")  # [B, N, 64]


# ----------------------------------------------------------------------------------------------------------------
# The module attached to Flux: one class per scheme


class SemanticModule(nn.Module):
    """What every scheme shares, under one prefix (`semantic.`) of the state dict.
    Flux.forward calls prepare() once, on_input() before img_in, after_double()/after_single() after blocks;
    here each of those but prepare() is the identity, and a scheme overrides the ones it uses."""

    def __init__(self, config: SemanticConfig, hidden_size: int, num_heads: int, depth: int, depth_single: int,
                 theta: int = 10_000, axes_dim: list[int] | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.heads, self.inner = config.attention_shape(hidden_size, num_heads)
        head_dim = self.inner // self.heads
        # RoPE over (row, col) only: the first id axis (target 0 / condition 1) carries no spatial meaning here, so
        # x_t and x_cond queries both line up with the semantic token at their own location.
        self.pe = EmbedND(dim=head_dim, theta=theta, axes_dim=[head_dim // 2, head_dim // 2])
        self.record = None  # a dict name -> list of attention maps when recording (see record_attention)
        self._record_hooks = []

    def encode(self, semantic: Tensor) -> tuple[Tensor, tuple[int, int] | None]:
        """Flux.forward's `semantic=` -> semantic tokens [B, N, D] and their grid (None: read it from the ids)."""
        return semantic, None

    # -- called by Flux.forward ------------------------------------------------------------------------------------
    def prepare(self, semantic: Tensor, semantic_ids: Tensor | None, img_ids: Tensor,
                strength: float | Tensor = 1.0) -> SemanticContext:
        """strength: a float, or [B] (one per sample)."""
        B = img_ids.shape[0]
        tokens, grid = self.encode(semantic)  # [B, N, D]
        if semantic.shape[0] != B:
            raise ValueError(f"semantic batch {semantic.shape[0]} != image batch {B}")
        N = tokens.shape[1]
        if semantic_ids is None:
            # The semantic map is the target's size, so its tokens sit on the target grid: the first N image ids.
            semantic_ids = img_ids[:, :N]
        if semantic_ids.shape[:2] != (B, N):
            raise ValueError(f"semantic_ids {tuple(semantic_ids.shape)} do not match {N} semantic tokens")
        if grid is None:
            grid = (int(semantic_ids[0, :, 1].max()) + 1, int(semantic_ids[0, :, 2].max()) + 1)
        if grid[0] * grid[1] != N:
            raise ValueError(f"{N} semantic tokens do not fill their {grid[0]}x{grid[1]} id grid")
        if isinstance(strength, Tensor):
            if strength.shape != (B,):
                raise ValueError(f"semantic strength must be a number or one per sample [{B}], got "
                                 f"{tuple(strength.shape)}")
            strength = strength.to(tokens)[:, None, None]  # [B, 1, 1]
        q_pe, k_pe = self.positions(img_ids, semantic_ids)
        return SemanticContext(tokens=tokens, grid=grid, q_pe=q_pe, k_pe=k_pe, strength=strength)

    def positions(self, img_ids: Tensor, semantic_ids: Tensor) -> tuple[Tensor | None, Tensor]:
        """RoPE of the image queries and of the semantic keys, from their ids."""
        return self.pe(img_ids[..., 1:]), self.pe(semantic_ids[..., 1:])

    def on_input(self, img: Tensor, ctx: SemanticContext) -> Tensor:
        return img

    def inside_double(self, i: int, ctx: SemanticContext):
        """What double block i's attention adds for its image queries (see DecoupledSemanticAttention), or None."""
        return None

    def inside_single(self, i: int, ctx: SemanticContext):
        return None

    def after_double(self, i: int, img: Tensor, ctx: SemanticContext) -> Tensor:
        return img

    def after_single(self, i: int, img: Tensor, ctx: SemanticContext) -> Tensor:
        return img

    # -- for training stages and visualisation ---------------------------------------------------------------------
    def strength_parameters(self) -> list[nn.Parameter]:
        """The scales (B), gates (C) or zero-conv strength (A): what the finetune stage trains."""
        return [p for n, p in self.named_parameters() if n.endswith(("scale", "gate")) and p.numel() == 1]

    def recorded_attentions(self) -> dict[str, CrossAttention]:
        """The image->semantic attentions that record_attention watches, by name ("double.3", "single.0")."""
        return {}

    def record_attention(self, on: bool = True):
        """Opt in to keeping the cross-attention weights (heads averaged) per block: self.record[name] is a list of
        [B, L_img, N] maps, one per forward call. A forward hook on each attention recomputes its softmax from the
        call's inputs; the forward itself always takes the fused path. Off: the hooks are removed."""
        for handle in self._record_hooks:
            handle.remove()
        self._record_hooks = []
        self.record = {} if on else None
        if on:
            for name, attn in self.recorded_attentions().items():
                self._record_hooks.append(attn.register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def hook(attn: CrossAttention, args: tuple, out: Tensor):
            with torch.no_grad():
                q, k, _ = attn.qkv(*args)
                weights = attention_weights(q, k)  # [B, H, L_img, N]
                self.record.setdefault(name, []).append(weights.mean(dim=1))  # heads averaged: [B, L_img, N]
        return hook


class ZeroConvModule(SemanticModule):
    """Scheme A: the packed semantic latents, through a zero conv, added to the x_cond tokens before img_in."""

    def __init__(self, config: SemanticConfig, hidden_size: int, num_heads: int, depth: int, depth_single: int,
                 theta: int = 10_000, axes_dim: list[int] | None = None):
        super().__init__(config, hidden_size, num_heads, depth, depth_single, theta)
        self.zeroconv = ZeroConv()

    def on_input(self, img: Tensor, ctx: SemanticContext) -> Tensor:
        """img: [x_t | x_cond] (Kontext order), or x_cond alone (the condition cache's condition pass)."""
        N = ctx.tokens.shape[1]
        if img.shape[1] < N:
            raise ValueError("scheme zeroconv adds to the x_cond tokens, which must follow x_t (Kontext order); "
                             f"got {img.shape[1]} image tokens for {N} semantic tokens")
        delta = ctx.once(self, lambda: self.zeroconv(ctx.tokens, ctx.grid))  # [B, N, 64], per image
        # [x_t | x_cond + zeroconv(sem)]: x_cond are the last N tokens
        return torch.cat((img[:, :-N], img[:, -N:] + ctx.strength * delta), dim=1)


class BlockwiseModule(SemanticModule):
    """Schemes B and C: a semantic encoder, and one injection module per chosen transformer block (after it; the
    decoupled B: inside its attention)."""

    def __init__(self, config: SemanticConfig, hidden_size: int, num_heads: int, depth: int, depth_single: int,
                 theta: int = 10_000, axes_dim: list[int] | None = None):
        super().__init__(config, hidden_size, num_heads, depth, depth_single, theta)
        self.token_dim = config.token_dim or hidden_size
        self.encoder = (LatentProjection(64, self.token_dim) if config.encoder == "vae"
                        else CNNEncoder(self.token_dim))
        self.shared = self.make_shared(hidden_size)
        double_ids, single_ids = chosen_blocks(config.blocks, depth, depth_single)
        self.double_blocks = nn.ModuleDict({str(i): self.make_block(hidden_size) for i in double_ids})
        self.single_blocks = nn.ModuleDict({str(i): self.make_block(hidden_size) for i in single_ids})

    def make_block(self, dim: int) -> nn.Module:
        raise NotImplementedError

    def make_shared(self, dim: int) -> nn.Module | None:
        """A module every block uses (the decoupled B's shared K/V projection), or None."""
        return None

    @staticmethod
    def block(blocks: nn.ModuleDict, i: int) -> nn.Module | None:
        return blocks[str(i)] if str(i) in blocks else None

    def encode(self, semantic: Tensor) -> tuple[Tensor, tuple[int, int] | None]:
        return self.encoder(semantic)

    def after_double(self, i: int, img: Tensor, ctx: SemanticContext) -> Tensor:
        block = self.block(self.double_blocks, i)
        return img if block is None else block(img, ctx)

    def after_single(self, i: int, img: Tensor, ctx: SemanticContext) -> Tensor:
        block = self.block(self.single_blocks, i)
        return img if block is None else block(img, ctx)

    def recorded_attentions(self) -> dict[str, nn.Module]:
        return ({f"double.{i}": b.cross_attn for i, b in self.double_blocks.items()}
                | {f"single.{i}": b.cross_attn for i, b in self.single_blocks.items()})


class XAttnModule(BlockwiseModule):
    """Scheme B: img <- img + scale * LN(CrossAttn(img, sem)) after each chosen block."""

    def make_block(self, dim: int) -> nn.Module:
        return SemanticCrossAttention(dim, self.inner, self.heads, self.token_dim)


class DecoupledXAttnModule(BlockwiseModule):
    """Scheme B, decoupled: in each chosen block, the image queries also attend to the semantic tokens' own keys
    and values (DecoupledSemanticAttention); with shared_kv one projection serves every block and runs once per
    forward. Nothing is added after the blocks."""

    def __init__(self, config: SemanticConfig, hidden_size: int, num_heads: int, depth: int, depth_single: int,
                 theta: int = 10_000, axes_dim: list[int] | None = None):
        if axes_dim is None:
            raise ValueError("the decoupled attention needs the transformer's RoPE axes (axes_dim)")
        super().__init__(config, hidden_size, num_heads, depth, depth_single, theta)
        # the semantic keys rotate with the transformer's own RoPE (3 axes; their ids are the target's (0, row, col))
        self.pe = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=axes_dim)

    def make_shared(self, dim: int) -> nn.Module | None:
        return kv_projection(self.token_dim, dim) if self.config.shared_kv else None

    def make_block(self, dim: int) -> nn.Module:
        # self.heads is the transformer's: the decoupled form uses the block's own heads (SemanticConfig.validate)
        return DecoupledSemanticAttention(self.token_dim, dim, self.heads, own_kv=not self.config.shared_kv)

    def positions(self, img_ids: Tensor, semantic_ids: Tensor) -> tuple[Tensor | None, Tensor]:
        return None, self.pe(semantic_ids)  # the block rotates its own queries with its own ids

    def prepare(self, semantic: Tensor, semantic_ids: Tensor | None, img_ids: Tensor,
                strength: float | Tensor = 1.0) -> SemanticContext:
        ctx = super().prepare(semantic, semantic_ids, img_ids, strength)
        if self.shared is not None:
            ctx.kv = self.shared(ctx.tokens)  # [B, N, token_dim] -> [B, N, 2D], once for every block
        return ctx

    def after_double(self, i: int, img: Tensor, ctx: SemanticContext) -> Tensor:
        return img

    def after_single(self, i: int, img: Tensor, ctx: SemanticContext) -> Tensor:
        return img

    def inside_double(self, i: int, ctx: SemanticContext):
        block = self.block(self.double_blocks, i)
        return None if block is None else (lambda q, q_pe: block(q, q_pe, ctx))

    def inside_single(self, i: int, ctx: SemanticContext):
        block = self.block(self.single_blocks, i)
        return None if block is None else (lambda q, q_pe: block(q, q_pe, ctx))


class AdapterModule(BlockwiseModule):
    """Scheme C: img <- img + gate * Adapter(img, sem) after each chosen block."""

    def make_block(self, dim: int) -> nn.Module:
        return SemanticAdapter(dim, self.inner, self.heads, self.config.mlp_ratio)


def attach(model: Flux, config: SemanticConfig, dtype: torch.dtype | None = None) -> SemanticModule:
    """Create the semantic module for this transformer and attach it as model.semantic, on the model's device and
    in `dtype` (default: the model's; training keeps it fp32 under bf16 autocast)."""
    if model.semantic is not None:
        raise ValueError("a semantic module is already attached")
    config.validate()
    scheme_class = {"xattn": XAttnModule, "zeroconv": ZeroConvModule, "adapter": AdapterModule}[config.scheme]
    if config.attention == "decoupled":
        scheme_class = DecoupledXAttnModule
    p = model.params
    module = scheme_class(config, p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks, p.theta, p.axes_dim)
    ref = model.img_in.weight
    if ref.device.type != "meta":
        module.to(device=ref.device, dtype=dtype or ref.dtype)
    model.semantic = module
    return module


def parameter_count(config: SemanticConfig, params) -> int:
    """Parameters of the semantic module `config` on a transformer of FluxParams `params` (e.g. PRESETS["dev"]),
    counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in attach(Flux(params), config).parameters())


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def semantic_input(config: SemanticConfig, sem_image: Tensor, vae=None) -> Tensor:
    """What Flux.forward's `semantic=` takes for this config (see SemanticConfig.takes_pixels): the semantic image
    itself [B, 3, H, W] in [-1, 1], or its packed VAE latents [B, N, 64]."""
    if config.takes_pixels:
        return sem_image
    if vae is None:
        raise ValueError("the vae semantic encoder needs the FLUX autoencoder to encode the semantic image")
    with torch.no_grad():
        return pack(vae.encode(sem_image))  # [B, 3, H, W] -> [B, 16, H/8, W/8] -> [B, N, 64]


def overlay(rgb: Tensor, sem: Tensor, alpha: float = 0.5) -> Tensor:
    """The pixel-fusion baseline the design replaces: the semantic image alpha-blended into the RGB image.
    Both [B, 3, H, W] in [-1, 1]."""
    if rgb.shape != sem.shape:
        raise ValueError(f"overlay needs images of one size, got rgb {tuple(rgb.shape)} and semantic "
                         f"{tuple(sem.shape)}")
    return (1 - alpha) * rgb + alpha * sem
