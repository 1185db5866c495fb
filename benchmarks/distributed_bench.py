"""Member-parallel training (issue 6): bytes communicated per step, collective times, step time with 1 and N processes.

    python benchmarks/distributed_bench.py [--presets mlp-256x4 cnn-10 densenet-100-12x4] [--nproc 2] [--rounds 3]
        [--out benchmarks/results/distributed.json]

For each preset, on the input shape of its paper data set (Fashion-MNIST 1x28x28 / 10 classes for MLPs, CIFAR-10
3x32x32 / 10 for cnn-10, CIFAR-100 3x32x32 / 100 for DenseNets):

1. Bytes per training step, computed: member-parallel all-reduces B x K + 2 float32 (the members' sum of logits and
   two loss sums); data-parallel training of the same ensemble all-reduces every parameter gradient (and, as DDP does
   by default, broadcasts the batch-norm buffers). Also the per-epoch traffic of the member-parallel run (validation
   outputs and checkpoint state gathered to rank 0), which the per-step figure leaves out.
2. Measured on this machine with N gloo processes: the time of one all-reduce of each of those two payloads.
3. Measured: the time of one real training step (``Trainer.train_epoch``: forward, modular loss, the step's
   all-reduce, backward, SGD update) with 1 process using every core, 1 process with 1 thread, and N processes
   under torchrun (``edgens.distributed.DistributedTrainer``, OMP_NUM_THREADS = cores / N each). Inputs are random
   tensors of the data set's shape: the values do not change the time. DenseNet and CNN steps use small batches
   here (see ``TIMING_BATCH``) because a CPU step at batch 100 takes seconds (cnn-10) to a minute (DenseNet).

The N-process part runs this file under ``python -m torch.distributed.run --standalone --nproc-per-node N`` with
``--worker``; rank 0 writes its measurements to a JSON file that the parent reads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgens.config import TrainConfig
from edgens.data import Dataset
from edgens.distributed.comm import Communicator, process_group
from edgens.distributed.trainer import DistributedTrainer
from edgens.fileio import atomic_write_text
from edgens.presets import PRESETS, preset_spec
from edgens.rundir import RunDir
from edgens.stacks import build_stack
from edgens.train import Trainer

# preset -> (input shape, classes, validation size) of the paper's data set for it
DATA = {"mlp": ((1, 28, 28), 10, 10_000), "cnn": ((3, 32, 32), 10, 5_000), "densenet": ((3, 32, 32), 100, 5_000)}
BATCH = 100  # the paper's (and edgens's default) training batch, for the byte counts
TIMING_BATCH = {"mlp-256x4": 100, "cnn-10": 25, "densenet-100-12x4": 4}
TIMING_STEPS = {"mlp-256x4": 30, "cnn-10": 4, "densenet-100-12x4": 2}
FLOAT = 4  # bytes of a float32


def data_of(preset: str) -> tuple[tuple[int, ...], int, int]:
    return DATA[PRESETS[preset]["kind"]]


def communication(preset: str, world: int) -> dict:
    """Bytes per step (member- vs data-parallel) and per epoch (member-parallel gathers), computed from the stack."""
    shape, classes, n_val = data_of(preset)
    stack = build_stack(preset_spec(preset, shape, classes))
    params = sum(p.numel() for p in stack.parameters())
    buffers = sum(b.numel() for b in stack.buffers() if b.dtype.is_floating_point)
    member = (BATCH * classes + 2) * FLOAT
    data_parallel = params * FLOAT
    ring = 2 * (world - 1) / world  # bytes each rank sends per payload byte in a ring all-reduce
    return {
        "preset": preset, "n_members": stack.n_members, "parameters": params, "float_buffers": buffers,
        "batch": BATCH, "classes": classes,
        "member_parallel_bytes_per_step": member,
        "data_parallel_bytes_per_step": data_parallel,
        "data_parallel_buffer_broadcast_bytes_per_step": buffers * FLOAT,
        "ratio_data_over_member": data_parallel / member,
        "ring_bytes_sent_per_rank_factor": ring,
        "member_parallel_epoch_gather_bytes": {
            "validation_outputs": stack.n_members * n_val * classes * FLOAT,
            "checkpoint_model_and_momentum": (2 * params + buffers) * FLOAT,
        },
    }


def synthetic_dataset(shape: tuple[int, ...], classes: int, n_train: int) -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_train + 2 * 8, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, size=len(images)).astype(np.int64)
    channels = shape[0]
    return Dataset("synthetic", "categorical", classes, None, images[:n_train], labels[:n_train],
                   images[n_train:n_train + 8], labels[n_train:n_train + 8], images[-8:], labels[-8:],
                   np.full(channels, 127.5, np.float32), np.full(channels, 64.0, np.float32))


def step_times(preset: str, rounds: int, comm: Communicator | None = None) -> list[float]:
    """Seconds per training step, one value per timed epoch (after one warm-up epoch)."""
    shape, classes, _ = data_of(preset)
    batch, steps = TIMING_BATCH[preset], TIMING_STEPS[preset]
    dataset = synthetic_dataset(shape, classes, batch * steps)
    config = TrainConfig(preset=preset, lam=0.99, epochs=1, batch_size=batch, device="cpu")
    spec = preset_spec(preset, shape, classes)
    run = RunDir(Path(tempfile.gettempdir()) / "edgens-distributed-bench-unused")
    if comm is None:
        trainer = Trainer(config, run, dataset, spec, torch.device("cpu"))
    else:
        trainer = DistributedTrainer(config, run, dataset, spec, torch.device("cpu"), comm)
    trainer.train_epoch(0)  # warm-up
    times = []
    for epoch in range(1, rounds + 1):
        if comm is not None:
            torch.distributed.barrier()  # start together: a rank's step waits for the slowest rank anyway
        started = time.perf_counter()
        trainer.train_epoch(epoch)
        times.append((time.perf_counter() - started) / steps)
    return times


def allreduce_times(comm: Communicator, numel: int, repeats: int) -> list[float]:
    tensor = torch.zeros(numel)
    comm.sum_(tensor)  # warm-up (connection buffers)
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        started = time.perf_counter()
        comm.sum_(tensor)
        times.append(time.perf_counter() - started)
    return times


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: all-reduce and step timings; rank 0 writes them to ``args.worker_out``."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results: dict = {}
    with process_group(timeout_s=600) as comm:
        for preset in args.presets:
            info = communication(preset, comm.world_size)
            results[preset] = {
                "allreduce_member_payload_s": allreduce_times(comm, info["member_parallel_bytes_per_step"] // FLOAT,
                                                              args.allreduce_repeats),
                "allreduce_gradient_payload_s": allreduce_times(comm, info["parameters"], args.allreduce_repeats),
                "step_s": step_times(preset, args.rounds, comm),
                "threads_per_process": torch.get_num_threads(),
            }
        if comm.is_main:
            Path(args.worker_out).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(TIMING_BATCH), choices=sorted(TIMING_BATCH))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per configuration")
    parser.add_argument("--allreduce-repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    cores = os.cpu_count() or 1
    report: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": cores,
                                "torch": torch.__version__, "load_average_before": os.getloadavg(),
                                "env": {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}},
                    "nproc": args.nproc, "timing_batch": TIMING_BATCH, "timing_steps": TIMING_STEPS, "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "workers.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // args.nproc)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(args.nproc), __file__, "--worker", "--worker-out", str(out), "--rounds", str(args.rounds),
                   "--allreduce-repeats", str(args.allreduce_repeats), "--presets", *args.presets]
        subprocess.run(command, check=True, env=env)
        workers = json.loads(out.read_text())
    for preset in args.presets:
        info = communication(preset, args.nproc)
        torch.set_num_threads(cores)
        single = step_times(preset, args.rounds)
        torch.set_num_threads(1)
        single_thread = step_times(preset, args.rounds)
        multi = workers[preset]
        info.update({
            "timing_batch": TIMING_BATCH[preset],
            "step_ms_1_process": 1000 * statistics.median(single),
            "step_ms_1_process_1_thread": 1000 * statistics.median(single_thread),
            f"step_ms_{args.nproc}_processes": 1000 * statistics.median(multi["step_s"]),
            "threads": {"1_process": cores, f"{args.nproc}_processes": multi["threads_per_process"]},
            "allreduce_ms_member_payload": 1000 * statistics.median(multi["allreduce_member_payload_s"]),
            "allreduce_ms_gradient_payload": 1000 * statistics.median(multi["allreduce_gradient_payload_s"]),
            "raw": {"step_s_1_process": single, "step_s_1_process_1_thread": single_thread,
                    f"step_s_{args.nproc}_processes": multi["step_s"]},
        })
        report["presets"][preset] = info
        print(f"{preset:18s} member-parallel {info['member_parallel_bytes_per_step']:>9,d} B/step "
              f"({info['allreduce_ms_member_payload']:.3f} ms)  data-parallel "
              f"{info['data_parallel_bytes_per_step']:>11,d} B/step ({info['allreduce_ms_gradient_payload']:.2f} ms)  "
              f"x{info['ratio_data_over_member']:,.0f}  "
              f"step (batch {TIMING_BATCH[preset]}): 1 proc {info['step_ms_1_process']:.1f} ms "
              f"(1 thread {info['step_ms_1_process_1_thread']:.1f}), {args.nproc} procs "
              f"{info[f'step_ms_{args.nproc}_processes']:.1f} ms", flush=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
