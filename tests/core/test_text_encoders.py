"""
text_encoders.py against Hugging Face transformers: tiny T5 v1.1 / CLIP text models are saved with save_pretrained and
loaded by our loaders; tokenizers are compared on files built here (a sentencepiece model trained on a small corpus,
a byte-level BPE vocab derived from a few words). Full-size configs are checked on the meta device. CPU, fp32.
"""

import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece
import torch
import transformers
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import text_encoders as te  # noqa: E402
from checkpoint import CheckpointError, strip_prefix  # noqa: E402

WORDS = ("a photo of the cat sitting on mat thermal infrared image person walking car road night street bright hot "
         "cold building tree sky dog running at with in and near two three white black warm engine window").split()

PROMPTS = [
    "A photo of a CAT sitting on the mat.",
    "  thermal   infrared\timage\n of a PERSON walking at night!!  ",
    "numbers 12345, 3.14 and 2024-01-01",
    "it's the dog's toy; they'll go, we've seen I'm ok, you'd",
    "ünïcödé café naïve — “quotes” and symbols @#$%^*() under_score",
    "",
    " ".join(WORDS * 4),  # too long for every max_length used here
]


def _max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere, norms and biases included, so a missed scale or bias cannot hide. Linear layers
    get std 1/sqrt(fan_in), which keeps activations O(1) so that fp32 rounding stays far below the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # norm weights (around 1) and biases (around 0)
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif "embed" in name or name.startswith("shared") or "relative_attention_bias" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> Path:
    """A unigram sentencepiece model with T5's special ids: pad 0, eos 1, unk 2, no bos."""
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
                                for _ in range(2000)) + "\nnumbers 0123456789 , ; : ! ? ' \" - ( ) café naïve\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "spiece"), vocab_size=300, model_type="unigram", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return d / "spiece.model"


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory) -> tuple[Path, Path]:
    """CLIP-layout vocab: the 256 byte characters, the same with "</w>", one token per merge, then the specials;
    merges learnt greedily (most frequent pair first) from WORDS."""
    d = tmp_path_factory.mktemp("clipvocab")
    b2u = transformers.models.clip.tokenization_clip.bytes_to_unicode()  # the oracle's table, not ours
    base = list(b2u.values())
    vocab = base + [c + "</w>" for c in base]
    words = Counter({tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in WORDS})
    merges = []
    for _ in range(120):
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        new = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d / "vocab.json", d / "merges.txt"


def _hf_t5_tokenizer(spm: Path):
    return transformers.T5Tokenizer(vocab_file=str(spm), extra_ids=0, legacy=True)


def _hf_clip_tokenizer(vocab: tuple[Path, Path]):
    return transformers.CLIPTokenizer(vocab_file=str(vocab[0]), merges_file=str(vocab[1]))


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory, spm_path):
    """A tiny HF T5EncoderModel (gated-gelu, 32 buckets, max distance 128) saved with save_pretrained + spiece.model."""
    cfg = transformers.T5Config(vocab_size=320, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=3,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                relative_attention_max_distance=128, dropout_rate=0.0)
    hf = transformers.T5EncoderModel(cfg).eval()
    _randomize(hf, seed=1)
    folder = tmp_path_factory.mktemp("t5")
    hf.save_pretrained(folder, safe_serialization=True)
    shutil.copy(spm_path, folder / "spiece.model")
    return folder, hf


def _hf_clip(eos_token_id: int, vocab_size: int, seed: int):
    cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                      eos_token_id=eos_token_id)
    hf = transformers.CLIPTextModel(cfg).eval()
    _randomize(hf, seed)
    return hf


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, clip_vocab):
    """A tiny HF CLIPTextModel with the legacy eos_token_id 2 (FLUX's config), saved with its tokenizer files."""
    vocab_size = len(json.loads(clip_vocab[0].read_text()))
    hf = _hf_clip(eos_token_id=2, vocab_size=vocab_size, seed=2)
    folder = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(folder, safe_serialization=True)
    for f in clip_vocab:
        shutil.copy(f, folder / f.name)
    return folder, hf


