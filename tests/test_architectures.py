"""Every keras.applications backbone through coreml-split.

Per architecture, a zoo of two classifiers (3 and 4 classes, different heads) on one frozen
backbone at the smallest input the architecture accepts (see ``tests/arch_zoo.py``), converted
with ``coreml-split convert``: one backbone and two pipelines come out, every file passes the
validator, and ``plan`` infers the family and the preprocessing keras.applications prescribes.
Then every emitted classifier runs through the numpy Core ML evaluator and is compared with
Keras on the same images.

Each zoo is built and converted once: a module-scoped fixture, parametrised by architecture
with one parameter list shared by every test, so that pytest runs an architecture's tests
together and deletes its files before the next one. Architectures that take more than about
20 s to build and convert are marked ``slow`` and swept by tests/test_architectures_slow.py,
which runs these same tests on them.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import arch_zoo
import digests
import numpy as np
import pytest
import zoos

from convert.check.validate import validate_file
from convert.cli import main
from convert.plan.make import make_plan

# Seconds to build the zoo and convert it (the fixture), measured under pytest on 2 cores:
# NASNetMobile 72 (converted standalone twice today; 36 once it shares), InceptionV3 27,
# DenseNet121 27, ResNet50 24, ResNet50V2 22, Xception 21, EfficientNetV2B0 18, EfficientNetB0
# 16, VGG16 11, MobileNet 11, MobileNetV2 10; MobileNetV3Small/Large and ConvNeXtTiny 4-6 (they
# fail to load today; about 15 s once MobileNetV3 converts). The parity check adds 1-4 s each.
# The whole file: 300 s; without the slow ones: about 90 s.
SLOW = {
    "ResNet50",
    "ResNet50V2",
    "DenseNet121",
    "InceptionV3",
    "Xception",
    "NASNetMobile",
}


CLASSIFIERS = zoos.ARCH_CLASSIFIERS  # name -> (classes, head seed)

ARCHS = [
    pytest.param(a, marks=[pytest.mark.slow] if a in SLOW else [], id=a) for a in arch_zoo.ARCHS
]
# The architectures this file sweeps; tests/test_architectures_slow.py sweeps the SLOW ones with
# the same tests, so that two test workers share the sweep.
SWEEP = [p for p in ARCHS if p.values[0] not in SLOW]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that takes ``run`` runs once per architecture of its module's SWEEP."""
    if "run" in metafunc.fixturenames:
        metafunc.parametrize("run", metafunc.module.SWEEP, indirect=True)


# Architectures whose backbone has a layer the layer registry (convert/build/layers/) does not
# cover, so that "auto" converts it with ct.convert: ConvNeXt's LayerNormalization.
NOT_DIRECT = {"ConvNeXtTiny"}
CONVERTERS = ("auto", "coremltools")


@dataclass
class Run:
    arch: str
    size: int
    zoo: Path
    outs: dict[str, Path]  # --backbone-converter -> output folder
    exit_codes: dict[str, int]
    stderr: dict[str, str]
    build_seconds: float
    convert_seconds: dict[str, float]

    @property
    def out(self) -> Path:
        return self.outs["auto"]


