#!/usr/bin/env python
"""PatchCore's nearest-neighbour search: batched torch matmul (what the family uses) against
faiss-cpu's exact flat index, on memory banks and query counts of the sizes real runs have.

    python scripts/nn_search_benchmark.py                       # bottle- and AITEX-sized cases
    python scripts/nn_search_benchmark.py --case 16384x272:100000 --threads 1 2

A case is BANKxDIM:QUERIES. Exact search only: the ONNX/OpenVINO export computes the same
distances in its graph, so an approximate index would make eager and exported scores differ.
Search time does not depend on what the features look like, so the features are Gaussian; the
distances of both methods are compared on them (max |difference| relative to the largest
distance). faiss is not a dependency of the project: `pip install faiss-cpu` to run its column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from defect_detection.models.families.patchcore import nearest_distances

# bank rows x feature dim : query patches, from the PatchCore runs of docs/results/families_speed.md
# (bottle: 4.8k-row bank, 59 test images x 28 x 28 patches; AITEX tiles: 6.6k rows, 20 test
# images x 5 tiles x 16 x 64 patches) and PatchCore's cap (max_bank 16384)
DEFAULT_CASES = ["4779x272:46256", "6617x272:102400", "16384x272:102400"]


def parse_case(text: str) -> tuple[int, int, int]:
    try:
        bank, queries = text.split(":")
        rows, dim = bank.lower().split("x")
        return int(rows), int(dim), int(queries)
    except ValueError as err:
        raise SystemExit(f"--case {text!r}: write BANKxDIM:QUERIES, e.g. 16384x272:100000") from err


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def faiss_search(bank: torch.Tensor, queries: torch.Tensor):
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.numpy())
    d2, _ = index.search(queries.numpy(), 1)
    return torch.from_numpy(d2[:, 0]).clamp_min(0).sqrt()


def measure(rows: int, dim: int, n_queries: int, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(rows, dim, generator=g), torch.randn(n_queries, dim, generator=g)
    out = {"bank": rows, "dim": dim, "queries": n_queries, "threads": threads}
    s, ref = best_of(lambda: nearest_distances(queries, bank), repeats)
    out["torch_s"], out["torch_queries_per_s"] = s, n_queries / s
    try:
        import faiss
    except ImportError:
        out["faiss"] = "not installed (pip install faiss-cpu)"
        return out
    faiss.omp_set_num_threads(threads)
    s, got = best_of(lambda: faiss_search(bank, queries), repeats)
    out["faiss_s"], out["faiss_queries_per_s"] = s, n_queries / s
    out["faiss_over_torch"] = out["torch_s"] / s
    out["max_rel_diff"] = float((got - ref).abs().max() / ref.max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=DEFAULT_CASES, help="BANKxDIM:QUERIES")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="markdown table (also printed)")
    args = parser.parse_args()
    results = [measure(*parse_case(c), t, args.repeats) for c in args.case for t in args.threads]
    lines = ["| bank x dim | queries | threads | torch matmul s | faiss flat s | faiss / torch speed | "
             "max rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in results:
        f = r.get("faiss_s")
        lines.append(f"| {r['bank']} x {r['dim']} | {r['queries']} | {r['threads']} | {r['torch_s']:.2f} | "
                     + (f"{f:.2f} | {r['faiss_over_torch']:.2f}x | {r['max_rel_diff']:.1e} |" if f else
                        "- | - | - |"))
    text = "\n".join(lines)
    print(text)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
