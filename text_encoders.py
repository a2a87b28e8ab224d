"""
FLUX.1's two frozen text encoders, written from their formulas: the T5 v1.1 encoder (XXL) and the text tower of
CLIP ViT-L/14. The file also holds their tokenizers, loaders for Hugging Face folders, and an on-disk prompt cache.

What FLUX takes from them (BFL src/flux/modules/conditioner.py `HFEmbedder`, sampling.py `prepare`):
    txt = T5(prompt).last_hidden_state  [B, 512, 4096]  (256 for schnell): the token sequence the transformer attends to
    vec = CLIP(prompt).pooler_output    [B, 768]        one vector, added to the timestep embedding (modulation)
Neither encoder gets an attention mask. T5 encodes and attends to its pad tokens like any other token. In CLIP the
causal mask keeps the pads after EOS from reaching the pooled EOS position.

References:
    T5: Raffel et al. 2020, arXiv:1910.10683; v1.1 changes (gated-GELU FF, untied embeddings): google-research/
        text-to-text-transfer-transformer released_checkpoints.md; HF transformers models/t5/modeling_t5.py.
    CLIP: Radford et al. 2021, arXiv:2103.00020; openai/CLIP clip/simple_tokenizer.py; HF models/clip/modeling_clip.py
        and tokenization_clip.py; GPT-2 byte-level BPE (Radford et al. 2019) for bytes_to_unicode.
Dims: B batch, L tokens, D model width, H heads, K head width, F feed-forward width, V vocabulary.
"""

import gc
import hashlib
import json
import math
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from checkpoint import CheckpointError, load_strict, read_metadata, read_safetensors, read_sharded, save_atomic


def _group(**children: nn.Module) -> nn.Module:
    """A bare module that only places its children at the checkpoint's key names (like BFL's VAE containers)."""
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


def _warn_truncated(what: str, prompt: str, dropped: int, max_length: int) -> None:
    warnings.warn(f"{what}: prompt truncated, {dropped} tokens dropped to fit max_length {max_length} (special tokens "
                  f"included): {prompt[:60]!r}{'...' if len(prompt) > 60 else ''}", stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------------
# T5 v1.1 encoder

@dataclass(frozen=True)
class T5Config:
    d_model: int  # D, the residual width
    d_ff: int  # F, the gated feed-forward width
    d_kv: int  # K, the width of one head (H * K need not equal D)
    num_heads: int  # H
    num_layers: int
    vocab_size: int  # V, the rows of `shared`; larger than the sentencepiece vocab (T5 keeps 100 spare ids + padding)
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_hf(cls, cfg: dict) -> "T5Config":
        """From a Hugging Face T5 config.json. save_pretrained leaves out values equal to the class defaults, so a
        missing key means HF's default (transformers T5Config)."""
        ff = cfg.get("feed_forward_proj", "relu")
        if ff != "gated-gelu":
            raise ValueError(f"feed_forward_proj={ff!r}: only T5 v1.1's 'gated-gelu' feed-forward is implemented "
                             "(FLUX uses google/t5-v1_1-xxl); the original T5 (relu) and other variants are not")
        return cls(d_model=cfg.get("d_model", 512), d_ff=cfg.get("d_ff", 2048), d_kv=cfg.get("d_kv", 64),
                   num_heads=cfg.get("num_heads", 8), num_layers=cfg.get("num_layers", 6),
                   vocab_size=cfg.get("vocab_size", 32128),
                   relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
                   relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
                   layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6))


T5_V1_1_XXL = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128)