# ---------------------------------------------------------------------------------------------------- 1. T5

def test_relative_position_buckets_equal_hf_for_every_offset_and_use_all_32():
    rel = torch.arange(-400, 401)[None, :]
    ours = te.relative_position_bucket(rel, 32, 128)
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(ours, ref)
    # exact, log-spaced and clipped buckets all exercised; 16 would be "distance 0, key after query", which cannot be
    assert set(ours.flatten().tolist()) == set(range(32)) - {16}
    assert ours[0, 0] == 15 and ours[0, -1] == 31 and ours[0, 400 + 7] == 16 + 7  # -400 / +400 clip, +7 is exact


def test_t5_loaded_from_hf_folder_matches_t5encodermodel_at_150_tokens(t5_folder):
    folder, hf = t5_folder
    embedder = te.load_t5(folder, max_length=150, dtype=torch.float32)
    prompts = [PROMPTS[1], " ".join(WORDS * 8)]  # short (mostly pads, which are attended) and truncated
    with pytest.warns(UserWarning, match="dropped to fit max_length 150"):
        ours = embedder(prompts)  # [2, 150, 32]
    ids = _hf_t5_tokenizer(folder / "spiece.model")(prompts, padding="max_length", max_length=150, truncation=True,
                                                     return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state  # BFL passes attention_mask=None too
    assert ours.shape == (2, 150, 32) and ours.dtype == torch.float32
    assert _max_rel(ours, ref) <= 1e-5
    assert not torch.allclose(ours[0], ours[1])  # the prompts really differ


@pytest.mark.parametrize("keys", ["shared", "embed_tokens", "both"])
def test_t5_accepts_either_tied_embedding_key(t5_folder, tmp_path, keys):
    folder, hf = t5_folder
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "encoder.embed_tokens.weight"}
    table = sd.pop("shared.weight")
    if keys in ("shared", "both"):
        sd["shared.weight"] = table
    if keys in ("embed_tokens", "both"):
        sd["encoder.embed_tokens.weight"] = table.clone()
    for name in ("config.json", "spiece.model"):
        shutil.copy(folder / name, tmp_path / name)
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = te.load_t5(tmp_path, max_length=8, dtype=torch.float32).model
    assert torch.equal(model.shared.weight, table)


def test_t5_load_builds_on_meta_and_keeps_the_file_dtype_requested(t5_folder):
    embedder = te.load_t5(t5_folder[0], max_length=8)  # default bf16
    params = list(embedder.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and not p.requires_grad for p in params)
    assert embedder(["a cat"]).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------- 2. CLIP

def test_clip_loaded_from_hf_folder_matches_cliptextmodel_pooled_and_hidden(clip_folder, clip_vocab):
    folder, hf = clip_folder
    embedder = te.load_clip(folder, dtype=torch.float32)
    prompts = PROMPTS[:5]
    ids = _hf_clip_tokenizer(clip_vocab)(prompts, padding="max_length", max_length=77, truncation=True,
                                         return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(input_ids=ids)
        hidden, pooled = embedder.model(ids)
    assert pooled.shape == (5, 32) and hidden.shape == (5, 77, 32)
    assert _max_rel(hidden, ref.last_hidden_state) <= 1e-5
    assert _max_rel(pooled, ref.pooler_output) <= 1e-5
    assert _max_rel(embedder(prompts), ref.pooler_output) <= 1e-5  # end to end, through our tokenizer


def test_clip_pools_at_first_eos_when_eos_id_is_not_the_legacy_2(clip_vocab):
    eos = 7  # deliberately not the largest id, so argmax pooling would pick a different position
    hf = _hf_clip(eos_token_id=eos, vocab_size=100, seed=3)
    with torch.device("meta"):
        ours = te.CLIPTextEncoder(te.CLIPTextConfig.from_hf(hf.config.to_dict()))
    te.load_strict(ours, hf.state_dict(), "tiny clip")
    ids = torch.tensor([[98, 10, eos, 50, 99, eos] + [eos] * 4, [98, 80, 90, eos] + [0] * 6])
    assert ids[0].argmax() != (ids[0] == eos).int().argmax()
    with torch.no_grad():
        ref = hf(input_ids=ids)
        hidden, pooled = ours(ids)
    assert _max_rel(pooled, ref.pooler_output) <= 1e-5
    assert _max_rel(hidden, ref.last_hidden_state) <= 1e-5
    assert torch.allclose(pooled[0], hidden[0, 2])


def test_clip_tolerates_position_ids_buffer_and_full_clipmodel_folder(clip_folder, clip_vocab, tmp_path):
    folder, hf = clip_folder
    # 1. a CLIPTextModel file that also stores HF's `position_ids` buffer
    a = tmp_path / "with_position_ids"
    shutil.copytree(folder, a)
    sd = load_file(str(a / "model.safetensors"))
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(a / "model.safetensors"))
    ids = torch.tensor([[97, 5, 6, 98] + [98] * 73])
    with torch.no_grad():
        ref = hf(input_ids=ids).pooler_output
        assert _max_rel(te.load_clip(a, dtype=torch.float32).model(ids)[1], ref) <= 1e-5
    # 2. a full CLIPModel (text + vision towers, model_type "clip"): only the text tower is loaded
    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=hf.config.to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=8, patch_size=4))).eval()
    full.text_model.load_state_dict(hf.text_model.state_dict())
    b = tmp_path / "full"
    full.save_pretrained(b, safe_serialization=True)
    for f in clip_vocab:
        shutil.copy(f, b / f.name)
    with torch.no_grad():
        assert _max_rel(te.load_clip(b, dtype=torch.float32).model(ids)[1], ref) <= 1e-5


