"""The `qareg` command: a thin argparse front over the library.

Flags map one to one onto the config dataclasses (`--lr` -> TrainConfig.lr); a YAML file
given with `--config` sets defaults by section (data, train, regularizer). Any bad input
ends with a message naming it and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import torch

from qareg.errors import ConfigError, QaregError

SECTIONS = {"data": "DataConfig", "train": "TrainConfig", "regularizer": "RegularizerConfig",
            "method": "the config of a rival --method (cpq, lsq, ...)"}


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
    unknown = sorted(set(values) - set(SECTIONS), key=str)  # YAML keys may be numbers too
    if unknown:
        raise QaregError(f"unknown section(s) {', '.join(map(str, unknown))} in "
                         f"{args.config!r}; valid sections: {', '.join(SECTIONS)}")
    for section, body in values.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"section {section!r} in {args.config!r} must be a mapping of "
                              f"keys to values, got {body!r}")
    return values


def _check_output(path: str | None, flag: str = "--out") -> None:
    """Fail early, before any work, if `path` cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise QaregError(f"{flag} {path!r} is a folder; give a file name")
    parent = Path(os.path.abspath(target)).parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())  # created if missing
    if not existing.is_dir():
        raise QaregError(f"{flag} {path!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path!r}: no permission to write in {str(existing)!r}")


def _check_not_input(path: str, flag: str, source: str) -> None:
    """Writing `path` must not replace the file `source` that the command reads."""
    if Path(path).resolve() == Path(source).resolve():
        raise ConfigError(f"{flag} {path!r} is the input file; give another file name")


def _print_config(**configs: Any) -> None:
    from qareg.config import as_dict

    print(json.dumps({name: as_dict(c) for name, c in configs.items()}, indent=None))


# ----------------------------------------------------------------------------- train


