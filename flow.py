"""
Rectified flow, as FLUX trains and samples it (BFL's sampling.py and minRF are the models).

    x_t = (1 - t) x0 + t noise        t in (0, 1); t = 0 is the data, t = 1 pure noise
    v   = noise - x0                  what the transformer learns to predict at (x_t, t)
    sampling: Euler from t = 1 to 0,  x <- x + (t_next - t) v(x, t)

Kontext conditioning: the clean RGB tokens x_cond ride along after x_t in the image sequence at every call, with
ids (1, row, col) on the same grid; their outputs are dropped, so the model only ever predicts v on the x_t tokens.
`velocity` is that one call, shared by the training step (`flow_loss`) and the sampler (`denoise`).

Latents become tokens here too (`pack`: 2x2 patches of the 16-channel latent -> 64-channel tokens) with their
position ids, as in BFL's sampling.py: the transformer itself only ever sees tokens and ids.
"""

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from einops import rearrange

# ----------------------------------------------------------------------------------------------------------------
# Tokens and their positions (BFL's sampling.py: prepare / unpack)


def pack(latents: Tensor) -> Tensor:
    """2x2 patches of the VAE latent become tokens: [B, 16, h, w] -> [B, (h/2)(w/2), 64].
    Inside a token the channel index is c*4 + ph*2 + pw; tokens run row-major over the (h/2, w/2) grid."""
    if latents.ndim != 4 or latents.shape[-2] % 2 or latents.shape[-1] % 2:
        raise ValueError(f"pack expects [B, C, h, w] latents with even h and w, got {tuple(latents.shape)}: "
                         "image sides must be multiples of 16 pixels")
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack for an image of height x width PIXELS: [B, (H/16)(W/16), 64] -> [B, 16, H/8, W/8]."""
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    if tokens.shape[1] != h * w:
        raise ValueError(f"unpack: {tokens.shape[1]} tokens do not form a {h}x{w} grid for {height}x{width} pixels")
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)


def image_ids(batch: int, h: int, w: int, index: int = 0, device=None) -> Tensor:
    """Position ids of an h x w token grid: [B, h*w, 3] with (index, row, col).
    index 0 marks the generated image; Kontext marks condition tokens with index 1 on the SAME (row, col) grid,
    so the model knows they are a different image yet spatially aligned with the target."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)  # [B, h*w, 3]


def kontext_ids(batch: int, h: int, w: int, device=None) -> Tensor:
    """Ids of Kontext's image sequence cat(x_t, x_cond) on an h x w token grid: [B, 2*h*w, 3], target tokens
    (0, row, col) first, then the condition tokens (1, row, col)."""
    return torch.cat([image_ids(batch, h, w, device=device), image_ids(batch, h, w, index=1, device=device)], dim=1)


