"""Exact 1-D k-means on all Conv and Linear weights of vgg16, against scikit-learn and Lloyd.

Builds vgg16 (CIFAR-10 shape, seed --seed), concatenates the weights of its Conv and Linear
layers (14,715,584 values) and, on one thread, times `qareg.kmeans1d(weights, k)` (best of
--repeat after a warm-up call that compiles or loads the numba cache), scikit-learn's
KMeans(n_clusters=k, n_init=1, init="k-means++", random_state=0) on the same values as an
(N, 1) float64 array, and `cluster1d.init_lloyd` (Lloyd from quantiles). Reports seconds,
sums of squares (nearest representative, float64) and the speed ratio, prints pass/fail
against the targets (kmeans1d <= 1 s, >= 10x faster than scikit-learn, sum of squares no
larger) and appends one JSON line to --out. scikit-learn is needed here only:
`pip install scikit-learn`.

    python benchmarks/kmeans1d_speed.py --out benchmarks/results/kmeans1d-vgg16.jsonl
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "NUMBA_NUM_THREADS"):
    os.environ[_name] = "1"  # one core: set before numpy, torch, numba or sklearn load

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import qareg  # noqa: E402
from qareg.bench import append_row  # noqa: E402
from qareg.cluster1d import init_lloyd, sum_of_squares  # noqa: E402
from qareg.provenance import provenance  # noqa: E402

TARGET_SECONDS = 1.0
TARGET_SPEEDUP = 10.0


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in lines.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def layer_weights(model: nn.Module) -> torch.Tensor:
    """(N,) float32: the weights of every Conv and Linear layer, in module order."""
    layers = (nn.Linear, nn.modules.conv._ConvNd)
    return torch.cat([m.weight.detach().flatten() for m in model.modules()
                      if isinstance(m, layers)])


def best_time(fn, repeat: int):
    """(least seconds over `repeat` calls, the last result)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="kmeans1d timings (best kept)")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kmeans1d-vgg16.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = qareg.create_model(args.model, num_classes=10, in_channels=3, input_size=32)
    weights = layer_weights(model)
    print(f"{args.model}: {weights.numel():,} Conv/Linear weights, k={args.k}", flush=True)

    start = time.perf_counter()
    qareg.kmeans1d(torch.linspace(-1, 1, 100), 4)  # compiles, or loads numba's disk cache
    first_call = time.perf_counter() - start
    exact_seconds, exact = best_time(lambda: qareg.kmeans1d(weights, args.k), args.repeat)
    exact_sse = sum_of_squares(weights, exact)
    print(f"kmeans1d   {exact_seconds:8.3f} s  sse {exact_sse:.12g}  (first call on a tiny "
          f"input, compiling or loading the cache: {first_call:.2f} s)", flush=True)

    lloyd_seconds, lloyd = best_time(lambda: init_lloyd(weights, args.k), 1)
    lloyd_sse = sum_of_squares(weights, lloyd)
    print(f"lloyd      {lloyd_seconds:8.3f} s  sse {lloyd_sse:.12g}", flush=True)

    row = {"model": args.model, "k": args.k, "seed": args.seed, "weights": weights.numel(),
           "threads": 1, "cpu": cpu_model(), "processor": platform.processor(),
           "cpu_count": os.cpu_count(), "numba_version": numba.__version__,
           "numpy_version": np.__version__, **provenance(),
           "kmeans1d_seconds": round(exact_seconds, 4), "kmeans1d_repeat": args.repeat,
           "kmeans1d_first_call_seconds": round(first_call, 3), "kmeans1d_sse": exact_sse,
           "lloyd_seconds": round(lloyd_seconds, 3), "lloyd_sse": lloyd_sse}
    checks = {"kmeans1d_within_1s": exact_seconds <= TARGET_SECONDS,
              "sse_not_above_lloyd": exact_sse <= lloyd_sse * (1 + 1e-12)}
    if not args.skip_sklearn:
        import sklearn
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        column = weights.double().numpy().reshape(-1, 1)  # (N, 1) float64
        km = KMeans(n_clusters=args.k, n_init=1, init="k-means++", random_state=0)
        with threadpool_limits(1):
            start = time.perf_counter()
            km.fit(column)
            sklearn_seconds = time.perf_counter() - start
        sklearn_sse = sum_of_squares(weights, torch.from_numpy(km.cluster_centers_.ravel()))
        speedup = sklearn_seconds / exact_seconds
        print(f"sklearn    {sklearn_seconds:8.3f} s  sse {sklearn_sse:.12g}  "
              f"({km.n_iter_} iterations)  kmeans1d is {speedup:.1f}x faster", flush=True)
        row.update(sklearn_version=sklearn.__version__, sklearn_seconds=round(sklearn_seconds, 3),
                   sklearn_sse=sklearn_sse, sklearn_inertia=float(km.inertia_),
                   sklearn_iterations=int(km.n_iter_),
                   sklearn_params="n_init=1, init=k-means++, random_state=0, max_iter=300",
                   speedup_vs_sklearn=round(speedup, 2))
        checks.update(at_least_10x_faster_than_sklearn=speedup >= TARGET_SPEEDUP,
                      sse_not_above_sklearn=exact_sse <= sklearn_sse * (1 + 1e-12))
    row["checks"] = checks
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    append_row(args.out, row)


if __name__ == "__main__":
    main()
