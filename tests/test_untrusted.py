"""No code from a model file, ever: a file whose model_config names a Python module outside
Keras, a class registered by other code, a Lambda (also hidden in a wrapper), a Python lambda
or a TensorFlow function that does more than compute is refused in one line before Keras sees
it, and nothing it names is imported. Keras' safe mode stays on underneath."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import factory_keras as fk
import pytest

from convert import cli
from convert.check import keras_model
from convert.check.keras_model import load_keras_model
from convert.cli import main
from convert.errors import ConversionError
from convert.read.h5 import read_model

NEVER = "coreml-split never imports code named by a model file"


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny classifier per Keras flavour, and a tiny tf_keras TFOpLambda one."""
    root = tmp_path_factory.mktemp("clean")
    import factory

    files = {
        flavour: fk.save_tiny_classifier(root / f"{flavour}.h5", flavour)
        for flavour in ("k2", "k3")
    }
    files["k2_op"] = factory.save_tiny_lgamma_classifier(root / "k2_op.h5", head_seed=1)
    return files


@pytest.fixture()
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module ``coreml_split_canary_xyz`` on sys.path that writes the returned
    marker file when imported (or when its class is made or called)."""
    marker = tmp_path / "canary-ran"
    fk.write_canary_module(tmp_path / "site", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, fk.CANARY_MODULE, raising=False)
    yield marker
    sys.modules.pop(fk.CANARY_MODULE, None)


def assert_untouched(marker: Path) -> None:
    assert not marker.exists(), marker.read_text()
    assert fk.CANARY_MODULE not in sys.modules


def crafted(clean: dict[str, Path], key: str, dst: Path, edit) -> Any:
    """A graph whose source is ``clean[key]`` with ``edit`` applied to its model_config; the
    graph is read from the clean file, so the reader's own checks do not stand in the way."""
    graph = read_model(clean[key], with_digests=False)
    return dataclasses.replace(graph, source=fk.edit_model_config(clean[key], dst, edit))


def refused(graph: Any) -> str:
    with pytest.raises(ConversionError) as caught:
        load_keras_model(graph)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{graph.source}: ")
    return message.split(": ", 1)[1]


# -- modules and registered names ------------------------------------------------------------------


def _name_module_in_initializer(module: str, class_name: str = "system"):
    def edit(config: dict[str, Any]) -> None:
        dense = fk.layer_entry(config, "dense")
        dense["config"]["kernel_initializer"] = {
            "module": module,
            "class_name": class_name,
            "config": {},
            "registered_name": None,
        }

    return edit


def _name_module_on_layer(module: str, class_name: str = "system"):
    def edit(config: dict[str, Any]) -> None:
        dense = fk.layer_entry(config, "dense")
        dense.update(module=module, class_name=class_name, registered_name=None)

    return edit


@pytest.mark.parametrize("flavour", ["k2", "k3"])
@pytest.mark.parametrize("where", ["initializer", "layer"])
def test_a_module_outside_keras_is_refused_and_never_imported(
    clean, canary: Path, tmp_path: Path, flavour: str, where: str
) -> None:
    edit = (_name_module_in_initializer if where == "initializer" else _name_module_on_layer)(
        fk.CANARY_MODULE
    )
    graph = crafted(clean, flavour, tmp_path / "canary.h5", edit)
    assert refused(graph) == f"layer 'dense' names Python module '{fk.CANARY_MODULE}'; {NEVER}"
    assert_untouched(canary)


@pytest.mark.parametrize(
    ("flavour", "module", "class_name"),
    [("k2", "os", "system"), ("k3", "subprocess", "Popen"), ("k2", "builtins", "eval")],
)
def test_os_subprocess_and_builtins_are_refused(
    clean, tmp_path: Path, flavour: str, module: str, class_name: str
) -> None:
    graph = crafted(
        clean, flavour, tmp_path / "os.h5", _name_module_in_initializer(module, class_name)
    )
    assert refused(graph) == f"layer 'dense' names Python module '{module}'; {NEVER}"


def test_a_builtins_function_is_refused_unless_keras_defines_it(clean, tmp_path: Path) -> None:
    def activation(name: str):
        def edit(config: dict[str, Any]) -> None:
            fk.layer_entry(config, "dense")["config"]["activation"] = {
                "module": "builtins",
                "class_name": "function",
                "config": name,
                "registered_name": None,
            }

        return edit

    # tf_keras would take `exit` from Python's builtins and call it on a tensor
    graph = crafted(clean, "k2", tmp_path / "exit.h5", activation("exit"))
    assert refused(graph) == f"layer 'dense' names Python module 'builtins'; {NEVER}"
    # a Keras function under "builtins" is resolved among Keras' own (keras 3 loads it)
    load_keras_model(crafted(clean, "k3", tmp_path / "softmax.h5", activation("softmax")))