def test_clip_loads_with_and_without_the_text_model_prefix(clip_folder, t5_folder, tmp_path):
    """transformers 5 saves CLIPTextModel keys without `text_model.`; both layouts load to the same encoder, and the
    unprefixed one is still recognised as CLIP by the T5 loader's hint."""
    folder, hf = clip_folder
    sd = load_file(str(folder / "model.safetensors"))
    assert all(k.startswith("text_model.") for k in sd)  # the layout transformers 4 writes
    flat = tmp_path / "clip_v5"
    shutil.copytree(folder, flat)
    flat_sd = strip_prefix(sd, "text_model.")
    flat_sd["embeddings.position_ids"] = torch.arange(77)[None]
    save_file(flat_sd, str(flat / "model.safetensors"))
    ids = torch.tensor([[97, 5, 6, 98] + [98] * 73])
    with torch.no_grad():
        ref = hf(input_ids=ids)
        for layout in (folder, flat):
            hidden, pooled = te.load_clip(layout, dtype=torch.float32).model(ids)
            assert _max_rel(hidden, ref.last_hidden_state) <= 1e-5 and _max_rel(pooled, ref.pooler_output) <= 1e-5
    t5_named = tmp_path / "t5_config_clip_weights"
    shutil.copytree(t5_folder[0], t5_named)
    shutil.copy(flat / "model.safetensors", t5_named / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"these are CLIP weights; load them with load_clip\(\)"):
        te.load_t5(t5_named)


# ---------------------------------------------------------------------------------------------------- 3. tokenizers

def test_t5_tokenizer_ids_equal_hf_slow_legacy_with_padding_and_truncation(spm_path):
    # The oracle is the slow T5Tokenizer with legacy behaviour, which is what BFL uses. A T5TokenizerFast converted
    # here from the bare spiece.model drops the leading "▁" piece (4.57.6), so it is not a usable reference.
    ours = te.T5Tokenizer(spm_path, max_length=32)
    with pytest.warns(UserWarning, match="T5 tokenizer: prompt truncated"):
        got = ours(PROMPTS)  # [7, 32]
    want = _hf_t5_tokenizer(spm_path)(PROMPTS, padding="max_length", max_length=32, truncation=True,
                                      return_tensors="pt").input_ids
    assert torch.equal(got, want)
    assert got[-1, -1] == 1 and got[-2, 0] == 1 and got[-2, 1] == 0  # truncated keeps </s> last; "" is </s> + pads
    ids, dropped = ours.encode(PROMPTS[-1])
    assert dropped == len(ours.sp.encode(PROMPTS[-1])) - 31 > 0


