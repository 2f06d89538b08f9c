"""Why qareg loses more than straight-through training at k = 4: a calibration study.

From one full-precision checkpoint (made by qareg_variants.py) it fine-tunes three copies
with the same optimiser and budget and reports validation accuracy after snapping:

- ste-free:   the forward pass sees the snapped weights; the straight-through estimator
              passes gradients to the latent weights (which may change representative) and
              the summed gradient to each representative.
- ste-frozen: the same, but every weight keeps the representative that k-means gave it;
              only the representatives (and biases, batch norm) learn. This is Deep
              Compression's trained quantization.
- qareg:      the regularizer with the demo's settings.

If qareg lands near ste-frozen, what it misses is weights changing representative.

    python benchmarks/assignment_study.py \\
        --checkpoint benchmarks/results/variants-lenet5-fp-seed0.pt \\
        --out benchmarks/results/assignment-lenet5.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from qareg import prepare, quantized_tensors
from qareg.checkpoint import load_checkpoint
from qareg.codebook import Codebook
from qareg.data import BatchLoader, load_dataset
from qareg.demo import DemoConfig
from qareg.engine import convert_with_data, train
from qareg.evaluation import evaluate
from qareg.provenance import provenance


class StraightThrough(nn.Module):
    """Parametrization: forward the snapped weight; gradient to the latent weight (STE) and
    to the representatives (summed over their weights)."""

    def __init__(self, codebook: Codebook, frozen_indices: Tensor | None) -> None:
        super().__init__()
        self.codebook = [codebook]  # a list: not registered twice as a submodule
        self.frozen_indices = frozen_indices

    def forward(self, latent: Tensor) -> Tensor:
        codebook = self.codebook[0]
        reps = codebook.representatives()
        indices = self.frozen_indices
        if indices is None:
            indices = codebook.assign(latent)
        snapped = reps[indices]
        return latent + (snapped - latent).detach() + (snapped - snapped.detach())


def fine_tune_ste(model: nn.Module, splits, epochs: int, frozen: bool, seed: int) -> float:
    for t in quantized_tensors(model):
        indices = t.codebook.assign(t.weight) if frozen else None
        parametrize.register_parametrization(t.module, t.attribute,
                                             StraightThrough(t.codebook, indices))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = BatchLoader(splits.train, 128, splits.mean, splits.std, shuffle=True,
                         drop_last=True, seed=seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            for t in quantized_tensors(model):
                t.codebook.project_()
    return evaluate(model, splits.val, splits)  # the forward pass is already snapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    splits = load_dataset("fashion-mnist")
    base, _ = load_checkpoint(args.checkpoint)
    name = base.qareg_model_spec["name"]
    demo = DemoConfig(model=name, qareg_epochs=args.epochs, seed=args.seed)
    rows = {"full-precision": evaluate(base, splits.val, splits)}
    for variant in ("ste-free", "ste-frozen"):
        torch.manual_seed(args.seed)
        model = prepare(copy.deepcopy(base), args.k, seed=args.seed)
        rows[variant] = fine_tune_ste(model, splits, args.epochs, variant == "ste-frozen",
                                      args.seed)
    model = prepare(copy.deepcopy(base), args.k, seed=args.seed)
    train(model, splits, demo.fine_tuning(), demo.qareg(args.k), augment=False,
          progress=False)
    convert_with_data(model, splits, demo.full_precision())
    rows["qareg"] = evaluate(model, splits.val, splits)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for variant, val in rows.items():
            f.write(json.dumps({"model": name, "k": args.k, "epochs": args.epochs,
                                "seed": args.seed, "variant": variant, "val": val,
                                **provenance()}) + "\n")
            print(f"{variant:<16} val {val:.2f}")


if __name__ == "__main__":
    main()