class T5LayerNorm(nn.Module):
    """RMS norm: x / sqrt(mean(x^2) + eps) * weight. Unlike LayerNorm it subtracts no mean and adds no bias. The mean
    of squares is taken in fp32 because bf16 loses the small activations that T5's large ones sit beside."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # [B, L, D] in fp32
        return self.weight * x32.to(self.weight.dtype)


def relative_position_bucket(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bidirectional bucket for each (key position - query position).

    Keys after the query use buckets [n/2, n) and keys at or before it use [0, n/2). Within each half, distances
    0 .. n/4-1 get one bucket each. Larger distances share the other n/4 buckets on a log scale up to max_distance,
    and everything beyond that falls into the last bucket. The float ops follow HF's order so that distances on a
    bucket boundary round the same way."""
    half = num_buckets // 2  # 16 per direction
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    exact = half // 2  # 8: distances 0..7 are exact
    # clamp(min=1) only avoids log(0) for distances that take the exact branch anyway
    log_scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_scaled.long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    """Multi-head self-attention without biases and with no 1/sqrt(K) on the scores. T5 folds that factor into the
    initialisation of q, so the trained weights expect unscaled dot products. Only block 0 owns the relative position
    bias table; the stack computes the bias once and every block adds the same one."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        q, k, v = (rearrange(proj(x), "B L (H K) -> B H L K", H=self.num_heads)
                   for proj in (self.q, self.k, self.v))  # [B, L, H*K] -> [B, H, L, K]
        # softmax(q k^T + bias) v; position_bias [1, H, L, L] is added to the scores like a float mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)  # [B, H, L, K]
        return self.o(rearrange(out, "B H L K -> B L (H K)"))  # [B, L, D]


class T5GatedFF(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): the v1.1 gated-GELU feed-forward. It has no biases. HF names it DenseReluDense
    for historical reasons."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # [B, L, D] -> [B, L, F]
        return self.wo(h)  # [B, L, F] -> [B, L, D]


class T5Block(nn.Module):
    """Pre-norm residual block. `layer.0` is the self-attention sublayer and `layer.1` the feed-forward one,
    matching HF's keys."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([
            _group(SelfAttention=T5Attention(cfg, has_relative_bias),
                   layer_norm=T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)),
            _group(DenseReluDense=T5GatedFF(cfg), layer_norm=T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)),
        ])

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), position_bias)  # [B, L, D]
        return x + ff.DenseReluDense(ff.layer_norm(x))  # [B, L, D]


class T5Encoder(nn.Module):
    """input_ids [B, L] -> last hidden state [B, L, D]. Module names equal HF T5EncoderModel's keys. HF ties
    `encoder.embed_tokens` to `shared`, and here that table exists only once, as `shared`."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = _group(
            block=nn.ModuleList(T5Block(cfg, has_relative_bias=(i == 0)) for i in range(cfg.num_layers)),
            final_layer_norm=T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon))

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """[1, H, L, L], computed on the fly (not a buffer) so the model can be built on the meta device."""
        pos = torch.arange(length, device=device)
        relative = pos[None, :] - pos[:, None]  # [Lq, Lk]: key position minus query position
        buckets = relative_position_bucket(relative, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)  # [Lq, Lk] in [0, 32)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return rearrange(table(buckets), "q k H -> 1 H q k")  # [Lq, Lk, H] -> [1, H, Lq, Lk]

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.shared(input_ids)  # [B, L] -> [B, L, D]; T5 does not scale embeddings by sqrt(D)
        bias = self.position_bias(input_ids.shape[1], input_ids.device).to(x.dtype)  # [1, H, L, L]
        for block in self.encoder.block:
            x = block(x, bias)  # [B, L, D]
        return self.encoder.final_layer_norm(x)  # [B, L, D]


# ----------------------------------------------------------------------------------------------------------------------
# CLIP text transformer

@dataclass(frozen=True)
class CLIPTextConfig:
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int
    num_attention_heads: int  # H, with K = D / H
    eos_token_id: int  # 2 in legacy configs (FLUX's), which means "pool at argmax(input_ids)"
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act {self.hidden_act!r}: only 'quick_gelu' (CLIP) and 'gelu' are implemented")

    @classmethod
    def from_hf(cls, cfg: dict) -> "CLIPTextConfig":
        """From a CLIPTextModel config.json, or a full CLIPModel one (its `text_config`). A missing key takes
        HF's default (transformers CLIPTextConfig)."""
        cfg = cfg.get("text_config", cfg)
        return cls(hidden_size=cfg.get("hidden_size", 512), intermediate_size=cfg.get("intermediate_size", 2048),
                   num_hidden_layers=cfg.get("num_hidden_layers", 12),
                   num_attention_heads=cfg.get("num_attention_heads", 8), eos_token_id=cfg.get("eos_token_id", 49407),
                   max_position_embeddings=cfg.get("max_position_embeddings", 77),
                   vocab_size=cfg.get("vocab_size", 49408), hidden_act=cfg.get("hidden_act", "quick_gelu"),
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-5))