def test_clip_tokenizer_ids_equal_hf_slow_and_fast_with_padding_and_truncation(clip_vocab):
    ours = te.CLIPTokenizer(*clip_vocab)
    slow, fast = _hf_clip_tokenizer(clip_vocab), transformers.CLIPTokenizerFast(
        vocab_file=str(clip_vocab[0]), merges_file=str(clip_vocab[1]), from_slow=True)
    prompts = PROMPTS + [" ".join(WORDS * 2) + " <|endoftext|> tail"]
    with pytest.warns(UserWarning, match="CLIP tokenizer: prompt truncated"):
        got = ours(prompts)  # [8, 77]
    for ref in (slow, fast):
        want = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(got, want)
    eos = ours.eos_id
    assert ours.pad_id == eos == slow.pad_token_id  # CLIPTokenizer pads with <|endoftext|>
    assert got[-2, 0] == ours.bos_id and got[-2, -1] == eos  # truncated keeps BOS first, EOS last
    assert len(set(got[0].tolist())) > 8  # the BPE really produced several different tokens


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("abcdeCAT xyz019 .,!?'-_\t\néü@") + WORDS[:6]), max_size=30).map("".join))
def test_tokenizers_equal_hf_slow_on_random_text(spm_path, clip_vocab, text):
    t5, clip = _cached_tokenizers(spm_path, clip_vocab)
    assert te.T5Tokenizer(spm_path, 24).encode(text)[0] == t5(text, padding="max_length", max_length=24,
                                                                 truncation=True).input_ids
    assert te.CLIPTokenizer(*clip_vocab).encode(text)[0] == clip(text, padding="max_length", max_length=77,
                                                                  truncation=True).input_ids


_TOKENIZERS = {}


def _cached_tokenizers(spm_path, clip_vocab):
    if not _TOKENIZERS:
        _TOKENIZERS["pair"] = (_hf_t5_tokenizer(spm_path), _hf_clip_tokenizer(clip_vocab))
    return _TOKENIZERS["pair"]


def test_bytes_to_unicode_equals_gpt2_table():
    ref = transformers.models.clip.tokenization_clip.bytes_to_unicode()
    assert te.bytes_to_unicode() == ref and len(set(ref.values())) == 256


def test_stdlib_re_split_pattern_equals_regex_pattern_on_latin_text():
    regex = pytest.importorskip("regex")
    exact = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                          r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    for text in PROMPTS + ["x__y!!z 3rd ñandú çà <|startoftext|>it's ελληνικά кириллица"]:
        text = " ".join(text.split()).lower()
        assert te._CLIP_SPLIT_RE.findall(text) == exact.findall(text)


# ---------------------------------------------------------------------------------------------------- 4. full size

def test_full_size_configs_have_the_published_param_counts_and_hf_key_names():
    with torch.device("meta"):
        t5, clip = te.T5Encoder(te.T5_V1_1_XXL), te.CLIPTextEncoder(te.CLIP_VIT_L14)
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480

    t5_keys = {"shared.weight", "encoder.final_layer_norm.weight",
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    for i in range(24):
        p = f"encoder.block.{i}.layer."
        t5_keys |= {f"{p}0.SelfAttention.{n}.weight" for n in "qkvo"} | {f"{p}0.layer_norm.weight",
                                                                        f"{p}1.layer_norm.weight"}
        t5_keys |= {f"{p}1.DenseReluDense.{n}.weight" for n in ("wi_0", "wi_1", "wo")}
    sd = t5.state_dict()
    assert set(sd) == t5_keys
    assert sd["shared.weight"].shape == (32128, 4096)
    assert sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (32, 64)
    assert sd["encoder.block.5.layer.1.DenseReluDense.wi_0.weight"].shape == (10240, 4096)
    assert sd["encoder.block.5.layer.1.DenseReluDense.wo.weight"].shape == (4096, 10240)

    clip_keys = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                 "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    for i in range(12):
        p = f"text_model.encoder.layers.{i}."
        names = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        names += ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
        clip_keys |= {f"{p}{n}.{w}" for n in names for w in ("weight", "bias")}
    sd = clip.state_dict()
    assert set(sd) == clip_keys
    assert sd["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd["text_model.embeddings.position_embedding.weight"].shape == (77, 768)
    assert sd["text_model.encoder.layers.3.mlp.fc1.weight"].shape == (3072, 768)


def test_from_hf_reads_configs_as_save_pretrained_writes_them():
    xxl = transformers.T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                feed_forward_proj="gated-gelu").to_diff_dict()  # what save_pretrained writes
    assert te.T5Config.from_hf(xxl) == te.T5_V1_1_XXL
    # a hand-written or older config may leave keys out: those take HF's defaults
    short = {k: v for k, v in xxl.items() if k not in ("vocab_size", "relative_attention_num_buckets")}
    assert te.T5Config.from_hf(short) == te.T5_V1_1_XXL
    clip_l = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         eos_token_id=2).to_diff_dict()
    assert te.CLIPTextConfig.from_hf(clip_l) == te.CLIP_VIT_L14
    assert te.CLIPTextConfig.from_hf({"text_config": clip_l, "model_type": "clip"}) == te.CLIP_VIT_L14
    with pytest.raises(ValueError, match="gated-gelu"):
        te.T5Config.from_hf(transformers.T5Config().to_diff_dict())  # original T5: relu


