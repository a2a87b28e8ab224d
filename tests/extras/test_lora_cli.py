"""LoRA files trained elsewhere on the command line: sample.py / tools.eval --lora FILE[:SCALE] (a diffusers-written
and a kohya-layout file give the output of the same weights merged into the base by hand, on top of a run's own
LoRA and semantic modules; an fp8 base takes them unmerged with the same output), text-encoder tensors skipped and
counted, bad flags in one line before loading; train.py --init-lora (the joint LoRA starts from the file; another
rank or alpha refused) and its exports (bf16 unless --lora-export-dtype fp32, the sampling settings, the card)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import data
import sample
from checkpoint import read_metadata, read_safetensors, save_atomic
from flux_model import PRESETS
from pipeline import SAMPLING_DEFAULTS, generate, load_pipeline
from tools import bench

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
TINY = PRESETS["tiny"]  # the world's demo base: hidden 128, 2 double and 4 single blocks
# diffusers' train_dreambooth_lora_flux.py targets, plus the single blocks' MLP and output, the modulations and the
# final layer (its adaLN halves are swapped between BFL and diffusers): every kind of layer the name table maps
DIFFUSERS_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2", "proj_mlp", "proj_out", "norm1.linear", "norm.linear", "norm_out.linear"]


def sample_args(out, *flags) -> list[str]:
    """sample.py on the example pair at 64 px, 2 steps."""
    return [str(EX / "rgb.png"), str(EX / "sem.png"), "-o", str(out), "--steps", "2", "--size", "64", *flags]


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def diffusers_lora(world, folder: Path, text_encoder: bool = False):
    """A LoRA written by diffusers' own save path: a PEFT adapter (random A and B, r 4, alpha 6) on diffusers'
    FluxTransformer2DModel holding the world's tiny base, saved with FluxPipeline.save_lora_weights (+, if asked, a
    PEFT adapter on a tiny transformers CLIPTextModel as its text_encoder part). Returns (file, the model)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    ref = bench.build_diffusers(TINY, read_safetensors(world / "weights" / "demo" / "flux.safetensors")).eval()
    torch.manual_seed(5)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=DIFFUSERS_TARGETS))
    te = {}
    if text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModel
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=16))
        clip.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "out_proj"]))
        te = {"text_encoder_lora_layers": get_peft_model_state_dict(clip, save_embedding_layers=False)}
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict(),
                                   weight_name="diffusers_lora.safetensors", **te)
    return folder / "diffusers_lora.safetensors", ref


KOHYA_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.2.linear1",
                "single_blocks.3.linear2")


def kohya_lora(path: Path, rank=2, alpha=3.0, layers=KOHYA_LAYERS, text_encoder=0, seed=7) -> dict:
    """A kohya-layout file as kohya's networks/lora_flux.py names it ("lora_unet_" + the BFL path with "." -> "_",
    lora_down [r, in], lora_up [out, r], a scalar .alpha) with random weights on `layers` of the tiny base, plus
    `text_encoder` lora_te1_ (CLIP) tensors. Returns {BFL name: (down, up, alpha)}: what a merge by hand uses."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(t.shape) for n, t in bench.random_weights(TINY).items()}
    sd, out = {}, {}
    for name in layers:
        rows, cols = shapes[f"{name}.weight"]
        down, up = torch.randn(rank, cols, generator=g) / math.sqrt(cols), 0.3 * torch.randn(rows, rank, generator=g)
        stem = "lora_unet_" + name.replace(".", "_")
        sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
        out[name] = (down, up, alpha)
    for i in range(text_encoder // 3):
        stem = f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj"
        sd |= {f"{stem}.lora_down.weight": torch.zeros(rank, 32), f"{stem}.lora_up.weight": torch.zeros(32, rank),
               f"{stem}.alpha": torch.tensor(alpha)}
    save_file(sd, str(path))
    return out


@torch.no_grad()
def merge_by_hand(model, weights: dict, scale: float):
    """W <- W + scale * alpha / r * up @ down, in the test's own words."""
    for name, (down, up, alpha) in weights.items():
        W = model.get_submodule(name).weight
        W += scale * alpha / down.shape[0] * (up @ down).to(W.dtype)


# ---------------------------------------------------------------------------------------------------------------
# sample.py --lora