CLIP_VIT_L14 = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              eos_token_id=2)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biases, scaled by 1/sqrt(K)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (rearrange(proj(x), "B L (H K) -> B H L K", H=self.num_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # [B, L, D] -> [B, H, L, K]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # each token sees itself and earlier ones
        return self.out_proj(rearrange(out, "B H L K -> B L (H K)"))  # [B, L, D]


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x))))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _group(fc1=nn.Linear(cfg.hidden_size, cfg.intermediate_size),
                          fc2=nn.Linear(cfg.intermediate_size, cfg.hidden_size))
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # [B, L, D]
        h = self.mlp.fc1(self.layer_norm2(x))  # [B, L, D] -> [B, L, F]
        # quick_gelu x * sigmoid(1.702 x) is the sigmoid approximation of GELU that OpenAI trained CLIP with
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return x + self.mlp.fc2(h)  # [B, L, F] -> [B, L, D]


class CLIPTextEncoder(nn.Module):
    """input_ids [B, L] -> (last hidden state [B, L, D], pooled [B, D]). Keys equal HF CLIPTextModel's.

    Pooling takes the final-LN hidden state at the EOS token. Legacy configs have eos_token_id 2, and HF then uses
    argmax(input_ids), because EOS (49407) is the largest id; that finds the first EOS even when pads are EOS too.
    Any other eos_token_id pools at the first position that holds that id, as HF does."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = _group(
            embeddings=_group(token_embedding=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                              position_embedding=nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)),
            encoder=_group(layers=nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))),
            final_layer_norm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps))

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        B, L = input_ids.shape
        if L > self.cfg.max_position_embeddings:
            raise ValueError(f"{L} tokens, but CLIP has {self.cfg.max_position_embeddings} positions")
        emb = self.text_model.embeddings
        positions = torch.arange(L, device=input_ids.device)  # computed here rather than stored as HF's buffer
        x = emb.token_embedding(input_ids) + emb.position_embedding(positions)  # [B, L, D] + [L, D]
        for layer in self.text_model.encoder.layers:
            x = layer(x)  # [B, L, D]
        x = self.text_model.final_layer_norm(x)  # [B, L, D]
        if self.cfg.eos_token_id == 2:
            eos_at = input_ids.argmax(dim=-1)  # [B]; argmax returns the first of equal maxima
        else:
            eos_at = (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # [B], first EOS
        return x, x[torch.arange(B, device=x.device), eos_at]  # [B, L, D], [B, D]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers

def _fit(body: list[int], start: list[int], end: list[int], pad: int, max_length: int) -> tuple[list[int], int]:
    """start + body + end, truncating the body (never the special tokens) and padding to max_length, as HF does with
    padding="max_length", truncation=True. Returns (ids, number of body tokens dropped)."""
    keep = max_length - len(start) - len(end)
    ids = start + body[:keep] + end
    return ids + [pad] * (max_length - len(ids)), max(0, len(body) - keep)


class T5Tokenizer:
    """Matches HF's T5Tokenizer with legacy behaviour, which BFL gets for google/t5-v1_1-xxl: the sentencepiece ids,
    then `</s>`, then `<pad>` up to max_length. Limitation: special-token strings written inside a prompt ("</s>")
    are encoded as plain text, whereas HF would turn them into the special ids."""

    def __init__(self, spiece_model: str | Path, max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length {max_length} leaves no room for </s>")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
        self.max_length = max_length
        self.eos_id, self.pad_id = self.sp.piece_to_id("</s>"), self.sp.piece_to_id("<pad>")  # 1, 0 for T5
        if self.sp.unk_id() in (self.eos_id, self.pad_id):
            raise CheckpointError(f"{spiece_model}: has no '</s>' or '<pad>' piece; not a T5 sentencepiece model")

    def encode(self, prompt: str) -> tuple[list[int], int]:
        """(ids of length max_length, number of prompt tokens dropped)."""
        return _fit(self.sp.encode(prompt), [], [self.eos_id], self.pad_id, self.max_length)

    def __call__(self, prompts: list[str]) -> Tensor:
        rows = []
        for p in prompts:
            ids, dropped = self.encode(p)
            if dropped:
                _warn_truncated("T5 tokenizer", p, dropped, self.max_length)
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long)  # [B, max_length]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table. BPE works on characters, and this table keeps spaces and control
    bytes out of the merge vocabulary. The 188 printable Latin-1 bytes map to themselves. The other 68 map to
    chr(256 + n), in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


# CLIP's pre-tokenizer splits into special tokens, English contractions, runs of letters, single digits, and runs
# of other non-space characters. The stdlib `re` has no \p{..} classes, so it approximates them: a letter is a word
# character that is neither a digit nor "_", and a number is a decimal digit. Limitation of that fallback:
# non-decimal numerals (², ½, Ⅻ) count as letters and join the neighbouring letters. With `regex` installed, the
# exact pattern is used.
_CLIP_SPLIT_RE = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""", re.IGNORECASE)
try:
    import regex
    _CLIP_SPLIT = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE)