@pytest.fixture(scope="module")
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Build ``request.param``'s zoo and convert it twice, ``--quiet``: with the default
    ``--backbone-converter auto`` (the backbone built from the weights where it can be) and with
    ``--backbone-converter coremltools`` (always ct.convert)."""
    arch = request.param
    size = arch_zoo.MIN_SIZE[arch]
    root = tmp_path_factory.mktemp(arch)
    zoo = root / "zoo"
    zoo.mkdir()
    started = time.perf_counter()
    zoos.arch(zoo, arch)
    built = time.perf_counter() - started
    outs, codes, errs, seconds = {}, {}, {}, {}
    for converter in CONVERTERS:
        outs[converter] = root / f"out-{converter}"
        stderr = io.StringIO()  # the CLI's rich console writes to whatever sys.stderr is then
        started = time.perf_counter()
        with contextlib.redirect_stderr(stderr):
            codes[converter] = main(
                ["convert", str(zoo), "--out", str(outs[converter]), "--quiet"]
                + ["--backbone-converter", converter]
            )
        seconds[converter] = time.perf_counter() - started
        errs[converter] = stderr.getvalue()
    yield Run(arch, size, zoo, outs, codes, errs, built, seconds)
    shutil.rmtree(root, ignore_errors=True)


def _load_spec(path: Path):
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(path.read_bytes())


@pytest.mark.parametrize("converter", CONVERTERS)
def test_convert(run: Run, converter: str) -> None:
    """One backbone and two valid pipelines, every file valid with strict types."""
    out = run.outs[converter]
    assert run.exit_codes[converter] == 0, run.stderr[converter]
    assert run.stderr[converter].strip() == ""
    files = sorted(p.name for p in out.glob("*.mlmodel"))
    for name in files:
        assert validate_file(out / name, strict_types=True) == [], name
    pipelines = sorted(f"{name}.mlmodel" for name in CLASSIFIERS)
    backbones = sorted(set(files) - set(pipelines))
    assert len(backbones) == 1 and len(files) == 3, files
    assert _load_spec(out / backbones[0]).WhichOneof("Type") == "neuralNetwork"
    for name in pipelines:
        spec = _load_spec(out / name)
        assert spec.WhichOneof("Type") == "pipelineClassifier"
        stub = spec.pipelineClassifier.pipeline.models[0]
        link = stub.linkedModel.linkedModelFile.linkedModelFileName.defaultValue
        assert link == Path(backbones[0]).stem + ".mlmodelc"


@pytest.mark.parametrize("converter", CONVERTERS)
def test_outputs_are_byte_identical_to_the_recorded_ones(run: Run, converter: str) -> None:
    assert run.exit_codes[converter] == 0, run.stderr[converter]
    digests.check(f"arch-{run.arch}-{converter}", run.zoo, run.outs[converter])


def test_backbone_builder(run: Run) -> None:
    """ "auto" builds every backbone here from the weights but NOT_DIRECT's, and the report
    says which way each was made."""
    expected = "coremltools" if run.arch in NOT_DIRECT else "direct"
    for converter in CONVERTERS:
        report = json.loads((run.outs[converter] / "report.json").read_text())
        builders = [b["builder"] for b in report["backbones"]]
        assert builders == [expected if converter == "auto" else "coremltools"], converter


def test_plan_infers_family_and_preprocessing(run: Run) -> None:
    family, preprocessing = arch_zoo.FAMILIES[run.arch]
    plan, _ = make_plan(run.zoo)
    assert not plan.errors
    for model in plan.models:
        assert model.preprocessing == preprocessing
        assert model.input_shape == [run.size, run.size, 3]
    assert len(plan.groups) == 1, [m.standalone_reason for m in plan.models]
    group = plan.groups[0]
    assert group.members == sorted(CLASSIFIERS)
    assert group.preprocessing == preprocessing
    assert group.family == family
    assert all(model.family == family for model in plan.models)


# -- numeric parity (needs the numpy Core ML evaluator, convert.check.reference) -------------
#
# The same deterministic uint8 images go to Keras, preprocessed in numpy as keras.applications
# prescribes for the family (tf: x / 127.5 - 1; caffe: RGB -> BGR minus [103.939, 116.779,
# 123.68]; torch: x / 255 minus [0.485, 0.456, 0.406] over [0.229, 0.224, 0.225]; raw: x), and to
# each emitted classifier (pipeline, or standalone model), which scales pixels itself. Skipped
# until convert.check.reference exists.

PARITY_IMAGES = 8
PARITY_ATOL = 1e-4
# InceptionV3 (random weights, 75x75) sits at float32's own noise floor: against a float64
# Keras run its features differ by 5.3e-4 in Keras float32 and by 4.5e-4 in Core ML, and the
# probabilities by up to 1.3e-4. Not a conversion error.
PARITY_ATOL_FOR = {"InceptionV3": 3e-4}


def _layer_kinds(path: Path) -> set[str]:
    """Layer kinds of every NeuralNetwork in a file, pipeline sub-models included."""
    kinds: set[str] = set()
    todo = [_load_spec(path)]
    while todo:
        spec = todo.pop()
        kind = spec.WhichOneof("Type")
        if kind in ("neuralNetwork", "neuralNetworkClassifier"):
            kinds |= {layer.WhichOneof("layer") for layer in getattr(spec, kind).layers}
        elif kind in ("pipeline", "pipelineClassifier"):
            todo.extend(getattr(spec, kind).pipeline.models)
    return kinds


@pytest.mark.parametrize("converter", CONVERTERS)
def test_classifiers_match_keras(run: Run, converter: str) -> None:
    reference = pytest.importorskip("convert.check.reference")
    out = run.outs[converter]
    assert run.exit_codes[converter] == 0, run.stderr[converter]
    kinds = set().union(*(_layer_kinds(p) for p in out.glob("*.mlmodel")))
    missing = sorted(kinds - set(reference.REGISTRY))
    assert not missing, f"layer kinds the evaluator lacks: {missing}"
    _, preprocessing = arch_zoo.FAMILIES[run.arch]
    pixels = arch_zoo.images(run.size, n=PARITY_IMAGES, seed=99)
    for name in CLASSIFIERS:
        expected = arch_zoo.keras_probabilities(run.zoo / f"{name}.h5", pixels, preprocessing)
        got = reference.load(out / f"{name}.mlmodel").predict({"image": pixels})
        got = np.asarray(got["__probabilities__"], np.float64)
        assert got.shape == expected.shape
        agree = float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1)))
        worst = float(np.max(np.abs(got - expected)))
        atol = PARITY_ATOL_FOR.get(run.arch, PARITY_ATOL)
        assert agree == 1.0 and worst <= atol, (
            f"{name}: top-1 agreement {agree:.0%}, max |dprob| {worst:.2e}"
        )


def test_direct_backbone_matches_coremltools(run: Run) -> None:
    """Where "auto" built the backbone from the weights, its features match ct.convert's
    backbone on the same images (both run by the evaluator)."""
    if run.arch in NOT_DIRECT:
        pytest.skip("converted with ct.convert either way")
    reference = pytest.importorskip("convert.check.reference")
    pixels = arch_zoo.images(run.size, n=4, seed=5)
    features = {}
    for converter in CONVERTERS:
        report = json.loads((run.outs[converter] / "report.json").read_text())
        backbone = run.outs[converter] / report["backbones"][0]["file"]
        features[converter] = reference.load(backbone).predict({"image": pixels})["features"]
    direct, converted = features["auto"], features["coremltools"]
    assert direct.shape == converted.shape
    scale = float(np.max(np.abs(converted))) or 1.0
    worst = float(np.max(np.abs(direct - converted))) / scale
    # float32 noise: the two sum in different orders and fold BatchNorms in float64 vs float32.
    # Measured: <= 1e-5 for the shallow backbones, 2.0e-5 ResNet50, 5.4e-5 InceptionV3.
    assert worst <= 1e-4, f"max |dfeature| / max |feature| = {worst:.2e}"
