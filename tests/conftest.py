import os
import sys
from pathlib import Path

import pytest
import torch

# Tests import the top-level modules (flux_model, vae, ...) directly, as the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# 2 threads on CI's 2 cores; OMP_NUM_THREADS=1 keeps a loaded machine from thrashing
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))

from flow import kontext_ids, text_ids  # noqa: E402
from flux_model import FluxParams  # noqa: E402


def small_flux_params(hidden=64, heads=4, axes=(4, 6, 6), depth=2, single=2, guidance=True, in_ch=64, ctx=32,
                      vec=16, mlp_ratio=4.0) -> FluxParams:
    """A FLUX of the official structure at test size (head dim 16 = 4 + 6 + 6)."""
    return FluxParams(in_channels=in_ch, out_channels=64, vec_in_dim=vec, context_in_dim=ctx, hidden_size=hidden,
                      mlp_ratio=mlp_ratio, num_heads=heads, depth=depth, depth_single_blocks=single,
                      axes_dim=list(axes), theta=10_000, qkv_bias=True, guidance_embed=guidance)


@pytest.fixture
def small_params():
    """The factory above: `small_params()` or `small_params(guidance=False, single=3)`."""
    return small_flux_params


def kontext_batch(params: FluxParams, B=2, h=3, w=4, seed=0) -> dict:
    """Flux.forward's keyword arguments for a Kontext sequence [x_t | x_cond] of 2*h*w tokens and 5 text tokens, plus
    `semantic` [B, h*w, 64] packed semantic latents (pop it for a model without a semantic module)."""
    g = torch.Generator().manual_seed(seed)
    n = h * w
    x = dict(img=torch.randn(B, 2 * n, params.in_channels, generator=g), img_ids=kontext_ids(B, h, w),
             txt=torch.randn(B, 5, params.context_in_dim, generator=g), txt_ids=text_ids(B, 5),
             timesteps=torch.rand(B, generator=g), y=torch.randn(B, params.vec_in_dim, generator=g),
             guidance=torch.full((B,), 3.5) if params.guidance_embed else None)
    x["semantic"] = torch.randn(B, n, 64, generator=g)
    return x


@pytest.fixture
def kontext_inputs():
    """The factory above: `kontext_inputs(params, B=2, h=3, w=4, seed=0)`."""
    return kontext_batch


# ----------------------------------------------------------------------------------------------------------------
# A scratch world for the scripts: random tiny demo weights and a few synthetic pairs


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A scratch weights/ folder with a random tiny demo base + autoencoder, and 12 synthetic 64px pairs."""
    from checkpoint import save_atomic
    from flux_model import PRESETS, Flux
    from tools.synth import write_synth
    from vae import AE_PRESETS, AutoEncoder, save_ae
    base = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    (base / "weights" / "demo").mkdir(parents=True)
    save_ae(AutoEncoder(AE_PRESETS["tiny"]), base / "weights" / "demo" / "ae.safetensors")
    save_atomic(Flux(PRESETS["tiny"]).state_dict(), base / "weights" / "demo" / "flux.safetensors")
    write_synth(base / "synth", count=12, size=64, seed=0)
    return base


@pytest.fixture
def env(world, monkeypatch):
    """The scripts see `world` as their weights/ and cache/ folders."""
    monkeypatch.setenv("FLUX_IR_WEIGHTS", str(world / "weights"))
    monkeypatch.setenv("FLUX_IR_CACHE", str(world / "cache"))
    return world


def train_args(world, out, *args) -> list[str]:
    """train.py's flags for a quick run on the world's pairs (extra flags override the defaults)."""
    return ["--data", str(world / "synth"), "--out", str(out), "--batch-size", "2", "--no-progress",
            "--sample-steps", "0", "--log-every", "1", "--warmup-steps", "2", *args]


@pytest.fixture
def run_train(env):
    """`run_train(out, *flags)` -> train.main's exit code."""
    import train
    return lambda out, *args: train.main(train_args(env, out, *args))