except ImportError:
    _CLIP_SPLIT = _CLIP_SPLIT_RE


class CLIPTokenizer:
    """CLIP's byte-level BPE (openai simple_tokenizer), matching HF's CLIPTokenizer with padding="max_length",
    truncation=True. The output is <|startoftext|> ... <|endoftext|> followed by pad tokens up to max_length.

    Text cleaning is NFC, whitespace collapsed to single spaces, then lowercase. That is what HF does when `ftfy` is
    absent. The openai original also runs ftfy.fix_text and html.unescape, which can differ on mojibake or on
    "&amp;". Pad is the tokenizer's pad_token from special_tokens_map.json / tokenizer_config.json. If neither names
    one, CLIPTokenizer's default "<|endoftext|>" is used (49407; openai/clip-vit-large-patch14 uses the same)."""

    def __init__(self, vocab_json: str | Path, merges_txt: str | Path, max_length: int = 77,
                 pad_token: str | None = None):
        self.vocab: dict[str, int] = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").strip().split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}  # (left, right) -> merge priority
        self.byte_to_char = bytes_to_unicode()
        self.max_length = max_length
        missing = [t for t in ("<|startoftext|>", "<|endoftext|>", pad_token or "<|endoftext|>") if t not in self.vocab]
        if missing:
            raise CheckpointError(f"{vocab_json}: no entry for {missing}; not a CLIP vocabulary")
        self.bos_id, self.eos_id = self.vocab["<|startoftext|>"], self.vocab["<|endoftext|>"]  # 49406, 49407
        self.pad_id = self.vocab[pad_token or "<|endoftext|>"]
        self.unk_id = self.eos_id  # CLIPTokenizer's unk_token is <|endoftext|> too
        self.cache: dict[str, list[str]] = {}

    def bpe(self, word: str) -> list[str]:
        """Split a word (already mapped byte -> char) into vocabulary tokens. Start from characters, with "</w>" on
        the last one, then keep applying the lowest-ranked merge, left to right, until none applies."""
        if word not in self.cache:
            parts = [*word[:-1], word[-1] + "</w>"]
            while len(parts) > 1:
                best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(parts):
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            self.cache[word] = parts
        return self.cache[word]

    def encode(self, prompt: str) -> tuple[list[int], int]:
        """(ids of length max_length, number of prompt tokens dropped)."""
        text = " ".join(unicodedata.normalize("NFC", prompt).split()).lower()
        body = []
        for piece in _CLIP_SPLIT.findall(text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                body.append(self.vocab[piece])
                continue
            word = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            body += [self.vocab.get(token, self.unk_id) for token in self.bpe(word)]
        return _fit(body, [self.bos_id], [self.eos_id], self.pad_id, self.max_length)

    def __call__(self, prompts: list[str]) -> Tensor:
        rows = []
        for p in prompts:
            ids, dropped = self.encode(p)
            if dropped:
                _warn_truncated("CLIP tokenizer", p, dropped, self.max_length)
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long)  # [B, max_length]


# ----------------------------------------------------------------------------------------------------------------------
# Loading Hugging Face folders

