"""The `qareg` command: a thin argparse front over the library.

Flags map one to one onto the config dataclasses (`--lr` -> TrainConfig.lr); a YAML file
given with `--config` sets defaults by section (data, train, regularizer). Any bad input
ends with a message naming it and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

import torch

from qareg.errors import QaregError

SECTIONS = {"data": "DataConfig", "train": "TrainConfig", "regularizer": "RegularizerConfig"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
                      ) -> None:
    """One flag per field of `cls`; default None so that only flags given override."""
    group = parser.add_argument_group(cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        comment = f"(default: {f.default!r})" if f.default is not dataclasses.MISSING else ""
        if hint is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                               help=comment)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(_flag(f.name), nargs="*", default=None, metavar="PATTERN",
                               help=comment)
        elif typing.get_origin(hint) is dict:
            group.add_argument(_flag(f.name), nargs="*", default=None, metavar="PATTERN=WEIGHT",
                               help="per-tensor weights of the penalty")
        else:
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            kind = base[0] if isinstance(base[0], type) else str
            group.add_argument(_flag(f.name), type=kind, default=None, help=comment)


def _pairs(values: list[str], flag: str) -> dict[str, float]:
    out = {}
    for item in values:
        pattern, sep, number = item.rpartition("=")
        try:
            out[pattern] = float(number)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise QaregError(f"{flag} takes PATTERN=WEIGHT pairs, got {item!r}")
    return out


def _build(cls: type, section: str, yaml_values: dict[str, Any], args: argparse.Namespace,
           fixed: dict[str, Any] | None = None) -> Any:
    """Config `cls`: dataclass defaults < YAML section < command-line flags < `fixed`."""
    from qareg.config import from_dict

    values = dict(yaml_values.get(section) or {})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            is_mapping = typing.get_origin(hints[f.name]) is dict
            values[f.name] = _pairs(given, _flag(f.name)) if is_mapping else given
    values.update(fixed or {})
    return from_dict(cls, values, where=f"section {section!r}")


def _read_yaml(args: argparse.Namespace) -> dict[str, Any]:
    from qareg.config import load_yaml

    if getattr(args, "config", None) is None:
        return {}
    values = load_yaml(args.config)
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise QaregError(f"unknown section(s) {', '.join(unknown)} in {args.config!r}; valid "
                         f"sections: {', '.join(SECTIONS)}")
    return values


def _check_output(path: str | None, flag: str = "--out") -> None:
    """Fail early, before any work, if `path` cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise QaregError(f"{flag} {path!r} is a folder; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise QaregError(f"{flag} {path!r}: {str(parent)!r} is not a folder")


def _print_config(**configs: Any) -> None:
    from qareg.config import as_dict

    print(json.dumps({name: as_dict(c) for name, c in configs.items()}, indent=None))


# ----------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from qareg import prepare, quantized_tensors
    from qareg.checkpoint import load_checkpoint, save_checkpoint
    from qareg.config import DataConfig, RegularizerConfig, TrainConfig, as_dict
    from qareg.data import load_dataset
    from qareg.engine import evaluate, train
    from qareg.models import create_model

    yaml_values = _read_yaml(args)
    data_cfg = _build(DataConfig, "data", yaml_values, args)
    train_cfg = _build(TrainConfig, "train", yaml_values, args)
    if args.method == "qareg":
        reg_cfg = _build(RegularizerConfig, "regularizer", yaml_values, args)
    else:
        reg_cfg = None
        given = [_flag(f.name) for f in dataclasses.fields(RegularizerConfig)
                 if getattr(args, f.name, None) is not None]
        if given or yaml_values.get("regularizer"):
            raise QaregError(f"{', '.join(given) or 'the regularizer section'} only applies "
                             "with --method qareg")
    _check_output(args.out)
    if args.metrics is None:
        args.metrics = str(Path(args.out).with_suffix(".metrics.jsonl"))
    _check_output(args.metrics, "--metrics")
    if args.init_from is not None and not Path(args.init_from).is_file():
        raise QaregError(f"--init-from {args.init_from!r} does not exist or is not a file")
    splits = load_dataset(data_cfg.dataset, data_cfg.data_dir, download=data_cfg.download,
                          val_size=data_cfg.val_size, split_seed=data_cfg.split_seed)
    torch.manual_seed(train_cfg.seed)
    if args.init_from is not None:
        model, _ = load_checkpoint(args.init_from)
        spec = model.qareg_model_spec
        if args.model is not None and spec["name"] != train_cfg.model:
            raise QaregError(f"--model {train_cfg.model!r} differs from the model in "
                             f"{args.init_from!r}: {spec['name']!r}")
        expected = (splits.num_classes, splits.in_channels, splits.input_size)
        if (spec["num_classes"], spec["in_channels"], spec["input_size"]) != expected:
            raise QaregError(f"{args.init_from!r} was built for {spec['in_channels']}x"
                             f"{spec['input_size']}x{spec['input_size']} images and "
                             f"{spec['num_classes']} classes; {data_cfg.dataset} has "
                             f"{expected[1]}x{expected[2]}x{expected[2]} and {expected[0]}")
        train_cfg = dataclasses.replace(train_cfg, model=spec["name"])
    else:
        model = create_model(train_cfg.model, splits.num_classes, splits.in_channels,
                             splits.input_size)
    model.to(train_cfg.device)
    existing = {t.codebook.k for t in quantized_tensors(model)}
    if reg_cfg is not None and existing and args.k is not None and existing != {reg_cfg.k}:
        raise QaregError(f"{args.init_from!r} already has codebooks with k in "
                         f"{sorted(existing)}; --k {reg_cfg.k} does not match")
    if reg_cfg is not None and not existing:
        prepare(model, reg_cfg.k, include=reg_cfg.include or None, exclude=reg_cfg.exclude,
                init=reg_cfg.init, seed=train_cfg.seed)
    _print_config(data=data_cfg, train=train_cfg, **({"regularizer": reg_cfg} if reg_cfg else {}))
    Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(args.metrics).write_text("")  # this run's metrics only
    history = train(model, splits, train_cfg, reg_cfg, augment=data_cfg.augment,
                    metrics_path=args.metrics, progress=not args.no_progress)
    meta = {
        "method": args.method,
        "config": {"data": as_dict(data_cfg), "train": as_dict(train_cfg),
                   "regularizer": as_dict(reg_cfg) if reg_cfg else None},
        "seed": train_cfg.seed,
        "converted": False,
        "init_from": args.init_from,
        "val_accuracy": history[-1].val_accuracy if history else None,
    }
    save_checkpoint(args.out, model, meta)
    print(f"saved {args.out}")
    if len(splits.val):
        accuracy = evaluate(model, splits.val, splits, train_cfg.device)
        print(f"validation accuracy {accuracy:.2f}%")
    return 0


# -------------------------------------------------------------------------- quantize


def _data_for(meta: dict[str, Any], args: argparse.Namespace):
    """The dataset a checkpoint was trained on, unless flags name another."""
    from qareg.config import DataConfig, from_dict
    from qareg.data import load_dataset

    values = dict((meta.get("config") or {}).get("data") or {})
    for name in ("dataset", "data_dir"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    cfg = from_dict(DataConfig, values, where="the checkpoint's data config")
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                        val_size=cfg.val_size, split_seed=cfg.split_seed)


def cmd_quantize(args: argparse.Namespace) -> int:
    from qareg import prepare, quantized_tensors
    from qareg.checkpoint import load_checkpoint, save_checkpoint
    from qareg.config import TrainConfig
    from qareg.engine import convert_with_data, evaluate

    _check_output(args.out)
    model, meta = load_checkpoint(args.checkpoint, args.device)
    if meta.get("converted"):
        raise QaregError(f"{args.checkpoint!r} is already quantized")
    prepared = quantized_tensors(model)
    if prepared and args.k is not None:
        raise QaregError(f"{args.checkpoint!r} already has codebooks (trained with the "
                         "regularizer); omit --k to snap to them")
    if not prepared:
        if args.k is None:
            raise QaregError(f"{args.checkpoint!r} has no codebooks: give --k for "
                             "post-training quantization")
        prepare(model, args.k, init=args.init, seed=args.seed)
    splits = _data_for(meta, args)
    config = TrainConfig(model=model.qareg_model_spec["name"], device=args.device,
                         bn_batches=args.bn_batches, seed=args.seed)
    report = convert_with_data(model, splits, config)
    print(report.format_table())
    accuracy = evaluate(model, splits.test, splits, args.device)
    print(f"test accuracy after quantization: {accuracy:.2f}%")
    save_checkpoint(args.out, model, {**meta, "converted": True, "quantized_from": args.checkpoint,
                                      "test_accuracy": accuracy,
                                      "method": meta.get("method") if prepared else "ptq-kmeans"})
    print(f"saved {args.out}")
    return 0


# -------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qareg.checkpoint import load_checkpoint
    from qareg.compress import inspect_compressed, is_compressed_file, load_compressed
    from qareg.engine import evaluate

    if is_compressed_file(args.checkpoint):
        meta = inspect_compressed(args.checkpoint).meta
        model = load_compressed(args.checkpoint, device=args.device)
    else:
        model, meta = load_checkpoint(args.checkpoint, args.device)
    splits = _data_for(meta, args)
    data = splits.test if args.split == "test" else splits.val
    accuracy = evaluate(model, data, splits, args.device)
    print(json.dumps({"checkpoint": args.checkpoint, "split": args.split,
                      "accuracy": round(accuracy, 2), "images": len(data)}))
    return 0


# -------------------------------------------------------------------- compress, inspect


def cmd_compress(args: argparse.Namespace) -> int:
    from qareg.checkpoint import load_checkpoint
    from qareg.compress import save_compressed

    _check_output(args.out)
    model, meta = load_checkpoint(args.checkpoint)
    if not meta.get("converted"):
        raise QaregError(f"{args.checkpoint!r} is not quantized yet: run `qareg quantize "
                         f"{args.checkpoint} --out QUANTIZED.pt` and compress that")
    info = save_compressed(model, args.out, codebook_dtype=args.codebook_dtype,
                           entropy_coding=not args.no_entropy_coding,
                           meta={**meta, "compressed_from": args.checkpoint})
    print(info.format_table())
    print(f"wrote {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qareg.compress import inspect_compressed

    info = inspect_compressed(args.file)
    if info.model is not None:
        args_text = ", ".join(f"{k}={v}" for k, v in info.model.items() if k != "name")
        print(f"model: {info.model.get('name')} ({args_text})")
    print(info.format_table())
    return 0


# ------------------------------------------------------------------------------ demo


def cmd_demo(args: argparse.Namespace) -> int:
    from qareg.demo import DemoConfig, format_table, run_demo

    _check_output(args.out)
    config = DemoConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)
           if getattr(args, f.name, None) is not None}
    )
    result = run_demo(config, progress=not args.no_progress)
    print(format_table(result))
    if args.out is not None:
        from qareg.checkpoint import atomic_write

        atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=2).encode() + b"\n"))
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from qareg.config import DataConfig, RegularizerConfig, TrainConfig
    from qareg.demo import DemoConfig

    parser = argparse.ArgumentParser(
        prog="qareg", description="Compress networks by quantization-aware regularization.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a network, in full precision or with the regularizer")
    p.add_argument("--method", choices=("fp", "qareg"), default="fp",
                   help="fp: full precision; qareg: with the quantization-aware regularizer")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--metrics", help="JSON-lines file of per-epoch metrics "
                   "(default: OUT with the suffix .metrics.jsonl)")
    p.add_argument("--init-from", help="fine-tune this checkpoint instead of a new network")
    p.add_argument("--config", help="YAML file with sections data, train, regularizer")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_flags(p, DataConfig)
    _add_config_flags(p, TrainConfig)
    _add_config_flags(p, RegularizerConfig)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("quantize", help="snap a checkpoint's weights: post-training k-means, "
                       "or to the codebooks learned with the regularizer")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="quantized checkpoint to write")
    p.add_argument("--k", type=int, help="representatives per tensor (post-training only)")
    p.add_argument("--init", default="kmeans", help="codebook init for post-training k-means")
    p.add_argument("--bn-batches", type=int, default=50,
                   help="training batches to re-estimate batch norm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", help="override the checkpoint's dataset")
    p.add_argument("--data-dir", help="folder of the dataset files")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint or of a compressed file")
    p.add_argument("checkpoint", help="checkpoint (.pt) or compressed file (qareg compress)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--dataset", help="override the checkpoint's dataset")
    p.add_argument("--data-dir", help="folder of the dataset files")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("compress", help="write a quantized checkpoint as codebooks plus "
                       "bit-packed indices")
    p.add_argument("checkpoint", help="a checkpoint written by qareg quantize")
    p.add_argument("out", help="compressed file to write")
    p.add_argument("--codebook-dtype", choices=("float32", "float16"), default="float32",
                   help="float16 halves the codebooks; loaded weights then differ slightly")
    p.add_argument("--no-entropy-coding", action="store_true",
                   help="bit-pack every index stream (by default range coding is used "
                   "wherever it is smaller)")
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("inspect", help="size accounting of a compressed file")
    p.add_argument("file")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("demo", help="full precision vs post-training k-means vs qareg on "
                       "Fashion-MNIST, in one table")
    p.add_argument("--out", help="also write the table as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    hints = typing.get_type_hints(DemoConfig)
    for f in dataclasses.fields(DemoConfig):
        hint = hints[f.name]
        if typing.get_origin(hint) is tuple:
            p.add_argument(_flag(f.name), type=int, nargs="+", default=None,
                           help=f"(default: {' '.join(map(str, f.default))})")
        else:
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            p.add_argument(_flag(f.name), type=base[0], default=None,
                           help=f"(default: {f.default!r})")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except QaregError as error:
        print(f"qareg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
