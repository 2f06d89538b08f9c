"""DistributedDataParallel on the CPU: 2 gloo processes on 127.0.0.1 against one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qareg
from qareg.checkpoint import load_checkpoint
from qareg.config import TrainConfig
from qareg.data import Augment, DatasetSplits, TensorData
from qareg.engine import train
from qareg.methods import Method, create_method

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CONFIG = TrainConfig(model="lenet5", epochs=2, batch_size=64, optimizer="sgd", lr=0.02,
                     lr_schedule="cosine")
METHODS = {  # qareg in both phases; lsq: learned step sizes in parametrizations
    "qareg": ({"k": 4, "lam": 100.0, "snapped_fraction": 0.5}, None),
    "lsq": ({}, 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_splits() -> DatasetSplits:
    from conftest import learnable_images

    def tensors(n, seed):
        images, labels = learnable_images(n, seed)
        return TensorData(torch.from_numpy(images).unsqueeze(1),
                          torch.from_numpy(labels.astype(np.int64)))

    return DatasetSplits(name="fashion-mnist", train=tensors(512, 0), val=tensors(64, 1),
                         test=tensors(64, 2), num_classes=10, in_channels=1, input_size=28,
                         mean=(0.2,), std=(0.3,), default_augment=Augment())


def prepared_lenet(method_name: str) -> tuple[torch.nn.Module, Method]:
    torch.manual_seed(0)
    model = qareg.create_model("lenet5", 10, 1, 28)
    options, bits = METHODS[method_name]
    method = create_method(method_name, options)
    method.prepare(model, bits, 0)
    return model, method


def flat_state(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in model.state_dict().values()])


def ddp_worker(rank: int, world_size: int, port: int, folder: str, method_name: str) -> None:
    """One rank: train, and after every step check that every rank holds the same weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    model, method = prepared_lenet(method_name)
    steps_differing = []

    def same_everywhere(step):
        mine = flat_state(model)  # weights, codebooks, buffers
        everyone = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(everyone, mine)
        if not all(torch.equal(everyone[0], other) for other in everyone[1:]):
            steps_differing.append(step)

    train(model, tiny_splits(), CONFIG, method, progress=False, on_step=same_everywhere)
    torch.save({"state": model.state_dict(), "differing": steps_differing},
               os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("method_name", ["qareg", "lsq"])
def test_two_gloo_ranks_stay_identical_and_match_one_process(tmp_path, method_name):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path), method_name), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["differing"] == [] and ranks[1]["differing"] == []

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, method = prepared_lenet(method_name)
        train(single, tiny_splits(), CONFIG, method, progress=False)
    finally:
        torch.set_num_threads(threads)
    # Summing a batch's gradient in two halves rounds differently from one sum; under lsq's
    # rounding a weight on the edge of a step may then round the other way. The ranks above
    # are bit-identical; against one process the weights agree to a small share of a step.
    tolerance = {"qareg": 1e-6, "lsq": 1e-4}[method_name]
    for name, expected in single.state_dict().items():
        got = ranks[0]["state"][name]
        assert torch.allclose(got, expected, rtol=1e-4, atol=tolerance), (
            name, (got - expected).abs().max().item())
    # the method's own parameters moved during training, and moved the same way
    own = {"qareg": "features.0.weight_codebook.normalized",
           "lsq": "features.0.parametrizations.weight.0.step"}[method_name]
    start = prepared_lenet(method_name)[0].state_dict()[own]
    assert not torch.equal(single.state_dict()[own], start)


def test_torchrun_launches_the_cli_on_two_processes(fashion_dir, tmp_path):
    argv = ["train", "--method", "qareg", "--model", "lenet5", "--data-dir", str(fashion_dir),
            "--val-size", "200", "--epochs", "1", "--batch-size", "64", "--k", "4",
            "--lam", "100", "--lr", "0.02", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single.pt", tmp_path / "ddp.pt"
    subprocess.run([sys.executable, "-m", "qareg", *argv, "--out", str(single)], env=env,
                   check=True, capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
              "-m", "qareg", *argv, "--out", str(multi)]
    done = subprocess.run(launch, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, _ = load_checkpoint(single)
    got, meta = load_checkpoint(multi)
    assert meta["method"] == "qareg"
    for name, tensor in expected.state_dict().items():
        assert torch.allclose(got.state_dict()[name], tensor, rtol=1e-4, atol=1e-6), name
