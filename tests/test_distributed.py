"""Member-parallel training with real torch.distributed processes (gloo on CPU, 2 ranks).

References are independent of the distributed code: a single-process Trainer on the same seed and batch, the paper's
gradient formula dL/d eta_j = (1/M) (yhat_j - y - lam (yhat_j - ybar)) computed in numpy, and a single-process
training run with the same settings.

Nothing here is compared bitwise across processes: a rank computes its members with narrower matrix products than
the single process, in another process, with one thread, and MKL/oneDNN pick kernels by CPU, shape and thread
count, so the last bits differ from machine to machine. Instead:

- one step: the rank's outputs and gradients equal the single process's within a tolerance derived from float32
  rounding at the values' scale (:func:`_rounding_tolerance`), and the paper's formula;
- whole runs: the run directory equals a single-process run's up to rtol 1e-5, with few optimisation steps (16: 8
  epochs of 2 batches) so that the comparison stays well conditioned. Measured by injecting uniform noise of N
  float32 ulps of each gradient's scale at every step of a single-process run: the 80 steps this test used to take
  drifted by 6e-5 (relative, val ambiguity) with N = 30, as much as it did fail by on an Intel Xeon; 16 steps
  drift by at most 2e-6 with N = 100.

The tests fail if the distributed gradient is wrong (tried once each, by breaking edgens.distributed.comm): with
the all-reduce's backward scaled by the world size (what torch.distributed.nn's all_reduce would give), the one-step
test fails on every element of the gradients and the whole-run tests on the first epoch's training loss (2.2569 vs
2.2860, 1e-2 relative); with the all-reduce skipped (each rank its own ensemble), the one-step ensemble mean is off
by 0.29 (allowed: 2.5e-6) and the first epoch's training loss by 2e-2 relative.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from edgens.checkpoint import load_checkpoint
from edgens.config import TrainConfig
from edgens.data import load_dataset
from edgens.errors import ConfigError, DistributedError, RunDirectoryError
from edgens.presets import preset_spec
from edgens.rundir import RunDir
from edgens.stacks import build_stack
from edgens.train import Trainer, fault_generator, train

pytestmark = pytest.mark.distributed

WORLD = 2
EPOCHS = 8  # enough epochs to stop a run between its first and its last; 2 batches each keep the runs comparable
TRAIN_LIMIT = 200  # 2 batches of 100 per epoch: 16 optimisation steps in all (see the module docstring)
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _rounding_tolerance(reference: torch.Tensor | np.ndarray, ulps: float = 64) -> float:
    """An absolute tolerance of ``ulps`` float32 rounding units at the scale (largest magnitude) of ``reference``.

    Why 64: a reordered float32 sum of n terms differs by about sqrt(n) ulps of its terms' scale; the members'
    outputs come from dot products of 784 and 64 terms (sqrt: 28 and 8), and gradients from sums over a batch.
    """
    return ulps * FLOAT32_EPS * float(np.abs(np.asarray(reference, dtype=np.float64)).max()) + 1e-12


def _settings(data_dir: Path, **overrides) -> dict:
    settings = {"preset": "mlp-16x64", "lam": 0.95, "epochs": EPOCHS, "train_limit": TRAIN_LIMIT, "val_size": 1000,
                "data_dir": str(data_dir), "seed": 5}
    settings.update(overrides)
    return settings


def _cli_args(settings: dict) -> list[str]:
    names = {"preset": "--preset", "lam": "--lam", "epochs": "--epochs", "train_limit": "--train-limit",
             "val_size": "--val-size", "data_dir": "--data-dir", "seed": "--seed"}
    return [part for key, value in settings.items() for part in (names[key], str(value))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_rank(rank: int, port: int, world: int) -> None:
    """The environment torchrun would give this process."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)


def _spawn(worker: Callable[..., None], *args: object) -> None:
    """Run ``worker(rank, *args)`` in WORLD fresh processes; a failure in any of them fails the test."""
    mp.spawn(worker, args=args, nprocs=WORLD, join=True)


