"""Training step time: fused member stacks vs one big network vs a per-member loop (issue 2's speed targets).

    python benchmarks/train_step.py [--batch 100] [--repeats 7] [--steps 30] [--out benchmarks/results/train_step.json]

Measures, in one run and interleaved (so machine noise hits every variant alike), the time of one SGD step
(forward, modular loss, backward, update) on a Fashion-MNIST-shaped batch for:
- ``mlp-256x4`` as one fused stack (edgens),
- ``mlp-1x1024`` (a single network with the same parameter count),
- ``mlp-256x4`` as 256 separate ``nn.Module`` networks called in a Python loop (what the paper's code and most
  libraries do), trained with the same loss,
and reports medians, ratios, and achieved GFLOP/s (FLOPs of the whole step counted by torch's FlopCounterMode) next
to the machine's large-matmul rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from edgens.fileio import atomic_write_text
from edgens.losses import modular_loss
from edgens.presets import create_stack
from edgens.stacks.reference import LoopEnsemble, reference_member


def make_step(model: torch.nn.Module, n_members: int, x: torch.Tensor, y: torch.Tensor, lam: float = 0.99):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        eta = model(x)
        loss = modular_loss(eta, y, lam, validate=False).total * n_members
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=30, help="steps timed per round and variant")
    parser.add_argument("--loop-steps", type=int, default=5, help="steps per round for the (slow) per-member loop")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    fused = create_stack("mlp-256x4", (1, 28, 28), 10)
    single = create_stack("mlp-1x1024", (1, 28, 28), 10)
    loop = LoopEnsemble([reference_member(fused.spec.with_members(1)) for _ in range(256)])
    variants = {"mlp-256x4 fused": (make_step(fused, 256, x, y), args.steps),
                "mlp-1x1024": (make_step(single, 1, x, y), args.steps),
                "mlp-256x4 per-member loop": (make_step(loop, 256, x, y), args.loop_steps)}
    flops = {name: step_flops(step) for name, (step, _) in variants.items()}
    for step, _ in variants.values():  # warm up
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (step, steps) in variants.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    rate = matmul_gflops()
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "batch": args.batch, "matmul_gflops_1024": round(rate, 1),
        "step_ms": {k: round(v, 3) for k, v in median.items()},
        "step_ms_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "gflops_per_step": {k: round(v / 1e9, 4) for k, v in flops.items()},
        "achieved_gflops": {k: round(flops[k] / (median[k] / 1e3) / 1e9, 1) for k in median},
        "ratio_fused_over_single": round(median["mlp-256x4 fused"] / median["mlp-1x1024"], 3),
        "speedup_fused_over_loop": round(median["mlp-256x4 per-member loop"] / median["mlp-256x4 fused"], 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
