"""
The training set as latent tokens, encoded once by the frozen autoencoder and cached on disk: the training loop then
needs neither the VAE encoder nor the images.

The pairs come in buckets, one per served size (data.PairedDataset.buckets: a set of one image size is one bucket);
a bucket's tokens are one tensor, so a training batch is drawn from one bucket. In memory the latents are a list
with one dict per bucket, in the dataset's bucket order; on disk every key is prefixed by its bucket, "<W>x<H>/":

    cache/latents/tokens-<key>-a<alpha>.safetensors
        "<W>x<H>/ir", "rgb", "sem", "overlay"   [N_b, L_b, 64] packed latent tokens, L_b = (H/16) (W/16) (overlay:
                                                the pixel-fusion baseline's input)
        "<W>x<H>/sem_pixels"                    [N_b, 3, H, W] uint8 (the cnn semantic encoder reads pixels)
        "<W>x<H>/sem_ids"                       [N_b, H, W] class ids
        "<W>x<H>/index"                         [N_b] the pairs' places in the dataset
    cache/latents/tokens-<key>-a<alpha>-jitter<J>x<V>s<seed>.safetensors   (train.py --sem-jitter J)
        "<W>x<H>/sem" [V, N_b, L_b, 64], "<W>x<H>/sem_pixels" [V, N_b, 3, H, W]   V misaligned copies of every map
The key covers every file's content (data.PairedDataset.fingerprint), the autoencoder file, the size setting (and the
sizes it serves) and the class palette, so a changed dataset or palette is encoded afresh. A cache file that cannot
be read back whole, or holds a value that is not finite, is removed and encoded again (one note says so).
"""

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

import data
from checkpoint import CheckpointError, read_safetensors, save_atomic
from flow import pack
from sem_cross_attn import SemanticConfig, overlay
from vae import AutoEncoder


def cache_dir() -> Path:
    """Latent and prompt caches (FLUX_IR_CACHE overrides cache/ in the repository)."""
    return Path(os.environ.get("FLUX_IR_CACHE", Path(__file__).resolve().parent / "cache"))


def cache_key(ds: data.PairedDataset, ae_path: Path) -> str:
    """The dataset's content (with its size and palette) and the autoencoder file (by path, size and time: it is
    one large file that only a training run rewrites). "buckets": the file layout, so a cache written before the
    layout had buckets is not read as one."""
    st = Path(ae_path).stat()
    key = f"{ds.fingerprint()}:buckets:{ae_path}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def tokens_path(ds, ae_path: Path, overlay_alpha: float) -> Path:
    return cache_dir() / "latents" / f"tokens-{cache_key(ds, ae_path)}-a{overlay_alpha}.safetensors"


def bucket_name(w: int, h: int) -> str:
    return f"{w}x{h}"


def by_bucket(flat: dict) -> list[dict]:
    """A cache file's tensors {"<W>x<H>/<key>": tensor} -> one {key: tensor} per bucket, in order of size (the order
    of data.PairedDataset.buckets)."""
    groups = {}
    for k, v in flat.items():
        bucket, key = k.split("/", 1)
        groups.setdefault(bucket, {})[key] = v
    return [groups[b] for b in sorted(groups, key=lambda b: tuple(int(n) for n in b.split("x")))]


@torch.no_grad()
def encode_dataset(ds, ae: AutoEncoder, ae_path: Path, overlay_alpha: float, device, dtype, master: bool = True,
                   progress: bool = True) -> list[dict]:
    """Packed latent tokens of every pair, one dict per bucket (the pairs served at one size, in the order of
    ds.buckets()): {"ir", "rgb", "sem", "overlay"} [N_b, L_b, 64], semantic pixels [N_b, 3, H, W] (uint8, for the
    cnn encoder), ids [N_b, H, W] and "index" [N_b] (the pairs' places in ds). Computed once per (dataset,
    autoencoder, size), then read from disk."""
    path = tokens_path(ds, ae_path, overlay_alpha)
    if cached := read_cache(path, master):
        return by_bucket(cached)
    if master:
        ds.validate(progress)  # every map's colours, all bad files named, before encoding
        from tqdm import tqdm
        latents, bar = {}, tqdm(total=len(ds), desc="encoding latents", disable=not progress)
        for (w, h), members in ds.buckets().items():
            out = {k: [] for k in ("ir", "rgb", "sem", "overlay", "sem_pixels", "sem_ids")}
            for i in members:
                item = ds[i]
                if item["rgb"].shape[-2:] != (h, w):  # the header said another size than the pixels decode to
                    raise data.DataError(f"{ds.root}: pair {item['name']!r} decodes to {item['rgb'].shape[-1]}x"
                                         f"{item['rgb'].shape[-2]} pixels as served, its header to {w}x{h}")
                rgb, sem = item["rgb"][None].to(device, dtype), item["sem"][None].to(device, dtype)
                fused = overlay(rgb, sem, overlay_alpha)
                ir = data.ir_to_rgb(item["ir"][None]).to(device, dtype)
                batch = torch.cat([ir, rgb, sem, fused])  # [4, 3, H, W]
                z = pack(ae.encode(batch).float().cpu())  # [4, 3, H, W] -> [4, 16, H/8, W/8] -> [4, L, 64]
                for k, zk in zip(("ir", "rgb", "sem", "overlay"), z):
                    out[k].append(zk)
                out["sem_pixels"].append(((item["sem"] + 1) * 127.5).round().to(torch.uint8))
                out["sem_ids"].append(item["sem_ids"].to(torch.int32))
                bar.update(1)
            out["index"] = [torch.tensor(members)]
            latents |= {f"{bucket_name(w, h)}/{k}": torch.cat(v) if k == "index" else torch.stack(v)
                        for k, v in out.items()}
        bar.close()
        save_atomic(latents, path, {"dataset": str(ds.root), "count": str(len(ds)),
                                    "buckets": ds.describe_buckets()})
    if dist.is_initialized():
        dist.barrier()
    return by_bucket(read_safetensors(path))