def _unfinished_run(path: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it holds a run that stopped before its last epoch."""
    from qareg.checkpoint import read_checkpoint

    if not Path(path).is_file():
        return None
    payload = read_checkpoint(path)
    return payload if "train_state" in payload else None


def _resumed_sections(saved: dict[str, Any], yaml_values: dict[str, Any]) -> dict[str, Any]:
    """Config sections for resuming: the saved run's, with the YAML file's on top (the
    result must then equal the saved run's; see `_check_same_run`)."""
    return {section: {**(saved.get(section) or {}), **(yaml_values.get(section) or {})}
            for section in SECTIONS}


def _check_same_run(saved: dict[str, Any], built: dict[str, Any], path: str) -> None:
    """Resuming continues the same run: only the device may change."""
    from qareg.config import as_dict

    changed = []
    for section, config in built.items():
        now = as_dict(config) if config is not None else None
        before = saved.get(section)
        if now is None or before is None:
            if now != before:
                changed.append(section)
            continue
        changed += [f"{section}.{k}" for k in now if k != "device" and now[k] != before.get(k)]
    if changed:
        raise QaregError(f"--resume continues the run saved in {path!r}, but {', '.join(changed)} "
                         "differ from it; drop those flags, or start a new run with another --out")


def _initial_model(args: argparse.Namespace, splits: Any, train_cfg: Any) -> tuple[Any, Any]:
    """The network to train: the --init-from checkpoint's, checked against the data, or a
    new one; with the train config naming its model."""
    from qareg.checkpoint import load_checkpoint
    from qareg.models import create_model

    if args.init_from is None:
        return create_model(train_cfg.model, splits.num_classes, splits.in_channels,
                            splits.input_size), train_cfg
    model, _ = load_checkpoint(args.init_from)
    spec = model.qareg_model_spec
    if args.model is not None and spec["name"] != train_cfg.model:
        raise QaregError(f"--model {train_cfg.model!r} differs from the model in "
                         f"{args.init_from!r}: {spec['name']!r}")
    expected = (splits.num_classes, splits.in_channels, splits.input_size)
    if (spec["num_classes"], spec["in_channels"], spec["input_size"]) != expected:
        raise QaregError(f"{args.init_from!r} was built for {spec['in_channels']}x"
                         f"{spec['input_size']}x{spec['input_size']} images and "
                         f"{spec['num_classes']} classes; {splits.name} has "
                         f"{expected[1]}x{expected[2]}x{expected[2]} and {expected[0]}")
    return model, dataclasses.replace(train_cfg, model=spec["name"])


def _method_options(args: argparse.Namespace, yaml_values: dict[str, Any]) -> Any:
    """The config of rival method --method: YAML section `method` < --option KEY=VALUE."""
    import yaml

    from qareg.config import from_dict
    from qareg.methods.base import METHODS

    values = dict(yaml_values.get("method") or {})
    for item in args.option or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option takes KEY=VALUE pairs, got {item!r}")
        values[key] = yaml.safe_load(text)
    cls = METHODS.get(args.method).config_class
    return from_dict(cls, values, where=f"the options of method {args.method!r}")


def _train_rival(args: argparse.Namespace, yaml_values: dict[str, Any], data_cfg: Any,
                 train_cfg: Any) -> int:
    """`qareg train --method NAME --bits B` for the methods other than fp and qareg: train,
    quantize at B bits, save the quantized checkpoint (codebooks attached) once at the end."""
    from qareg.checkpoint import save_checkpoint
    from qareg.config import as_dict
    from qareg.data import load_dataset
    from qareg.engine import evaluate, quantize_with_data, train
    from qareg.methods import check_bits, create_method

    if args.resume:
        raise ConfigError(f"--resume is available for --method fp and qareg; a {args.method} run "
                          "is saved once, after training")
    if args.bits is None:
        raise ConfigError(f"--method {args.method} needs --bits (1 to 8)")
    bits = check_bits(args.bits)
    method = create_method(args.method, _method_options(args, yaml_values))
    if args.init_from is not None:
        _check_not_input(args.out, "--out", args.init_from)
    splits = load_dataset(data_cfg.dataset, data_cfg.data_dir, download=data_cfg.download,
                          val_size=data_cfg.val_size, split_seed=data_cfg.split_seed)
    torch.manual_seed(train_cfg.seed)
    model, train_cfg = _initial_model(args, splits, train_cfg)
    model.to(train_cfg.device)
    method.prepare(model, None if method.post_training else bits, train_cfg.seed)
    _print_config(data=data_cfg, train=train_cfg, method=method.config)
    history = train(model, splits, train_cfg, method=method, augment=data_cfg.augment,
                    metrics_path=args.metrics, progress=not args.no_progress)
    report = quantize_with_data(method, model, splits, train_cfg, bits)
    meta = {"method": args.method, "bits": bits, "converted": True, "seed": train_cfg.seed,
            "init_from": args.init_from,
            "config": {"data": as_dict(data_cfg), "train": as_dict(train_cfg),
                       "method": as_dict(method.config)},
            "val_accuracy": history[-1].val_accuracy if history else None}
    save_checkpoint(args.out, model, meta)
    print(report.format_table())
    print(f"saved {args.out} (quantized at {bits} bits; qareg compress writes it packed)")
    if len(splits.val):
        accuracy = evaluate(model, splits.val, splits, train_cfg.device)
        print(f"validation accuracy after quantization {accuracy:.2f}%")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from qareg import prepare, quantized_tensors
    from qareg.checkpoint import model_from_checkpoint, save_checkpoint
    from qareg.config import DataConfig, RegularizerConfig, TrainConfig, as_dict
    from qareg.data import load_dataset
    from qareg.distributed import init_from_env, leave_process_group
    from qareg.engine import TrainingDiverged, evaluate, train

    yaml_values = _read_yaml(args)
    _check_output(args.out)
    unfinished = _unfinished_run(args.out)
    if unfinished is not None and not args.resume:
        state = unfinished["train_state"]
        total = unfinished["meta"]["config"]["train"]["epochs"]
        raise QaregError(f"{args.out!r} holds an unfinished run (epoch {state['epoch']} of "
                         f"{total}); pass --resume to continue it, or choose another --out")
    saved_meta = unfinished["meta"] if unfinished is not None else None
    if saved_meta is not None:
        yaml_values = _resumed_sections(saved_meta["config"], yaml_values)
        args.method = args.method or saved_meta["method"]
        args.init_from = args.init_from or saved_meta["init_from"]
    args.method = args.method or "fp"
    data_cfg = _build(DataConfig, "data", yaml_values, args)
    train_cfg = _build(TrainConfig, "train", yaml_values, args)
    rival = args.method not in ("fp", "qareg")
    if not rival and (args.bits is not None or args.option or yaml_values.get("method")):
        raise ConfigError("--bits, --option and the method section apply to the methods other "
                          f"than fp and qareg (qareg: --k); got --method {args.method}")
    if args.method == "qareg":
        reg_cfg = _build(RegularizerConfig, "regularizer", yaml_values, args)
    else:
        reg_cfg = None
        given = [_flag(f.name) for f in dataclasses.fields(RegularizerConfig)
                 if getattr(args, f.name, None) is not None]
        if given or (saved_meta is None and yaml_values.get("regularizer")):
            raise QaregError(f"{', '.join(given) or 'the regularizer section'} only applies "
                             "with --method qareg")
    if args.metrics is None:
        args.metrics = str(Path(args.out).with_suffix(".metrics.jsonl"))
    _check_output(args.metrics, "--metrics")
    if Path(args.metrics).resolve() == Path(args.out).resolve():
        raise ConfigError(f"--metrics {args.metrics!r} is also --out; give another file name")
    if args.init_from is not None and not Path(args.init_from).is_file():
        raise QaregError(f"--init-from {args.init_from!r} does not exist or is not a file")
    if rival:
        return _train_rival(args, yaml_values, data_cfg, train_cfg)
    if saved_meta is not None:
        _check_same_run(saved_meta["config"],
                        {"data": data_cfg, "train": train_cfg, "regularizer": reg_cfg}, args.out)
        if (args.method, args.init_from) != (saved_meta["method"], saved_meta["init_from"]):
            raise QaregError(f"--resume continues the run saved in {args.out!r}: --method "
                             f"{saved_meta['method']} --init-from {saved_meta['init_from']}")
    if args.init_from is not None:
        _check_not_input(args.out, "--out", args.init_from)
    splits = load_dataset(data_cfg.dataset, data_cfg.data_dir, download=data_cfg.download,
                          val_size=data_cfg.val_size, split_seed=data_cfg.split_seed)
    world, device = init_from_env(train_cfg.device)
    train_cfg = dataclasses.replace(train_cfg, device=device)
    torch.manual_seed(train_cfg.seed)
    if unfinished is not None:
        model = model_from_checkpoint(unfinished, device)
    else:
        model, train_cfg = _initial_model(args, splits, train_cfg)
    model.to(train_cfg.device)
    existing = {t.codebook.k for t in quantized_tensors(model)}
    if reg_cfg is not None and existing and args.k is not None and existing != {reg_cfg.k}:
        raise QaregError(f"{args.init_from!r} already has codebooks with k in "
                         f"{sorted(existing)}; --k {reg_cfg.k} does not match")
    if reg_cfg is not None and not existing:
        prepare(model, reg_cfg.k, include=reg_cfg.include or None, exclude=reg_cfg.exclude,
                init=reg_cfg.init, seed=train_cfg.seed)
    if reg_cfg is not None:  # now, not at the first step, after the metrics file is written
        from qareg.quantize import _check_patterns_match

        _check_patterns_match(reg_cfg.layer_weights, [t.name for t in quantized_tensors(model)],
                              "layer_weights pattern")
    meta = {
        "method": args.method,
        "config": {"data": as_dict(data_cfg), "train": as_dict(train_cfg),
                   "regularizer": as_dict(reg_cfg) if reg_cfg else None},
        "seed": train_cfg.seed,
        "converted": False,
        "init_from": args.init_from,
    }
    if world.is_main:
        _print_config(data=data_cfg, train=train_cfg,
                      **({"regularizer": reg_cfg} if reg_cfg else {}))
        if unfinished is None:
            Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics).write_text("")  # this run's metrics only
        else:
            print(f"resuming {args.out} after epoch {unfinished['train_state']['epoch']}")
    saved_epoch = unfinished["train_state"]["epoch"] if unfinished is not None else 0

    def save_state(state: dict[str, Any]) -> None:  # every epoch: a checkpoint to resume from
        nonlocal saved_epoch
        save_checkpoint(args.out, model, meta, train_state=state)
        saved_epoch = state["epoch"]

    try:
        history = train(model, splits, train_cfg, reg_cfg, augment=data_cfg.augment,
                        metrics_path=args.metrics, progress=not args.no_progress,
                        save_state=save_state,
                        resume=unfinished["train_state"] if unfinished is not None else None)
    except TrainingDiverged as error:
        kept = (f"the last good checkpoint (epoch {saved_epoch}) is kept in {args.out!r}; "
                "resume it with --resume after lowering the learning rate or lambda"
                if saved_epoch else "no epoch finished, so nothing was saved")
        raise TrainingDiverged(f"{error}; {kept}") from None
    finally:
        leave_process_group(world)
    if not world.is_main:
        return 0
    meta["val_accuracy"] = history[-1].val_accuracy if history else None
    save_checkpoint(args.out, model, meta)  # finished: no optimizer state to carry
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
    from qareg.cluster1d import INITS
    from qareg.config import TrainConfig, check_choice, check_device, check_int
    from qareg.engine import convert_with_data, evaluate
    from qareg.quantize import MAX_K

    if args.k is not None:
        check_int("--k", args.k, 2, MAX_K)
    if args.init is not None:
        check_choice("--init", args.init, INITS)
    check_int("--bn-batches", args.bn_batches, 1)
    check_int("--seed", args.seed, 0)
    check_device("--device", args.device)
    _check_output(args.out)
    _check_not_input(args.out, "--out", args.checkpoint)
    model, meta = load_checkpoint(args.checkpoint, args.device)
    if meta.get("converted"):
        raise QaregError(f"{args.checkpoint!r} is already quantized")
    prepared = quantized_tensors(model)
    for flag, value in (("--k", args.k), ("--init", args.init)):
        if prepared and value is not None:
            raise QaregError(f"{args.checkpoint!r} already has codebooks (trained with the "
                             f"regularizer); omit {flag} to snap to them")
    if not prepared:
        if args.k is None:
            raise QaregError(f"{args.checkpoint!r} has no codebooks: give --k for "
                             "post-training quantization")
        prepare(model, args.k, init=args.init or "kmeans", seed=args.seed)
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
    from qareg.config import check_device
    from qareg.engine import evaluate

    check_device("--device", args.device)
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
    _check_not_input(args.out, "out", args.checkpoint)
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


# ----------------------------------------------------------------------------- bench


BENCH_SECTIONS = ("bench", "methods")


def _bench_config(args: argparse.Namespace) -> Any:
    """BenchConfig: defaults < YAML (section bench; section methods: name -> fields) < flags."""
    from qareg.bench import BenchConfig
    from qareg.config import from_dict, load_yaml

    values: dict[str, Any] = {}
    if args.config is not None:
        loaded = load_yaml(args.config)
        unknown = sorted(set(loaded) - set(BENCH_SECTIONS), key=str)
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(map(str, unknown))} in "
                              f"{args.config!r}; valid sections: {', '.join(BENCH_SECTIONS)}")
        for section in BENCH_SECTIONS:
            if loaded.get(section) is not None and not isinstance(loaded[section], dict):
                raise ConfigError(f"section {section!r} in {args.config!r} must be a mapping, "
                                  f"got {loaded[section]!r}")
        values.update(loaded.get("bench") or {})
        if loaded.get("methods"):
            values["method_configs"] = loaded["methods"]
    for f in dataclasses.fields(BenchConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return from_dict(BenchConfig, values, where="section 'bench'")


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from qareg.bench import Bench

    config = _bench_config(args)
    _check_output(args.out)
    bench = Bench(config, args.out, progress=not args.no_progress)  # reads what is done
    _print_config(bench=config)
    planned = bench.planned()
    todo = [key for key in planned if key not in bench.done]
    print(f"{len(planned)} runs planned, {len(planned) - len(todo)} already in {args.out}")

    def show(row: dict[str, Any]) -> None:
        tqdm.write(f"{row['method']:<12} bits {row['bits']:>2} seed {row['seed']}: "
                   f"{row['accuracy']:.2f}% at {row['bits_per_weight']:.2f} bits/weight, "
                   f"trained {row['train_seconds'] or 0:.0f} s")

    bench.run(on_row=show)
    print(f"results in {args.out}; tables and plots: qareg report {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qareg.report import load_results, markdown_table, summary, write_report

    rows = load_results(args.results)  # fails on bad input before anything is written
    if args.out_dir is not None and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ConfigError(f"--out-dir {args.out_dir!r} is a file; give a folder")
    print(markdown_table(summary(rows)))
    if args.out_dir is not None:
        for path in write_report(args.results, args.out_dir):
            print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from qareg.config import DataConfig, RegularizerConfig, TrainConfig
    from qareg.demo import DemoConfig

    parser = argparse.ArgumentParser(
        prog="qareg", description="Compress networks by quantization-aware regularization.")
    sub = parser.add_subparsers(dest="command", required=True)

    from qareg.methods import list_methods

    p = sub.add_parser("train", help="train a network, in full precision, with the regularizer "
                       "or with a rival method")
    p.add_argument("--method", choices=list_methods(), default=None,
                   help="fp: full precision (the default); qareg: with the quantization-aware "
                   "regularizer; the others (with --bits) train and quantize as their papers do")
    p.add_argument("--bits", type=int, help="bit-width of a rival method (not fp or qareg)")
    p.add_argument("--option", nargs="*", metavar="KEY=VALUE",
                   help="config fields of a rival method, e.g. drop_rate=0.2")
    p.add_argument("--out", required=True, help="checkpoint file to write; it is rewritten "
                   "after every epoch, atomically, with what --resume needs")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run saved in --out (a fresh start if there is "
                   "none)")
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
    p.add_argument("--init", help="codebook init for post-training k-means: linear, "
                   "quantile, kmeans++ or kmeans (default)")
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

    from qareg.bench import BenchConfig

    defaults = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(BenchConfig)})
    p = sub.add_parser("bench", help="compare methods x bits x seeds on one model and dataset; "
                       "resumable, one JSON line per run")
    p.add_argument("--out", required=True, help="JSON-lines results file; runs already in it "
                   "are not rerun")
    p.add_argument("--config", help="YAML file with sections bench (these flags) and methods "
                   "(method name -> config fields)")
    p.add_argument("--model", help=f"(default: {defaults.model})")
    p.add_argument("--dataset", help=f"(default: {defaults.dataset})")
    rivals = ", ".join(m for m in list_methods() if m != "fp")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"methods compared, from {rivals} (default: all); fp always runs as the "
                   "reference")
    p.add_argument("--bits", nargs="+", type=int, help="bit-widths (default: 1 2 3 4)")
    p.add_argument("--seeds", nargs="+", type=int, help="seed values (default: 0 1 2)")
    p.add_argument("--epochs", type=int, help=f"every method's training budget after the shared "
                   f"pretraining (default: {defaults.epochs})")
    p.add_argument("--pretrain-epochs", type=int,
                   help="shared full-precision epochs per seed "
                   f"(default: {defaults.pretrain_epochs})")
    p.add_argument("--lr", type=float, help=f"(default: {defaults.lr})")
    p.add_argument("--pretrain-lr", type=float, help=f"(default: {defaults.pretrain_lr})")
    p.add_argument("--batch-size", type=int, help=f"(default: {defaults.batch_size})")
    p.add_argument("--data-dir", help="dataset folder")
    p.add_argument("--val-size", type=int, help=f"(default: {defaults.val_size})")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("report", help="markdown table and plots from bench result files")
    p.add_argument("results", nargs="+", help="JSON-lines files written by qareg bench")
    p.add_argument("--out-dir", help="write report.md and the PNG plots in this folder")
    p.set_defaults(run=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except QaregError as error:
        from qareg.engine import TrainingDiverged

        print(f"qareg {args.command}: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, TrainingDiverged) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
