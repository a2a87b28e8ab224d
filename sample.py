"""
Generate the infrared image for a visible image and its semantic map.

    python sample.py rgb.png sem.png [-o ir.png] [--ckpt PATH] [--steps N] [--guidance G] [--seed S] [--attn PATH]

The pipeline, as small functions (BFL's sampling.py order):
    load_pipeline  -> the base transformer + autoencoder (official files in weights/, else the tiny demo), the trained
                      semantic module / LoRA from --ckpt, and the prompt embedding
    encode_condition: RGB [B,3,H,W] --VAE--> [B,16,H/8,W/8] --pack--> x_cond [B,L,64]   (overlay: RGB blended first)
    get_noise       : seeded CPU generator -> [B,16,H/8,W/8] -> pack -> x [B,L,64]
    get_schedule    : t from 1 (noise) to 0 (data), shifted towards noise for larger images
    denoise         : Euler: x <- x + (t_prev - t) * v(cat(x, x_cond)) [:, :L]; condition tokens stay clean
    decode          : unpack -> VAE decode [B,3,H,W] -> channel mean -> IR [B,1,H,W] in [0,1]
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from PIL import Image, ImageDraw

from checkpoint import CheckpointError, read_metadata, read_safetensors
from flux_model import Flux, PRESETS, load_flux, pack, unpack, image_ids, text_ids, detect_preset
from vae import AutoEncoder, load_ae, AE_PRESETS
from sem_cross_attn import SemanticConfig, attach, semantic_input, overlay
import data

ROOT = Path(__file__).resolve().parent
WEIGHTS = ROOT / "weights"  # FLUX_IR_WEIGHTS overrides it (tests use a scratch folder)


def weights_dir() -> Path:
    return Path(os.environ.get("FLUX_IR_WEIGHTS", WEIGHTS))


def cache_dir() -> Path:
    """Latent and prompt caches (FLUX_IR_CACHE overrides it)."""
    return Path(os.environ.get("FLUX_IR_CACHE", ROOT / "cache"))
DEFAULT_PROMPT = "a thermal infrared image"

# ----------------------------------------------------------------------------------------------------------------
# Schedule (FLUX_SPEC §3; reference values are checked in tests/test_sample.py)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """exp(mu) / (exp(mu) + (1/t - 1)^sigma): spends more steps near t=1 (noise) when mu is larger."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15):
    """mu as a line through (256 tokens, 0.5) and (4096 tokens, 1.15)."""
    m = (y2 - y1) / (x2 - x1)
    return lambda x: m * x + (y1 - m * x1)


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list[float]:
    """num_steps + 1 times from 1 to 0. schnell samples unshifted."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        inner = ts[1:-1]
        ts[1:-1] = time_shift(mu, 1.0, inner)
    return ts.tolist()


def get_noise(batch: int, height: int, width: int, seed: int, device="cpu", dtype=torch.float32) -> Tensor:
    """[B, 16, 2*ceil(H/16), 2*ceil(W/16)] from a seeded CPU generator: the same seed gives the same image on any
    device."""
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# What the commands run on


@dataclass
class Setup:
    """Which base files the commands use: the official FLUX files in weights/, or the tiny demo."""
    kind: str  # "official" | "demo"
    flux: Path
    preset: str
    ae: Path
    t5: Path | None = None
    clip: Path | None = None
    guidance: float | None = None  # fixed guidance input for guidance-distilled bases

    def describe(self) -> str:
        if self.kind == "demo":
            return (f"no official FLUX checkpoint in {self.flux.parent.parent}: using the tiny demo preset "
                    f"({self.flux}, trained on synthetic scenes; see weights/README.md to use FLUX.1)")
        return f"using {self.flux.name} ({self.preset}) with {self.ae.name}"


def find_setup(weights: Path | None = None) -> Setup:
    """Official files win when present (Kontext is the natural base: it was trained with condition tokens)."""
    weights = weights or weights_dir()
    for name in ("flux1-kontext-dev.safetensors", "flux1-dev.safetensors", "flux1-schnell.safetensors"):
        f = weights / name
        if f.is_file():
            ae = weights / "ae.safetensors"
            if not ae.is_file():
                raise CheckpointError(f"found {f} but no {ae}: the FLUX autoencoder is needed too (weights/README.md)")
            preset = "kontext" if "kontext" in name else detect_preset(f)
            t5, clip = weights / "t5", weights / "clip"
            for p in (t5, clip):
                if not p.is_dir():
                    raise CheckpointError(f"found {f} but no text encoder folder {p} (weights/README.md)")
            return Setup("official", f, preset, ae, t5, clip, guidance=None if preset == "schnell" else 2.5)
    demo = weights / "demo"
    return Setup("demo", demo / "flux.safetensors", "tiny", demo / "ae.safetensors")


def text_condition(setup: Setup, params, batch: int, prompt: str, device, dtype, prompt_cache: Path | None = None):
    """(txt [B, L_txt, context_in_dim], txt_ids, y [B, vec_in_dim]). The tiny demo has no text encoders: one constant
    zero token (txt_in's bias makes it a learned constant) and a zero pooled vector."""
    if setup.kind == "demo":
        txt = torch.zeros(batch, 1, params.context_in_dim, device=device, dtype=dtype)
        y = torch.zeros(batch, params.vec_in_dim, device=device, dtype=dtype)
    else:
        from text_encoders import PromptCache
        cache = PromptCache(prompt_cache or cache_dir() / "prompts", setup.t5, setup.clip,
                            t5_max_length=256 if setup.preset == "schnell" else 512, device=device, dtype=dtype)
        txt, y = cache([prompt])
        txt, y = txt.expand(batch, -1, -1).to(device, dtype), y.expand(batch, -1).to(device, dtype)
    return txt, text_ids(batch, txt.shape[1], device=device), y


@dataclass
class Pipeline:
    setup: Setup
    model: Flux
    ae: AutoEncoder
    scheme: str  # xattn | zeroconv | adapter | overlay | none
    semantic: SemanticConfig | None
    guidance: float | None
    prompt: str
    device: torch.device
    dtype: torch.dtype
    meta: dict = field(default_factory=dict)


def run_config(path) -> dict:
    """The config a train.py output carries in its metadata (scheme, semantic options, LoRA, base)."""
    meta = read_metadata(path)
    if "config" not in meta:
        raise CheckpointError(f"{path}: no 'config' metadata: not a train.py output (a LoRA file? use lora.py)")
    try:
        return json.loads(meta["config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt config metadata ({e})") from None


def build_model(setup: Setup, cfg: dict, device, dtype) -> Flux:
    """Base transformer + the modules the run config names (semantic scheme, LoRA), before their weights load."""
    model = load_flux(setup.flux, setup.preset, device=device, dtype=dtype)
    scheme = cfg.get("scheme", "none")
    if scheme in ("xattn", "zeroconv", "adapter"):
        attach(model, SemanticConfig(**cfg["semantic"]), dtype=dtype)
    if cfg.get("lora_rank"):
        from lora import inject_lora
        inject_lora(model, rank=cfg["lora_rank"], alpha=cfg.get("lora_alpha"))
        model.to(device=device, dtype=dtype)
    return model


def load_trained(model: Flux, path, cfg: dict, setup: Setup) -> None:
    """Strictly load a train.py output's weights (semantic module and/or LoRA) into a model built by build_model."""
    sd = read_safetensors(path, dtype=model.img_in.weight.dtype, device=model.img_in.weight.device)
    if cfg.get("base_preset") not in (None, setup.preset):
        raise CheckpointError(f"{path} was trained on the {cfg['base_preset']!r} base, but this run uses "
                              f"{setup.preset!r} ({setup.describe()})")
    trainable = {k for k in model.state_dict() if k.startswith("semantic.") or ".lora_" in k}
    full = cfg.get("stage") in ("base",)
    expected = set(model.state_dict()) if full else trainable
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - set(model.state_dict()))
    mis = [k for k in sd if k in model.state_dict() and sd[k].shape != model.state_dict()[k].shape]
    if missing or unexpected or mis:
        raise CheckpointError(f"{path}: does not match a {cfg.get('scheme')} model on the {setup.preset} base: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {mis[:5]} "
                              "(was it trained with another --scheme, preset or LoRA rank?)")
    model.load_state_dict(sd, strict=False)


def default_ckpt(setup: Setup) -> Path | None:
    """The newest warmup output, else the demo's shipped semantic weights."""
    for p in (ROOT / "runs" / "warmup" / "final.safetensors", setup.flux.parent / "xattn.safetensors"):
        if p.is_file():
            return p
    return None


def load_pipeline(ckpt=None, device=None, dtype=None, setup: Setup | None = None, prompt: str = DEFAULT_PROMPT,
                  quiet: bool = False) -> Pipeline:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    setup = setup or find_setup()
    if not quiet:
        print(setup.describe())
    if setup.kind == "demo" and not setup.flux.is_file():
        raise CheckpointError(f"{setup.flux} is missing: run `python train.py --stage base` (or restore weights/demo)")
    cfg = run_config(ckpt) if ckpt else {"scheme": "none"}
    model = build_model(setup, cfg, device, dtype)
    if ckpt:
        load_trained(model, ckpt, cfg, setup)
    model.eval().requires_grad_(False)
    ae = load_ae(setup.ae, device=device, dtype=dtype).eval().requires_grad_(False)
    scheme = cfg.get("scheme", "none")
    guidance = cfg.get("guidance", setup.guidance) if PRESETS[setup.preset].guidance_embed else None
    return Pipeline(setup, model, ae, scheme, SemanticConfig(**cfg["semantic"]) if "semantic" in cfg else None,
                    guidance, cfg.get("prompt", prompt), device, dtype, cfg)


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def condition_image(scheme: str, rgb: Tensor, sem: Tensor, alpha: float = 0.5) -> Tensor:
    """What the VAE encodes into x_cond: the RGB image, or for the overlay baseline RGB blended with the map."""
    return overlay(rgb, sem, alpha) if scheme == "overlay" else rgb


def model_inputs(pipe: Pipeline, rgb: Tensor, sem: Tensor, txt_cache=None) -> dict:
    """Everything that stays fixed over the denoising steps: x_cond tokens, ids, text, semantic input."""
    B, _, H, W = rgb.shape
    if rgb.shape != sem.shape:
        raise ValueError(f"rgb {tuple(rgb.shape)} and semantic map {tuple(sem.shape)} differ in size")
    if H % 16 or W % 16:
        raise ValueError(f"image sides must be multiples of 16, got {H}x{W} (use --size)")
    with torch.no_grad():
        x_cond = pack(pipe.ae.encode(condition_image(pipe.scheme, rgb, sem)))  # [B,3,H,W] -> [B,L,64]
        sem_in = semantic_input(pipe.semantic, sem, pipe.ae) if pipe.semantic is not None else None
    h, w = H // 16, W // 16
    ids = torch.cat([image_ids(B, h, w, device=rgb.device), image_ids(B, h, w, index=1, device=rgb.device)], dim=1)
    txt, tids, y = txt_cache or text_condition(pipe.setup, pipe.model.params, B, pipe.prompt, rgb.device, pipe.dtype)
    return dict(x_cond=x_cond, img_ids=ids, txt=txt, txt_ids=tids, y=y, semantic=sem_in, H=H, W=W)


def denoise(model: Flux, x: Tensor, inp: dict, timesteps: list[float], guidance: float | None,
            progress: bool = False) -> Tensor:
    """Euler integration of the velocity field from t=1 to t=0 on the x_t tokens only. x: [B, L, 64]."""
    B, L = x.shape[:2]
    g = torch.full((B,), guidance, device=x.device, dtype=x.dtype) if guidance is not None else None
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="sampling", leave=False)
    for t_curr, t_prev in steps:
        t_vec = torch.full((B,), t_curr, device=x.device, dtype=x.dtype)
        pred = model(img=torch.cat([x, inp["x_cond"]], dim=1), img_ids=inp["img_ids"], txt=inp["txt"],
                     txt_ids=inp["txt_ids"], timesteps=t_vec, y=inp["y"], guidance=g,
                     semantic=inp["semantic"])[:, :L]  # condition-token predictions are discarded
        x = x + (t_prev - t_curr) * pred
    return x


