"""Small but real deployment bundles for the runtime's tests and benchmark smoke runs, built without torch.

Each member is a one-hidden-layer MLP (or a linear map) held as numpy weights. A stack is a real ONNX graph written
with ``onnx.helper`` that computes several members at once, ``x (B, *shape) -> eta (members, B, K)``, in the fused
form the exporter uses (one matmul into all members' hidden units, one batched matmul out). The same numpy weights
give the expected predictions member by member (:meth:`SyntheticBundle.expected`), independently of the runtime.

The members are random-feature classifiers whose output layer is fitted by ridge regression on synthetic
Fashion-MNIST-like data (:func:`make_data`), so single members are weak and the ensemble is better: the curves a
benchmark draws on this bundle have the right shape.

Run as a script to write a bundle and a data file for a benchmark smoke run::

    python tests/runtime/bundle_factory.py OUT_DIR [--members 16 --per-stack 4 --hidden 64]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as a script
    sys.path.insert(0, str(ROOT))

from edgens.fileio import atomic_write_bytes, sha256_file  # noqa: E402
from edgens.runtime.bundle import (  # noqa: E402
    Curves, InputSpec, Manifest, MemberInfo, Metrics, Preprocessing, SelfTestInfo, SpecialistInfo, SplitMetrics,
    StackInfo, TrainingInfo, write_manifest)
from edgens.runtime.outliers import fit_thresholds  # noqa: E402

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
PROTOTYPE_SEED = 1234  # the classes are the same whatever seed a data set or bundle uses


@dataclass
class Member:
    """Weights of one member: ``eta = relu(x @ w1 + b1) @ w2 + b2`` (or ``x @ w2 + b2`` without hidden layer)."""

    w1: np.ndarray | None
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray

    def eta(self, x: np.ndarray) -> np.ndarray:
        """Natural parameters (B, K) in float64 for normalised, flattened input (B, D)."""
        h = x.astype(np.float64)
        if self.w1 is not None:
            h = np.maximum(h @ self.w1.astype(np.float64) + self.b1, 0.0)
        return h @ self.w2.astype(np.float64) + self.b2


@dataclass
class SyntheticBundle:
    """A bundle on disk and the weights it was built from."""

    path: Path
    manifest: Manifest
    members: dict[int, Member]
    mean: np.ndarray
    std: np.ndarray
    family: str
    stack_members: dict[str, list[int]] = field(default_factory=dict)

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """(B, D) float64: the bundle's preprocessing, written out independently of the runtime."""
        x = raw.astype(np.float64).reshape(len(raw), len(self.mean), -1)
        x = (x - self.mean[None, :, None]) / self.std[None, :, None]
        return x.reshape(len(raw), -1)

    def member_etas(self, raw: np.ndarray, ids: list[int]) -> np.ndarray:
        """(len(ids), B, K) natural parameters of the given members."""
        x = self.normalise(raw)
        return np.stack([self.members[i].eta(x) for i in ids])

    def expected_eta(self, raw: np.ndarray, ids: list[int]) -> np.ndarray:
        """Mean natural parameters over the given members (B, K)."""
        return self.member_etas(raw, ids).mean(axis=0)

    def expected(self, raw: np.ndarray, ids: list[int]) -> np.ndarray:
        """The ensemble prediction of the given members: mean of natural parameters, then the inverse link."""
        eta = self.expected_eta(raw, ids)
        if self.family == "categorical":
            e = np.exp(eta - eta.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return eta if self.family == "gaussian" else np.exp(eta)

    @property
    def order(self) -> list[int]:
        return list(self.manifest.order)


def make_data(n: int, seed: int, n_classes: int = 10, shape: tuple[int, ...] = (1, 28, 28),
              noise: float = 60.0, separation: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST-like data: uint8 images ``(n, *shape)`` around one random prototype per class, and labels.

    The prototypes differ by ``separation`` per pixel, far less than the ``noise``: single members are weak.
    """
    proto_rng = np.random.default_rng(PROTOTYPE_SEED)
    base = proto_rng.uniform(60, 190, size=int(np.prod(shape)))
    protos = base + proto_rng.normal(0.0, separation, size=(n_classes, base.size))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    x = protos[y] + rng.normal(0.0, noise, size=(n, protos.shape[1]))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape((n, *shape)), y.astype(np.int64)


def _fit_members(n_members: int, hidden: int, family: str, n_outputs: int, shape: tuple[int, ...],
                 mean: np.ndarray, std: np.ndarray, seed: int) -> dict[int, Member]:
    rng = np.random.default_rng(seed)
    raw, y = make_data(600, seed + 1, n_classes=max(n_outputs, 2), shape=shape)
    d = int(np.prod(shape))
    x = ((raw.reshape(len(raw), shape[0], -1).astype(np.float64) - mean[None, :, None]) / std[None, :, None]
         ).reshape(len(raw), d)
    if family == "categorical":
        target = np.eye(n_outputs)[y] * 6.0 - 3.0  # logits of about +-3
    elif family == "gaussian":
        target = (y[:, None] - 4.5) / 3.0
    else:
        target = np.log1p(y[:, None].astype(np.float64))
    members = {}
    for j in range(n_members):
        if hidden:
            w1 = rng.normal(0.0, 1.0 / np.sqrt(d), size=(d, hidden)).astype(np.float32)
            b1 = rng.normal(0.0, 0.1, size=hidden).astype(np.float32)
            features = np.maximum(x @ w1 + b1, 0.0)
        else:
            w1 = b1 = None
            features = x
        # Ridge regression on a random half: members differ in features and data, as an ensemble's members do.
        rows = rng.permutation(len(x))[: len(x) // 2]
        a = np.hstack([features[rows], np.ones((len(rows), 1))])
        solution = np.linalg.solve(a.T @ a + 3.0 * np.eye(a.shape[1]), a.T @ target[rows])
        members[j] = Member(w1, b1, solution[:-1].astype(np.float32), solution[-1].astype(np.float32))
    return members


def stack_graph(members: list[Member], input_shape: tuple[int, ...], n_outputs: int, input_name: str = "x",
                output_name: str = "eta") -> onnx.ModelProto:
    """A real ONNX graph computing the given members at once: ``x (B, *shape) -> eta (members, B, K)``."""
    m = len(members)
    inits = []
    nodes = [helper.make_node("Flatten", [input_name], ["flat"], axis=1)]
    if members[0].w1 is not None:
        hidden = members[0].w1.shape[1]
        inits += [numpy_helper.from_array(np.concatenate([mb.w1 for mb in members], axis=1), "w1"),
                  numpy_helper.from_array(np.concatenate([mb.b1 for mb in members]), "b1"),
                  numpy_helper.from_array(np.array([0, m, hidden], dtype=np.int64), "split_shape"),
                  numpy_helper.from_array(np.stack([mb.w2 for mb in members]), "w2"),
                  numpy_helper.from_array(np.stack([mb.b2 for mb in members])[:, None, :], "b2")]
        nodes += [helper.make_node("MatMul", ["flat", "w1"], ["h0"]),
                  helper.make_node("Add", ["h0", "b1"], ["h1"]),
                  helper.make_node("Relu", ["h1"], ["h2"]),
                  helper.make_node("Reshape", ["h2", "split_shape"], ["h3"]),  # (B, m, H)
                  helper.make_node("Transpose", ["h3"], ["h4"], perm=[1, 0, 2]),  # (m, B, H)
                  helper.make_node("MatMul", ["h4", "w2"], ["o0"]),  # batched: (m, B, H) @ (m, H, K)
                  helper.make_node("Add", ["o0", "b2"], [output_name])]
    else:
        inits += [numpy_helper.from_array(np.concatenate([mb.w2 for mb in members], axis=1), "w"),
                  numpy_helper.from_array(np.concatenate([mb.b2 for mb in members]), "b"),
                  numpy_helper.from_array(np.array([0, m, n_outputs], dtype=np.int64), "split_shape")]
        nodes += [helper.make_node("MatMul", ["flat", "w"], ["o0"]),
                  helper.make_node("Add", ["o0", "b"], ["o1"]),
                  helper.make_node("Reshape", ["o1", "split_shape"], ["o2"]),
                  helper.make_node("Transpose", ["o2"], [output_name], perm=[1, 0, 2])]
    graph = helper.make_graph(
        nodes, "stack",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [m, "batch", n_outputs])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgens-tests")
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def _write_stack(bundle: Path, name: str, role: str, ids: list[int], members: dict[int, Member],
                 input_shape: tuple[int, ...], n_outputs: int, flops: dict[int, int]) -> StackInfo:
    relative = f"stacks/{name}.onnx"
    model = stack_graph([members[i] for i in ids], input_shape, n_outputs)
    atomic_write_bytes(bundle / relative, model.SerializeToString())
    return StackInfo(name=name, role=role, file=relative, sha256=sha256_file(bundle / relative),
                     bytes=(bundle / relative).stat().st_size, members=list(ids),
                     flops=sum(flops[i] for i in ids))


def make_bundle(path: str | Path, *, n_members: int = 6, per_stack: int | list[int] = 2, hidden: int = 8,
                family: str = "categorical", n_outputs: int | None = None,
                input_shape: tuple[int, ...] = (1, 28, 28), order: list[int] | None = None,
                specialists: dict[int, list[int]] | None = None, prefixes: list[int] | None = None,
                seed: int = 0, outliers: bool = False, self_test: bool = False) -> SyntheticBundle:
    """Write a bundle with real ONNX stacks to ``path``.

    Args:
        per_stack: members per general stack (an int, or the size of each stack in turn).
        hidden: hidden units per member (0: linear members).
        order: the anytime order (default: by id).
        specialists: ``{class index: member ids}`` (categorical only; default: class 3 with the last two members).
        prefixes: member counts of prefix stacks (each the end of a general stack; default: none).
        outliers: fit outlier thresholds on 1,000 synthetic validation examples (the members' numpy outputs).
        self_test: store 8 inputs and every stack's outputs on them, computed in numpy from the weights.
    """
    path = Path(path)
    n_outputs = n_outputs or (10 if family == "categorical" else 1)
    channels = input_shape[0]
    # Per-channel statistics in raw units, as the data loaders compute them on the training split.
    mean = np.linspace(120.0, 130.0, channels)
    std = np.linspace(60.0, 70.0, channels)
    members = _fit_members(n_members, hidden, family, n_outputs, input_shape, mean, std, seed)
    d = int(np.prod(input_shape))
    flop = 2 * (d * hidden + hidden * n_outputs) if hidden else 2 * d * n_outputs
    flops = {i: flop for i in members}
    order = list(range(n_members)) if order is None else list(order)
    sizes = [per_stack] * -(-n_members // per_stack) if isinstance(per_stack, int) else list(per_stack)
    stacks, start = [], 0
    for i, size in enumerate(sizes):
        ids = order[start:start + size]
        if ids:
            stacks.append(_write_stack(path, f"general-{i:03d}", "general", ids, members, input_shape, n_outputs,
                                       flops))
        start += size
    for n in prefixes or []:
        stacks.append(_write_stack(path, f"prefix-{n:04d}", "prefix", order[:n], members, input_shape, n_outputs,
                                   flops))
    if specialists is None:
        specialists = {3: order[-2:]} if family == "categorical" and n_members >= 2 else {}
    infos = []
    for c, ids in specialists.items():
        stack = _write_stack(path, f"specialist-{c}", "specialist", ids, members, input_shape, n_outputs, flops)
        stacks.append(stack)
        infos.append(SpecialistInfo(task=f"class-{c}", class_index=c, members=list(ids), stack=stack.name,
                                    val_f1={"greedy": 0.9, "best_of_random": 0.88, "random_mean": 0.8,
                                            "best_single": 0.85}))
    curve = [round(0.3 / np.sqrt(k), 4) for k in range(1, n_members + 1)]
    manifest = Manifest(
        family=family, n_outputs=n_outputs,
        class_names=CLASS_NAMES[:n_outputs] if family == "categorical" and n_outputs <= 10 else None,
        edgens_version="0.1.0",
        input=InputSpec(shape=tuple(input_shape), raw_dtype="uint8"),
        preprocessing=Preprocessing(mean=mean.tolist(), std=std.tolist()),
        training=TrainingInfo(preset="synthetic", lam=0.99, dataset="synthetic", config={"seed": seed}),
        members=[MemberInfo(id=i, params=int(d * hidden + hidden + hidden * n_outputs + n_outputs),
                            flops=flops[i], val_error=0.3, val_nll=0.9) for i in range(n_members)],
        order=order, order_method="index" if order == sorted(order) else "greedy",
        stacks=stacks, specialists=infos,
        curves=Curves(order_val_error=curve, index_val_error=curve, random_val_error=curve),
        metrics=Metrics(val=SplitMetrics(error=curve[-1], nll=0.5), test=SplitMetrics(error=curve[-1], nll=0.5)))
    if outliers:
        val_raw, _ = make_data(1000, seed + 5, n_classes=max(n_outputs, 2), shape=input_shape)
        bundle = SyntheticBundle(path=path, manifest=manifest, members=members, mean=mean, std=std, family=family)
        eta = bundle.member_etas(val_raw, order)
        positions = {m: i for i, m in enumerate(order)}
        manifest.outliers = fit_thresholds(eta, {s.name: [positions[m] for m in s.members]
                                                 for s in stacks if s.role == "general"}, family)
    if self_test:  # 64 inputs: outputs of the first 8, members' sums and sums of squares over all
        x_test, _ = make_data(64, seed + 6, n_classes=max(n_outputs, 2), shape=input_shape)
        bundle = SyntheticBundle(path=path, manifest=manifest, members=members, mean=mean, std=std, family=family)
        arrays: dict[str, np.ndarray] = {"x": x_test}
        for s in stacks:
            eta = bundle.member_etas(x_test, s.members)
            arrays.update({s.name: eta[:, :8].astype(np.float32), f"{s.name}.sum": eta.sum(axis=1),
                           f"{s.name}.square": (eta ** 2).sum(axis=1)})
        np.savez(path / "selftest.npz", **arrays)
        manifest.self_test = SelfTestInfo(file="selftest.npz", sha256=sha256_file(path / "selftest.npz"), examples=64)
    write_manifest(path, manifest)
    return SyntheticBundle(path=path, manifest=manifest, members=members, mean=mean, std=std, family=family,
                           stack_members={s.name: list(s.members) for s in stacks})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--per-stack", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args(argv)
    bundle = make_bundle(args.out / "bundle", n_members=args.members, per_stack=args.per_stack, hidden=args.hidden)
    x, y = make_data(args.examples, seed=99)
    np.savez(args.out / "test.npz", x=x, y=y)
    val_x, val_y = make_data(args.examples, seed=98)
    np.savez(args.out / "val.npz", x=val_x, y=val_y)
    print(f"wrote {bundle.path} and {args.out / 'test.npz'}, {args.out / 'val.npz'}")


if __name__ == "__main__":
    main()