class T5Embedder(nn.Module):
    """prompts -> T5 last hidden state [B, max_length, d_model]: FLUX's `txt`."""

    def __init__(self, model: T5Encoder, tokenizer: T5Tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, prompts: list[str] | str) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        ids = self.tokenizer(prompts).to(self.model.shared.weight.device)  # [B, L]
        return self.model(ids)  # [B, L, D]


class CLIPEmbedder(nn.Module):
    """prompts -> CLIP pooled output [B, hidden_size]: FLUX's `vec`."""

    def __init__(self, model: CLIPTextEncoder, tokenizer: CLIPTokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, prompts: list[str] | str) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        ids = self.tokenizer(prompts).to(self.model.text_model.final_layer_norm.weight.device)  # [B, 77]
        return self.model(ids)[1]  # [B, D]


_LOADER_FOR = {"t5": "load_t5", "clip": "load_clip", "clip_text_model": "load_clip"}


def _read_config(folder: Path, accepted: tuple[str, ...], what: str) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (expected a Hugging Face {what} folder: config.json, "
                              "model.safetensors or a sharded index, and the tokenizer files)")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a Hugging Face {what} folder has config.json beside the weights")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type not in accepted:
        other = _LOADER_FOR.get(model_type)
        hint = f"; this is a {model_type} folder, load it with {other}()" if other else ""
        raise CheckpointError(f"{path}: model_type {model_type!r}, expected {' or '.join(accepted)} for {what}{hint}")
    return cfg


def _tokenizer_file(folder: Path, name: str) -> Path:
    """A plain HF repo keeps tokenizer files beside the weights. A diffusers FLUX repo keeps them in the sibling
    tokenizer/ (CLIP) or tokenizer_2/ (T5) folder, so that folder is tried next."""
    places = dict.fromkeys([folder, folder.parent / folder.name.replace("text_encoder", "tokenizer")])
    for place in places:
        if (place / name).is_file():
            return place / name
    raise CheckpointError(f"{name}: not found in {' or '.join(str(p) for p in places)}; the tokenizer files must sit "
                          "beside config.json (or in the diffusers sibling tokenizer folder)")


def _t5_files(folder: Path) -> list[Path]:
    return [_tokenizer_file(folder, "spiece.model")]


def _clip_files(folder: Path) -> list[Path]:
    files = [_tokenizer_file(folder, "vocab.json"), _tokenizer_file(folder, "merges.txt")]
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (files[0].parent / name).is_file():
            files.append(files[0].parent / name)
    return files


_CLIP_TEXT_PARTS = ("embeddings.token_embedding.", "encoder.layers.", "final_layer_norm.")  # under text_model.


def _t5_hint(missing: set, unexpected: set, mismatched: list) -> str:
    if any(k.startswith(("text_model.", *_CLIP_TEXT_PARTS)) for k in unexpected):
        return "these are CLIP weights; load them with load_clip()"
    if any(".DenseReluDense.wi." in k for k in unexpected):
        return "this is an original T5 (single relu `wi`); FLUX needs T5 v1.1 (gated-gelu `wi_0`, `wi_1`)"
    if mismatched or missing:
        return "config.json does not describe these weights (other sizes or layer count); re-download the folder"
    return ""


def _clip_hint(missing: set, unexpected: set, mismatched: list) -> str:
    if any(k.startswith(("encoder.block.", "shared.")) for k in unexpected):
        return "these are T5 weights; load them with load_t5()"
    if mismatched or missing:
        return "config.json does not describe these weights (other sizes or layer count); re-download the folder"
    return ""


