"""Cost of the regularizer in a training step: vgg16 plain, with qareg's penalty, with DKM.

One SGD-with-momentum step (forward, cross-entropy, backward, optimizer step) on a fixed
random batch of 3x32x32 images, in four configurations built from the same initial weights:
  plain       the task loss only;
  qareg       `qareg.prepare(model, k)` (every Conv and Linear weight), loss = task + lam *
              qareg.penalty(model), the hard variant, computed after the forward pass as the
              engine does;
  qareg_torch the same through the penalty's torch kernels (what other devices and dtypes
              run; on the CPU before the compiled kernels of `qareg.penalty_cpu`);
  qareg_snapped  qareg's default training step: the forward pass inside
              `qareg.straight_through(model, terms)` (snapped weights, straight-through
              gradients), plus the penalty found in the same pass, as QaregMethod runs it;
  qareg_snapped_unfused  the same with the penalty computed after the pass (a second
              nearest lookup): qareg's step before the two were fused;
  qareg_rate  qareg_snapped plus issue 17's rate term (`qareg.rate`), each large tensor
              read through the strided sample qareg trains with (`QaregConfig.rate_sample`);
  qareg_rate_full  the same reading every weight every step;
  qareg_soft  the same with the soft variant, whose (N, 3) candidate tensors cost more;
  dkm         every Conv and Linear weight replaced in the forward pass by
              `dkm_soft_weights(weight, centroids, temperature)`, k learnable centroids per
              layer (torch.nn.utils.parametrize), loss = task.

Time: all configurations live in one process and take turns, one step each per round
(plain, qareg, qareg_soft, dkm, plain, ...), so that load from other processes on a shared
machine falls on all of them alike. After `--warmup` rounds, `--rounds` rounds are timed;
a configuration's time ratio is the median over rounds of its step time over the plain
step of the same round (the ratio of median times is recorded too). The load average before
and after is recorded: on a machine shared with other jobs step times swing by tens of per
cent, more than the differences measured here, so compare runs made under similar load.

Memory: one child process per configuration, so that no other model shares its memory.
After building everything (model, codebooks, optimizer, batch) the child returns freed heap
memory to the system (malloc_trim), resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and runs `--memory-steps` steps; the peak is VmHWM afterwards: the
whole process's peak resident memory during training steps, Python and torch included,
which is what the acceptance compares. The step's own share, peak minus the resident memory
before the first step, is recorded beside it. Children run with glibc's
MALLOC_MMAP_THRESHOLD_=65536, so that every block of 64 KiB or more is returned to the
system when freed: resident memory then follows live tensors, instead of what glibc happens
to keep cached, which moved the plain step's peak by +-80 MiB between runs. On CUDA the peak
is torch.cuda.max_memory_allocated over the same steps.

Codebooks start from quantiles (`--init`): the step costs the same whatever their values,
and the default k-means init runs compiled numba code whose JIT stays resident (about
70 MiB here), a fixed cost of the process that would otherwise count against qareg alone.

    python benchmarks/regularizer_cost.py --out benchmarks/results/regularizer-cost-vgg16.jsonl
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numba
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import qareg
from qareg import penalty_cpu
from qareg.bench import append_row
from qareg.constants import DEFAULT_LAYERS
from qareg.methods import create_method
from qareg.methods.dkm import dkm_soft_weights
from qareg.methods.qareg import QaregConfig
from qareg.provenance import provenance
from qareg.quantize import weighted_sum
from qareg.rate import model_rate_bits

RATE_SAMPLE = QaregConfig.rate_sample  # qareg's default: the rate term samples large tensors


def numba_layer() -> str | None:
    """The threading layer numba's compiled passes ran on (None if none ran)."""
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel launched in this process
        return None


CONFIGS = ("plain", "qareg", "qareg_torch", "qareg_snapped", "qareg_snapped_unfused",
           "qareg_rate", "qareg_rate_full", "qareg_soft", "dkm", "lsq")
TIME_LIMIT, MEMORY_LIMIT = 1.05, 1.10  # acceptance, for qareg against plain