@pytest.mark.parametrize("layout", ["new", "legacy"])
def test_a_class_registered_outside_keras_is_refused_and_never_made(
    clean, tmp_path: Path, layout: str
) -> None:
    """Keras takes a class registered under the name a file gives before anything else: by
    registered_name (new format) or by class_name (legacy format, no module)."""
    import keras
    from keras.src.saving import object_registration

    marker = tmp_path / "made"

    class Evil(keras.layers.Dense):
        @classmethod
        def from_config(cls, config):
            marker.write_text("made")
            return super().from_config(config)

    keras.saving.register_keras_serializable(package="coreml_split_test")(Evil)
    try:

        def edit(config: dict[str, Any]) -> None:
            dense = fk.layer_entry(config, "dense")
            if layout == "new":
                dense.update(
                    module="keras.layers",
                    class_name="Evil",
                    registered_name="coreml_split_test>Evil",
                )
            else:
                dense["class_name"] = "coreml_split_test>Evil"

        graph = crafted(clean, "k3", tmp_path / "registered.h5", edit)
        assert refused(graph) == (
            "layer 'dense' names 'coreml_split_test>Evil', a class or function registered by "
            f"code outside Keras; {NEVER}"
        )
        assert not marker.exists()
    finally:
        object_registration.GLOBAL_CUSTOM_OBJECTS.pop("coreml_split_test>Evil", None)
        object_registration.GLOBAL_CUSTOM_NAMES.pop(Evil, None)


# -- code stored in the file -----------------------------------------------------------------------


def _lambda_in_wrapper(marker: Path):
    """The weightless 'relu' layer becomes TimeDistributed(Lambda(<bytecode writing marker>)):
    the reader sees a TimeDistributed, tf_keras would unmarshal and run the Lambda."""
    function = fk.lambda_function_config(marker)

    def edit(config: dict[str, Any]) -> None:
        relu = fk.layer_entry(config, "relu")
        relu["class_name"] = "TimeDistributed"
        relu["config"] = {
            "name": "relu",
            "trainable": True,
            "dtype": "float32",
            "layer": {
                "class_name": "Lambda",
                "config": {
                    "name": "lam",
                    "trainable": True,
                    "dtype": "float32",
                    "function": function,
                    "function_type": "lambda",
                    "module": "builtins",
                    "output_shape": None,
                    "output_shape_type": "raw",
                    "output_shape_module": None,
                    "arguments": {},
                },
            },
        }

    return edit


def test_a_lambda_inside_a_wrapper_is_refused_and_never_runs(clean, tmp_path: Path) -> None:
    marker = tmp_path / "lambda-ran"
    graph = crafted(clean, "k2", tmp_path / "wrapped.h5", _lambda_in_wrapper(marker))
    assert refused(graph) == (
        "layer 'relu/lam' holds a Lambda layer; loading it would run Python code stored in the "
        "file, so coreml-split refuses it"
    )
    assert not marker.exists()


def test_a_python_lambda_is_refused(clean, tmp_path: Path) -> None:
    def edit(config: dict[str, Any]) -> None:
        fk.layer_entry(config, "dense")["config"]["activation"] = {
            "class_name": "__lambda__",
            "config": {"value": ["ZGF0YQ==", None, None]},
        }

    graph = crafted(clean, "k3", tmp_path / "lambda.h5", edit)
    assert refused(graph) == (
        "layer 'dense' holds a Python lambda; loading it would run Python code stored in the "
        "file, so coreml-split refuses it"
    )


@pytest.mark.parametrize(
    "symbol", ["io.write_file", "load_op_library", "compat.v1.io.gfile.remove"]
)
def test_a_tfoplambda_that_does_more_than_compute_is_refused(
    clean, tmp_path: Path, symbol: str
) -> None:
    def edit(config: dict[str, Any]) -> None:
        op = next(e for e in fk.entries(config) if e["class_name"] == "TFOpLambda")
        op["config"]["function"] = symbol

    graph = crafted(clean, "k2_op", tmp_path / "op.h5", edit)
    reason = refused(graph)
    assert f"calls TensorFlow's tf.{symbol}, which coreml-split does not run" in reason


# -- what Keras itself writes passes -------------------------------------------------------------


def test_what_keras_writes_for_ordinary_models_is_accepted(clean, tmp_path: Path) -> None:
    """Both flavours' keras.applications MobileNetV2, a Teachable Machine-like Keras 3 model and
    layers with activations, initializers, regularizers and constraints: nothing is refused."""
    import factory
    import keras
    import tf_keras

    paths = [clean["k2"], clean["k3"], clean["k2_op"], fk.save_tm_like_k3(tmp_path / "tm")]
    for flavour, K in (("k2", tf_keras), ("k3", keras)):
        inp = K.Input((8, 8, 3), name="pixels")
        x = K.layers.Conv2D(
            2,
            3,
            activation=K.activations.relu,
            kernel_initializer=K.initializers.HeNormal(seed=1),
            kernel_regularizer=K.regularizers.L2(1e-3),
            kernel_constraint=K.constraints.MaxNorm(2),
            bias_regularizer="l1",
        )(inp)
        x = K.layers.BatchNormalization(beta_constraint=K.constraints.NonNeg())(x)
        x = K.layers.Activation("swish")(K.layers.LeakyReLU()(x))
        x = K.layers.GlobalAveragePooling2D()(x)
        out = K.layers.Dense(2, activation="softmax", activity_regularizer=K.regularizers.L1L2())
        model = K.Model(inp, out(x))
        paths.append(tmp_path / f"misc_{flavour}.h5")
        factory.zoo.save_h5(model, paths[-1])
        base = K.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
        )
        paths.append(tmp_path / f"mobilenet_{flavour}.h5")
        factory.zoo.save_h5(base, paths[-1])
    for path in paths:
        major = read_model(path, with_digests=False).keras_major
        names = keras_model._KerasNames.of(major)
        keras_model.refuse_foreign_code(path, fk.model_config(path), names)
    # and the modules they name are the ones the allowlist comment lists
    modules = {e.get("module") for p in paths for e in fk.entries(fk.model_config(p))}
    assert modules - {None} <= {
        "keras",
        "keras.initializers",
        "keras.regularizers",
        "keras.constraints",
        "keras.layers",
        "tf_keras.src.engine.functional",
    }, modules