def load_t5(path: str | Path, max_length: int = 512, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.bfloat16) -> T5Embedder:
    """A T5 v1.1 encoder from a Hugging Face folder (config.json, model.safetensors or sharded index, spiece.model).
    FLUX uses max_length 512 (dev, Kontext) or 256 (schnell). The weights are read once, straight into `dtype` on
    `device`. The model is built on the meta device and takes those tensors as its parameters."""
    folder = Path(path)
    cfg = T5Config.from_hf(_read_config(folder, ("t5",), "T5 encoder"))
    if dtype == torch.float16:
        raise ValueError("T5 v1.1 overflows in float16 (its activations exceed 65504); use bfloat16 or float32")
    tokenizer = T5Tokenizer(_t5_files(folder)[0], max_length)  # tokenizer errors come before the 9 GB read
    if tokenizer.sp.get_piece_size() > cfg.vocab_size:
        raise CheckpointError(f"{folder}: spiece.model has {tokenizer.sp.get_piece_size()} pieces but the model only "
                              f"{cfg.vocab_size} embeddings; tokenizer and weights are from different models")
    sd = read_sharded(folder, dtype, device)
    # HF stores the tied embedding as `shared.weight`, `encoder.embed_tokens.weight` or both: keep one, as `shared`
    tied = sd.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in sd and tied is not None:
        sd["shared.weight"] = tied
    # a full encoder-decoder checkpoint: drop the decoder, as HF's T5EncoderModel does
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "lm_head."))}
    with torch.device("meta"):
        model = T5Encoder(cfg)
    load_strict(model, sd, f"T5 encoder {folder}", hint=_t5_hint)
    return T5Embedder(model.eval().requires_grad_(False), tokenizer)


def load_clip(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.bfloat16) -> CLIPEmbedder:
    """A CLIP text encoder from a Hugging Face folder: a CLIPTextModel (FLUX's text_encoder/) or a full CLIPModel
    (openai/clip-vit-large-patch14; its vision tower is skipped). It needs vocab.json and merges.txt."""
    folder = Path(path)
    hf = _read_config(folder, ("clip_text_model", "clip"), "CLIP text encoder")
    cfg = CLIPTextConfig.from_hf(hf)
    files = _clip_files(folder)
    pad_token = None
    for extra in files[2:]:  # special_tokens_map.json, then tokenizer_config.json, may name the pad token
        pad = json.loads(extra.read_text(encoding="utf-8")).get("pad_token")
        pad_token = pad_token or (pad.get("content") if isinstance(pad, dict) else pad)
    tokenizer = CLIPTokenizer(files[0], files[1], cfg.max_position_embeddings, pad_token)
    sd = read_sharded(folder, dtype, device)
    if hf.get("model_type") == "clip":  # full CLIPModel: keep the text tower
        sd = {k: v for k, v in sd.items() if k.startswith("text_model.")}
    elif any(k.startswith(_CLIP_TEXT_PARTS) for k in sd) and not any(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}  # transformers 5 dropped CLIPTextModel's inner text_model
    # HF saves `position_ids` as a buffer in some versions; it is only arange(77)
    sd.pop("text_model.embeddings.position_ids", None)
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    load_strict(model, sd, f"CLIP text encoder {folder}", hint=_clip_hint)
    return CLIPEmbedder(model.eval().requires_grad_(False), tokenizer)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt-embedding cache