def test_diffusers_written_lora_through_sample_equals_the_base_diffusers_fused(env, tmp_path, capsys, monkeypatch):
    """A diffusers-written file (with a text-encoder part) at scale 0.7 through sample.py --lora gives the image of
    a base whose weights diffusers itself fused (PeftAdapterMixin.fuse_lora(lora_scale=0.7)); the text-encoder
    tensors are skipped and counted."""
    from extras.checkpoint_forms import load_flux
    path, ref = diffusers_lora(env, tmp_path, text_encoder=True)
    n_te = sum(k.startswith("text_encoder.") for k in read_safetensors(path))
    assert n_te == 16  # 2 layers x q, k, v, out x A, B
    assert sample.main(sample_args(tmp_path / "lora.png", "--base", "--lora", f"{path}:0.7")) == 0
    out = capsys.readouterr().out
    assert f"LoRA: {path} (diffusers layout, " in out and "at scale 0.7, merged into the base weights" in out
    assert f"skipped {n_te} text-encoder tensors" in out

    ref.fuse_lora(lora_scale=0.7)  # diffusers' own merge, then its adapter removed: a plain diffusers transformer
    ref.unload_lora()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "fused_diffusers.safetensors"))
    fused = tmp_path / "fused_weights"
    (fused / "demo").mkdir(parents=True)
    shutil.copy(env / "weights" / "demo" / "ae.safetensors", fused / "demo" / "ae.safetensors")
    save_atomic(load_flux(tmp_path / "fused_diffusers.safetensors", TINY, dtype=torch.float32).state_dict(),
                fused / "demo" / "flux.safetensors")
    assert sample.main(sample_args(tmp_path / "base.png", "--base")) == 0  # the world's base, without the LoRA
    monkeypatch.setenv("FLUX_IR_WEIGHTS", str(fused))
    assert sample.main(sample_args(tmp_path / "fused.png", "--base")) == 0
    with_lora, by_diffusers, base = (image(tmp_path / n) for n in ("lora.png", "fused.png", "base.png"))
    assert np.abs(base - by_diffusers).mean() > 5  # the LoRA changes the image
    assert np.abs(with_lora - by_diffusers).max() <= 1  # the same image, but for an 8-bit rounding at an edge


@pytest.fixture
def joint_run(run_train, tmp_path):
    """A joint run (its own LoRA, rank 2, and semantic module): the ckpt --lora goes on top of."""
    out = tmp_path / "joint"
    assert run_train(out, "--stage", "joint", "--steps", "1", "--lora-rank", "2", "--lora-alpha", "2") == 0
    return out / "final.safetensors"


def test_kohya_lora_on_top_of_a_run_equals_the_same_weights_merged_by_hand(joint_run, tmp_path, capsys):
    """A kohya-layout file at scale 0.5 on top of a joint run (its LoRA and semantic module): the transformer's
    output and the generated IR equal the run's pipeline with W + 0.5 * alpha/r * up @ down written into the base
    weights by hand."""
    weights = kohya_lora(tmp_path / "kohya.safetensors", text_encoder=6)
    rgb, sem, _ = data.load_pair(EX / "rgb.png", EX / "sem.png", data.DEFAULT_CLASSES, 64)  # [3, 64, 64] x 2
    x = model_inputs()
    pipe = load_pipeline(joint_run, loras=[(tmp_path / "kohya.safetensors", 0.5)])
    out = capsys.readouterr().out
    assert "(kohya layout, 4 layers, rank 2) at scale 0.5, merged into the base weights" in out
    assert "skipped 6 text-encoder tensors" in out
    hand = load_pipeline(joint_run)
    before = run_model(hand.model, x), generate(hand, rgb[None], sem[None], steps=2)
    merge_by_hand(hand.model, weights, 0.5)
    expected = run_model(hand.model, x), generate(hand, rgb[None], sem[None], steps=2)  # [1, 32, 64], [1, 1, 64, 64]
    got = run_model(pipe.model, x), generate(pipe, rgb[None], sem[None], steps=2)
    for b, e, g, acts in zip(before, expected, got, (1e-2, 1e-3)):
        assert (e - b).abs().max() > acts  # the LoRA acts
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

    assert sample.main(sample_args(tmp_path / "ir.png", "--ckpt", str(joint_run), "--lora",
                                   str(tmp_path / "kohya.safetensors"))) == 0
    assert "at scale 1, merged" in capsys.readouterr().out


def test_fp8_base_takes_the_lora_unmerged_with_the_same_output(joint_run, tmp_path, capsys):
    """--base-dtype fp8 cannot take a merge: the file goes beside the fp8 weights as LoRA layers (on a layer with
    the run's own LoRA, one branch of the summed rank), and gives the dequantized base with the file merged by hand."""
    from extras.fp8 import FP8_DTYPES, dequantize_
    weights = kohya_lora(tmp_path / "kohya.safetensors")
    x = model_inputs()
    pipe = load_pipeline(joint_run, base_dtype="fp8", loras=[(tmp_path / "kohya.safetensors", 0.5)])
    assert "as LoRA layers beside the fp8 base weights" in capsys.readouterr().out
    qkv = pipe.model.get_submodule("double_blocks.0.img_attn.qkv")
    assert qkv.weight.dtype in FP8_DTYPES and qkv.rank == 2 + 2  # the run's rank 2 + the file's rank 2
    hand = load_pipeline(joint_run, base_dtype="fp8")
    before = run_model(hand.model, x)
    dequantize_(hand.model, torch.float32)  # W = q * s exactly, in fp32
    merge_by_hand(hand.model, weights, 0.5)
    expected = run_model(hand.model, x)
    assert (expected - before).abs().max() > 1e-2
    torch.testing.assert_close(run_model(pipe.model, x), expected, rtol=1e-5, atol=1e-5)