# ---------------------------------------------------------------------------------------------------- 5. cache, errors

def test_prompt_cache_loads_encoders_only_on_a_miss_and_returns_identical_tensors(t5_folder, clip_folder, tmp_path,
                                                                                   monkeypatch):
    loads = Counter()
    real_t5, real_clip = te.load_t5, te.load_clip

    def counting_t5(*a, **k):
        loads["t5"] += 1
        return real_t5(*a, **k)

    def counting_clip(*a, **k):
        loads["clip"] += 1
        return real_clip(*a, **k)

    monkeypatch.setattr(te, "load_t5", counting_t5)
    monkeypatch.setattr(te, "load_clip", counting_clip)
    cache = te.PromptCache(tmp_path / "cache", t5_folder[0], clip_folder[0], t5_max_length=40, dtype=torch.float32)
    prompts = [PROMPTS[0], PROMPTS[-1], PROMPTS[0]]  # a duplicate, and a prompt too long for 40 T5 tokens

    with pytest.warns(UserWarning, match="dropped"):
        txt, vec = cache(prompts)
    assert dict(loads) == {"t5": 1, "clip": 1}
    assert txt.shape == (3, 40, 32) and vec.shape == (3, 32)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4  # 2 distinct prompts x 2 encoders
    direct = real_t5(t5_folder[0], 40, dtype=torch.float32)(prompts[:1])
    assert torch.equal(txt[:1], direct)

    with pytest.warns(UserWarning) as record:  # the hit still reports truncation, for both encoders
        txt2, vec2 = cache(prompts)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("T5 (cached): prompt truncated") for m in messages)
    assert any(m.startswith("CLIP (cached): prompt truncated") for m in messages)
    assert dict(loads) == {"t5": 1, "clip": 1}
    assert torch.equal(txt, txt2) and torch.equal(vec, vec2)

    cache(["a new prompt"])
    assert dict(loads) == {"t5": 2, "clip": 2}
    other = te.PromptCache(tmp_path / "cache", t5_folder[0], clip_folder[0], t5_max_length=16, dtype=torch.float32)
    txt3, vec3 = other([PROMPTS[0]])  # another max_length is another T5 entry; CLIP entries are shared
    assert dict(loads) == {"t5": 3, "clip": 2}
    assert txt3.shape == (1, 16, 32) and torch.equal(vec3[0], vec[0])