def encoder_fingerprint(folder: str | Path, tokenizer_files: list[Path]) -> str:
    """sha256 identifying an encoder folder without reading its weights. It hashes config.json, the tokenizer files,
    and for each weight file its name, size, first MiB (header + first tensor) and last MiB. Limitation: a fine-tune
    that leaves both ends of every file untouched looks like its base; give it its own cache folder."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in [folder / "config.json", *tokenizer_files]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weights = sorted({folder / s for s in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    else:
        weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{folder}: no *.safetensors file and no model.safetensors.index.json")
    for f in weights:
        if not f.is_file():
            raise CheckpointError(f"{f}: no such file (named by {index})")
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(0, size - (1 << 20)))
            tail = fh.read()
        h.update(f"{f.name}:{size}".encode() + head + tail)
    return h.hexdigest()


class PromptCache:
    """prompts -> (txt [B, L, 4096], vec [B, 768]) from disk, so training and sampling need not keep a 9 GB T5
    resident, and need no encoder files at all once every prompt they use is cached.

    There is one safetensors file per (encoder kind, T5's max_length, prompt), named by the sha256 of the three; its
    metadata records which encoder made it (the folder's fingerprint and the dtype). With the encoder folder present,
    an entry made by another encoder or dtype is computed again; with the folder absent, any entry of the prompt is
    used (one note says so) and a prompt without one is an error naming the folder. An encoder is loaded only when
    some prompt misses. It then encodes all missing prompts and is freed before the call returns. Files are written
    atomically, and a hit repeats the truncation warning from the miss. Embeddings are stored in `dtype`, as
    computed on `device`, and returned in `dtype`."""

    def __init__(self, folder: str | Path, t5_path: str | Path, clip_path: str | Path, t5_max_length: int = 512,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, batch_size: int = 8):
        self.folder, self.device, self.dtype, self.batch_size = Path(folder), device, dtype, batch_size
        self.t5_path, self.clip_path, self.t5_max_length = Path(t5_path), Path(clip_path), t5_max_length
        self.paths = {"t5": self.t5_path, "clip": self.clip_path}
        # a folder that is there is checked now, so a wrong one fails before any prompt is encoded; an absent one
        # leaves the cache to serve what it holds
        self.max_length = {"t5": t5_max_length, "clip": 77}  # CLIP-L's window; the folder's config says its own
        self.encoder_ids = {"t5": None, "clip": None}
        if self.t5_path.exists():
            _read_config(self.t5_path, ("t5",), "T5 encoder")
            self.encoder_ids["t5"] = f"t5:{encoder_fingerprint(self.t5_path, _t5_files(self.t5_path))}:{dtype}"
        if self.clip_path.exists():
            clip_cfg = CLIPTextConfig.from_hf(_read_config(self.clip_path, ("clip_text_model", "clip"),
                                                           "CLIP text encoder"))
            self.max_length["clip"] = clip_cfg.max_position_embeddings
            self.encoder_ids["clip"] = f"clip:{encoder_fingerprint(self.clip_path, _clip_files(self.clip_path))}:{dtype}"
        self.noted = set()

    def file(self, kind: str, prompt: str) -> Path:
        window = self.t5_max_length if kind == "t5" else ""  # T5's is a setting; CLIP's is the encoder's own
        key = hashlib.sha256(f"{kind}:{window}\n{prompt}".encode()).hexdigest()
        return self.folder / f"{key}.safetensors"

    def _embed(self, kind: str, prompts: list[str]) -> Tensor:
        found: dict[str, Tensor] = {}
        wanted = self.encoder_ids[kind]  # None: the encoder folder is absent, any cached entry serves
        for p in dict.fromkeys(prompts):
            path = self.file(kind, p)
            if path.is_file():
                try:
                    meta, emb = read_metadata(path), read_safetensors(path)["embedding"]
                except (CheckpointError, KeyError):
                    continue  # unreadable cache entry: recompute and overwrite it
                if meta.get("prompt") == p and wanted in (None, meta.get("encoder")):  # a foreign file, an old encoder
                    found[p] = emb.to(self.device, self.dtype)
                    dropped = int(meta.get("dropped_tokens", 0))
                    if dropped:
                        _warn_truncated(f"{kind.upper()} (cached)", p, dropped, self.max_length[kind])
                    if wanted is None and kind not in self.noted:
                        self.noted.add(kind)
                        print(f"note: no {kind.upper()} folder {self.paths[kind]}: using the cached embedding "
                              f"({meta.get('encoder', '?').split(':')[0]} encoder, {path.name})")
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing and wanted is None:
            raise CheckpointError(f"{self.paths[kind]}: no such folder, and the prompt {missing[0]!r} has no cached "
                                  f"{kind.upper()} embedding in {self.folder}: put the encoder there (weights/README.md)")
        if missing:
            embedder = (load_t5(self.t5_path, self.t5_max_length, self.device, self.dtype) if kind == "t5"
                        else load_clip(self.clip_path, self.device, self.dtype))
            with torch.no_grad():
                for i in range(0, len(missing), self.batch_size):
                    chunk = missing[i:i + self.batch_size]
                    for p, emb in zip(chunk, embedder(chunk)):  # emb [L, D] (T5) or [D] (CLIP)
                        meta = {"prompt": p, "encoder": wanted,
                                "dropped_tokens": str(embedder.tokenizer.encode(p)[1])}
                        save_atomic({"embedding": emb}, self.file(kind, p), meta)
                        found[p] = emb
            del embedder  # free the encoder before returning; a 9 GB T5 must not outlive the cache miss
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return torch.stack([found[p] for p in prompts])  # [B, L, D] or [B, D]

    def __call__(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._embed("t5", prompts), self._embed("clip", prompts)  # [B, L, 4096], [B, 768]

