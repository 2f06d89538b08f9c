"""Gradient L1 regularization's claim (Alizadeh et al., ICLR 2020): one set of weights,
quantized after training to several bit-widths, weights and activations, loses less than the
same network trained without the regularizer. Per model and seed, one pretrained network
(the suite's recipe, cached like the bench's) is fine-tuned twice with the same recipe,
plainly (`fp`) and with gradl1, and each is swept at W/A 8/8, 6/6 and 4/4 (`qareg sweep`'s
quantizers: uniform per tensor, activations calibrated on 8 training batches). Test
accuracies; nothing is chosen.

    python benchmarks/gradl1_widths.py --config configs/suite-lenet5.yaml \
        --out benchmarks/results/gradl1-widths-lenet5.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from qareg.bench import Bench
from qareg.cli import build_parser
from qareg.cli.compare import bench_config
from qareg.data import load_dataset
from qareg.engine import train
from qareg.evaluation import bn_loader
from qareg.methods.gradl1 import bit_width_sweep
from qareg.provenance import provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a bench config (its recipe)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    args = parser.parse_args()
    config = bench_config(build_parser().parse_args(
        ["bench", "--config", args.config, "--out", str(args.out), "--methods", "gradl1",
         "--seeds", *map(str, args.seeds), "--tune-trials", "0"]))
    bench = Bench(config, args.out.with_name(args.out.stem + ".bench.jsonl"), progress=True)
    bench.splits = load_dataset(config.dataset, config.data_dir, val_size=config.val_size)
    bench.cache.mkdir(parents=True, exist_ok=True)
    for seed in config.seeds:
        start = bench.pretrained(seed)
        for name in ("fp", "gradl1"):
            method, model = config.method(name), copy.deepcopy(start)
            recipe = config.method_training(method, seed)
            method.prepare(model, None, seed)
            train(model, bench.splits, recipe, method, augment=config.augment,
                  description=f"{name} seed {seed}")
            rows = bit_width_sweep(model, bench.splits, args.bits, "same", False,
                                   bn_loader(bench.splits, recipe))
            with args.out.open("a") as f:
                for row in rows:
                    f.write(json.dumps({"model": config.model, "seed": seed, "trained": name,
                                        "bits": row["weight_bits"],
                                        "act_bits": row["activation_bits"],
                                        "accuracy": row["accuracy"], "recipe": config.recipe(),
                                        **provenance()}) + "\n")
            print(name, seed, [(r["weight_bits"], r["accuracy"]) for r in rows])


if __name__ == "__main__":
    main()