def read_cache(path: Path, master: bool = True) -> dict | None:
    """A cache file's tensors; None when there is none, or (the master removes it, with a note) when it is truncated,
    corrupt or holds a value that is not finite: the caller encodes it again."""
    if not path.is_file():
        return None
    try:
        tensors = read_safetensors(path)
        problem = next((f"{k} is not finite" for k, t in tensors.items()
                        if t.is_floating_point() and not torch.isfinite(t).all()), None)
    except CheckpointError as e:
        tensors, problem = None, str(e).removeprefix(f"{path}: ").split(";")[0]  # the file's problem, not its fix
    if problem is None:
        return tensors
    if master:
        print(f"note: the latent cache {path} cannot be used ({problem}); removing it and encoding again")
        path.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    return None


JITTER_DOWNS = (1, 2, 4)  # the coarsening factors of the augmentation (data.misalign's `down`)


def jitter_draws(n: int, jitter: int, variants: int, seed: int) -> Tensor:
    """[variants, n, 3] (dy, dx, down) of the misalignment augmentation: shifts uniform in [-jitter, jitter],
    coarsening one of JITTER_DOWNS, from their own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(-jitter, jitter + 1, (variants, n, 2), generator=g)
    down = torch.tensor(JITTER_DOWNS)[torch.randint(len(JITTER_DOWNS), (variants, n, 1), generator=g)]
    return torch.cat([shift, down], dim=-1)


@torch.no_grad()
def encode_jittered(latents: list[dict], classes, ae: AutoEncoder, key_path: Path, jitter: int, device, dtype,
                    variants: int = 4, seed: int = 0, master: bool = True, progress: bool = True) -> list[dict]:
    """`variants` misaligned copies of every semantic map (data.misalign, draws from jitter_draws, one per pair of the
    whole set), rendered in the palette and encoded like the originals, one dict per bucket of `latents`:
    {"sem": [V, N_b, L_b, 64], "sem_pixels": [V, N_b, 3, H, W] uint8}. Cached beside the dataset's tokens
    (`key_path`), keyed by jitter, variants and seed."""
    path = key_path.with_name(f"{key_path.stem}-jitter{jitter}x{variants}s{seed}.safetensors")
    if cached := read_cache(path, master):
        return by_bucket(cached)
    if master:
        from tqdm import tqdm
        draws = jitter_draws(sum(len(b["index"]) for b in latents), jitter, variants, seed)  # [V, N, 3]
        out = {}
        for bucket in latents:
            ids, index = bucket["sem_ids"].long(), bucket["index"]  # [N_b, H, W], [N_b]
            name = bucket_name(ids.shape[-1], ids.shape[-2])
            sem, pixels = [], []
            for v in tqdm(range(variants), desc=f"encoding misaligned maps {name}", disable=not progress):
                moved = torch.stack([data.misalign(ids[k], *draws[v, i].tolist()) for k, i in enumerate(index)])
                colour = data.render_semantic(moved, classes)  # [N_b, 3, H, W] in [-1, 1]
                sem.append(torch.cat([pack(ae.encode(c.to(device, dtype)).float().cpu())
                                      for c in colour.split(32)]))  # [N_b, L_b, 64]
                pixels.append(((colour + 1) * 127.5).round().to(torch.uint8))
            out |= {f"{name}/sem": torch.stack(sem), f"{name}/sem_pixels": torch.stack(pixels)}
        save_atomic(out, path, {"jitter": str(jitter), "variants": str(variants), "seed": str(seed)})
    if dist.is_initialized():
        dist.barrier()
    return by_bucket(read_safetensors(path))


def semantic_batch(latents: dict, idx: Tensor, semcfg: SemanticConfig | None, device,
                   variant: Tensor | None = None) -> Tensor | None:
    """What Flux.forward's `semantic=` takes, from one bucket's cache `latents`: packed latents [B, L, 64], or pixels
    for the cnn encoder. `variant` [B]: take each sample's map from that misaligned copy (latents["jittered"], see
    encode_jittered) instead of the original."""
    if semcfg is None:
        return None
    src = latents if variant is None else {k: v[variant, idx] for k, v in latents["jittered"].items()}
    at = idx if variant is None else slice(None)
    if semcfg.takes_pixels:
        return src["sem_pixels"][at].to(device).float() / 127.5 - 1  # uint8 -> [B, 3, H, W] in [-1, 1]
    return src["sem"][at].to(device)
