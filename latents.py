"""
The training set as latent tokens, encoded once by the frozen autoencoder and cached on disk: the training loop then
needs neither the VAE encoder nor the images.

    cache/latents/tokens-<key>-a<alpha>.safetensors
        "ir", "rgb", "sem", "overlay"   [N, L, 64] packed latent tokens (overlay: the pixel-fusion baseline's input)
        "sem_pixels"                    [N, 3, H, W] uint8 (the cnn semantic encoder reads pixels)
        "sem_ids"                       [N, H, W] class ids
The key covers every file's name, size and mtime, the autoencoder file, the crop size and the class palette, so a
changed dataset or palette is encoded afresh.
"""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

import data
from checkpoint import read_safetensors, save_atomic
from flow import pack
from pipeline import cache_dir
from sem_cross_attn import SemanticConfig, overlay
from vae import AutoEncoder


def cache_key(ds: data.PairedDataset, ae_path: Path) -> str:
    h = hashlib.sha256()
    for name in ds.names:
        for d in data.FOLDERS:
            st = ds.files[d][name].stat()
            h.update(f"{d}/{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    st = Path(ae_path).stat()
    h.update(f"{ae_path}:{st.st_size}:{st.st_mtime_ns}:{ds.size}".encode())
    h.update(json.dumps([asdict(c) for c in ds.classes]).encode())  # the palette the semantic maps were read with
    return h.hexdigest()[:20]


@torch.no_grad()
def encode_dataset(ds, ae: AutoEncoder, ae_path: Path, overlay_alpha: float, device, dtype, master: bool = True,
                   progress: bool = True) -> dict:
    """Packed latent tokens of every pair: {"ir", "rgb", "sem", "overlay"} [N, L, 64], semantic pixels [N, 3, H, W]
    (uint8, for the cnn encoder) and ids [N, H, W]. Computed once per (dataset, autoencoder, size), then read from
    disk."""
    path = cache_dir() / "latents" / f"tokens-{cache_key(ds, ae_path)}-a{overlay_alpha}.safetensors"
    if path.is_file():
        return read_safetensors(path)
    if master:
        from tqdm import tqdm
        out = {k: [] for k in ("ir", "rgb", "sem", "overlay", "sem_pixels", "sem_ids")}
        for i in tqdm(range(len(ds)), desc="encoding latents", disable=not progress):
            item = ds[i]
            rgb, sem = item["rgb"][None].to(device, dtype), item["sem"][None].to(device, dtype)
            fused = overlay(rgb, sem, overlay_alpha)
            ir = data.ir_to_rgb(item["ir"][None]).to(device, dtype)
            batch = torch.cat([ir, rgb, sem, fused])  # [4, 3, H, W]
            z = pack(ae.encode(batch).float().cpu())  # [4, 3, H, W] -> [4, 16, H/8, W/8] -> [4, L, 64]
            for k, zk in zip(("ir", "rgb", "sem", "overlay"), z):
                out[k].append(zk)
            out["sem_pixels"].append(((item["sem"] + 1) * 127.5).round().to(torch.uint8))
            out["sem_ids"].append(item["sem_ids"].to(torch.int32))
        shapes = {tuple(t.shape) for t in out["sem_ids"]}
        if len(shapes) > 1:
            raise ValueError(f"{ds.root}: images of different sizes {sorted(shapes)[:3]}; pass --size S to train on "
                             "one size")
        latents = {k: torch.stack(v) for k, v in out.items()}
        save_atomic(latents, path, {"dataset": str(ds.root), "count": str(len(ds))})
    if dist.is_initialized():
        dist.barrier()
    return read_safetensors(path)


def semantic_batch(latents: dict, idx: Tensor, semcfg: SemanticConfig | None, device) -> Tensor | None:
    """What Flux.forward's `semantic=` takes, from the cache: packed latents [B, N, 64], or pixels for the cnn
    encoder."""
    if semcfg is None:
        return None
    if semcfg.takes_pixels:
        return latents["sem_pixels"][idx].to(device).float() / 127.5 - 1  # uint8 -> [B, 3, H, W] in [-1, 1]
    return latents["sem"][idx].to(device)