@torch.no_grad()
def generate(pipe: Pipeline, rgb: Tensor, sem: Tensor, steps: int = 20, seed: int | list[int] = 0, guidance=None,
             progress: bool = False) -> Tensor:
    """rgb, sem [B, 3, H, W] in [-1, 1] -> IR [B, 1, H, W] in [0, 1]. A list of seeds gives each pair its own noise,
    so a pair's result does not depend on what it was batched with."""
    rgb, sem = rgb.to(pipe.device, pipe.dtype), sem.to(pipe.device, pipe.dtype)
    inp = model_inputs(pipe, rgb, sem)
    B, H, W = rgb.shape[0], inp["H"], inp["W"]
    if isinstance(seed, int):
        noise = get_noise(B, H, W, seed, pipe.device, pipe.dtype)
    else:
        noise = torch.cat([get_noise(1, H, W, s, pipe.device, pipe.dtype) for s in seed])
    x = pack(noise)  # [B, 16, H/8, W/8] -> [B, L, 64]
    timesteps = get_schedule(steps, x.shape[1], shift=pipe.setup.preset != "schnell")
    x = denoise(pipe.model, x, inp, timesteps, guidance if guidance is not None else pipe.guidance, progress)
    img = pipe.ae.decode(unpack(x.float().to(pipe.dtype), H, W))  # [B, L, 64] -> [B, 16, H/8, W/8] -> [B, 3, H, W]
    return data.rgb_to_ir(img.float().clamp(-1, 1))