def text_ids(batch: int, length: int, device=None) -> Tensor:
    """All text tokens sit at position (0, 0, 0): [B, L_txt, 3]."""
    return torch.zeros(batch, length, 3, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Training times


def sample_t(n: int, g: torch.Generator, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
             seq_len: int = 0) -> Tensor:
    """[n] training times in (0, 1). logit_normal (SD3): sigmoid(mean + std * N(0, 1)) concentrates on the middle,
    where the velocity is hardest; uniform; shifted: logit-normal, then the resolution shift sampling uses."""
    if kind == "uniform":
        return torch.rand(n, generator=g)
    t = torch.sigmoid(mean + std * torch.randn(n, generator=g))
    if kind == "shifted":
        t = time_shift(get_lin_function()(seq_len), 1.0, t)
    return t


def noised(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, target v) for x0, noise [B, L, C] and t [B]."""
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    return x_t, noise - x0


# ----------------------------------------------------------------------------------------------------------------
# The sampling schedule (FLUX_SPEC §3)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """exp(mu) / (exp(mu) + (1/t - 1)^sigma): spends more steps near t=1 (noise) when mu is larger."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    """mu as a line through (256 tokens, 0.5) and (4096 tokens, 1.15)."""
    m = (y2 - y1) / (x2 - x1)
    return lambda x: m * x + (y1 - m * x1)


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list[float]:
    """num_steps + 1 times from 1 to 0, shifted towards noise for larger images. schnell samples unshifted."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        ts[1:-1] = time_shift(mu, 1.0, ts[1:-1])
    return ts.tolist()


def get_noise(batch: int, height: int, width: int, seed: int, device="cpu", dtype=torch.float32) -> Tensor:
    """[B, 16, 2*ceil(H/16), 2*ceil(W/16)] from a seeded CPU generator: the same seed gives the same image on any
    device."""
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The velocity call and the sampler


@dataclass
class Condition:
    """Everything that stays fixed while x_t changes: the Kontext condition tokens, ids, text and semantic input."""
    x_cond: Tensor  # [B, L, 64] clean RGB (or overlay) latent tokens
    img_ids: Tensor  # [B, 2L, 3] ids of cat(x_t, x_cond)
    txt: Tensor  # [B, L_txt, context_in_dim]
    txt_ids: Tensor  # [B, L_txt, 3]
    y: Tensor  # [B, vec_in_dim] pooled text vector
    semantic: Tensor | None  # what Flux.forward's `semantic=` takes (packed latents or pixels), or None
    sem_strength: float | Tensor = 1.0  # multiplier on the semantic module's scales/gates: a float or [B]


def make_condition(x_cond: Tensor, semantic: Tensor | None, text: tuple[Tensor, Tensor, Tensor], h: int,
                   w: int) -> Condition:
    """x_cond [B, h*w, 64] on an h x w token grid; text = (txt, txt_ids, y) for batch 1 or B."""
    B = x_cond.shape[0]
    txt, txt_ids, y = text
    return Condition(x_cond, kontext_ids(B, h, w, device=x_cond.device), txt.expand(B, -1, -1),
                     txt_ids.expand(B, -1, -1), y.expand(B, -1), semantic)


def velocity(model, x: Tensor, t: Tensor, cond: Condition, guidance: Tensor | None = None) -> Tensor:
    """v(x_t, t) on the x_t tokens: x [B, L, 64], t [B] -> [B, L, 64]. The condition tokens are appended to the image
    sequence and their outputs dropped."""
    L = x.shape[1]
    img = torch.cat([x, cond.x_cond], dim=1)  # [B, 2L, 64]
    sem = {} if cond.semantic is None else {"semantic": cond.semantic, "semantic_strength": cond.sem_strength}
    return model(img=img, img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t, y=cond.y,
                 guidance=guidance, **sem)[:, :L]


def guided_velocity(model, x: Tensor, t: Tensor, cond: Condition, guidance: Tensor | None = None,
                    sem_guidance: float = 1.0) -> Tensor:
    """Semantic classifier-free guidance: v = v_without + w (v_with - v_without), the "without" pass given no
    semantic input at all. w = 1 is the plain conditional prediction (one pass)."""
    v_with = velocity(model, x, t, cond, guidance)
    if sem_guidance == 1.0 or cond.semantic is None:
        return v_with
    v_without = velocity(model, x, t, replace(cond, semantic=None), guidance)
    return v_without + sem_guidance * (v_with - v_without)


def flow_loss(model, x0: Tensor, noise: Tensor, t: Tensor, cond: Condition, guidance: Tensor | None = None) -> Tensor:
    """The training objective per sample, mean over tokens and channels of (v_pred - (noise - x0))^2:
    x0, noise [B, L, 64], t [B] -> [B]. The model runs in the condition's dtype; the loss is computed in fp32."""
    x_t, target = noised(x0, noise, t)  # [B, L, 64] each
    dtype = cond.x_cond.dtype
    pred = velocity(model, x_t.to(dtype), t.to(dtype), cond, guidance)  # [B, L, 64]
    return (pred.float() - target).square().mean(dim=(1, 2))


def denoise(model, x: Tensor, cond: Condition, timesteps: list[float], guidance: float | None = None,
            progress: bool = False, sem_guidance: float = 1.0) -> Tensor:
    """Euler integration of the velocity field along `timesteps` (from 1 towards 0). x: [B, L, 64] -> [B, L, 64].
    sem_guidance w != 1 costs a second pass per step (see guided_velocity)."""
    B = x.shape[0]
    g = torch.full((B,), guidance, device=x.device, dtype=x.dtype) if guidance is not None else None
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="sampling", leave=False)
    for t_curr, t_next in steps:
        t = torch.full((B,), t_curr, device=x.device, dtype=x.dtype)
        x = x + (t_next - t_curr) * guided_velocity(model, x, t, cond, g, sem_guidance)
    return x
