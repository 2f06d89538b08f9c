"""Compressed file sizes against the ideal, with save and load times.

For vgg16 (CIFAR-10 shape) at each k: post-training k-means codebooks, snapped, saved
bit-packed (entropy coding off) and with entropy coding on. Ideal bytes = sum over quantized
tensors of N * ceil(log2 k) / 8 plus codebook bytes, plus the raw bytes of the other
tensors. The entropy rows use a regularized copy: `--reg-steps` Adam steps on
lambda * qareg.penalty alone pull the weights onto their representatives, leaving the
uneven cluster sizes the regularizer produces; its range-coded index bytes are compared with
N * H / 8, H the empirical entropy of the indices. One JSON line per (k, coding) to --out.

    python benchmarks/storage_size.py --out benchmarks/results/storage-vgg16.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qareg
from qareg.bench import append_row
from qareg.provenance import provenance


def regularize(model: torch.nn.Module, steps: int) -> None:
    optimizer = torch.optim.Adam([t.codebook.normalized for t in qareg.quantized_tensors(model)]
                                 + [t.weight for t in qareg.quantized_tensors(model)], lr=1e-3)
    for _ in range(steps):
        loss = 1000.0 * qareg.penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def measure(model: torch.nn.Module, folder: Path, entropy: bool) -> dict:
    path = folder / f"m-{entropy}.qz"
    start = time.perf_counter()
    info = qareg.save_compressed(model, path, entropy_coding=entropy)
    saved = time.perf_counter()
    qareg.load_compressed(path)
    loaded = time.perf_counter()
    index_bytes = sum(t.index_bytes for t in info.tensors)
    entropy_bytes = sum(t.entropy_bytes for t in info.tensors)
    return {
        "entropy_coding": entropy, "file_bytes": info.file_bytes,
        "ideal_bytes": info.ideal_bytes, "file_over_ideal": info.file_bytes / info.ideal_bytes,
        "index_bytes": index_bytes, "entropy_bytes": entropy_bytes,
        "index_over_entropy": index_bytes / entropy_bytes,
        "codings": sorted({t.coding for t in info.tensors}),
        "float32_bytes": info.float32_bytes, "compression_ratio": info.compression_ratio,
        "bits_per_weight": info.bits_per_weight, "save_seconds": round(saved - start, 3),
        "load_seconds": round(loaded - saved, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--reg-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # batch norm is not re-estimated: sizes only
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            torch.manual_seed(args.seed)
            model = qareg.create_model(args.model, 10, 3, 32)
            qareg.prepare(model, k, seed=args.seed)
            regularized = copy.deepcopy(model)
            report = qareg.convert(model)
            regularize(regularized, args.reg_steps)
            qareg.convert(regularized)
            common = {"model": args.model, "k": k, "seed": args.seed,
                      "weights": report.quantized_weights, **provenance()}
            rows.append({**common, "weights_from": "ptq-kmeans",
                         **measure(model, Path(tmp), entropy=False)})
            rows.append({**common, "weights_from": f"penalty-{args.reg_steps}-steps",
                         **measure(regularized, Path(tmp), entropy=True)})
            for row in rows[-2:]:
                print(json.dumps({key: row[key] for key in (
                    "k", "weights_from", "file_over_ideal", "index_over_entropy", "codings",
                    "compression_ratio", "save_seconds", "load_seconds")}), flush=True)
    for row in rows:
        append_row(args.out, row)


if __name__ == "__main__":
    main()
