"""How fast each inference runtime scores, and how close that is to what the CPU's arithmetic allows.

Used by `scripts/benchmark.py --runtimes`: the same prepared network inputs go through eager
PyTorch, ONNX Runtime and OpenVINO (fp32 and int8), at batch 1 (latency p50/p99) and larger
batches (throughput), with 1 and 2 threads. The bound is FLOPs per input (torch's FlopCounterMode:
2 per multiply-add, convolutions and matrix products) over a measured fp32 GEMM peak.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gemm_peak_gflops(threads: int, size: int = 2048, repeats: int = 7) -> float:
    """The best fp32 matrix-product rate of this machine with `threads` threads (GFLOP/s; the
    highest of `repeats` timed products, the warm-up not counted): the practical FP32 ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    with torch_threads(threads):
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times) / 1e9


def flops_per_input(net: torch.nn.Module, shape: Sequence[int]) -> float:
    """FLOPs of one network input of `shape` (C x H x W) through `net`, as FlopCounterMode counts."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *shape)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net.eval()(x)
    return float(counter.get_total_flops())


def latency_ms(score: Callable[[torch.Tensor], object], x: torch.Tensor, calls: int = 60,
               warmup: int = 5) -> dict:
    """Per-call latency of one input at a time (a line camera's case): p50, p99 and mean in ms."""
    for i in range(warmup):
        score(x[i % len(x):i % len(x) + 1])
    times = []
    for i in range(calls):
        one = x[i % len(x):i % len(x) + 1]
        start = time.perf_counter()
        score(one)
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": statistics.fmean(times), "calls": calls}


def throughput(score: Callable[[torch.Tensor], object], x: torch.Tensor, batch: int,
               repeats: int = 3) -> dict:
    """Inputs per second over all of `x` in batches of `batch`: the median of `repeats` passes
    after one warm-up pass (per-pass values kept)."""
    def one_pass() -> float:
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            score(x[i:i + batch])
        return len(x) / (time.perf_counter() - start)

    one_pass()
    rates = [one_pass() for _ in range(repeats)]
    return {"batch": batch, "inputs_per_s": statistics.median(rates), "passes": rates}


def best_batch(score: Callable[[torch.Tensor], object], x: torch.Tensor, batches: Sequence[int],
               repeats: int = 3) -> dict:
    """Throughput at each batch size and the best of them."""
    runs = [throughput(score, x, b, repeats) for b in batches]
    best = max(runs, key=lambda r: r["inputs_per_s"])
    return {"best_batch": best["batch"], "inputs_per_s": best["inputs_per_s"],
            "by_batch": {str(r["batch"]): r["inputs_per_s"] for r in runs}}


def module_scoring_rates(module, batches: Sequence, with_map: bool = False) -> dict[str, float | None]:
    """Images/s and network inputs/s of a DetectorModule scoring prepared batches (tiling and
    pooling included), one untimed warm-up first; with_map also times the score and the net's own
    map (anomaly_map) together. The benchmark scripts share it, so their figures compare."""
    module.eval()
    module._start_scoring()
    seconds = map_seconds = 0.0
    images = inputs = 0
    with torch.inference_mode():
        module._score(batches[0].x[:2])
        for batch in batches:
            began = time.perf_counter()
            module.pool(module._score(batch.x).float(), batch.counts)
            seconds += time.perf_counter() - began
            images, inputs = images + len(batch.y), inputs + len(batch.x)
            if with_map:
                began = time.perf_counter()
                module.pool(module._score(batch.x).float(), batch.counts)
                module.net.anomaly_map(batch.x)
                map_seconds += time.perf_counter() - began
    return {"images_per_s": images / seconds, "inputs_per_s": inputs / seconds,
            "inputs_per_image": inputs / max(1, images),
            "map_images_per_s": images / map_seconds if with_map else None}