def model_inputs() -> dict:
    """Flux.forward's inputs for the tiny base with its semantic module: 4x4 tokens of x_t and of the condition."""
    from conftest import kontext_batch
    return kontext_batch(TINY, B=1, h=4, w=4)


@torch.no_grad()
def run_model(model, x) -> torch.Tensor:
    return model(**x)


def test_lora_flag_errors_are_one_line_before_loading(env, tmp_path, capsys):
    """The pair does not exist: an error about --lora (not the pair) proves it came first."""
    kohya_lora(tmp_path / "k.safetensors")
    for flag, says in [(f"{tmp_path / 'k.safetensors'}:abc", "the scale 'abc' is not a finite number"),
                       (f"{tmp_path / 'k.safetensors'}:nan", "the scale 'nan' is not a finite number"),
                       (str(tmp_path / "missing.safetensors"), "no such file"),
                       (f"{tmp_path / 'missing.safetensors'}:0.5", "no such file")]:
        rc = sample.main([str(tmp_path / "missing_rgb.png"), str(tmp_path / "missing_sem.png"), "--base",
                          "-o", str(tmp_path / "out.png"), "--lora", flag])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: --lora ") and len(err.strip().splitlines()) == 1, (flag, err)
        assert says in err and "missing_rgb" not in err, (flag, err)
    from tools import eval as tools_eval
    rc = tools_eval.main(["--base", "--data", str(tmp_path / "no_data"), "--lora", f"{tmp_path}/k.safetensors:x"])
    assert rc == 2
    assert "the scale 'x' is not a finite number" in capsys.readouterr().err


