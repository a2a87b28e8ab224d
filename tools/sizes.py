"""
The model sizes the benchmarks run: one place, read by tools/bench.py (speed and memory against diffusers) and
tools/fp8_error.py (what an fp8 base costs in accuracy).
"""

from dataclasses import dataclass

from flux_model import FluxParams


@dataclass
class BenchConfig:
    hidden: int  # D
    heads: int
    axes: tuple[int, int, int]  # RoPE split of the head dim
    depth: int  # double blocks
    single: int  # single blocks
    grid: tuple[int, int]  # token grid of the target: h*w noisy tokens + h*w Kontext condition tokens
    n_txt: int  # text tokens
    context_in_dim: int  # T5 width
    vec_in_dim: int  # CLIP pooled width
    batch: int = 1
    repeats: int = 5  # timed calls per case
    warmup: int = 1  # untimed calls first (the first one counts FLOPs)
    sample_steps: int = 4
    lora_rank: int = 16
    peak_n: int = 4096  # size of the GEMM that measures the machine's matmul rate (CPU; 8192 on a GPU)

    def params(self) -> FluxParams:
        return FluxParams(in_channels=64, out_channels=64, vec_in_dim=self.vec_in_dim,
                          context_in_dim=self.context_in_dim, hidden_size=self.hidden, mlp_ratio=4.0,
                          num_heads=self.heads, depth=self.depth, depth_single_blocks=self.single,
                          axes_dim=list(self.axes), theta=10_000, qkv_bias=True, guidance_embed=True)


CONFIGS = {
    # seconds on a CPU: the smoke test
    "tiny": BenchConfig(hidden=64, heads=4, axes=(4, 6, 6), depth=1, single=2, grid=(4, 4), n_txt=8,
                        context_in_dim=32, vec_in_dim=16, repeats=2, warmup=1, sample_steps=2, lora_rank=4,
                        peak_n=1024),
    # the yardstick: dev's structure at a quarter of its width and a fifth of its depth, 512x512 tokens
    "medium": BenchConfig(hidden=768, heads=12, axes=(16, 24, 24), depth=4, single=8, grid=(32, 32), n_txt=64,
                          context_in_dim=4096, vec_in_dim=768),
}
