"""What a build has to do: one job per group (its backbone, then its members' heads and
pipelines) and one per standalone model, each output with the recipe it is made from.

Before anything runs, every output's recipe (see :mod:`convert.build.cache`) is compared with the
one it was last written from; a job with nothing stale is skipped, so a rerun with nothing changed
imports neither TensorFlow nor coremltools.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convert.build.cache import Cache, recipe
from convert.errors import RunError
from convert.files import tool_versions
from convert.plan.types import ErrorEntry, GroupPlan, ModelPlan, Plan
from convert.read.graph import Graph, PackedGraphs
from convert.read.manifest import AUTO, Manifest, ModelSettings, calibrated
from convert.read.sources import SourceCache

Progress = Callable[[str], None]
Step = Callable[[int, int], None]  # (done, total): how far a counted stage has come
DEFAULT_JOBS = 2
DIRECT = "direct"  # built layer by layer from the .h5 weights (convert/build/network.py)
COREMLTOOLS = "coremltools"  # traced through TensorFlow and converted with ct.convert
BACKBONE_CONVERTERS = ("auto", COREMLTOOLS)


# how quantization uses the images: 1 bias correction, 2 compensated rounding on the images and
# their mirror images; a new method changes the bytes of every calibrated file
CALIBRATION_METHOD = 2


@dataclass(frozen=True)
class Calibration:
    """What quantized storages are calibrated on, and ``--weights auto`` measures on: the
    images (their folder, how many, a digest of their bytes; no folder: synthetic images) and
    the budget of max |dprob| that auto keeps every classifier within."""

    images: Path | None
    count: int
    max_dprob: float
    digest: str = "synthetic"

    def key(self) -> dict[str, Any]:
        return {
            "images": self.digest,
            "count": self.count,
            "max_dprob": self.max_dprob,
            "method": CALIBRATION_METHOD,
        }


@dataclass
class Job:
    """One unit of work for a worker: a group, or one standalone model."""

    group: GroupPlan | None
    models: list[ModelPlan]  # the group's members (in order), or the standalone model
    graphs: Mapping[str, Graph]  # each access may read a fresh copy (PackedGraphs)
    settings: dict[str, ModelSettings]
    out: Path
    recipes: dict[str, str]  # output file -> recipe
    sha256: dict[str, str]  # model -> its source file's sha256
    stale: list[str]  # names of the models whose file must be (re)written
    write_backbone: bool
    backbone_settings: ModelSettings = field(default_factory=ModelSettings)
    input_name: str | None = None  # the backbone's image input, if zoo.toml renames it
    backbone_builder: str = COREMLTOOLS  # DIRECT: from the weights; COREMLTOOLS: ct.convert
    needs_tensorflow: bool = True  # a ct.convert or a Keras load may be needed
    tensorflow_free: bool = False  # no job of this run needs TensorFlow: do not import it
    calibration: Calibration | None = None  # the images that quantized storages calibrate on

    @property
    def label(self) -> str:
        if self.group is None:
            return self.models[0].name
        return self.group.id


@dataclass
class JobResult:
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> report row
    errors: list[ErrorEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # damaged cache entries, dropped


def plan_jobs(
    plan: Plan,
    graphs: Mapping[str, Graph],
    out: Path,
    manifest: Manifest,
    cache: Cache,
    sources: SourceCache,
    backbone_converter: str = "auto",
    calibration: Calibration | None = None,
) -> list[Job]:
    versions = tool_versions()
    sha = {m.name: sources.sha256(Path(m.source)) for m in plan.models}
    jobs = []
    for group in plan.groups:
        members = [plan.model(n) for n in group.members]
        settings = {m.name: manifest.for_model(m.name) for m in members}
        backbone_file = f"{group.id}.mlmodel"
        input_name = settings[members[0].name].input_name  # make_plan checked they agree
        builder = _backbone_builder(members[0], graphs[members[0].name], backbone_converter)
        backbone_key = _backbone_key(group, members[0]) | {"builder": builder}
        if group.weights == AUTO and (calibration is None or calibration.images is None):
            raise RunError(None, f"backbone {group.id}: weights = auto measures on --images")
        if calibrated(group.weights):
            assert calibration is not None
            backbone_key |= {"calibration": calibration.key()}
        if group.weights == AUTO:  # the choice weighs every member's head: a new one may move it
            backbone_key |= {"members": [(m.name, sha[m.name], m.weights) for m in members]}
        backbone_recipe = recipe("backbone", versions, backbone_key, input_name)
        recipes = {backbone_file: backbone_recipe}
        for m in members:
            recipes[f"{m.name}.mlmodel"] = recipe(
                "pipeline",
                versions,
                backbone_recipe,
                _model_key(m, sha[m.name], settings[m.name])
                | _calibrated(m, calibration)
                | _aliased(graphs[m.name]),
            )
        stale = [m.name for m in members if not cache.fresh(*_output(m, recipes))]
        write_backbone = cache.fresh(backbone_file, backbone_recipe) is None
        needs_tf = (write_backbone and builder != DIRECT) or any(
            _head_needs_tensorflow(plan.model(name), graphs[name]) for name in stale
        )
        jobs.append(
            Job(
                group=group,
                models=members,
                graphs=_subset(graphs, [m.name for m in members]),
                settings=settings,
                out=out,
                recipes=recipes,
                sha256={m.name: sha[m.name] for m in members},
                stale=stale,
                write_backbone=write_backbone,
                backbone_settings=manifest.defaults,
                input_name=input_name,
                backbone_builder=builder,
                needs_tensorflow=needs_tf,
                calibration=calibration,
            )
        )
    for m in plan.models:
        if m.group is None:
            settings = manifest.for_model(m.name)
            file = f"{m.name}.mlmodel"
            builder = _standalone_builder(m, graphs[m.name], backbone_converter)
            key = _model_key(m, sha[m.name], settings) | {"builder": builder}
            key |= _calibrated(m, calibration) | _aliased(graphs[m.name])
            wanted = recipe("standalone", versions, key)
            jobs.append(
                Job(
                    group=None,
                    models=[m],
                    graphs=_subset(graphs, [m.name]),
                    settings={m.name: settings},
                    out=out,
                    recipes={file: wanted},
                    sha256={m.name: sha[m.name]},
                    stale=[] if cache.fresh(file, wanted) else [m.name],
                    write_backbone=False,
                    backbone_builder=builder,
                    needs_tensorflow=builder != DIRECT,
                    calibration=calibration,
                )
            )
    return jobs


def _subset(graphs: Mapping[str, Graph], names: list[str]) -> Mapping[str, Graph]:
    if isinstance(graphs, PackedGraphs):
        return graphs.subset(names)
    return {name: graphs[name] for name in names}


def _backbone_builder(first: ModelPlan, graph: Graph, converter: str) -> str:
    """DIRECT when the layer registry covers every layer of the backbone, else COREMLTOOLS.
    Members share the backbone's weights and structure, so the first member decides."""
    from convert.build import network

    if converter == COREMLTOOLS or first.split_tensor is None:
        return COREMLTOOLS
    return DIRECT if network.supported(graph, first.split_tensor) is None else COREMLTOOLS


