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


# ----------------------------------------------------------------------------------------------------------------
# Checks and files shared by the core's and the extras' tests


def check_warmup_output(out: Path, scheme: str) -> None:
    """A 3-step warmup's final.safetensors holds only semantic weights, its run config names the run, and its log has
    one line per step with the loss in 10 t-bins."""
    import json
    from checkpoint import read_metadata, read_safetensors
    sd = read_safetensors(out / "final.safetensors")
    assert sd and all(k.startswith("semantic.") for k in sd)
    cfg = json.loads(read_metadata(out / "final.safetensors")["config"])
    assert cfg["scheme"] == scheme and cfg["base_preset"] == "tiny" and cfg["stage"] == "warmup"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(len(r["loss_by_t"]) == 10 for r in log)


def check_recording(model, sem_mod, x: dict, names: list[str]) -> None:
    """Recording is a forward hook: the output is the same, one heads-averaged [B, L_img, N] map (rows sum to 1) per
    recorded block (`names`) and forward call; switching it on twice does not double the hooks; off removes them."""
    fused = model(**x)
    sem_mod.record_attention(True)
    sem_mod.record_attention(True)
    assert torch.equal(model(**x), fused)
    model(**x)
    assert sorted(sem_mod.record) == names
    L_img, N = x["img"].shape[1], x["semantic"].shape[1]
    for maps in sem_mod.record.values():
        assert len(maps) == 2 and maps[0].shape == (2, L_img, N)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, L_img))
    sem_mod.record_attention(False)
    assert sem_mod.record is None
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert torch.equal(model(**x), fused)


def save_image(arr_or_img, path, mode=None, **kw) -> Path:
    """An array or a PIL image written to `path` (PIL's options in kw)."""
    from PIL import Image
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img, mode)
    img.save(path, **kw)
    return Path(path)


def make_dataset_root(root, names=("a",), hw=(32, 32)):
    """A dataset folder of all-zero pairs."""
    import numpy as np
    import data
    for d in data.FOLDERS:
        (root / d).mkdir(parents=True, exist_ok=True)
    for n in names:
        save_image(np.zeros((*hw, 3), np.uint8), root / "rgb" / f"{n}.png")
        save_image(np.zeros(hw, np.uint8), root / "sem" / f"{n}.png")
        save_image(np.zeros(hw, np.uint8), root / "ir" / f"{n}.png")
    return root


REAL_SIZES = {"msrs": (640, 480), "pst900": (1280, 720), "llvip": (1280, 1024)}  # their frames' (width, height)


def make_real_size_set(root, sets=REAL_SIZES, per_set=1):
    """A dataset folder of pairs at the frame sizes of published RGB-T sets (<set>_<i>.png): smooth ramps in rgb/ and
    ir/ (small PNGs), and a label-id map with a person (id 4) in the leftmost tenth of the width and a running car
    (id 6) in the rightmost tenth, sky (id 0) between, so what a crop cuts from the sides shows in the labels."""
    import numpy as np
    import data
    for d in data.FOLDERS:
        (root / d).mkdir(parents=True, exist_ok=True)
    for name, (w, h) in sets.items():
        ramp = np.broadcast_to(np.linspace(0, 255, w).astype(np.uint8), (h, w))  # [H, W]
        ids = np.zeros((h, w), np.uint8)
        ids[:, : w // 10], ids[:, w - w // 10:] = 4, 6
        for i in range(per_set):
            save_image(np.stack([ramp] * 3, axis=-1), root / "rgb" / f"{name}_{i}.png")
            save_image(ids, root / "sem" / f"{name}_{i}.png")
            save_image(255 - ramp, root / "ir" / f"{name}_{i}.png")
    return root


def check_strength_per_sample(model, x: dict, sem, base) -> None:
    """With the semantic module acting: strength 0 is the base model `base`; a per-sample strength [1, 0] gives
    sample 0 the full update and sample 1 the base; a strength of another batch size is refused."""
    full = model(**x, semantic=sem)
    assert not torch.allclose(full, base)
    assert torch.equal(model(**x, semantic=sem, semantic_strength=0.0), base)
    mixed = model(**x, semantic=sem, semantic_strength=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(mixed[0], full[0])
    torch.testing.assert_close(mixed[1], base[1])
    with pytest.raises(ValueError, match="one per sample"):
        model(**x, semantic=sem, semantic_strength=torch.ones(3))


def check_checkpointing_same_gradients(model, loss) -> dict:
    """loss() backpropagated with and without model.gradient_checkpointing: the same gradient for every parameter,
    and every parameter gets one. Returns the gradients (without checkpointing) by name."""
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        loss().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == {n for n, _ in model.named_parameters()}
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
    return grads[0]


def check_lora_only_output(out: Path) -> None:
    """A joint run of a baseline (no semantic module) wrote LoRA weights only."""
    from checkpoint import read_safetensors
    sd = read_safetensors(out / "final.safetensors")
    assert sd and all(".lora_" in k for k in sd)