# --- pure functions: slices and state assembly -----------------------------------------------------------------
def test_member_slices_are_contiguous_and_balanced() -> None:
    from edgens.distributed.slices import member_slices

    assert member_slices(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert member_slices(256, 2) == [range(0, 128), range(128, 256)]
    with pytest.raises(ConfigError, match="3 processes for an ensemble of 2 members"):
        member_slices(2, 3)


def test_rank_state_is_the_subset_and_joins_back_to_the_whole() -> None:
    from edgens.distributed.slices import (concat_model_members, concat_optimizer_members, member_slices,
                                           take_model_members, take_optimizer_members)

    torch.manual_seed(0)
    stack = build_stack(preset_spec("cnn-10", (1, 12, 12), 10, n_members=5))  # batch norm: buffers and a 0-d counter
    optimizer = torch.optim.SGD(stack.parameters(), lr=0.1, momentum=0.9)
    stack(torch.randn(4, 1, 12, 12)).square().mean().backward()
    optimizer.step()
    state, opt_state = stack.state_dict(), optimizer.state_dict()
    slices = member_slices(5, 2)
    pieces = [take_model_members(state, 5, members) for members in slices]
    for members, piece in zip(slices, pieces):
        expected = stack.subset(list(members)).state_dict()  # the stack's own, independent slicing
        assert piece.keys() == expected.keys()
        for name in piece:
            assert torch.equal(piece[name], expected[name]), name
    joined = concat_model_members(pieces)
    assert all(torch.equal(joined[name], state[name]) for name in state)
    opt_pieces = [take_optimizer_members(opt_state, 5, members) for members in slices]
    joined_opt = concat_optimizer_members(opt_pieces)
    assert joined_opt["param_groups"] == opt_state["param_groups"]
    for index, entries in opt_state["state"].items():
        assert torch.equal(joined_opt["state"][index]["momentum_buffer"], entries["momentum_buffer"])
    with pytest.raises(RunDirectoryError, match="multiple of the 3 members"):
        take_model_members(state, 3, range(0, 1))


def test_torchrun_environment_is_read_and_checked() -> None:
    from edgens.distributed.launch import WorldInfo, torchrun_env

    assert torchrun_env({}) is None
    assert torchrun_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == WorldInfo(1, 4, 1)
    with pytest.raises(DistributedError, match="must be integers"):
        torchrun_env({"RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="0 <= RANK < WORLD_SIZE"):
        torchrun_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_launcher_refuses_to_nest_and_bad_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgens.distributed.launch import launch

    with pytest.raises(ConfigError, match="got 0"):
        launch(0, ["train"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="already is a torchrun worker"):
        launch(2, ["train"])


def test_distributed_training_needs_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgens.distributed import train_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="not started by torchrun"):
        train_distributed(TrainConfig(preset="mlp-16x64"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- one step: gradients against the single-process model and the paper's formula ------------------------------
def _gradient_worker(rank: int, port: int, cases: list[dict], out_dir: str) -> None:
    _as_rank(rank, port, WORLD)
    from edgens.distributed.comm import process_group
    from edgens.distributed.trainer import DistributedTrainer

    with process_group(timeout_s=60) as comm:
        datasets: dict = {}
        for number, case in enumerate(cases):
            config = TrainConfig(**case)
            key = (config.dataset, config.family)
            if key not in datasets:
                datasets[key] = load_dataset(config.dataset, config.data_dir, config.val_size, config.split_seed,
                                             config.family, config.train_limit)
            dataset = datasets[key]
            spec = preset_spec(config.preset, dataset.input_shape, dataset.n_outputs, config.n_members)
            run = RunDir(Path(out_dir) / "unused")
            results = {}
            for name, trainer in (("single", Trainer(config, run, dataset, spec, torch.device("cpu"))),
                                  ("rank", DistributedTrainer(config, run, dataset, spec, torch.device("cpu"), comm))):
                index = trainer.batches(0)[0]
                x, y = trainer.data["train"][0][index], trainer.data["train"][1][index]
                eta = trainer.model(x)
                eta.retain_grad()
                generator = fault_generator(config.seed, 0) if config.fault_weight else None
                masks = trainer.fault_masks(generator)
                parts, eta_bar = trainer.loss(eta, y, index, masks)
                (parts.total * spec.n_members).backward()  # as Trainer.train_epoch does
                results[name] = {"eta": eta.detach(), "eta_grad": eta.grad, "eta_bar": eta_bar, "y": y, "masks": masks,
                                 "parts": [float(getattr(parts, f).detach())
                                           for f in ("total", "ensemble_nll", "member_nll", "ambiguity")],
                                 "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()}}
            results["members"] = [trainer.members.start, trainer.members.stop]
            torch.save(results, Path(out_dir) / f"case{number}-rank{rank}.pt")


def _formula_gradient(eta: np.ndarray, y: np.ndarray, lam: float, family: str, anytime_weight: float = 0.0,
                      prefixes: tuple[int, ...] = (), fault_weight: float = 0.0,
                      masks: np.ndarray | None = None) -> np.ndarray:
    """The paper's dL/d eta_j times M, for the batch mean: (yhat_j - y - lam (yhat_j - ybar)) / B, in float64.

    With the anytime term mu * sum_k (k/M) NLL(mean of the first k), member j gets mu * sum_{k > j} (yhat(mean of
    the first k) - y) / B more (times M): each prefix it belongs to passes it 1/k of its gradient, times k/M.
    With the random-subset term nu * mean_r (k_r/M) mean_n NLL(mean of the members draw r kept), member j gets
    nu * sum_r mask_rj (yhat(subset r) - y) / (R B) more (times M), by the same 1/k times k/M."""
    eta = eta.astype(np.float64)
    batch = eta.shape[1]
    if family == "categorical":
        def mean(z: np.ndarray) -> np.ndarray:
            e = np.exp(z - z.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        target = np.eye(eta.shape[-1])[y]
    else:  # gaussian: the mean is eta itself
        def mean(z: np.ndarray) -> np.ndarray:
            return z
        target = y.astype(np.float64)[:, None]
    yhat, ybar = mean(eta), mean(eta.mean(0))
    grad = (yhat - target - lam * (yhat - ybar[None])) / batch
    for k in prefixes:
        grad[:k] += anytime_weight * (mean(eta[:k].mean(0)) - target) / batch
    if fault_weight:
        masks = masks.astype(np.float64)  # (R, M)
        for mask in masks:
            subset = eta[mask == 1].mean(0)
            grad[mask == 1] += fault_weight * (mean(subset) - target) / (len(masks) * batch)
    return grad


def test_one_step_gradients_equal_single_process(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=(x @ rng.normal(size=5)).astype(np.float32))
    fashion = {"data_dir": str(fashion_mnist_dir), "train_limit": 500, "val_size": 200, "seed": 11}
    cases = [
        {"preset": "mlp-16x64", "n_members": 5, "lam": 0.95, **fashion},  # uneven slices: 3 + 2 members
        {"preset": "cnn-10", "n_members": 3, "lam": 1.0, **fashion},  # grouped convolutions, batch norm
        {"preset": "mlp-64x16", "n_members": 4, "lam": 0.0, "method": "bagging", **fashion},  # weighted members
        {"preset": "mlp-16x64", "n_members": 4, "lam": 0.5, "family": "gaussian", "dataset": f"npz:{tmp_path}/reg.npz",
         "seed": 2, "batch_size": 64},
        # the anytime term: prefixes inside rank 0's slice (1, 2), at its end (3) and across both ranks (4)
        {"preset": "mlp-16x64", "n_members": 5, "lam": 0.99, "anytime_weight": 0.8, "prefixes": (1, 2, 3, 4),
         **fashion},
        {"preset": "mlp-16x64", "n_members": 4, "lam": 0.5, "family": "gaussian", "dataset": f"npz:{tmp_path}/reg.npz",
         "seed": 2, "batch_size": 64, "anytime_weight": 2.0, "prefixes": (1, 3)},
        # the random-subset term with the anytime term: subsets span both ranks' members
        {"preset": "mlp-16x64", "n_members": 5, "lam": 0.99, "anytime_weight": 0.5, "prefixes": (2,),
         "fault_weight": 0.7, "fault_draws": 3, **fashion},
    ]
    _spawn(_gradient_worker, _free_port(), cases, str(tmp_path))
    for number, case in enumerate(cases):
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"case{number}-rank{rank}.pt", weights_only=False)
            single, mine = got["single"], got["rank"]
            start, stop = got["members"]
            assert stop - start == [[3, 2], [2, 1], [2, 2], [2, 2], [3, 2], [2, 2], [3, 2]][number][rank]
            # the rank's members compute the single-process members' outputs (same initial weights; narrower
            # matrix products, so equal up to float32 rounding, not bitwise)
            reference = single["eta"][start:stop]
            torch.testing.assert_close(mine["eta"], reference, rtol=0, atol=_rounding_tolerance(reference))
            torch.testing.assert_close(mine["eta_bar"], single["eta_bar"], rtol=0,
                                       atol=_rounding_tolerance(single["eta_bar"]))
            # loss values: each on the scale of the NLLs it is made of (ambiguity is their difference)
            scale = max(abs(value) for value in single["parts"])
            np.testing.assert_allclose(mine["parts"], single["parts"], rtol=0, atol=_rounding_tolerance(scale))
            # gradients w.r.t. the members' outputs: the paper's formula, and the single-process autograd
            formula = _formula_gradient(single["eta"].numpy(), single["y"].numpy(), case["lam"],
                                        case.get("family", "categorical"), case.get("anytime_weight", 0.0),
                                        case.get("prefixes", ()), case.get("fault_weight", 0.0),
                                        None if single["masks"] is None else single["masks"].numpy())
            if case.get("method") != "bagging":  # the formula is for unweighted members
                np.testing.assert_allclose(mine["eta_grad"], formula[start:stop], rtol=0,
                                           atol=_rounding_tolerance(formula, 128))
                np.testing.assert_allclose(single["eta_grad"], formula, rtol=0, atol=_rounding_tolerance(formula, 128))
            np.testing.assert_allclose(mine["eta_grad"], single["eta_grad"][start:stop], rtol=0,
                                       atol=_rounding_tolerance(single["eta_grad"]))
            # parameter gradients: this rank's rows of the single-process gradients (member-blocked layout); sums
            # over the batch and the units, so a wider tolerance on the same scale
            m = case["n_members"]
            for name, grad in mine["grads"].items():
                full = single["grads"][name]
                rows = full.shape[0] // m
                expected = full[start * rows:stop * rows]
                assert grad.shape == expected.shape, name
                torch.testing.assert_close(grad, expected, rtol=0, atol=_rounding_tolerance(expected, 256),
                                           msg=f"case {number}, {name}")


# --- failures: an error on rank 0 reaches every rank; a silent rank becomes a timeout error ----------------------
class _Hung(Exception):
    pass


def _failure_worker(rank: int, ports: tuple[int, int], run_dir: str, out_dir: str) -> None:
    from edgens.distributed.comm import process_group
    from edgens.distributed.trainer import train_distributed

    _as_rank(rank, ports[0], WORLD)
    outcome: dict = {}
    try:  # rank 0 refuses the run directory; rank 1 must get the same error, not wait for rank 0
        train_distributed(TrainConfig(preset="mlp-16x64", train_limit=100, val_size=50), run_dir, timeout_s=60)
    except RunDirectoryError as err:
        outcome["refused"] = str(err)
    _as_rank(rank, ports[1], WORLD)
    done = Path(out_dir) / "rank0-done"
    try:
        with process_group(timeout_s=3) as comm:
            if rank == 0:
                started = time.monotonic()
                try:
                    comm.sum_(torch.ones(10), "a test all-reduce")
                except DistributedError as err:
                    outcome["hang"] = (str(err), time.monotonic() - started)
                done.touch()
            else:  # alive but silent: a hung rank, which never returns to the collectives
                deadline = time.monotonic() + 60
                while not done.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                raise _Hung
    except _Hung:
        pass
    (Path(out_dir) / f"failure-rank{rank}.json").write_text(json.dumps(outcome))


def test_rank_errors_and_hangs_become_clear_errors(tmp_path: Path) -> None:
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    _spawn(_failure_worker, (_free_port(), _free_port()), str(run_dir), str(tmp_path))
    outcomes = [json.loads((tmp_path / f"failure-rank{rank}.json").read_text()) for rank in range(WORLD)]
    for outcome in outcomes:
        assert "already exists and is not empty" in outcome["refused"]
    assert (run_dir / "notes.txt").read_text() == "mine" and len(list(run_dir.iterdir())) == 1
    message, waited = outcomes[0]["hang"]
    assert "rank 0 of 2: a test all-reduce failed" in message and "timeout (3 s)" in message
    assert 2.5 < waited < 15  # the group's timeout, not forever


# --- whole runs: torchrun, the launcher, a killed rank, resume ------------------------------------------------
@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    """The single-process reference run."""
    path = tmp_path_factory.mktemp("single") / "run"
    train(TrainConfig(**_settings(fashion_mnist_dir)), path)
    return path


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def _assert_close_records(got: object, expected: object, path: str = "") -> None:
    """Same structure, same non-float values, floats within 1e-5 (relative) / 1e-6 (absolute)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for key in expected:
            _assert_close_records(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_close_records(a, b, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), path
    else:
        assert got == expected, path


def _assert_same_run(distributed: Path, single: Path) -> None:
    """The run directories have the same files and format, and the same weights and metrics up to float rounding."""
    files = sorted(str(p.relative_to(single)) for p in single.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(distributed)) for p in distributed.rglob("*") if p.is_file()) == files
    a, b = RunDir(distributed), RunDir(single)
    config_a, config_b = a.config(), b.config()
    assert config_a["config"] == config_b["config"] and config_a["stack"] == config_b["stack"]
    assert config_a["data"] == config_b["data"]
    assert config_a["resolved"].pop("distributed")["world_size"] == WORLD
    assert config_a["resolved"] == config_b["resolved"]
    _assert_close_records(_strip(a.metrics()), _strip(b.metrics()))
    summary_a, summary_b = a.summary(), b.summary()
    summary_a.pop("train_time_s"), summary_b.pop("train_time_s")
    _assert_close_records(summary_a, summary_b)
    for name in ("last", "best"):
        state_a, state_b = (load_checkpoint(p / "checkpoints" / f"{name}.pt") for p in (distributed, single))
        assert state_a.keys() == state_b.keys()
        for key in state_a["model"]:
            torch.testing.assert_close(state_a["model"][key], state_b["model"][key], rtol=1e-5, atol=1e-6,
                                       msg=f"{name}.pt {key}")
        if name == "last":
            assert state_a["optimizer"]["param_groups"] == state_b["optimizer"]["param_groups"]
            assert state_a["scheduler"] == state_b["scheduler"] and state_a["best_epoch"] == state_b["best_epoch"]
            for index, entries in state_b["optimizer"]["state"].items():
                torch.testing.assert_close(state_a["optimizer"]["state"][index]["momentum_buffer"],
                                           entries["momentum_buffer"], rtol=1e-5, atol=1e-6)
    for split in ("val", "test"):
        (eta_a, y_a), (eta_b, y_b) = a.outputs(split), b.outputs(split)
        np.testing.assert_array_equal(y_a, y_b)
        np.testing.assert_allclose(eta_a, eta_b, rtol=1e-5, atol=1e-5)


def _worker_env() -> dict:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_torchrun_training_matches_single_process(tmp_path: Path, fashion_mnist_dir: Path, single_run: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "edgens", "train", *_cli_args(_settings(fashion_mnist_dir)), "--out", str(out), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=170, env=_worker_env())
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone reports
    assert summary["run"] == str(out) and summary["n_members"] == 16
    _assert_same_run(out, single_run)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def _ranks(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the workers the launcher started (their environment says which rank they are)."""
    ranks = {}
    for pid in _children(launcher_pid):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds worker processes through /proc")
def test_killed_rank_fails_the_launcher_and_the_run_resumes(tmp_path: Path, fashion_mnist_dir: Path,
                                                            single_run: Path) -> None:
    out = tmp_path / "run"
    launcher = subprocess.Popen(["edgens", "train", "--nproc-per-node", str(WORLD),
                                 *_cli_args(_settings(fashion_mnist_dir)), "--out", str(out), "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())
    try:
        deadline = time.monotonic() + 120
        while not RunDir(out).metrics() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = _ranks(launcher.pid)
        assert sorted(workers) == [0, 1], f"workers {workers}; launcher status {launcher.poll()}"
        for pid in workers.values():  # freeze both, so that what is on disk cannot change under the checks
            os.kill(pid, signal.SIGSTOP)
        finished_epochs = len(RunDir(out).metrics())
        assert 1 <= finished_epochs < EPOCHS and not RunDir(out).is_finished()
        killed = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        os.kill(workers[0], signal.SIGCONT)
        _, stderr = launcher.communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    assert waited < 60
    assert f"rank 1 (pid {workers[1]}) was killed by SIGKILL" in stderr, stderr[-3000:]
    assert f"edgens train --resume {out} --nproc-per-node 2" in stderr
    assert not RunDir(out).is_finished() and len(RunDir(out).metrics()) >= finished_epochs

    resumed = subprocess.run(["edgens", "train", "--resume", str(out), "--nproc-per-node", str(WORLD), "--quiet"],
                             capture_output=True, text=True, timeout=170, env=_worker_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, single_run)
