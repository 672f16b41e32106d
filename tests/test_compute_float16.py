"""The reference evaluator's float16 compute: what a GPU or Neural Engine would round (the
network's inputs, every layer's outputs, the weights) is rounded, the default float32 path is
left as it was, and `verify --compute float16` uses and reports it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.check import reference
from convert.check.verify import TOLERANCES
from convert.cli import main

F16_MAX = float(np.finfo(np.float16).max)  # 65504


def half(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to float16 and back to float32, as the evaluator should."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def network(input_shape: tuple[int, ...], add: Any) -> Any:
    """A NeuralNetwork with input ``x`` and output ``y``, built with coremltools' builder."""
    from convert.heavy import coremltools

    coremltools()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder(
        [("x", datatypes.Array(*input_shape))], [("y", None)], disable_rank5_shape_mapping=True
    )
    add(builder)
    return builder.spec


def run(spec: Any, x: Any, **kwargs: Any) -> np.ndarray:
    out, _ = reference.evaluate_spec(spec, {"x": x}, model_dir=Path("."), **kwargs)
    return out["y"]


@pytest.fixture(scope="module")
def small() -> dict[str, Any]:
    """convolution -> relu -> innerProduct -> softmax on (4, 6, 6) inputs, random weights."""
    rng = np.random.default_rng(3)
    conv = rng.normal(0, 0.3, size=(3, 3, 4, 8)).astype(np.float32)
    dense = rng.normal(0, 0.1, size=(5, 8 * 6 * 6)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=5).astype(np.float32)

    def add(b: Any) -> None:
        b.add_convolution(
            "conv", 4, 8, 3, 3, 1, 1, "same", 1, conv, None, False, input_name="x", output_name="c"
        )
        b.add_activation("relu", "RELU", "c", "r")
        b.add_inner_product("dense", dense, bias, 8 * 6 * 6, 5, True, "r", "d")
        b.add_softmax("softmax", "d", "y")

    x = rng.normal(0, 2, size=(4, 1, 4, 6, 6)).astype(np.float32)
    return {"spec": network((1, 4, 6, 6), add), "x": x}


def test_float16_compute_moves_results_but_only_a_little(small: dict[str, Any]) -> None:
    single = run(small["spec"], small["x"])
    rounded = run(small["spec"], small["x"], compute="float16")
    assert rounded.shape == single.shape == (4, 5, 1, 1)
    moved = np.abs(rounded - single)
    assert moved.max() > 1e-5  # something was rounded
    assert moved.max() < 5e-3  # float16 keeps ~3 digits: probabilities move in the 1e-4s
    assert np.array_equal(rounded, half(rounded))  # the softmax's output is float16 too