def test_bad_folders_give_errors_that_name_the_problem(t5_folder, clip_folder, tmp_path):
    t5, clip = t5_folder[0], clip_folder[0]
    with pytest.raises(CheckpointError, match="no such folder"):
        te.load_t5(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        te.load_clip(tmp_path)
    with pytest.raises(CheckpointError, match=r"clip_text_model folder, load it with load_clip\(\)"):
        te.load_t5(clip)
    with pytest.raises(CheckpointError, match=r"load it with load_t5\(\)"):
        te.load_clip(t5)
    with pytest.raises(CheckpointError, match="config.json: missing"):  # a folder that is there is checked at once
        te.PromptCache(tmp_path / "c", tmp_path, clip)

    no_spm = tmp_path / "no_spm"
    shutil.copytree(t5, no_spm)
    (no_spm / "spiece.model").unlink()
    with pytest.raises(CheckpointError, match="spiece.model: not found"):
        te.load_t5(no_spm)

    short = tmp_path / "short"  # weights with the last block's feed-forward missing
    shutil.copytree(t5, short)
    sd = load_file(str(short / "model.safetensors"))
    del sd["encoder.block.2.layer.1.DenseReluDense.wo.weight"]
    save_file(sd, str(short / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: encoder\.block\.2\.layer\.1\.DenseReluDense\.wo\.weight"):
        te.load_t5(short)


def test_diffusers_layout_finds_tokenizer_in_sibling_folder(t5_folder, tmp_path):
    shutil.copytree(t5_folder[0], tmp_path / "text_encoder_2")
    (tmp_path / "tokenizer_2").mkdir()
    (tmp_path / "text_encoder_2" / "spiece.model").rename(tmp_path / "tokenizer_2" / "spiece.model")
    assert te.load_t5(tmp_path / "text_encoder_2", max_length=8)(["a"]).shape == (1, 8, 32)


def test_cached_prompts_need_no_encoder_files(t5_folder, clip_folder, tmp_path, capsys):
    """Once a prompt is cached, a run without the encoder folders reads it (one note); a new prompt then names the
    missing folder; an entry of another encoder is computed again when the encoder is there."""
    cache = te.PromptCache(tmp_path / "cache", t5_folder[0], clip_folder[0], t5_max_length=40, dtype=torch.float32)
    txt, vec = cache(["a thermal image"])
    gone = te.PromptCache(tmp_path / "cache", tmp_path / "no_t5", tmp_path / "no_clip", t5_max_length=40,
                          dtype=torch.float32)
    capsys.readouterr()
    txt2, vec2 = gone(["a thermal image"])
    assert torch.equal(txt, txt2) and torch.equal(vec, vec2)
    assert "note: no T5 folder" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=r"no_t5: no such folder, and the prompt 'new' has no cached T5"):
        gone(["new"])
    bf16 = te.PromptCache(tmp_path / "cache", t5_folder[0], clip_folder[0], t5_max_length=40, dtype=torch.bfloat16)
    assert bf16(["a thermal image"])[0].dtype == torch.bfloat16  # another dtype's entry: computed again
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # and stored in its place


def test_the_encoders_in_bf16_stay_within_bf16_rounding_of_the_fp32_reference(t5_folder, clip_folder, clip_vocab):
    """The commands run T5 and CLIP in bf16 (pipeline.text_condition), the smallest dtype they have: through their
    layers the embeddings stay within 2^-5 of transformers' fp32 models (bf16 rounds each value by up to 2^-9)."""
    folder, hf = t5_folder
    prompts = [PROMPTS[1], PROMPTS[0]]
    ids = _hf_t5_tokenizer(folder / "spiece.model")(prompts, padding="max_length", max_length=40, truncation=True,
                                                     return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
    ours = te.load_t5(folder, max_length=40, dtype=torch.bfloat16)(prompts).float()  # [2, 40, 32]
    assert ours.dtype == torch.float32 and 1e-5 < _max_rel(ours, ref) <= 2 ** -5  # 0.017 measured
    clip_dir, clip_hf = clip_folder
    clip_ids = _hf_clip_tokenizer(clip_vocab)(prompts, padding="max_length", max_length=77, truncation=True,
                                              return_tensors="pt").input_ids
    with torch.no_grad():
        pooled_ref = clip_hf(input_ids=clip_ids).pooler_output
    pooled = te.load_clip(clip_dir, dtype=torch.bfloat16)(prompts).float()  # [2, D]
    assert 1e-5 < _max_rel(pooled, pooled_ref) <= 2 ** -5  # 0.007 measured