# ----------------------------------------------------------------------------------------------------------------
# Pictures


def to_pil_gray(ir: Tensor) -> Image.Image:
    """[1, H, W] in [0, 1] -> 8-bit grayscale."""
    return Image.fromarray((ir[0].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8), "L")


def to_pil_rgb(x: Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB."""
    arr = ((x.clamp(-1, 1).permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def heat(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a black-red-yellow-white ramp (reads as 'hot')."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 0], [180, 20, 10], [255, 170, 0], [255, 255, 255]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    f = pos - i
    return (stops[i[..., 0]] * (1 - f) + stops[i[..., 0] + 1] * f).astype(np.uint8)


def grid(images: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Rows of equally sized pictures on one canvas, with optional column labels on top."""
    w, h = images[0][0].size
    top = 12 if labels else 0
    cols = max(len(r) for r in images)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, top + len(images) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels or []):
        draw.text((pad + j * (w + pad) + 2, 0), label, fill=(0, 0, 0))
    for i, row in enumerate(images):
        for j, im in enumerate(row):
            canvas.paste(im.convert("RGB"), (pad + j * (w + pad), top + pad + i * (h + pad)))
    return canvas


def query_points(sem_ids: Tensor, max_points: int = 4) -> list[tuple[str, int, int]]:
    """One query pixel per class (the region pixel nearest the class centroid), largest classes last so small
    objects such as people and posters are always shown."""
    pts = []
    for c in torch.unique(sem_ids).tolist():
        ys, xs = torch.nonzero(sem_ids == c, as_tuple=True)
        cy, cx = ys.float().mean(), xs.float().mean()
        k = int(((ys - cy) ** 2 + (xs - cx) ** 2).argmin())
        pts.append((int(ys.numel()), c, int(ys[k]), int(xs[k])))
    pts.sort()
    return [(c, y, x) for _, c, y, x in pts[:max_points]]


