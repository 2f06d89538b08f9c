"""Time of the penalty's forward pass (`qareg.penalty_cpu.forward_sums`) and of the nearest
lookup alone (`qareg.nearest_cpu.assign`) over vgg16's weights, per route and k: the evidence
for `qareg.nearest_cpu.COUNT_MAX_K`.

Builds vgg16 (CIFAR-10 shape, seed --seed), gives each Conv and Linear weight a codebook of
k quantiles, and times one pass over every tensor (what one training step of qareg runs)
through each route, forced in turn: `count` (a vectorized sweep per boundary), `grid` (the
cell grid of `qareg.nearest_cpu`) and `search` (its binary search). `--function assign`
times the lookup alone (int64 indices, as `assign` returns them, then stored in one byte
each as the snapped pass keeps them). Median of --repeat passes after a warm-up that
compiles or loads the numba cache; torch's threads (numba uses as many). Every route must
give the same indices (checked). One JSON line per (route, k) goes to --out.

    python benchmarks/penalty_pass.py --out benchmarks/results/penalty-pass-vgg16.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
from regularizer_cost import machine

import qareg
from qareg import nearest_cpu, penalty_cpu
from qareg.bench import append_row
from qareg.constants import DEFAULT_LAYERS
from qareg.nearest import midpoints
from qareg.provenance import provenance

ROUTES = ("count", "grid", "search")


def forced(route: str) -> ExitStack:
    """Patches that make both functions take `route` on tensors of any size and k."""
    stack = ExitStack()
    stack.enter_context(mock.patch.multiple(
        nearest_cpu, COUNT_MAX_K=(1 << 8) if route == "count" else 0,
        GRID_MIN_NUMEL=0 if route == "grid" else 1 << 62))
    return stack


def step_pass(function: str, weights: list[torch.Tensor], codebooks: list[torch.Tensor],
              saved: list[torch.Tensor], power: int) -> float:
    start = time.perf_counter()
    for w, c, s in zip(weights, codebooks, saved, strict=True):
        if function == "penalty":
            penalty_cpu.forward_sums(w, c, power, s)
        else:
            s.copy_(nearest_cpu.assign(w, midpoints(c, w.dtype)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--function", choices=("penalty", "assign"), default="penalty")
    parser.add_argument("--power", type=int, choices=(1, 2), default=2)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/penalty-pass-vgg16.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = qareg.create_model("vgg16", 10, 3, 32)
    weights = [m.weight.detach().reshape(-1).contiguous() for m in model.modules()
               if isinstance(m, DEFAULT_LAYERS)]
    numel = sum(w.numel() for w in weights)
    for k in args.ks:
        levels = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
        codebooks = [torch.quantile(w[: 1 << 20], levels).unique() for w in weights]
        first = None
        for route in ROUTES:
            saved = [torch.empty(w.numel(), dtype=torch.uint8) for w in weights]
            with forced(route):
                step_pass(args.function, weights, codebooks, saved, args.power)  # compile
                seconds = [step_pass(args.function, weights, codebooks, saved, args.power)
                           for _ in range(args.repeat)]
            if first is None:
                first = saved
            assert all(torch.equal(a, b) for a, b in zip(first, saved, strict=True)), route
            row = {"model": "vgg16", "weights": numel, "tensors": len(weights), "k": k,
                   "function": args.function, "power": args.power, "route": route,
                   "repeat": args.repeat, "seed": args.seed, "machine": machine("cpu"),
                   "threads": torch.get_num_threads(),
                   "seconds_median": statistics.median(seconds), "seconds": seconds,
                   **provenance()}
            append_row(args.out, row)
            print(f"k {k:3d} {route:6s} {row['seconds_median'] * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