def test_a_float16_inner_product_is_the_rounded_product() -> None:
    """Inputs, weights and bias rounded to float16, the sum in higher precision, the result
    rounded again: computed here in float64 from numpy's own float16."""
    rng = np.random.default_rng(11)
    cin, cout = 48, 24
    w = rng.normal(size=(cout, cin)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    x = rng.normal(0, 10, size=(6, cin)).astype(np.float32)
    spec = network((cin,), lambda builder: builder.add_inner_product(
        "dense", w, b, cin, cout, True, "x", "y"
    ))  # fmt: skip

    def product(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        return half(x.astype(np.float64) @ w.T.astype(np.float64) + b)

    want = product(half(x), half(w), half(b))
    # each rounding changes the answer, so a missing one fails the comparison below
    assert not np.array_equal(want, product(x, half(w), half(b)))
    assert not np.array_equal(want, product(half(x), w, b))
    np.testing.assert_array_equal(run(spec, x, compute="float16"), want)


def test_the_preprocessed_image_is_rounded_before_the_first_layer() -> None:
    """pixels / 127.5 - 1, then times 3: in float16 the preprocessed pixels are rounded first."""

    def add(builder: Any) -> None:
        builder.add_activation("triple", "LINEAR", "x", "y", params=[3.0, 0.0])
        builder.set_pre_processing_parameters(
            image_input_names=["x"],
            image_scale=1 / 127.5,
            red_bias=-1.0,
            green_bias=-1.0,
            blue_bias=-1.0,
        )

    spec = network((3, 8, 8), add)
    pixels = np.random.default_rng(5).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    pre = pixels.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 127.5) - 1
    want = half(3 * half(pre))
    assert not np.array_equal(want, half(3 * pre))  # rounding the input first matters
    got = run(spec, pixels, compute="float16")
    np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_beyond_float16s_range_is_inf_in_float16_and_finite_in_float32() -> None:
    """100 * 1000 = 1e5 > 65504: inf on a float16 device, and inf stays inf through a layer
    that brings it back into range."""
    w = np.array([[1000.0]], dtype=np.float32)

    def add(builder: Any) -> None:
        builder.add_inner_product("big", w, None, 1, 1, False, "x", "h")
        builder.add_activation("small", "LINEAR", "h", "y", params=[0.001, 0.0])

    spec = network((1,), add)
    x = np.array([[100.0], [10.0]], dtype=np.float32)
    single = run(spec, x)
    rounded = run(spec, x, compute="float16")
    assert 1e5 > F16_MAX
    np.testing.assert_allclose(single[:, 0], [100.0, 10.0], rtol=1e-6)
    assert np.isposinf(rounded[0, 0])
    assert rounded[1, 0] == pytest.approx(10.0, rel=1e-3)  # 1e4 is within range


def test_the_default_is_float32_and_rounds_nothing() -> None:
    """Default and explicit float32 agree bit for bit with the same float32 numpy operations
    the layers do (a matrix product, a bias, a relu), and nothing is float16-rounded."""
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(16, 10)).astype(np.float32)
    b1 = rng.normal(size=16).astype(np.float32)
    w2 = rng.normal(size=(3, 16)).astype(np.float32)

    def add(builder: Any) -> None:
        builder.add_inner_product("one", w1, b1, 10, 16, True, "x", "h")
        builder.add_activation("relu", "RELU", "h", "r")
        builder.add_inner_product("two", w2, None, 16, 3, False, "r", "y")

    spec = network((10,), add)
    x = rng.normal(size=(5, 10)).astype(np.float32)
    want = np.maximum(x @ np.ascontiguousarray(w1.T) + b1, 0) @ np.ascontiguousarray(w2.T)
    default = run(spec, x)
    assert default.dtype == np.float32
    np.testing.assert_array_equal(default, want)
    np.testing.assert_array_equal(run(spec, x, compute="float32"), want)
    assert not np.array_equal(default, half(default))


def test_one_model_keeps_its_compute_modes_apart(small: dict[str, Any], tmp_path: Path) -> None:
    """A ReferenceModel caches its prepared networks: float16 ones (rounded weights) must not
    serve a float32 call, nor the other way round."""
    path = tmp_path / "small.mlmodel"
    path.write_bytes(small["spec"].SerializeToString())
    x = small["x"].reshape(4, 4, 6, 6)
    fresh = {
        c: reference.load(path).predict({"x": x}, compute=c)["y"] for c in ("float32", "float16")
    }
    model = reference.load(path)
    for compute in ("float16", "float32", "float16", "float32"):
        np.testing.assert_array_equal(model.predict({"x": x}, compute=compute)["y"], fresh[compute])
    assert not np.array_equal(fresh["float32"], fresh["float16"])
    with pytest.raises(ValueError, match="bfloat16"):
        model.predict({"x": x}, compute="bfloat16")


def test_verify_with_float16_compute_passes_and_says_so(built, tmp_path: Path, capsys) -> None:
    out, _ = built
    work = tmp_path / "build"
    shutil.copytree(out, work)
    only = ["--only", "nested_k3", "--only", "tm_dogs"]
    assert main(["verify", str(work), "--count", "8", "--compute", "float16", *only]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[ok]")]
    assert len(lines) == 2 and all("float32 weights, float16 compute" in x for x in lines), lines
    results = json.loads((work / "report.json").read_text())["verify"]
    assert {r["name"] for r in results} == {"nested_k3", "tm_dogs"}
    for r in results:
        assert r["compute"] == "float16" and r["weights"] == "float32", r
        assert r["tolerance"] == TOLERANCES["float16"] > TOLERANCES["float32"], r
        assert r["passed"] and r["top1_agreement"] == 1.0, r
        assert r["max_abs_diff"] > TOLERANCES["float32"], r  # it moved: float16 was computed