@torch.no_grad()
def attention_figure(pipe: Pipeline, rgb: Tensor, sem: Tensor, sem_ids: Tensor, names: dict[int, str],
                     seed: int = 0, steps: int = 20, max_blocks: int = 3) -> Image.Image:
    """Where the semantic cross-attention looks: for a few query pixels (one per class) and a few blocks, the
    attention over the semantic tokens at mid-denoising (t ~ 0.5), as a heat map over the RGB image."""
    module = pipe.model.semantic
    if module is None or pipe.semantic.scheme not in ("xattn", "adapter"):
        raise ValueError("attention maps exist only for the xattn and adapter schemes")
    rgb, sem = rgb.to(pipe.device, pipe.dtype), sem.to(pipe.device, pipe.dtype)
    inp = model_inputs(pipe, rgb[:1], sem[:1])
    H, W = inp["H"], inp["W"]
    h, w = H // 16, W // 16
    ts = get_schedule(steps, h * w, shift=pipe.setup.preset != "schnell")
    mid = min(range(len(ts) - 1), key=lambda i: abs(ts[i] - 0.5))
    x = denoise(pipe.model, pack(get_noise(1, H, W, seed, pipe.device, pipe.dtype)), inp, ts[: mid + 1],
                pipe.guidance)  # run to t ~ 0.5, then record one step
    module.record_attention(True)
    try:
        denoise(pipe.model, x, inp, ts[mid: mid + 2], pipe.guidance)
        record = module.record
    finally:
        module.record_attention(False)
    names_sorted = sorted(record, key=lambda k: (k.split(".")[0] != "double", int(k.split(".")[1])))
    pick = [names_sorted[round(i * (len(names_sorted) - 1) / max(1, max_blocks - 1))] for i in range(max_blocks)]
    pick = list(dict.fromkeys(pick))
    base = np.asarray(to_pil_rgb(rgb[0])).astype(np.float32)
    points = query_points(sem_ids)
    rows = []
    for name in pick:
        amap = record[name][0][0]  # [L_img, N] for the first sample; the first h*w queries are the x_t tokens
        row = [to_pil_rgb(sem[0])]
        for c, py, px in points:
            q = (py // 16) * w + (px // 16)
            a = amap[q].float().reshape(h, w).cpu().numpy()
            a = a / max(a.max(), 1e-8)
            a = np.kron(a, np.ones((16, 16)))  # token grid -> pixels
            im = Image.fromarray((0.35 * base + 0.65 * heat(a)).astype(np.uint8))
            d = ImageDraw.Draw(im)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], outline=(0, 255, 0), width=2)
            row.append(im)
        rows.append(row)
    labels = ["semantic"] + [names.get(c, str(c)) for c, _, _ in points]
    canvas = grid(rows, labels)
    d = ImageDraw.Draw(canvas)
    for i, name in enumerate(pick):  # block names down the left edge of each row
        d.text((4, 12 + 2 + i * (H + 2) + 2), name, fill=(0, 255, 0))
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# Command line


