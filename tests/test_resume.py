"""Crash-safe training: per-epoch checkpoints, --resume, and a run killed with SIGKILL."""

import copy
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import qareg
from qareg.checkpoint import load_checkpoint, read_checkpoint
from qareg.cli import main
from qareg.config import TrainConfig
from qareg.engine import train
from qareg.methods import create_method


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def one_thread():
    """Bit-identical runs need the same kernels: one thread, whatever else runs beside."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method_name", ["qareg", "lsq", "cpq", "dkm", "gradl1"])
def test_resuming_from_any_epoch_gives_the_uninterrupted_weights(tiny_splits, one_thread,
                                                                  method_name):
    config = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=2e-3,
                         lr_schedule="onecycle")
    options = {"qareg": {"k": 4, "lam": 100.0}}.get(method_name, {})
    bits = None if method_name in ("qareg", "gradl1") else 2

    def prepared_lenet():
        torch.manual_seed(0)
        model = qareg.create_model("lenet5", 10, 1, 28)
        method = create_method(method_name, options)
        method.prepare(model, bits, 0)
        return model, method

    whole, method = prepared_lenet()
    states = []

    def keep(state):  # what a checkpoint holds: the model's weights and the train state
        weights = {k: v.clone() for k, v in whole.state_dict().items()}
        states.append((weights, copy.deepcopy(state)))  # optimizer tensors change in place

    history = train(whole, tiny_splits, config, method, progress=False, save_state=keep)
    assert [state["epoch"] for _, state in states] == [1, 2, 3]
    for weights, state in states[:2]:
        resumed, method = prepared_lenet()
        resumed.load_state_dict(weights)
        rest = train(resumed, tiny_splits, config, method, progress=False, resume=state)
        assert_same_weights(resumed.state_dict(), whole.state_dict())
        assert [m.epoch for m in rest] == [1, 2, 3]
        assert rest[-1].val_accuracy == history[-1].val_accuracy


METHOD_FLAGS = {
    "qareg": ["--method", "qareg", "--k", "4", "--lam", "100"],
    "lsq": ["--method", "lsq", "--bits", "2"],
    "cpq": ["--method", "cpq", "--bits", "2"],  # samples DropBits gates: random states matter
}


def train_argv(data_dir, out, epochs=6, method="qareg"):
    return ["train", *METHOD_FLAGS[method], "--model", "lenet5", "--data-dir", str(data_dir),
            "--val-size", "200", "--epochs", str(epochs), "--batch-size", "64",
            "--optimizer", "adam", "--lr", "0.002", "--out", str(out), "--no-progress"]


def test_an_unfinished_run_is_not_overwritten_without_resume(fashion_dir, tmp_path, capsys):
    out = tmp_path / "run.pt"
    assert main(train_argv(fashion_dir, out, epochs=2)) == 0
    finished = read_checkpoint(out)
    assert "train_state" not in finished  # a finished checkpoint carries no optimizer state
    unfinished = dict(finished, train_state={"epoch": 1})
    torch.save(unfinished, out)
    before = out.read_bytes()
    assert main(train_argv(fashion_dir, out, epochs=2)) == 2
    assert "unfinished run (epoch 1 of 2); pass --resume" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_resume_refuses_a_changed_recipe(fashion_dir, tmp_path, capsys):
    out = tmp_path / "run.pt"
    main(train_argv(fashion_dir, out, epochs=1))
    payload = read_checkpoint(out)
    payload["train_state"] = {"epoch": 0}
    torch.save(payload, out)
    before = out.read_bytes()
    assert main([*train_argv(fashion_dir, out, epochs=1), "--resume", "--lr", "0.01"]) == 2
    assert "train.lr differ" in capsys.readouterr().err
    assert out.read_bytes() == before


def run_cli(argv, env):
    return subprocess.Popen([sys.executable, "-m", "qareg", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("method, seed", [("qareg", 0), ("lsq", 1), ("cpq", 2)])
def test_sigkill_at_a_random_moment_then_resume_gives_the_same_weights(fashion_dir, tmp_path,
                                                                       method, seed):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same kernels
    reference = tmp_path / "reference.pt"
    assert run_cli(train_argv(fashion_dir, reference, method=method), env).wait() == 0

    killed = tmp_path / "killed.pt"
    delay = random.Random(seed).uniform(0.0, 2.0)  # after the first epoch: a random moment
    for _ in range(6):  # mid-epoch or mid-write; a run that finishes first is tried sooner
        for stale in tmp_path.glob("killed*"):
            stale.unlink()
        process = run_cli(train_argv(fashion_dir, killed, method=method), env)
        while not killed.exists() and process.poll() is None:  # wait for the first epoch
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        payload = read_checkpoint(killed)  # never torn: the old file or the new one
        if "train_state" in payload:  # stopped before its last epoch was saved
            break
        delay /= 4
    stopped_after = payload.get("train_state", {}).get("epoch")
    assert stopped_after is not None, "every run finished before it could be killed"

    resumed = run_cli([*train_argv(fashion_dir, killed, method=method), "--resume"], env)
    _, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr.decode()
    final, _ = load_checkpoint(killed)
    expected, _ = load_checkpoint(reference)
    assert_same_weights(final.state_dict(), expected.state_dict())
    metrics = killed.with_suffix(".metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 6, f"stopped after epoch {stopped_after}: {metrics}"


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fashion_dir, tmp_path,
                                                                     capsys, monkeypatch):
    import qareg.engine

    calls = 0

    def poisoned(logits, labels):  # NaN from the 41st batch on: epoch 3 of 15-batch epochs
        nonlocal calls
        calls += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if calls > 40 else loss

    monkeypatch.setattr(qareg.engine, "F", type("F", (), {"cross_entropy": staticmethod(poisoned)}))
    out = tmp_path / "run.pt"
    assert main(train_argv(fashion_dir, out, epochs=4)) == 1
    message = capsys.readouterr().err
    assert "the training loss became nan in epoch 3" in message
    assert f"the last good checkpoint (epoch 2) is kept in {str(out)!r}" in message
    payload = read_checkpoint(out)
    assert payload["train_state"]["epoch"] == 2
    assert all(torch.isfinite(t).all() for t in payload["state_dict"].values())


def test_a_run_saved_with_the_last_release_names_resumes(fashion_dir, tmp_path,
                                                         monkeypatch, one_thread):
    import shutil

    import qareg.runs

    out, first = tmp_path / "run.pt", tmp_path / "after-epoch-1.pt"
    save = qareg.runs.save_checkpoint

    def keep_epoch_1(path, model, meta, train_state=None):
        save(path, model, meta, train_state)
        if train_state is not None and train_state["epoch"] == 1:
            shutil.copyfile(path, first)

    monkeypatch.setattr(qareg.runs, "save_checkpoint", keep_epoch_1)
    assert main(train_argv(fashion_dir, out, epochs=2)) == 0
    payload = read_checkpoint(first)
    options = payload["meta"]["config"].pop("method")  # as the last release saved them:
    options["straight_through"] = options.pop("snapped_fraction")
    options["straight_through_lam"] = options.pop("snapped_lam")
    options["init"] = "kmeans"
    payload["meta"]["config"]["regularizer"] = options
    resumed = tmp_path / "resumed.pt"
    torch.save(payload, resumed)
    with pytest.warns(DeprecationWarning, match="now called"):
        assert main([*train_argv(fashion_dir, resumed, epochs=2), "--resume"]) == 0
    final, _ = load_checkpoint(resumed)
    expected, _ = load_checkpoint(out)
    assert_same_weights(final.state_dict(), expected.state_dict())
