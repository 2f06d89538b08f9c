"""`qareg train`: train a network with any registered method, resumably.

Config precedence: the dataclass defaults < the method's fine-tuning recipe (with
--init-from) < the config file's sections < flags. On --resume the saved run's sections
take the place of the defaults and the result must equal them. The rules of --out are
`qareg.runs.run_to_resume`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qareg.checkpoint import read_checkpoint
from qareg.cli.flags import (
    Flag,
    add_flags,
    build,
    field_flags,
    flag_name,
    given_values,
    option_pairs,
    read_config_file,
    yaml_value,
)
from qareg.cli.output import (
    check_output,
    epoch_line,
    percent,
    progress_bars,
    say,
    stem_with,
)
from qareg.config import DataConfig, TrainConfig
from qareg.constants import MAX_BITS
from qareg.errors import ConfigError
from qareg.methods import METHODS, create_method, list_methods
from qareg.runs import (
    RunResult,
    RunSpec,
    check_same_run,
    run_to_resume,
    run_training,
    saved_sections,
)
from qareg.validate import bits_from_text

SECTIONS = ("data", "train", "method", "regularizer")  # regularizer: the method's, renamed
OPTION_DEST = "option_"  # argparse dest prefix of the method options


def option_owners() -> dict[str, list[tuple[str, Flag]]]:
    """{option name: [(method, its flag), ...]} over every registered method, but the names
    the data and train flags take."""
    taken = {f.field for cls in (DataConfig, TrainConfig) for f in field_flags(cls)}
    owners: dict[str, list[tuple[str, Flag]]] = {}
    for name in list_methods():
        for flag in field_flags(METHODS.get(name).config_class):
            if flag.field not in taken:
                owners.setdefault(flag.field, []).append((name, flag))
    return dict(sorted(owners.items()))


def method_flags() -> list[Flag]:
    """One flag per option of any registered method (a name several methods share is one
    flag; its help gives each method's meaning and default)."""
    flags = []
    for field, entries in option_owners().items():
        hints = {repr(flag.hint) for _, flag in entries}
        first = entries[0][1]
        if len(entries) == 1:
            text = f"[{entries[0][0]}] {first.help}"
        else:
            text = " | ".join(f"[{name}] {flag.help}" for name, flag in entries)
        flags.append(Flag(field, first.hint if len(hints) == 1 else None, text, first.default))
    return flags


def options_help() -> str:
    lines = ["options of each method (--option KEY=VALUE, or the flags below):"]
    for name in list_methods():
        fields = [f.field for f in field_flags(METHODS.get(name).config_class)]
        lines.append(f"  {name}: {', '.join(fields) or '(none)'}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a network with any method: full precision (fp), qareg, or a rival",
        description="Train, resumably; a method that quantizes ends by converting the network, "
        "so the saved checkpoint is quantized.", epilog=options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=list_methods(), default=None,
                   help="fp: full precision (the default); qareg: the quantization-aware "
                   "regularizer; the others as their papers train them")
    p.add_argument("--bits", type=bits_argument, help=f"bit-width, 1 to {MAX_BITS} (qareg: "
                   "sets k = 2**bits; the methods but fp and qareg need it); qareg also takes a "
                   "fractional budget of stored bits per weight, e.g. 0.75")
    p.add_argument("--option", nargs="*", metavar="KEY=VALUE",
                   help="options of the method (listed below), e.g. drop_rate=0.2")
    p.add_argument("--out", required=True, help="checkpoint to write; rewritten atomically "
                   "after every epoch with what --resume needs")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run saved in --out (a fresh start if there is "
                   "none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (kept until the first epoch is saved)")
    p.add_argument("--metrics", help="JSON-lines file of per-epoch metrics "
                   "(default: OUT with the suffix .metrics.jsonl)")
    p.add_argument("--init-from", help="fine-tune this checkpoint instead of a new network")
    p.add_argument("--config", help="YAML file with sections data, train, method")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are drawn only on a terminal anyway)")
    for cls in (DataConfig, TrainConfig):
        add_flags(p.add_argument_group(cls.__name__), field_flags(cls))
    flags = method_flags()
    add_flags(p.add_argument_group("method options"), flags, OPTION_DEST)
    renamed = {old for n in list_methods()
               for old in getattr(METHODS.get(n).config_class, "RENAMED", {})}
    for old in sorted(renamed - {f.field for f in flags}):  # the last release's names, hidden
        p.add_argument(flag_name(old), dest=OPTION_DEST + old, type=yaml_value, default=None,
                       help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_train)


def _method_options(args: argparse.Namespace, method: str, flags: list[Flag]
                    ) -> dict[str, Any]:
    """The method options given as flags or --option, checked against `method`'s fields."""
    given = given_values(args, flags, OPTION_DEST)
    for key, value in vars(args).items():  # hidden flags of renamed options
        field = key.removeprefix(OPTION_DEST)
        if key.startswith(OPTION_DEST) and value is not None and field not in given:
            given[field] = value
    given.update(option_pairs(args.option))
    cls = METHODS.get(method).config_class
    fields = [f.field for f in field_flags(cls)]
    valid = {*fields, *getattr(cls, "RENAMED", {})}
    wrong = [key for key in given if key not in valid]
    if wrong:
        owners = {field: ", ".join(name for name, _ in entries)
                  for field, entries in option_owners().items()}
        where = "; ".join(f"{flag_name(k)} is an option of {owners[k]}"
                          for k in wrong if k in owners)
        raise ConfigError(f"{', '.join(map(flag_name, wrong))} do{'es' * (len(wrong) == 1)} not "
                          f"apply to --method {method}" + (f" ({where})" if where else "")
                          + f"; its options: {', '.join(fields) or 'none'}")
    return given