class DKMWeight(nn.Module):
    """Parametrization: a layer's weight as DKM's attention-weighted mix of k centroids."""

    def __init__(self, weight: torch.Tensor, k: int, temperature: float) -> None:
        super().__init__()
        w = weight.detach().flatten().sort().values
        positions = torch.linspace(0, w.numel() - 1, k).round().long()
        self.centroids = nn.Parameter(w[positions].clone())  # (k,) quantiles
        # squared weight units: `temperature` times the layer's mean square
        self.temperature = temperature * w.square().mean().item()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return dkm_soft_weights(weight, self.centroids, self.temperature)


def build(config: str, args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)
    model = qareg.create_model(args.model, 10, 3, 32)
    if config.startswith("qareg"):
        qareg.prepare(model, args.k, init=args.init, seed=args.seed)
    elif config == "lsq":  # LSQ's quantizers at log2(k) bits: the rival step of issue 17
        create_method("lsq").prepare(model, max(1, (args.k - 1).bit_length()), args.seed)
    elif config == "dkm":
        for module in list(model.modules()):
            if isinstance(module, DEFAULT_LAYERS):
                parametrize.register_parametrization(
                    module, "weight", DKMWeight(module.weight, args.k, args.dkm_temperature))
    model.to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer


def train_step(config: str, model: nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, lam: float, step: int = 0) -> None:
    torch_kernels = config == "qareg_torch"
    with (mock.patch.object(penalty_cpu, "supports", lambda weights: False) if torch_kernels
          else nullcontext()):
        snapped = config in ("qareg_snapped", "qareg_snapped_unfused", "qareg_rate",
                             "qareg_rate_full")
        terms = {} if config != "qareg_snapped_unfused" else None  # fused as QaregMethod does
        with qareg.straight_through(model, terms) if snapped else nullcontext():
            task = F.cross_entropy(model(x), y)
        penalty = weighted_sum(terms) if terms else None  # found while snapping
        if config in ("qareg", "qareg_torch", "qareg_snapped", "qareg_snapped_unfused"):
            loss = task + lam * (penalty if penalty is not None else qareg.penalty(model))
        elif config in ("qareg_rate", "qareg_rate_full"):  # with issue 17's rate term
            sample = RATE_SAMPLE if config == "qareg_rate" else 0
            rate = model_rate_bits(qareg.quantize.quantized_tensors(model), 0.05, sample, step)
            loss = task + lam * (penalty + rate)
        elif config == "qareg_soft":
            loss = task + lam * qareg.penalty(model, "soft")
        else:
            loss = task
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)  # (B, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,), generator=g)  # (B,)
    return x.to(args.device), y.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resident_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def measure_memory(config: str, args: argparse.Namespace) -> dict:
    """Peak memory of `--memory-steps` steps of one configuration (run in a child)."""
    model, optimizer = build(config, args)
    x, y = batch(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass  # not glibc: freed heap memory may stay resident, counted as before
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = resident_kib("VmRSS") * 1024
    for step in range(args.memory_steps):
        train_step(config, model, optimizer, x, y, args.lam, step)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resident_kib("VmHWM") * 1024
    return {"peak_bytes": peak, "before_bytes": before}


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # memory children only, see the docstring


def memory_in_child(config: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--memory-child", config, *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True, check=True,
                          env={**os.environ, **MALLOC_ENV})
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_time(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds of every timed step, per configuration, interleaved."""
    runs = {config: build(config, args) for config in args.configs}
    x, y = batch(args)
    times: dict[str, list[tuple[float, float]]] = {config: [] for config in args.configs}
    for round_ in range(args.warmup + args.rounds):
        for config, (model, optimizer) in runs.items():
            sync(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(config, model, optimizer, x, y, args.lam, round_)
            sync(args.device)
            if round_ >= args.warmup:
                times[config].append((time.perf_counter() - wall, time.process_time() - cpu))
        print(f"round {round_ + 1}/{args.warmup + args.rounds}: " + ", ".join(
            f"{c} {t[-1][0]:.2f}s" for c, t in times.items() if t), flush=True)
    return times


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--lam", type=float, default=1.0)  # penalty weight; no effect on cost
    parser.add_argument("--init", default="quantile")  # codebook init; see the docstring
    parser.add_argument("--dkm-temperature", type=float, default=0.05)  # x layer mean square
    parser.add_argument("--rounds", type=int, default=5)  # timed rounds after the warm-up
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/regularizer-cost-vgg16.jsonl"))
    parser.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args)))
        return
    assert args.configs[0] == "plain", "the first configuration must be plain, the reference"
    threads = torch.get_num_threads()
    print(f"{args.model}, batch {args.batch}, k {args.k}, device {args.device}, "
          f"{threads} threads, {machine(args.device)}", flush=True)
    memory = {config: memory_in_child(config, args) for config in args.configs}
    load_before = os.getloadavg()[0]
    times = measure_time(args)
    load_after = os.getloadavg()[0]

    plain_walls = [wall for wall, _ in times["plain"]]
    common = {"model": args.model, "batch": args.batch, "k": args.k, "lam": args.lam,
              "init": args.init,
              "dkm_temperature": args.dkm_temperature, "seed": args.seed,
              "rounds": args.rounds, "warmup": args.warmup, "memory_steps": args.memory_steps,
              "device": args.device, "machine": machine(args.device), "threads": threads,
              "interleaved": list(args.configs), "memory_child_env": MALLOC_ENV,
              "load_average_1min": [load_before, load_after],
              "numba_threading_layer": numba_layer(), **provenance()}
    rows = []
    for config in args.configs:
        walls = [wall for wall, _ in times[config]]
        cpus = [cpu for _, cpu in times[config]]
        mem, plain_mem = memory[config], memory["plain"]
        row = {
            **common, "config": config,
            "step_seconds": [round(t, 4) for t in walls],
            "step_seconds_median": statistics.median(walls),
            "cpu_seconds_median": statistics.median(cpus),
            "time_ratio": statistics.median(w / p for w, p in zip(walls, plain_walls, strict=True)),
            "time_ratio_of_medians": statistics.median(walls) / statistics.median(plain_walls),
            "cpu_time_ratio": statistics.median(cpus) / statistics.median(
                cpu for _, cpu in times["plain"]),
            "peak_bytes": mem["peak_bytes"], "before_bytes": mem["before_bytes"],
            "memory_ratio": mem["peak_bytes"] / plain_mem["peak_bytes"],
            "step_memory_ratio": (mem["peak_bytes"] - mem["before_bytes"])
            / (plain_mem["peak_bytes"] - plain_mem["before_bytes"]),
        }
        if config == "qareg":
            row["pass"] = row["time_ratio"] <= TIME_LIMIT and row["memory_ratio"] <= MEMORY_LIMIT
        rows.append(row)

    print(f"\n{'config':<11} {'step s':>7} {'time x':>7} {'cpu x':>6} {'peak MiB':>9} "
          f"{'mem x':>6} {'step MiB':>9} {'step mem x':>10}")
    for r in rows:
        print(f"{r['config']:<11} {r['step_seconds_median']:>7.3f} {r['time_ratio']:>7.3f} "
              f"{r['cpu_time_ratio']:>6.3f} {r['peak_bytes'] / 2**20:>9.0f} "
              f"{r['memory_ratio']:>6.3f} {(r['peak_bytes'] - r['before_bytes']) / 2**20:>9.0f} "
              f"{r['step_memory_ratio']:>10.3f}")
    print(f"load average (1 min) {load_before:.2f} before timing, {load_after:.2f} after, "
          f"on {os.cpu_count()} CPUs")
    qr = next((r for r in rows if r["config"] == "qareg"), None)
    if qr is not None:
        print(f"\nqareg time {qr['time_ratio']:.3f} (limit {TIME_LIMIT}), memory "
              f"{qr['memory_ratio']:.3f} (limit {MEMORY_LIMIT}): "
              f"{'PASS' if qr['pass'] else 'FAIL'}")
    for row in rows:
        append_row(args.out, row)


if __name__ == "__main__":
    main()
