"""What a new user meets: nothing finished is overwritten silently, no empty leftovers, the
final line reports the network that was saved, unreadable files are named for what they
are, and the README's command-line walk-through runs as written."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import qareg.engine
from qareg.cli import main
from qareg.evaluation import evaluate
from qareg.runs import load_run

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--model", "lenet5", "--epochs", "1", "--val-size", "200", "--batch-size", "64",
        "--no-progress"]


@pytest.fixture
def data_env(fashion_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("QAREG_DATA", str(fashion_dir))
    monkeypatch.chdir(tmp_path)
    return fashion_dir


def test_a_finished_run_is_not_overwritten_nor_its_metrics_truncated(data_env, capsys):
    out, metrics = Path("runs/fp.pt"), Path("runs/fp.metrics.jsonl")
    assert main(["train", *FAST, "--out", str(out)]) == 0
    before = out.read_bytes(), metrics.read_bytes()
    capsys.readouterr()
    assert main(["train", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run (fp); pass --overwrite to replace it" in err
    assert (out.read_bytes(), metrics.read_bytes()) == before
    assert main(["train", *FAST, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before[0] and len(metrics.read_text().splitlines()) == 1


def test_a_run_stopped_before_its_first_epoch_leaves_no_files(data_env, monkeypatch, capsys):
    calls = 0

    def interrupted(logits, labels):  # Ctrl-C on the third batch of the first epoch
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(logits, labels)

    monkeypatch.setattr(qareg.engine, "F", type("F", (), {"cross_entropy": staticmethod(
        interrupted)}))
    assert main(["train", *FAST, "--out", "runs/new.pt", "--resume"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not Path("runs/new.pt").exists() and not Path("runs/new.metrics.jsonl").exists()


def test_the_final_line_reports_the_quantized_network_that_was_saved(data_env, capsys):
    assert main(["train", *FAST, "--out", "fp.pt"]) == 0
    assert main(["train", "--method", "qareg", "--init-from", "fp.pt", "--k", "2",
                 *FAST[2:], "--out", "q.pt"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    printed = float(re.search(r"validation accuracy ([\d.]+)% after quantization", last)[1])
    model, meta = load_run("q.pt")
    assert meta["converted"]
    from qareg.cli.files import data_for

    splits = data_for(meta, type("Args", (), {})())
    assert printed == pytest.approx(evaluate(model, splits.val, splits), abs=0.005)
    metrics = [json.loads(line) for line in Path("q.metrics.jsonl").read_text().splitlines()]
    assert printed == pytest.approx(metrics[-1]["val_accuracy_quantized"], abs=0.005)


@pytest.mark.parametrize("content, argv, message", [
    (b"this is text\n", ["train", "--init-from", "{file}", "--out", "x.pt"],
     "is a text file; expected a qareg checkpoint: a .pt file written by qareg train"),
    (bytes(range(256)) * 8, ["evaluate", "{file}"],
     "holds bytes of an unknown format; expected a qareg checkpoint (.pt, from qareg train"),
    (b"", ["evaluate", "{file}"], "is empty (0 bytes); expected a qareg checkpoint"),
], ids=["text-as-init-from", "random-bytes", "empty-file"])
def test_unreadable_files_say_what_they_are_and_what_was_expected(data_env, capsys, content,
                                                                   argv, message):
    Path("input.bin").write_bytes(content)
    assert main([a.replace("{file}", "input.bin") for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"'input.bin' {message}" in err
    assert "KeyError" not in err and "index out of range" not in err


def test_inspect_on_a_checkpoint_says_how_to_make_a_compressed_file(data_env, capsys):
    assert main(["train", *FAST, "--out", "fp.pt"]) == 0
    capsys.readouterr()
    assert main(["inspect", "fp.pt"]) == 2
    err = capsys.readouterr().err
    assert ("'fp.pt' is a qareg checkpoint (.pt), not a compressed file: `qareg compress "
            "fp.pt") in err
    assert "header" not in err


def test_a_config_file_is_checked_whole_even_where_a_flag_sets_the_key(data_env, capsys):
    Path("bad.yaml").write_text("train:\n  epochs: three\n")
    assert main(["train", "--config", "bad.yaml", *FAST, "--out", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert "section 'train' of config file 'bad.yaml': epochs must be an integer" in err
    assert not Path("x.pt").exists()


def walkthrough() -> list[list[str]]:
    """The commands of the README's command-line walk-through, as argv lists."""
    text = README.read_text()
    section = text[text.index("## Command line"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True)[1:] for line in joined.splitlines()
            if line.strip().startswith("qareg ")]


def test_the_readme_walk_through_runs_as_written(data_env, capsys):
    commands = walkthrough()
    assert [c[0] for c in commands][:3] == ["train", "quantize", "train"]
    for argv in commands:
        # as written, on the tiny test data: fewer epochs and images, appended last (the
        # last value of a flag wins), so every written flag is parsed and used
        fast = ["--epochs", "1", "--val-size", "200", "--no-progress"]
        extra = fast if argv[0] == "train" else []
        assert main([*argv, *extra]) == 0, argv
        out = capsys.readouterr().out.strip().splitlines()
        assert out and ("Next:" in out[-1] or "nothing written" in out[-1]), (argv, out[-1:])