def _spec(args: argparse.Namespace, saved: dict[str, Any] | None) -> RunSpec:
    """The run asked for: defaults < recipe < config file < flags (module docstring)."""
    file_sections = read_config_file(args.config, SECTIONS)
    if "regularizer" in file_sections:  # the last release's name of the method section
        file_sections.setdefault("method", {}).update(file_sections.pop("regularizer"))
    method_name = args.method or (saved["method"] if saved else "fp")
    method_cls = METHODS.get(method_name)
    in_file = f"config file {args.config!r}"
    for section, cls in (("data", DataConfig), ("train", TrainConfig),
                         ("method", method_cls.config_class)):
        if section in file_sections:  # the whole file is checked, whatever the flags say
            build(cls, file_sections[section], f"section {section!r} of {in_file}")
    init_from = args.init_from if args.init_from is not None else (
        saved["init_from"] if saved else None)
    base = saved_sections(saved) if saved else {
        "data": {}, "train": dict(method_cls.recipe) if init_from else {}, "method": {}}
    flags = method_flags()
    sections = {
        "data": {**base["data"], **file_sections.get("data", {}),
                 **given_values(args, field_flags(DataConfig))},
        "train": {**base["train"], **file_sections.get("train", {}),
                  **given_values(args, field_flags(TrainConfig))},
        "method": {**base["method"], **file_sections.get("method", {}),
                   **_method_options(args, method_name, flags)},
    }
    if init_from is not None:
        sections["train"]["model"] = _init_model_name(init_from, args.model)
    method = create_method(method_name, build(method_cls.config_class, sections["method"],
                                              f"the options of --method {method_name}"))
    bits = args.bits if args.bits is not None else (saved.get("bits") if saved else None)
    method.bits = method.resolve_bits(bits)  # what it will train at (qareg: k = 2**bits)
    return RunSpec(method, method.bits, init_from,
                   build(DataConfig, sections["data"], "data"),
                   build(TrainConfig, sections["train"], "train"))


def _init_model_name(path: str, asked: str | None) -> str:
    """The model of checkpoint `path`, which --model, when given, must name."""
    name = read_checkpoint(path)["model_spec"]["name"]
    if asked is not None and asked != name:
        raise ConfigError(f"--model {asked!r} differs from the model in {path!r}: {name!r}")
    return name


def _header(spec: RunSpec, args: argparse.Namespace, resumed_epoch: int | None) -> None:
    t, m = spec.train, spec.method
    what = f"{m.name}" + (f" at {spec.bits} bits" if spec.bits is not None else "")
    start = f"from {spec.init_from}" if spec.init_from else "from a new network"
    say(f"qareg train: {what}, {t.model} on {spec.data.dataset}, {start}")
    say(f"  recipe: {t.epochs} epoch{'s' * (t.epochs != 1)}, {t.optimizer} lr {t.lr:g} "
        f"({t.lr_schedule}), batch {t.batch_size}, seed {t.seed}, {t.device}")
    defaults = type(m)().options()
    changed = ", ".join(f"{k}={v}" for k, v in m.options().items() if v != defaults[k])
    if defaults:
        say(f"  options: {changed or 'the defaults'}" + (" (the others at their defaults)"
                                                          if changed else ""))
    say(f"  writes: {args.out} (after every epoch), metrics in {args.metrics}")
    if resumed_epoch is not None:
        say(f"  resuming after epoch {resumed_epoch}")


def _final_line(spec: RunSpec, out: str, result: RunResult) -> str:
    accuracy = percent(result.val_accuracy, "validation")
    if result.report is None:
        return (f"saved {out}: full precision, {accuracy}. Next: qareg quantize {out} --k 4 "
                f"--out {stem_with(out, '-k4.pt')}, or qareg train --method qareg --init-from "
                f"{out} --out {stem_with(out, '-qareg.pt')}")
    return (f"saved {out}: quantized by {spec.method.name}, "
            f"{result.report.bits_per_weight:.2f} bits/weight, {accuracy} after "
            f"quantization. Next: qareg compress {out} {stem_with(out, '.qz')}")


def cmd_train(args: argparse.Namespace) -> int:
    check_output(args.out)
    unfinished = run_to_resume(args.out, resume=args.resume, overwrite=args.overwrite)
    saved = unfinished["meta"] if unfinished is not None else None
    if args.metrics is None:
        args.metrics = str(Path(args.out).with_suffix(".metrics.jsonl"))
    check_output(args.metrics, "--metrics")
    if Path(args.metrics).resolve() == Path(args.out).resolve():
        raise ConfigError(f"--metrics {args.metrics!r} is also --out; give another file name")
    if args.init_from is not None:
        if not Path(args.init_from).is_file():
            raise ConfigError(f"--init-from {args.init_from!r} does not exist or is not a file")
        if Path(args.init_from).resolve() == Path(args.out).resolve():
            raise ConfigError(f"--out {args.out!r} is the --init-from file; give another name")
    spec = _spec(args, saved)
    if saved is not None:
        check_same_run(saved, spec, args.out)
    resumed = unfinished["train_state"]["epoch"] if unfinished is not None else None
    result = run_training(
        spec, args.out, args.metrics, resume_from=unfinished,
        progress=progress_bars(args.no_progress),
        on_start=lambda s: _header(s, args, resumed),
        on_epoch=lambda m: say(epoch_line(m, spec.train.epochs)))
    if not result.is_main:
        return 0
    if result.report is not None:
        say(result.report.format_table())
    say(_final_line(spec, args.out, result))
    return 0


def bits_argument(text: str) -> int | float:
    """argparse type of --bits: a whole bit-width or a fractional budget."""
    try:
        return bits_from_text(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
