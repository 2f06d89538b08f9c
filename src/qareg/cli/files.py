"""The commands that read a saved network: `quantize`, `evaluate`, `compress`, `inspect`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from qareg.checkpoint import save_checkpoint
from qareg.cli.output import (
    check_derived_file,
    check_new_file,
    check_not_input,
    check_output,
    say,
    stem_with,
)
from qareg.config import DataConfig, TrainConfig, from_dict
from qareg.constants import INITS, MAX_K
from qareg.data import DatasetSplits, load_dataset
from qareg.engine import convert_with_data
from qareg.errors import ConfigError
from qareg.evaluation import evaluate
from qareg.filetypes import describe, sniff
from qareg.quantize import prepare, quantized_tensors
from qareg.runs import load_run, saved_sections
from qareg.validate import check_device, check_init, check_int


def data_for(meta: dict[str, Any], args: argparse.Namespace) -> DatasetSplits:
    """The dataset a network was trained on, unless flags name another."""
    values = dict(saved_sections(meta)["data"])
    for name in ("dataset", "data_dir"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    cfg = from_dict(DataConfig, values, where="the checkpoint's data config")
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                        val_size=cfg.val_size, split_seed=cfg.split_seed)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="override the dataset the network was trained on")
    p.add_argument("--data-dir", help="folder of the dataset files")
    p.add_argument("--device", default="cpu")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a full-precision checkpoint by post-training "
                       "k-means, or snap one trained with codebooks")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="quantized checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--k", type=int, help="representatives per tensor (post-training only)")
    p.add_argument("--init", help=f"codebook init for post-training k-means: {', '.join(INITS)} "
                   "(default: kmeans-exact)")
    p.add_argument("--bn-batches", type=int, default=50,
                   help="training batches to re-estimate batch norm")
    p.add_argument("--seed", type=int, default=0)
    add_data_flags(p)
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("evaluate", help="test (or validation) accuracy of a checkpoint or of a "
                       "compressed file")
    p.add_argument("checkpoint", help="checkpoint (.pt) or compressed file (.qz)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--json", action="store_true", help="print one JSON line instead")
    add_data_flags(p)
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("compress", help="write a quantized checkpoint as codebooks plus "
                       "entropy-coded indices (.qz)")
    p.add_argument("checkpoint", help="a quantized checkpoint (qareg train with a quantizing "
                   "method, or qareg quantize)")
    p.add_argument("out", help="compressed file to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--codebook-dtype", choices=("float32", "float16"), default="float32",
                   help="float16 halves the codebooks; loaded weights then differ slightly")
    p.add_argument("--raw-dtype", choices=("float32", "float16"), default="float32",
                   help="float16 halves biases and batch norm (stored as they are); loaded "
                   "values then differ slightly")
    p.add_argument("--no-entropy-coding", action="store_true",
                   help="bit-pack every index stream (by default range coding is used "
                   "wherever it is smaller)")
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("export", help="write a compressed file as ONNX, each quantized weight "
                       "a codebook plus packed indices")
    p.add_argument("file", help="a compressed file (.qz)")
    p.add_argument("--onnx", required=True, help="ONNX file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --onnx if it exists")
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input channels, height, width (default: what the file records)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("inspect", help="size accounting of a compressed file")
    p.add_argument("file")
    p.set_defaults(run=cmd_inspect)


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.k is not None:
        check_int("--k", args.k, 2, MAX_K)
    if args.init is not None:
        args.init = check_init("--init", args.init)
    check_int("--bn-batches", args.bn_batches, 1)
    check_int("--seed", args.seed, 0)
    check_device("--device", args.device)
    check_output(args.out)
    check_not_input(args.out, "--out", args.checkpoint)
    check_new_file(args.out, "--out", args.overwrite)
    model, meta = load_run(args.checkpoint, args.device)
    if meta.get("converted"):
        raise ConfigError(f"{args.checkpoint!r} is already quantized: compress it with qareg "
                          f"compress {args.checkpoint} {stem_with(args.checkpoint, '.qz')}")
    prepared = quantized_tensors(model)
    for flag, value in (("--k", args.k), ("--init", args.init)):
        if prepared and value is not None:
            raise ConfigError(f"{args.checkpoint!r} already has codebooks (trained with the "
                              f"regularizer); omit {flag} to snap to them")
    if not prepared and meta.get("method") not in (None, "fp"):
        raise ConfigError(f"{args.checkpoint!r} holds an unfinished {meta['method']} run; "
                          f"finish it with qareg train --resume --out {args.checkpoint}, which "
                          "saves it quantized")
    if not prepared:
        if args.k is None:
            raise ConfigError(f"{args.checkpoint!r} has no codebooks: give --k for "
                              "post-training quantization")
        prepare(model, args.k, init=args.init or "kmeans-exact", seed=args.seed)
    splits = data_for(meta, args)
    config = TrainConfig(model=model.qareg_model_spec["name"], device=args.device,
                         bn_batches=args.bn_batches, seed=args.seed)
    report = convert_with_data(model, splits, config)
    say(report.format_table())
    accuracy = evaluate(model, splits.test, splits, args.device)
    save_checkpoint(args.out, model, {**meta, "converted": True, "quantized_from": args.checkpoint,
                                      "test_accuracy": accuracy,
                                      "method": meta.get("method") if prepared else "ptq-kmeans"})
    what = "snapped to its codebooks" if prepared else f"post-training k-means, k={args.k}"
    say(f"saved {args.out}: {what}, test accuracy {accuracy:.2f}% ({splits.name} test split). "
        f"Next: qareg compress {args.out} {stem_with(args.out, '.qz')}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qareg.compress import inspect_compressed, load_compressed

    check_device("--device", args.device)
    kind = sniff(args.checkpoint)
    if kind == "compressed":
        meta = inspect_compressed(args.checkpoint).meta
        model = load_compressed(args.checkpoint, device=args.device)
    elif kind == "checkpoint":
        model, meta = load_run(args.checkpoint, args.device)
    else:
        raise ConfigError(f"{describe(args.checkpoint)}; expected a qareg checkpoint (.pt, "
                          "from qareg train or quantize) or compressed file (.qz, from qareg "
                          "compress)")
    splits = data_for(meta, args)
    data = splits.test if args.split == "test" else splits.val
    accuracy = evaluate(model, data, splits, args.device)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "split": args.split,
                          "accuracy": round(accuracy, 2), "images": len(data)}))
        return 0
    split = "test" if args.split == "test" else "validation"
    say(f"{args.checkpoint}: {split} accuracy {accuracy:.2f}% on {len(data)} images of "
        f"{splits.name} (nothing written)")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from qareg.compress import save_compressed

    check_derived_file(args.out, "OUT", args.checkpoint, args.overwrite)
    model, meta = load_run(args.checkpoint)
    if not meta.get("converted"):
        raise ConfigError(f"{args.checkpoint!r} is not quantized yet: run `qareg quantize "
                          f"{args.checkpoint} --out QUANTIZED.pt` and compress that")
    info = save_compressed(model, args.out, codebook_dtype=args.codebook_dtype,
                           raw_dtype=args.raw_dtype,
                           entropy_coding=not args.no_entropy_coding,
                           meta={**meta, "compressed_from": args.checkpoint})
    say(info.format_table())
    say(f"wrote {args.out}: {info.file_bytes} bytes, {info.compression_ratio:.1f}x smaller than "
        f"float32. Next: qareg evaluate {args.out} (test accuracy from the file)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from qareg.compress import inspect_compressed

    info = inspect_compressed(args.file)
    if info.model is not None:
        args_text = ", ".join(f"{k}={v}" for k, v in info.model.items() if k != "name")
        say(f"model: {info.model.get('name')} ({args_text})")
    say(info.format_table())
    say(f"{args.file}: {info.file_bytes} bytes, checked (nothing written). Next: qareg "
        f"evaluate {args.file}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qareg.onnx_export import export_onnx

    check_derived_file(args.onnx, "--onnx", args.file, args.overwrite)
    sizes = export_onnx(args.file, args.onnx,
                        input_shape=tuple(args.input_shape) if args.input_shape else None)
    say(f"{args.file}: {sizes.compressed_bytes} bytes (qareg compressed file)")
    say(f"{args.onnx}: {sizes.onnx_bytes} bytes (ONNX, codebooks and packed indices)")
    say(f"the same network as float32 ONNX: {sizes.float32_onnx_bytes} bytes "
        f"({sizes.float32_onnx_bytes / sizes.onnx_bytes:.1f}x larger; not written)")
    say(f"wrote {args.onnx}, input 'images' (batch, C, H, W), output 'logits'. Next: run it "
        "with ONNX Runtime, or any ONNX runtime")
    return 0
