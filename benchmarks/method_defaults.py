"""The evidence behind the rivals' defaults: LSQ's step-size learning rate, DKM's
temperature and gradl1's optimizer, measured on Fashion-MNIST's validation split.

Every run starts from the CPU suite's pretrained lenet5 (configs/suite-lenet5.yaml:
4 epochs of SGD, cached beside --out like the bench's), fine-tunes it for the suite's 3
epochs with the method's recipe and the option varied, converts it at each bit-width and
measures the validation split (choices are made there; the test split is not read). One
JSON line per run goes to --out; finished runs are skipped.

    python benchmarks/method_defaults.py --out benchmarks/results/method-defaults-lenet5.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from qareg.bench import Bench, BenchConfig, append_row
from qareg.config import as_dict
from qareg.data import load_dataset
from qareg.engine import convert_with_data, train
from qareg.evaluation import evaluate
from qareg.methods import create_method
from qareg.provenance import provenance

# (method, options, recipe overrides, bit-widths converted at)
RUNS = [
    *[("lsq", {"lr_scale": s}, {}, (b,)) for s in (0.01, 0.1, 1.0) for b in (1, 2)],
    *[("dkm", {"tau": t}, {}, (b,)) for t in (0.05, 0.1, 0.3) for b in (1, 2)],
    *[("gradl1", {}, recipe, (2, 4)) for recipe in ({}, {"optimizer": "adam", "lr": 1e-3})],
]


def key(method: str, options: dict, recipe: dict) -> str:
    return json.dumps([method, options, recipe], sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BenchConfig(model="lenet5", bits=(1, 2), seeds=(args.seed,), augment=False)
    bench = Bench(config, args.out.with_name(args.out.stem + "-bench.jsonl"), progress=False)
    bench.splits = splits = load_dataset(config.dataset, val_size=config.val_size)
    start_model = bench.pretrained(args.seed)
    done = set()
    if args.out.exists():
        done = {key(r["method"], r["options"], r["recipe"])
                for r in map(json.loads, args.out.read_text().splitlines())}
    for name, options, recipe, bits_list in RUNS:
        if key(name, options, recipe) in done:
            continue
        method = create_method(name, options)
        train_config = config.method_training(method, args.seed)
        train_config = type(train_config)(**{**as_dict(train_config), **recipe})
        model = copy.deepcopy(start_model)
        prepare_bits = None if method.post_training else bits_list[0]
        method.prepare(model, prepare_bits, args.seed)
        began = time.perf_counter()
        history = train(model, splits, train_config, method, augment=False, progress=False)
        seconds = time.perf_counter() - began
        for bits in bits_list:
            converted = copy.deepcopy(model)
            convert_with_data(converted, splits, train_config, method, bits)
            row = {"method": name, "options": options, "recipe": recipe, "bits": bits,
                   "val_accuracy": evaluate(converted, splits.val, splits),
                   "final_penalty": history[-1].penalty, "train_seconds": round(seconds, 1),
                   "train": as_dict(train_config), "seed": args.seed, **provenance()}
            append_row(args.out, row)
            print(f"{name:<7} {json.dumps(options):<22} {json.dumps(recipe):<36} {bits} bits: "
                  f"val {row['val_accuracy']:.2f}%", flush=True)


if __name__ == "__main__":
    main()
