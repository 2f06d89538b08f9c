"""Deploying compressed files: sizes (.qz, ONNX with codebooks, float32 ONNX) and forward
latency (dense PyTorch load, packed PyTorch load, ONNX Runtime), one JSON line per model
and k.

    python benchmarks/deploy_latency.py --out benchmarks/results/deploy-lenet5-cnn4-vgg16.jsonl

Each network is freshly initialised (seed 0), given k-means codebooks (`qareg.prepare`,
exact 1-D k-means) and converted: cluster sizes as after post-training k-means. lenet5 and
cnn4 run on 64 Fashion-MNIST test images (which also give the largest difference between
ONNX Runtime's and PyTorch's logits), vgg16 on 64 random 3x32x32 inputs. Latency is the
median of `--repeats` forward passes after 3 warm-up passes, on torch's and ONNX Runtime's
default threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import qareg
from qareg.compress import load_compressed, save_compressed
from qareg.data import load_dataset
from qareg.evaluation import eval_loader
from qareg.onnx_export import export_onnx
from qareg.provenance import provenance

SETTINGS = {"lenet5": (1, 28), "cnn4": (1, 28), "vgg16": (3, 32)}


def median_seconds(run, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inputs(name: str, batch: int) -> torch.Tensor:
    channels, size = SETTINGS[name]
    if channels == 1:
        splits = load_dataset("fashion-mnist", None, val_size=5000)
        x, _ = next(iter(eval_loader(splits.test, splits, "cpu")))
        return x[:batch]
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


def measure(name: str, k: int, batch: int, repeats: int, folder: Path) -> dict:
    channels, size = SETTINGS[name]
    torch.manual_seed(0)
    model = qareg.create_model(name, num_classes=10, in_channels=channels, input_size=size)
    qareg.prepare(model, k, seed=0)
    x = inputs(name, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # models without batch norm say so
        qareg.convert(model, [x])
    qz, onnx_path = folder / f"{name}-{k}.qz", folder / f"{name}-{k}.onnx"
    info = save_compressed(model, qz)
    sizes = export_onnx(qz, onnx_path)
    dense, packed = load_compressed(qz).eval(), load_compressed(qz, packed=True).eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    with torch.no_grad():
        reference = dense(x)
        assert torch.equal(packed(x), reference)
        row = {
            "model": name, "k": k, "batch": batch, "repeats": repeats,
            "qz_bytes": info.file_bytes, "index_codebook_bytes": info.index_bytes
            + info.codebook_bytes, "onnx_bytes": sizes.onnx_bytes,
            "float32_onnx_bytes": sizes.float32_onnx_bytes,
            "float32_safetensors_bytes": info.float32_bytes,
            "onnx_max_abs_difference": float(np.abs(session.run(None, feed)[0]
                                                    - reference.numpy()).max()),
            "logits_max_abs": float(reference.abs().max()),
            "dense_seconds": median_seconds(lambda: dense(x), repeats),
            "packed_seconds": median_seconds(lambda: packed(x), repeats),
            "onnxruntime_seconds": median_seconds(lambda: session.run(None, feed), repeats),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(SETTINGS))
    parser.add_argument("--ks", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for k in args.ks:
                row = {**measure(name, k, args.batch, args.repeats, Path(folder)), **machine,
                       **provenance()}
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} k={k}: qz {row['qz_bytes']} B, onnx {row['onnx_bytes']} B, "
                      f"dense {row['dense_seconds'] * 1e3:.2f} ms, packed "
                      f"{row['packed_seconds'] * 1e3:.2f} ms, ort "
                      f"{row['onnxruntime_seconds'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
