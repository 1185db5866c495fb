"""Generated bad inputs (hypothesis) against the runtime API and the device commands: every one is a one-line
error (an EdgensError in the API; exit status 2 and one line on stderr in the CLI) and writes no file.

Good inputs drawn along the way must give a prediction whose probabilities sum to one: the strategies are not
allowed to learn that everything fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import SyntheticBundle
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgens.cli import COMMANDS, cli
from edgens.errors import EdgensError, PredictorClosedError
from edgens.runtime import Predictor

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BAD_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, -0.0, -1e-300])  # never a valid budget
ODD_FLOATS = st.one_of(BAD_NUMBERS, st.sampled_from([1e308, 5e-324]))
SHAPES = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=30)
DTYPES = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                   hnp.complex_number_dtypes(), hnp.boolean_dtypes(), st.just(np.dtype(object)))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@SETTINGS
@given(shape=SHAPES, dtype=DTYPES, fill=st.sampled_from(["zeros", "nan", "inf", "big", "pixels"]))
def test_predict_on_generated_arrays(predictor: Predictor, bundle: SyntheticBundle, shape: tuple[int, ...],
                                     dtype: np.dtype, fill: str) -> None:
    before = _files(bundle.path)
    x = np.empty(shape, dtype=object) if dtype.kind == "O" else np.zeros(shape, dtype=dtype)
    if dtype.kind == "f" and x.size:
        x.flat[0] = {"nan": np.nan, "inf": np.inf, "big": np.finfo(dtype).max, "zeros": 0, "pixels": 128}[fill]
    try:
        prediction = predictor.predict(x)
    except EdgensError as err:
        assert "\n" not in str(err) and str(err)
    else:  # a valid batch: a real prediction
        assert len(x) >= 1 and x.shape[-2:] == (28, 28)
        np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert _files(bundle.path) == before


@SETTINGS
@given(kind=st.sampled_from(["members", "flops", "latency_ms", "deadline_ms", "confidence"]),
       value=st.one_of(ODD_FLOATS, st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=3), st.booleans(), st.none()))
def test_budgets_with_generated_values(predictor: Predictor, data, kind: str, value: object) -> None:
    x, _ = data
    try:
        prediction = predictor.predict(x[:4], **{kind: value})
    except EdgensError as err:
        assert "\n" not in str(err)
    except TypeError as err:  # a str or None where a keyword expects a number is the caller's Python error
        raise AssertionError(f"{kind}={value!r}: {err}") from err
    else:
        assert prediction.members_used.min() >= 1


def test_predict_after_close_says_the_predictor_is_closed(bundle: SyntheticBundle, data) -> None:
    predictor = Predictor.load(bundle.path)
    predictor.close()
    for call in (lambda: predictor.predict(data[0]), lambda: predictor.stack_outputs(data[0]),
                 lambda: next(predictor.anytime(data[0]))):
        with pytest.raises(PredictorClosedError, match="was closed; load the bundle again"):
            call()
    predictor.close()  # closing twice is harmless


# --- the CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture()
def cli_run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(COMMANDS, "infer", "edgens.cli.infer_cmd:infer")
    monkeypatch.setitem(COMMANDS, "profile", "edgens.cli.profile_cmd:profile")

    def invoke(*args: object):
        return CliRunner().invoke(cli, [str(a) for a in args])

    return invoke


def _one_line_error(result) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
    assert "Traceback" not in result.output


@SETTINGS
@given(content=st.sampled_from(["empty", "0-d", "truncated", "garbage", "pickle", "npz-corrupt", "npz-empty-x"]))
def test_infer_on_unusable_input_files(cli_run, bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory,
                                       content: str) -> None:
    folder = tmp_path_factory.mktemp("inputs")
    path = folder / ("x.npz" if content.startswith("npz") else "x.npy")
    if content == "empty":
        np.save(path, np.zeros((0, 28, 28), np.uint8))
    elif content == "0-d":
        np.save(path, np.array(3.0))
    elif content == "truncated":
        np.save(path, np.zeros((4, 28, 28), np.uint8))
        path.write_bytes(path.read_bytes()[:200])
    elif content == "garbage":
        path.write_bytes(b"\x93NUMPY not really")
    elif content == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif content == "npz-corrupt":
        np.savez(path, x=np.zeros((4, 28, 28), np.uint8))
        path.write_bytes(path.read_bytes()[:-30])
    else:
        np.savez(path, x=np.zeros((0, 28, 28), np.uint8))
    before = _files(folder) | _files(bundle.path)
    _one_line_error(cli_run("infer", bundle.path, "--input", path))
    assert _files(folder) | _files(bundle.path) == before


@SETTINGS
@given(option=st.sampled_from(["--flops", "--latency-ms", "--deadline-ms", "--confidence", "--stack-timeout-ms"]),
       value=st.one_of(BAD_NUMBERS, st.floats(max_value=0.0)))
def test_infer_with_non_finite_or_negative_numbers(cli_run, bundle: SyntheticBundle, npz_file: Path, option: str,
                                                    value: float) -> None:
    before = _files(bundle.path)
    _one_line_error(cli_run("infer", bundle.path, "--input", npz_file, option, repr(value)))
    assert _files(bundle.path) == before


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bundle_factory import make_data

    x, y = make_data(8, seed=3)
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    np.savez(path, x=x, y=y)
    return path