def test_a_lora_given_as_ckpt_or_a_run_given_as_lora_points_to_the_right_flag(joint_run, tmp_path, capsys):
    kohya_lora(tmp_path / "k.safetensors")
    assert sample.main(sample_args(tmp_path / "ir.png", "--ckpt", str(tmp_path / "k.safetensors"))) == 2
    assert f"a LoRA file, not a train.py output: pass it as --lora {tmp_path / 'k.safetensors'}" in \
        capsys.readouterr().err
    assert sample.main(sample_args(tmp_path / "ir.png", "--base", "--lora", str(joint_run))) == 2
    assert "a train.py output, not a LoRA file: pass it as --ckpt" in capsys.readouterr().err
    assert not (tmp_path / "ir.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# train.py --init-lora, and the exports of a run


def test_init_lora_starts_the_joint_lora_from_the_file(run_train, tmp_path, capsys):
    """The joint stage's LoRA starts at the file's A and B (kohya layout, rank 2, alpha 3, text-encoder tensors
    skipped) on the layers it has, at zero elsewhere: after one step at lr 1e-12 the run's weights are still those."""
    weights = kohya_lora(tmp_path / "k.safetensors", alpha=3.0, text_encoder=3)
    out = tmp_path / "joint"
    assert run_train(out, "--stage", "joint", "--steps", "1", "--lr", "1e-12", "--lora-rank", "2",
                     "--lora-alpha", "3", "--init-lora", str(tmp_path / "k.safetensors"),
                     "--lora-export-dtype", "fp32") == 0
    printed = capsys.readouterr().out
    assert "the LoRA starts from" in printed and "skipped 3 text-encoder tensors" in printed
    sd = read_safetensors(out / "final.safetensors")
    for name, (down, up, _) in weights.items():
        torch.testing.assert_close(sd[f"{name}.lora_A.weight"], down, rtol=0, atol=1e-6)
        torch.testing.assert_close(sd[f"{name}.lora_B.weight"], up, rtol=0, atol=1e-6)
    assert sd["double_blocks.1.img_attn.proj.lora_B.weight"].abs().max() < 1e-6  # not in the file: starts at zero
    exported = read_safetensors(out / "lora_kohya.safetensors")
    assert exported["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].dtype == torch.float32  # on request


def test_init_lora_with_another_rank_or_alpha_is_refused_before_any_work(run_train, tmp_path, capsys):
    kohya_lora(tmp_path / "k.safetensors", rank=2, alpha=3.0)
    out = tmp_path / "joint"
    for flags, says in [(["--lora-rank", "4", "--lora-alpha", "3"], "its LoRA has rank 2 but this run has "
                                                                     "--lora-rank 4: pass --lora-rank 2"),
                        (["--lora-rank", "2", "--lora-alpha", "2"], "its LoRA has alpha 3 but this run has "
                                                                     "--lora-alpha 2: pass --lora-alpha 3"),
                        (["--stage", "warmup"], "starts the joint stage's LoRA; this is --stage warmup")]:
        rc = run_train(out, "--stage", "joint", "--steps", "1", "--init-lora", str(tmp_path / "k.safetensors"), *flags)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: --init-lora {tmp_path / 'k.safetensors'}: ") and \
            len(err.strip().splitlines()) == 1, (flags, err)
        assert says in err, (flags, err)
        assert not out.exists()
    assert run_train(out, "--stage", "joint", "--init", str(tmp_path / "k.safetensors")) == 2
    assert "a LoRA file, not a train.py output: pass it as --init-lora" in capsys.readouterr().err


def test_a_runs_exports_go_back_into_sample_and_train(joint_run, run_train, tmp_path, capsys):
    """train.py's exports are bf16 by default, say the sampling settings, come with the model card, and the kohya
    file goes back in: sample.py --lora, and train.py --init-lora with the run's rank and alpha."""
    kohya = joint_run.parent / "lora_kohya.safetensors"
    sd = read_safetensors(kohya)
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    meta = read_metadata(kohya)
    assert {k: float(meta[f"sample_{k}"]) for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert "joint, xattn" in (joint_run.parent / "README.md").read_text()
    assert sample.main(sample_args(tmp_path / "ir.png", "--base", "--lora", f"{kohya}:0.5")) == 0
    assert f"LoRA: {kohya} (kohya layout" in capsys.readouterr().out
    out = tmp_path / "again"
    assert run_train(out, "--stage", "joint", "--steps", "1", "--lr", "1e-12", "--lora-rank", "2",
                     "--lora-alpha", "2", "--init-lora", str(kohya)) == 0
    again = read_safetensors(out / "final.safetensors")
    key = "single_blocks.0.linear1.lora_B"
    torch.testing.assert_close(again[f"{key}.weight"], sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].float(),
                               rtol=0, atol=1e-6)
    assert json.loads(read_metadata(out / "final.safetensors")["train_args"])["init_lora"] == str(kohya)


def test_a_resume_state_from_before_init_lora_resumes(run_train, tmp_path, capsys):
    """A resume state written before train.py had --init-lora / --lora-export-dtype: left at their defaults they are
    what that run did, so it resumes; given otherwise, the change is refused, naming the flag."""
    from checkpoint import load_torch_state, save_torch_atomic
    out = tmp_path / "joint"
    assert run_train(out, "--stage", "joint", "--steps", "1", "--lora-rank", "2") == 0
    state = load_torch_state(out / "resume.pt")
    settings = json.loads(state["settings"])
    del settings["init_lora"], settings["lora_export_dtype"]
    save_torch_atomic(state | {"settings": json.dumps(settings)}, out / "resume.pt")
    kohya_lora(tmp_path / "k.safetensors", rank=2, alpha=2.0)
    assert run_train(out, "--stage", "joint", "--steps", "2", "--lora-rank", "2", "--resume",
                     "--init-lora", str(tmp_path / "k.safetensors"), "--lora-alpha", "2") == 2
    assert "--init-lora None ->" in capsys.readouterr().err
    assert run_train(out, "--stage", "joint", "--steps", "2", "--lora-rank", "2", "--resume") == 0


def test_eval_scores_one_model_with_the_lora_applied(joint_run, env, tmp_path, capsys):
    """tools.eval --lora: the file applied on top of --ckpt (as sample.py does), named in the JSON line; refused
    with --ablation."""
    from tools import eval as tools_eval
    kohya_lora(tmp_path / "k.safetensors")
    assert tools_eval.main(["--ckpt", str(joint_run), "--data", str(env / "synth"), "--limit", "1", "--steps", "1",
                            "--no-progress", "--lora", f"{tmp_path / 'k.safetensors'}:0.5"]) == 0
    out = capsys.readouterr().out
    assert "at scale 0.5, merged into the base weights" in out
    assert json.loads(out.strip().splitlines()[-1])["loras"] == [[str(tmp_path / "k.safetensors"), 0.5]]
    assert tools_eval.main(["--ablation", "--lora", str(tmp_path / "k.safetensors")]) == 2
    assert "not to the ablation's runs" in capsys.readouterr().err