def load_pair(rgb_path, sem_path, classes, size: int | None):
    """Read and check a user's pair: same size, sides multiples of 16 (or --size to resize and centre-crop)."""
    rgb = data.load_rgb(rgb_path)
    ids, sem = data.load_semantic(sem_path, classes)
    if rgb.shape[-2:] != sem.shape[-2:]:
        raise data.DataError(f"{rgb_path} is {rgb.shape[2]}x{rgb.shape[1]} but {sem_path} is "
                             f"{sem.shape[2]}x{sem.shape[1]}: the semantic map must match the image")
    if size:
        rgb = data._center_square(rgb, size, "bicubic")
        sem = data._center_square(sem, size, "nearest")
        ids = data._center_square(ids[None].float(), size, "nearest")[0].long()
    elif rgb.shape[1] % 16 or rgb.shape[2] % 16:
        raise data.DataError(f"{rgb_path}: {rgb.shape[2]}x{rgb.shape[1]} is not a multiple of 16 on each side; "
                             "pass --size S to resize and centre-crop")
    return rgb, sem, ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("rgb", help="visible image")
    ap.add_argument("sem", help="semantic map (colour image in the class palette, or label-id image)")
    ap.add_argument("-o", "--out", default="ir.png", help="output infrared image (8-bit PNG)")
    ap.add_argument("--ckpt", default=None, help="train.py output (default: runs/warmup, else the demo weights)")
    ap.add_argument("--base", action="store_true", help="sample the base model without semantic weights")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None, help="guidance input (dev/Kontext bases)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="resize shorter side to S and centre-crop to SxS")
    ap.add_argument("--classes", default=None, help="classes.json of the semantic palette (default: synthetic)")
    ap.add_argument("--attn", default=None, help="also write a picture of the semantic cross-attention maps")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    try:
        classes = data.load_classes(args.classes)
        rgb, sem, ids = load_pair(args.rgb, args.sem, classes, args.size)
        setup = find_setup()
        ckpt = None if args.base else (args.ckpt or default_ckpt(setup))
        pipe = load_pipeline(ckpt, args.device, setup=setup)
        print(f"semantic weights: {ckpt or 'none (base model)'} (scheme {pipe.scheme})")
        ir = generate(pipe, rgb[None], sem[None], steps=args.steps, seed=args.seed, guidance=args.guidance,
                      progress=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        to_pil_gray(ir[0]).save(args.out)
        print(f"wrote {args.out} ({ir.shape[-1]}x{ir.shape[-2]})")
        if args.attn:
            fig = attention_figure(pipe, rgb[None], sem[None], ids, {c.id: c.name for c in classes},
                                   seed=args.seed, steps=args.steps)
            fig.save(args.attn)
            print(f"wrote {args.attn}")
    except (data.DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