def _standalone_builder(model: ModelPlan, graph: Graph, converter: str) -> str:
    """DIRECT when the layer registry covers every layer of the model and its labels are
    settled without loading it, else COREMLTOOLS."""
    from convert.build import network

    if converter == COREMLTOOLS or not model.output_size_known:
        return COREMLTOOLS
    return DIRECT if network.supported(graph, graph.outputs[0]) is None else COREMLTOOLS


def _head_needs_tensorflow(model: ModelPlan, graph: Graph) -> bool:
    if not model.output_size_known or model.split_tensor is None:
        return True  # the labels wait for the loaded model's output size
    return head_layout(graph, model) is None


def head_layout(graph: Graph, model: ModelPlan) -> str | None:
    """How this head is built from the weights (see :func:`convert.build.network.head_layout`),
    or None: convert it with ct.convert. Planning and building ask this one question."""
    from convert.build import network

    assert model.split_tensor is not None
    return network.head_layout(graph, model.split_tensor, graph.outputs[0])


def _output(model: ModelPlan, recipes: dict[str, str]) -> tuple[str, str]:
    file = f"{model.name}.mlmodel"
    return file, recipes[file]


def _backbone_key(group: GroupPlan, first: ModelPlan) -> dict[str, Any]:
    """What the backbone's bytes depend on: its weights and structure (the fingerprint), the
    preprocessing, the input, the file name. Not its members: a new classifier on the same
    backbone leaves the backbone file as it is."""
    return {
        "fingerprint": group.fingerprint,
        "preprocessing": group.preprocessing,
        "input_shape": first.input_shape,
        "file": group.id,
        "family": group.family,
        "split_layer": group.split_layer,
        "feature_shape": group.feature_shape,
        "weights": group.weights,
    }


def _calibrated(model: ModelPlan, calibration: Calibration | None) -> dict[str, Any]:
    """A quantized head's bytes depend on the images it was calibrated on."""
    if not calibrated(model.weights) or calibration is None:
        return {}
    return {"calibration": calibration.key()}


def _aliased(graph: Graph) -> dict[str, Any]:
    """The [aliases] a file was read with change what its head computes (a backbone's
    fingerprint already names the classes it holds)."""
    return {"aliases": graph.aliases} if graph.aliases else {}


def _model_key(model: ModelPlan, sha256: str, settings: ModelSettings) -> dict[str, Any]:
    """What a classifier's file depends on. Where the zoo lies on disk is not part of it: the
    files carry the source's name and hash, not its path."""
    where = {"source": Path(model.source).name, "labels_source": None}
    return {
        "source_sha256": sha256,
        "plan": asdict(model) | where,
        "settings": asdict(settings) | {"labels_source": None},
    }
