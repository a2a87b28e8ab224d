"""
Semantic conditioning, scheme B: the semantic map as an independent control signal read by zero-initialised
attention inside every transformer block (IP-Adapter's decoupled attention).

    semantic image [B,3,H,W] --frozen FLUX VAE--> [B,16,H/8,W/8] --flow.pack--> [B,N,64]
        --LatentProjection--> semantic tokens [B,N,T]            (T = token_dim, 64: small keys/values)
    in every block, for the image queries q [B,H,L_img,Dh] (the block's own, QK-normed and rotated):
        k, v = split(to_kv(tokens))  [B,H,N,Dh] each;  k = RMSNorm(k) rotated by the semantic tokens' own ids
        attn_img <- attn_img + strength * scale * softmax(q k^T / sqrt(Dh)) v      (before the block's output proj)
The value half of to_kv starts at zero, so at initialisation every block is exactly the pretrained one, and the
values get gradient from the first step. RoPE on both sides, with the semantic tokens on the target's own grid
(ids (0, row, col)), lets a region read the class at its own location: a person and a poster of a person look the
same in RGB; only the semantic map says which one is hot.

The module attaches itself as `flux.semantic` (state-dict prefix `semantic.`) and, once per forward, gives the
transformer a SemanticContext: the flux_model.Extra whose image_attention adds the term above. Its parameters are
the only ones the `warmup` stage trains. The other schemes of the ablation (zero-conv A, the separate form of B,
adapter C, shared K/V, a CNN encoder, a choice of blocks) are in extras/schemes.py.
"""

import re
from dataclasses import dataclass, asdict

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from einops import rearrange

from flow import pack
from flux_model import EmbedND, Extra, Flux, FluxParams, RMSNorm, apply_rope

SCHEMES = ("xattn", "zeroconv", "adapter")  # the schemes with a module: B (here), A and C (extras/schemes.py)
ATTENTION_FORMS = ("decoupled", "separate")  # scheme B's two forms (the separate one: extras/schemes.py)


