"""Which regularizer variant should be the default? Measured on the validation split.

Trains one full-precision network on Fashion-MNIST (cached beside the results), quantizes it
after training with k-means (the baseline), then fine-tunes a copy with every variant in
VARIANTS at every k and snaps it. One JSON line per run goes to --out; finished runs are
skipped, so an interrupted sweep resumes. Choices are made on `val_quantized`; `test` only
reports.

    python benchmarks/qareg_variants.py --model lenet5 \
        --out benchmarks/results/variants-lenet5.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from qareg import create_model, prepare
from qareg.bench import append_row
from qareg.checkpoint import load_checkpoint, save_checkpoint
from qareg.config import as_dict
from qareg.data import load_dataset
from qareg.demo import DemoConfig
from qareg.engine import convert_with_data, train
from qareg.evaluation import evaluate
from qareg.methods import create_method
from qareg.provenance import provenance

# The regularizer alone, the default until straight-through forward passes were measured
# (variants-cnn4-ste.jsonl): lambda 1000 with a linear ramp. The first sweeps varied it.
REGULARIZER_ONLY = {"snapped_fraction": 0.0, "lam": 1000.0}


def _only(**overrides: object) -> dict:
    return {**REGULARIZER_ONLY, **overrides}


# name -> (QaregConfig overrides, TrainConfig overrides), on the demo's recipe
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),  # whatever the defaults are now (before 2026-11-23: regularizer-only)
    "regularizer-only": (_only(), {}),
    "soft-T0.05": (_only(variant="soft", temperature=0.05), {}),
    "soft-anneal-0.3-0.001": (_only(variant="soft", temperature=0.3, temperature_final=0.001),
                              {}),
    "abs": (_only(variant="abs"), {}),
    "abs-sgd": (_only(variant="abs", lam=100.0), {"optimizer": "sgd", "lr": 0.01}),
    "init-linear": (_only(init="linear"), {}),
    "init-quantile": (_only(init="quantile"), {}),
    "init-kmeans++": (_only(init="kmeans++"), {}),
    "lam-100": (_only(lam=100.0), {}),
    "lam-10000": (_only(lam=10000.0), {}),
    "schedule-constant": (_only(lam_schedule="constant"), {}),
    "schedule-cosine": (_only(lam_schedule="cosine"), {}),
    "schedule-exponential": (_only(lam_schedule="exponential", lam_start=1e-3), {}),
    "ramp-0.5": (_only(ramp=0.5), {}),
    "codebook-lr-x10": (_only(codebook_lr_scale=10.0), {}),
    "sgd-lam100": (_only(lam=100.0), {"optimizer": "sgd", "lr": 0.01}),
    "adam-lr3e-4": (_only(), {"lr": 3e-4}),
    # snapped forward passes (straight-through) in the last fraction of fine-tuning
    "ste-0.2": (_only(snapped_fraction=0.2), {}),
    "ste-0.4": (_only(snapped_fraction=0.4), {}),
    "ste-0.4-lam-100": (_only(snapped_fraction=0.4, lam=100.0), {}),
    "ste-0.4-then-lam-0": (_only(snapped_fraction=0.4, snapped_lam=0.0), {}),
    "ste-0.4-then-lam-10": (_only(snapped_fraction=0.4, snapped_lam=10.0), {}),
    "ste-0.2-then-lam-0": (_only(snapped_fraction=0.2, snapped_lam=0.0), {}),
    "ste-1.0": (_only(snapped_fraction=1.0), {}),
    "ste-1.0-lam-0": (_only(snapped_fraction=1.0, lam=0.0), {}),
    "ste-1.0-lam-1": (_only(snapped_fraction=1.0, lam=1.0), {}),  # the default since
    "ste-1.0-lam-10": (_only(snapped_fraction=1.0, lam=10.0), {}),
    "ste-1.0-lam-100": (_only(snapped_fraction=1.0, lam=100.0), {}),
}


def done_runs(path: Path) -> set[tuple[str, int]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(row["variant"], row["k"]) for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DemoConfig.model)
    parser.add_argument("--fp-epochs", type=int, default=DemoConfig.epochs)
    parser.add_argument("--epochs", type=int, default=DemoConfig.qareg_epochs)
    parser.add_argument("--ks", type=int, nargs="+", default=[4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    demo = DemoConfig(model=args.model, epochs=args.fp_epochs, qareg_epochs=args.epochs,
                      seed=args.seed)
    splits = load_dataset("fashion-mnist")
    fp_config = demo.full_precision()
    fp_path = args.out.with_name(f"{args.out.stem}-fp-seed{args.seed}.pt")
    if fp_path.exists():
        model, _ = load_checkpoint(fp_path)
    else:
        torch.manual_seed(args.seed)
        model = create_model(args.model, splits.num_classes, splits.in_channels,
                             splits.input_size)
        train(model, splits, fp_config, augment=False, progress=False)
        save_checkpoint(fp_path, model, {"config": as_dict(fp_config), "seed": args.seed})
    common = {"model": args.model, "seed": args.seed, "fp_epochs": args.fp_epochs,
              "epochs": args.epochs, **provenance()}
    finished = done_runs(args.out)
    if ("full-precision", 32) not in finished:
        append_row(args.out, {**common, "variant": "full-precision", "k": 32,
                          "val": evaluate(model, splits.val, splits),
                          "test": evaluate(model, splits.test, splits)})
    for k in args.ks:
        if ("ptq-kmeans", k) not in finished:
            ptq = prepare(copy.deepcopy(model), k, seed=args.seed)
            convert_with_data(ptq, splits, fp_config)
            append_row(args.out, {**common, "variant": "ptq-kmeans", "k": k,
                              "val_quantized": evaluate(ptq, splits.val, splits),
                              "test": evaluate(ptq, splits.test, splits)})
        for name in args.variants:
            if (name, k) in finished:
                continue
            reg_overrides, train_overrides = VARIANTS[name]
            method = create_method("qareg", {"k": k, "lam": demo.lam, **reg_overrides})
            config = dataclasses.replace(demo.fine_tuning(), **train_overrides)
            tuned = copy.deepcopy(model)
            method.prepare(tuned, None, args.seed)
            start = time.perf_counter()
            history = train(tuned, splits, config, method, augment=False, progress=False)
            seconds = time.perf_counter() - start
            val_fp = evaluate(tuned, splits.val, splits)
            convert_with_data(tuned, splits, fp_config)
            append_row(args.out, {
                **common, "variant": name, "k": k, "val_fp": val_fp,
                "val_quantized": evaluate(tuned, splits.val, splits),
                "test": evaluate(tuned, splits.test, splits),
                "final_penalty": history[-1].penalty, "train_seconds": round(seconds, 1),
                "regularizer": method.options(), "train": as_dict(config),
            })
            print(name, k, "done", flush=True)


if __name__ == "__main__":
    main()
