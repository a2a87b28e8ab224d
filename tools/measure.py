"""
How one call is measured on this machine (FLOPs, seconds, the matmul rate, peak memory), and why.
It knows nothing of FLUX or diffusers: tools/bench.py decides what is measured and sets the two sides against each
other.

- FLOPs: torch.utils.flop_counter.FlopCounterMode over one call. Its table has no entry for the CPU flash-attention
  kernels, so they are added here with its own SDPA formulas.
- Seconds: the call runs between two device synchronisations with Python's garbage collector off.
- Matmul rate: the median time of a large n x n x n GEMM, as 2 n^3 FLOPs per call: what the arithmetic of a call
  is set against (a model's GFLOP/s over this rate = its fraction of the machine's peak).
- Bytes held: the parameters and buffers of a module, counted from their dtypes (tensor_bytes): what a storage
  format (bf16, fp8) really keeps, without reading the process's memory.
- Peak memory: what one call needs on top of what is resident before it (activations, gradients, workspaces); run
  a warm call first, so one-time allocations (library workspaces, compiled graphs) are not counted. CUDA:
  torch.cuda.max_memory_allocated() minus memory_allocated() before. CPU: the kernel's peak resident set (VmHWM,
  reset through /proc/self/clear_refs) minus the resident set before. That follows the live tensors only in a
  process started with RSS_FOLLOWS_TENSORS in its environment: glibc's mmap threshold fixed at 64 KiB, so every
  tensor buffer is its own mapping, given back to the kernel when freed (with the default allocator freed buffers
  stay in the heap and a later call's peak hides in them). allocated_peak_bytes: the same peak on a CPU from the
  allocator's own events (torch.profiler), whatever else runs on the machine.
"""

import gc
import os
import re
import statistics
from contextlib import contextmanager
from time import perf_counter
from typing import Callable

import torch

RSS_FOLLOWS_TENSORS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # glibc, read at start


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def _cpu_flash_formulas() -> dict:
    """FlopCounterMode counts SDPA only through its CUDA kernels' names; the CPU flash kernels get the same
    formulas here (4 B H Lq Lk Dh forward; backward as flop_counter's sdpa_backward_flop_count)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten

    def fwd(q, k, v, *args, **kwargs) -> int:  # FlopCounterMode hands over shapes, not tensors
        return fc.sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return out


def flop_counter():
    """A context manager; .get_total_flops() after it closes."""
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False, custom_mapping=_cpu_flash_formulas())


def count_flops(fn: Callable) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------------
# Time and the machine's matmul rate


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def gc_off():
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def seconds(fn: Callable, device: str) -> float:
    """Wall-clock seconds of one call, from an idle device to an idle device."""
    sync(device)
    with gc_off():
        t0 = perf_counter()
        fn()
        sync(device)
        return perf_counter() - t0


def matmul_peak(device: str, dtype=torch.float32, n: int | None = None, repeats: int = 5) -> dict:
    """This machine's matrix-multiply rate: the median over `repeats` of an n x n x n GEMM (after one warm-up)."""
    n = n or (4096 if device == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    ts = [seconds(lambda: torch.mm(a, b), device) for _ in range(repeats)]
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "gflops": 2 * n ** 3 / statistics.median(ts) / 1e9}


def load_average() -> float | None:
    """The 1-minute load average: a busy shared machine shows in it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_bytes(fn: Callable, device: str) -> int:
    """Bytes one call of fn needs on top of what is resident before it (see the module docstring: warm it first;
    on a CPU, run in a process started with RSS_FOLLOWS_TENSORS)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def allocated_peak_bytes(fn: Callable) -> int:
    """CPU: the most bytes one call of fn holds at once through PyTorch's allocator on top of what was allocated
    before it, from torch.profiler's allocation events (profile_memory): every allocation and free of this process's
    tensors, in order. Other processes, the C library's heap and the allocator's caching do not enter it (unlike the
    resident set peak_bytes reads). A free of memory allocated before the call has no event (the profiler does not
    know its size): free what the call would free (e.g. the last step's gradients) before it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # stable: events of one nanosecond keep their order
        now += e.nbytes()
        peak = max(peak, now)
    return peak


# ----------------------------------------------------------------------------------------------------------------
# Bytes held


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once), from numel x element size."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
