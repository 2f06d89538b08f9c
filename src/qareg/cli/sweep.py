"""`qareg sweep`: one stored network quantized after training at several bit-widths (the
use gradient L1 regularization was made for: one set of weights, widths on demand)."""

from __future__ import annotations

import argparse
import json

from qareg.checkpoint import atomic_write
from qareg.cli.files import add_data_flags, data_for
from qareg.cli.output import check_new_file, check_output, say
from qareg.config import TrainConfig
from qareg.errors import ConfigError
from qareg.evaluation import bn_loader
from qareg.runs import load_run
from qareg.validate import check_device, check_int

ACT_BITS = ("same", "none")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="quantize one full-precision checkpoint at several "
                       "bit-widths after training, and test each")
    p.add_argument("checkpoint", help="a full-precision checkpoint (qareg train, e.g. with "
                   "--method gradl1 or fp)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4],
                   help="weight bit-widths (default: 8 6 4)")
    p.add_argument("--act-bits", choices=ACT_BITS, default="none",
                   help="same: activations at the weights' bits too; none: full precision")
    p.add_argument("--per-channel", action="store_true",
                   help="one weight scale per output channel (default: per tensor)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--calibration-batches", type=int, default=8,
                   help="training batches that calibrate activations and batch norm")
    p.add_argument("--out", help="also write one JSON line per bit-width to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_data_flags(p)
    p.set_defaults(run=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from qareg.methods.gradl1 import bit_width_sweep

    check_device("--device", args.device)
    check_int("--calibration-batches", args.calibration_batches, 1)
    if len(set(args.bits)) != len(args.bits):
        raise ConfigError(f"--bits must not repeat a width, got {args.bits}")
    check_output(args.out)
    if args.out is not None:
        check_new_file(args.out, "--out", args.overwrite)
    model, meta = load_run(args.checkpoint, args.device)
    if meta.get("converted"):
        raise ConfigError(f"{args.checkpoint!r} is quantized already; sweep a full-precision "
                          "checkpoint")
    splits = data_for(meta, args)
    calibration = bn_loader(splits, TrainConfig(model=model.qareg_model_spec["name"],
                                                device=args.device, seed=0))
    rows = bit_width_sweep(model, splits, args.bits,
                           "same" if args.act_bits == "same" else None, args.per_channel,
                           calibration, data=splits.test if args.split == "test" else splits.val,
                           calibration_batches=args.calibration_batches)
    lines = [{"bits": r["weight_bits"], "act_bits": r["activation_bits"],
              "per_channel": r["per_channel"], "accuracy": r["accuracy"],
              "split": args.split, "checkpoint": args.checkpoint} for r in rows]
    say(f"{'bits':>5} {'act bits':>9} {args.split + ' acc %':>11}")
    for line in lines:
        act = "-" if line["act_bits"] is None else line["act_bits"]
        say(f"{line['bits']:>5} {act:>9} {line['accuracy']:>11.2f}")
    where = "nothing written"
    if args.out is not None:
        text = "".join(json.dumps(line) + "\n" for line in lines).encode()
        atomic_write(args.out, lambda f: f.write(text))
        where = f"wrote {args.out}"
    say(f"{args.split} accuracies of {args.checkpoint} quantized after training, uniform "
        f"{'per channel' if args.per_channel else 'per tensor'}; {where}")
    return 0