# -- safe mode underneath --------------------------------------------------------------------------


def test_keras_safe_mode_is_on_even_without_the_check(
    clean, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the check switched off, tf_keras (whose HDF5 loader has no safe_mode) still refuses
    the wrapped Lambda's bytecode, and Keras 3's repaired load path refuses a Python lambda."""
    monkeypatch.setattr(keras_model, "refuse_foreign_code", lambda *a: None, raising=False)
    marker = tmp_path / "lambda-ran"
    graph = crafted(clean, "k2", tmp_path / "wrapped.h5", _lambda_in_wrapper(marker))
    with pytest.raises(ConversionError, match="Lambda"):
        load_keras_model(graph)
    assert not marker.exists()

    source = fk.as_keras_3_7(
        fk.save_tm_like_k3(tmp_path / "tm"), tmp_path / "tm" / "keras_model_37.h5"
    )

    def edit(config: dict[str, Any]) -> None:
        dense = next(e for e in fk.entries(config) if e["class_name"] == "Dense")
        dense["config"]["activation"] = {"class_name": "__lambda__", "config": {"value": "x"}}

    graph = read_model(source, with_digests=False)
    graph = dataclasses.replace(graph, source=fk.edit_model_config(source, tmp_path / "l.h5", edit))
    assert keras_model._repair_single_tensor_io(fk.model_config(graph.source), "3.7.0")
    with pytest.raises(ConversionError, match="lambda"):
        load_keras_model(graph)


# -- through the command line ----------------------------------------------------------------------


def test_convert_refuses_it_in_one_line_when_keras_is_needed(
    tmp_path: Path, canary: Path, capsys
) -> None:
    """A layer coreml-split does not build from the weights (LayerNormalization) sends the model
    through Keras and ct.convert: the file is refused there, in its one error line."""
    models = tmp_path / "models"
    models.mkdir()
    clean = fk.save_tiny_classifier(tmp_path / "norm.h5", "k2", norm=True)
    fk.edit_model_config(clean, models / "norm.h5", _name_module_in_initializer(fk.CANARY_MODULE))
    (models / "norm.labels.txt").write_text("a\nb\nc\n")
    assert main(["convert", str(models), "--out", str(tmp_path / "build"), "--quiet"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        f"error: {models / 'norm.h5'}: layer 'dense' names Python module "
        f"'{fk.CANARY_MODULE}'; {NEVER}"
    ]
    assert_untouched(canary)


def test_verify_leaves_such_a_file_unverified_and_imports_nothing(
    tmp_path: Path, canary: Path, capsys
) -> None:
    """Converted from the weights (no Keras needed), the file is refused by verify only: that
    classifier is unverified, in one line, and nothing it names is imported."""
    from convert.check.verify import UNVERIFIED, verify_build

    models = tmp_path / "models"
    models.mkdir()
    clean = fk.save_tiny_classifier(models / "tiny.h5", "k2")
    out = tmp_path / "build"
    assert main(["convert", str(models), "--out", str(out), "--quiet"]) == 0
    _replace_in_place(clean, _name_module_on_layer(fk.CANARY_MODULE))
    run = verify_build(out, count=2)
    assert not run.results and not run.errors
    assert [(p.name, p.status) for p in run.unverified] == [("tiny", UNVERIFIED)]
    assert run.unverified[0].reason == (
        f"layer 'dense' names Python module '{fk.CANARY_MODULE}'; {NEVER}"
    )
    assert run.outcome == UNVERIFIED
    capsys.readouterr()
    assert main(["verify", str(out), "--count", "2", "--quiet"]) == cli.EXIT_UNVERIFIED == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        f"unverified: {clean}: layer 'dense' names Python module '{fk.CANARY_MODULE}'; {NEVER}"
    ]
    report = json.loads((out / "report.json").read_text())
    assert not [v for v in report.get("verify") or [] if v["name"] == "tiny"]
    assert_untouched(canary)


def _replace_in_place(path: Path, edit) -> Path:
    tmp = path.with_name(path.name + ".edited")
    fk.edit_model_config(path, tmp, edit)
    tmp.replace(path)
    return path
