"""Member stacks: fused computation equals separate plain networks; subsets; sizes; presets."""

from __future__ import annotations

import math

import pytest
import torch

from edgens.errors import ConfigError, InputError
from edgens.presets import PRESETS, create_stack, preset_spec
from edgens.stacks import StackSpec, build_stack
from edgens.stacks.reference import reference_ensemble

# Small configurations of every kind (fast on CPU).
SMALL = {
    "mlp-1": StackSpec("mlp", 5, (1, 6, 6), 4, {"hidden": (8,)}),
    "mlp-2": StackSpec("mlp", 4, (10,), 3, {"hidden": (6, 5)}),
    "cnn": StackSpec("cnn", 3, (2, 9, 9), 4, {"channels": (4, 6, 8), "strides": (1, 2, 1)}),
    "cnn-no-bn": StackSpec("cnn", 3, (1, 8, 8), 4, {"channels": (4, 5), "strides": (2, 1), "batch_norm": False}),
    "densenet": StackSpec("densenet", 3, (3, 8, 8), 5, {"depth": 10, "growth": 3}),
}


def _warm_batch_norm(stack: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Run a few training batches so batch-norm running statistics are not the trivial initial ones."""
    stack.train()
    with torch.no_grad():
        for _ in range(3):
            stack(torch.randn(6, *shape) * 2 + 0.5)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stack_equals_loop_of_plain_members(name: str, mode: str) -> None:
    torch.manual_seed(0)
    spec = SMALL[name]
    stack = build_stack(spec)
    _warm_batch_norm(stack, spec.input_shape)
    stack.train(mode == "train")
    loop = reference_ensemble(stack)
    assert not any(isinstance(mod, torch.nn.Conv2d) and mod.groups > 1 for mod in loop.modules())
    x = torch.randn(7, *spec.input_shape)
    fused = stack(x)
    assert fused.shape == (spec.n_members, 7, spec.n_outputs)
    torch.testing.assert_close(fused, loop(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_stack_gradients_equal_loop_gradients(name: str) -> None:
    torch.manual_seed(1)
    spec = SMALL[name]
    stack = build_stack(spec)
    loop = reference_ensemble(stack)
    x = torch.randn(5, *spec.input_shape)
    weights = torch.randn(spec.n_members, 5, spec.n_outputs)
    (stack(x) * weights).sum().backward()
    (loop(x) * weights).sum().backward()
    # The first layer's weight gradient of member j lives in rows j*c:(j+1)*c of the fused tensor.
    first_fused = next(p for p in stack.parameters())
    c = first_fused.shape[0] // spec.n_members
    for j, member in enumerate(loop.members):
        first_plain = next(p for p in member.parameters())
        torch.testing.assert_close(first_fused.grad[j * c:(j + 1) * c].reshape(first_plain.shape),
                                   first_plain.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("ids", [[0], [2, 0], [1, 2, 0]])
def test_subset_equals_slicing(name: str, ids: list[int]) -> None:
    torch.manual_seed(2)
    spec = SMALL[name]
    stack = build_stack(spec)
    _warm_batch_norm(stack, spec.input_shape)
    stack.eval()
    x = torch.randn(4, *spec.input_shape)
    sub = stack.subset(ids)
    assert sub.n_members == len(ids) and not sub.training
    torch.testing.assert_close(sub(x), stack(x)[ids], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ids", [[], [0, 0], [-1], [5]])
def test_subset_rejects_bad_ids(ids: list[int]) -> None:
    with pytest.raises(InputError, match="distinct integers"):
        build_stack(SMALL["mlp-1"]).subset(ids)


def test_mlp_parameters_and_flops_match_formulas() -> None:
    spec = StackSpec("mlp", 3, (2, 5), 4, {"hidden": (6, 7)})
    stack = build_stack(spec)
    d = 10
    assert stack.params_per_member() == (d * 6 + 6) + (6 * 7 + 7) + (7 * 4 + 4)
    assert stack.flops_per_member() == 2 * (d * 6 + 6 * 7 + 7 * 4)


def test_cnn_flops_match_formula() -> None:
    spec = StackSpec("cnn", 2, (3, 8, 8), 5, {"channels": (4, 6), "strides": (1, 2)})
    # conv 3x3: 2 * Cin * 9 * Cout * Hout * Wout; head: 2 * C * K
    expected = 2 * (3 * 9 * 4 * 8 * 8 + 4 * 9 * 6 * 4 * 4 + 6 * 5)
    assert build_stack(spec).flops_per_member() == expected


@pytest.mark.parametrize(("name", "total"), [
    ("mlp-1x1024", 815_000), ("mlp-16x64", 815_000), ("mlp-64x16", 815_000), ("mlp-256x4", 815_000),
    ("cnn-10", 2_800_000), ("densenet-100-12x4", 3_200_000), ("densenet-82-8x8", 2_100_000),
    ("densenet-64-6x16", 1_700_000),
])
def test_presets_have_the_papers_sizes(name: str, total: int) -> None:
    # Webb et al. (arXiv 1902.04422): ~815K parameters per Fashion-MNIST MLP ensemble; 2.8M for the CIFAR-10 CNN
    # ensemble; 3.2M / 2.1M / 1.7M for the CIFAR-100 DenseNet-BC ensembles.
    shape, classes = ((1, 28, 28), 10) if name.startswith("mlp") else ((3, 32, 32), 10 if name == "cnn-10" else 100)
    spec = preset_spec(name, shape, classes)
    stack = build_stack(spec)
    assert stack.n_members == PRESETS[name]["n_members"]
    assert math.isclose(stack.params_per_member() * stack.n_members, total, rel_tol=0.04)


def test_preset_member_override_and_output_shape() -> None:
    stack = create_stack("cnn-10", (1, 28, 28), 10, n_members=2)
    assert stack(torch.zeros(3, 1, 28, 28)).shape == (2, 3, 10)


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'mlp-4x4'.*mlp-256x4"):
        create_stack("mlp-4x4", (1, 28, 28), 10)


@pytest.mark.parametrize(("spec", "message"), [
    (StackSpec("mlp", 0, (4,), 2, {"hidden": (3,)}), "at least one member"),
    (StackSpec("mlp", 2, (4,), 2, {"hidden": ()}), "hidden"),
    (StackSpec("cnn", 2, (4,), 2, {"channels": (3,), "strides": (1,)}), "images"),
    (StackSpec("densenet", 2, (3, 8, 8), 2, {"depth": 11, "growth": 2}), "depth = 4 \\+ 6n"),
    (StackSpec("transformer", 2, (4,), 2), "unknown stack kind 'transformer'.*cnn, densenet, mlp"),
])
def test_bad_specs_get_clear_errors(spec: StackSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_stack(spec)


def test_spec_round_trips_through_json_form() -> None:
    for spec in SMALL.values():
        assert StackSpec.from_dict(spec.to_dict()) == spec