@dataclass
class SemanticConfig:
    """What a semantic module is; its defaults are the default scheme B. Written into every training output."""
    scheme: str = "xattn"  # xattn (B) | zeroconv (A) | adapter (C)
    encoder: str = "vae"  # vae: FLUX-VAE latents + projection | cnn: light trainable CNN on the semantic image
    blocks: str = "all"  # all | double | single | every:K (every K-th block of each kind)
    num_heads: int = 0  # separate B / C: attention heads; 0: the transformer's own head count
    inner_dim: int = 0  # separate B / C: attention width; 0: the transformer's hidden size
    mlp_ratio: float = 2.0  # adapter feed-forward width (scheme C)
    # scheme B's form: "decoupled" (IP-Adapter: new keys/values only, read by the block's own image queries inside
    # its attention) or "separate" (its own cross-attention after each chosen block)
    attention: str = "decoupled"
    token_dim: int = 64  # width of the semantic tokens (the encoder's output); 0: the transformer's hidden size
    shared_kv: bool = False  # decoupled: one key/value projection for every chosen block

    @property
    def takes_pixels(self) -> bool:
        """True: Flux.forward's `semantic=` is the semantic image [B, 3, H, W] in [-1, 1] (the cnn encoder).
        False: it is the packed VAE latents of the semantic image [B, N, 64] (the vae encoder, and scheme A)."""
        return self.encoder == "cnn" and self.scheme != "zeroconv"

    @property
    def is_core(self) -> bool:
        """The form this file builds: decoupled B on VAE latents in every block, one K/V projection per block."""
        return (self.scheme, self.encoder, self.blocks, self.attention, self.shared_kv) == \
            ("xattn", "vae", "all", "decoupled", False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SemanticConfig":
        """A run config's semantic options. Files written before a field existed lack it, and meant what the
        module computed then: the separate attention on tokens of the transformer's width, one K/V per block."""
        return cls(**({"attention": "separate", "token_dim": 0, "shared_kv": False} | d))

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


DEFAULT_B = SemanticConfig()  # the default scheme B: decoupled attention on 64-dim semantic tokens


# ----------------------------------------------------------------------------------------------------------------
# The semantic tokens


class LatentProjection(nn.Module):
    """Packed VAE latents of the semantic image -> semantic tokens: [B, N, 64] -> [B, N, T]."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, tokens: Tensor) -> tuple[Tensor, tuple[int, int] | None]:
        """-> (tokens [B, N, T], their grid: None, read from the ids)."""
        if tokens.ndim != 3:
            raise ValueError(f"the vae semantic encoder takes packed latents [B, N, 64], got {tuple(tokens.shape)}")
        return self.net(tokens), None


def kv_projection(token_dim: int, dim: int) -> nn.Linear:
    """Semantic tokens -> keys | values [.., 2D], the value half zero (see DecoupledSemanticAttention)."""
    lin = nn.Linear(token_dim, 2 * dim)
    with torch.no_grad():
        lin.weight[dim:].zero_()
        lin.bias[dim:].zero_()
    return lin


def attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """The softmax that the fused attention applies, written out in float32 so it can be looked at:
    q [B, H, Lq, Dh], k [B, H, N, Dh] -> softmax(q k^T / sqrt(Dh)) [B, H, Lq, N]."""
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# One block's semantic attention, and the context every block reads


@dataclass
class SemanticContext(Extra):
    """The semantic input of one forward (SemanticModule.prepare), given to the transformer as its Extra."""
    module: "SemanticModule"
    tokens: Tensor  # [B, N, T] semantic tokens (scheme A: the packed latents [B, N, 64] themselves)
    grid: tuple[int, int]  # (rows, cols) of the semantic token grid
    k_pe: Tensor  # [B, 1, N, Dh/2, 2, 2] RoPE of the semantic tokens
    strength: float | Tensor = 1.0  # multiplies every learned scale/gate: a float, or [B, 1, 1] per sample
    kv: Tensor | None = None  # shared K/V (extras/schemes.py): every block's keys/values [B, N, 2D], computed once

    def image_attention(self, name: str, q: Tensor) -> Tensor | None:
        block = self.module.block(name)  # None: no semantic attention in this block
        return None if block is None else block(q, self)  # [B, L_img, D]

    def strength_as(self, x: Tensor) -> float | Tensor:
        """The strength as it multiplies x: a float as it is, a [B, 1, 1] tensor in x's dtype."""
        return self.strength.to(x.dtype) if isinstance(self.strength, Tensor) else self.strength


class DecoupledSemanticAttention(nn.Module):
    """One block's scheme B: its own image queries (QK-normed, rotated with the block's ids) also attend to the
    semantic tokens, whose keys (RMSNorm, RoPE from their own ids) and values are the only new projections:
        attn_img <- attn_img + strength * scale * SDPA(q_img, k_sem, v_sem)
    The value projection starts at zero (the block is unchanged at init; the values get gradient at step 1)."""

    def __init__(self, token_dim: int, dim: int, num_heads: int, own_kv: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.to_kv = kv_projection(token_dim, dim) if own_kv else None  # None: the module's shared projection
        self.k_norm = RMSNorm(dim // num_heads)
        self.scale = nn.Parameter(torch.ones(1))

    def kv(self, ctx: SemanticContext) -> tuple[Tensor, Tensor]:
        """The semantic tokens' rotated keys and values, 2 x [B, H, N, Dh]."""
        kv = ctx.kv if self.to_kv is None else self.to_kv(ctx.tokens)  # [B, N, 2D]
        k, v = rearrange(kv, "B N (K H D) -> K B H N D", K=2, H=self.num_heads)  # 2 x [B, H, N, Dh]
        return apply_rope(self.k_norm(k).to(v), ctx.k_pe), v

    def query_key(self, q: Tensor, ctx: SemanticContext) -> tuple[Tensor, Tensor]:
        """What record_attention reads from a call: its queries and the semantic keys, [B, H, L_img | N, Dh]."""
        return q, self.kv(ctx)[0]

    def forward(self, q: Tensor, ctx: SemanticContext) -> Tensor:
        """q: the block's rotated image queries [B, H, L_img, Dh] -> [B, L_img, D], in q's dtype."""
        out = F.scaled_dot_product_attention(q, *self.kv(ctx))  # [B, H, L_img, Dh]
        out = rearrange(out, "B H L D -> B L (H D)")  # [B, L_img, D]
        # the scale is an fp32 (1,) parameter (training keeps the module fp32): cast where it multiplies, or it
        # would promote a bf16 block's attention to fp32
        return ctx.strength_as(out) * self.scale.to(out.dtype) * out


# ----------------------------------------------------------------------------------------------------------------
# The module attached to Flux


class SemanticModule(nn.Module):
    """Scheme B as attached to a transformer: the semantic encoder and one DecoupledSemanticAttention per block
    (`semantic.encoder.*`, `semantic.double_blocks.{i}.*`, `semantic.single_blocks.{i}.*`).
    extras/schemes.py builds the other schemes as subclasses: they override the four make_/chosen_ methods (the
    construction order, and so the initial weights, stay those of this one) and the Extra they prepare."""

    def __init__(self, config: SemanticConfig, params: FluxParams):
        super().__init__()
        config.validate(params.hidden_size, params.num_heads)
        self.config = config
        self.heads, self.inner = config.attention_shape(params.hidden_size, params.num_heads)
        self.token_dim = config.token_dim or params.hidden_size
        # the semantic keys rotate with the transformer's own RoPE (3 axes; their ids are the target's (0, row, col))
        self.pe = self.make_pe(params)
        self.record = None  # a dict name -> list of attention maps when recording (see record_attention)
        self._record_hooks = []
        self.encoder = self.make_encoder()
        self.shared = self.make_shared(params.hidden_size)
        double_ids, single_ids = self.chosen_blocks(params.depth, params.depth_single_blocks)
        self.double_blocks = nn.ModuleDict({str(i): self.make_block(params.hidden_size) for i in double_ids})
        self.single_blocks = nn.ModuleDict({str(i): self.make_block(params.hidden_size) for i in single_ids})

    # -- what the scheme is made of (extras/schemes.py overrides these) ------------------------------------------
    def make_pe(self, params: FluxParams) -> EmbedND:
        return EmbedND(dim=params.hidden_size // params.num_heads, theta=params.theta, axes_dim=params.axes_dim)

    def make_encoder(self) -> nn.Module | None:
        return LatentProjection(64, self.token_dim)

    def make_shared(self, dim: int) -> nn.Module | None:
        return None

    def chosen_blocks(self, depth: int, depth_single: int) -> tuple[list[int], list[int]]:
        return list(range(depth)), list(range(depth_single))

    def make_block(self, dim: int) -> nn.Module:
        return DecoupledSemanticAttention(self.token_dim, dim, self.heads)

    def block(self, name: str) -> nn.Module | None:
        """The module of the transformer's block `name` ("double.3", "single.0"), or None where it has none."""
        kind, i = name.split(".")
        blocks = self.double_blocks if kind == "double" else self.single_blocks
        return blocks[i] if i in blocks else None

    def blocks(self) -> dict[str, nn.Module]:
        """The per-block modules by the transformer's block names ("double.3", "single.0")."""
        return ({f"double.{i}": b for i, b in self.double_blocks.items()}
                | {f"single.{i}": b for i, b in self.single_blocks.items()})

    # -- called by Flux.forward ----------------------------------------------------------------------------------
    def prepare(self, semantic: Tensor, semantic_ids: Tensor | None, img_ids: Tensor,
                strength: float | Tensor = 1.0) -> SemanticContext:
        """The semantic input of one forward -> its Extra. semantic: what Flux.forward's `semantic=` takes;
        semantic_ids [B, N, 3] (default: the first N image ids, the target grid); strength: a float, or [B]."""
        B = img_ids.shape[0]
        tokens, grid = self.encoder(semantic) if self.encoder is not None else (semantic, None)  # [B, N, T]
        if semantic.shape[0] != B:
            raise ValueError(f"semantic batch {semantic.shape[0]} != image batch {B}")
        N = tokens.shape[1]
        if semantic_ids is None:
            semantic_ids = img_ids[:, :N]  # the semantic map is the target's size: its tokens sit on its grid
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
        return self.context(tokens, grid, img_ids, semantic_ids, strength)

    def context(self, tokens: Tensor, grid: tuple[int, int], img_ids: Tensor, semantic_ids: Tensor,
                strength: float | Tensor) -> SemanticContext:
        return SemanticContext(self, tokens, grid, self.pe(semantic_ids), strength)

    # -- for training stages and visualisation -------------------------------------------------------------------
    def strength_parameters(self) -> list[nn.Parameter]:
        """The scales (B), gates (C) or zero-conv strength (A): what the finetune stage trains."""
        return [p for n, p in self.named_parameters() if n.endswith(("scale", "gate")) and p.numel() == 1]

    def recorded_attentions(self) -> dict[str, nn.Module]:
        """The image->semantic attentions that record_attention watches, by block name."""
        return self.blocks()

    def record_attention(self, on: bool = True):
        """Opt in to keeping the semantic attention weights (heads averaged) per block: self.record[name] is a list
        of [B, L_img, N] maps, one per forward call. A forward hook on each attention recomputes its softmax from
        the call's inputs; the forward itself always takes the fused path. Off: the hooks are removed."""
        for handle in self._record_hooks:
            handle.remove()
        self._record_hooks = []
        self.record = {} if on else None
        if on:
            for name, attn in self.recorded_attentions().items():
                self._record_hooks.append(attn.register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def hook(attn: nn.Module, args: tuple, out: Tensor):
            with torch.no_grad():
                q, k = attn.query_key(*args)
                weights = attention_weights(q, k)  # [B, H, L_img, N]
                self.record.setdefault(name, []).append(weights.mean(dim=1))  # heads averaged: [B, L_img, N]
        return hook


def attach(model: Flux, config: SemanticConfig = DEFAULT_B, dtype: torch.dtype | None = None) -> SemanticModule:
    """Create the scheme B module for this transformer and attach it as model.semantic, on the model's device and
    in `dtype` (default: the model's; training keeps it fp32 under bf16 autocast). The other schemes and options:
    extras.schemes.attach."""
    if not config.is_core:
        raise ValueError(f"{config} is not the default scheme B (decoupled, vae encoder, every block, one K/V per "
                         "block): extras.schemes.attach builds it")
    return attach_module(model, SemanticModule(config, model.params), dtype)


def attach_module(model: Flux, module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Attach a built semantic module as model.semantic, on the model's device and in `dtype`."""
    if model.semantic is not None:
        raise ValueError("a semantic module is already attached")
    ref = model.img_in.weight
    if ref.device.type != "meta":
        module.to(device=ref.device, dtype=dtype or ref.dtype)
    model.semantic = module
    return module


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
    """The pixel-fusion baseline the design must beat: the semantic image alpha-blended into the RGB image.
    Both [B, 3, H, W] in [-1, 1]."""
    if rgb.shape != sem.shape:
        raise ValueError(f"overlay needs images of one size, got rgb {tuple(rgb.shape)} and semantic "
                         f"{tuple(sem.shape)}")
    return (1 - alpha) * rgb + alpha * sem
