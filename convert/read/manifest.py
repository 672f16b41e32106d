"""The optional zoo manifest, ``zoo.toml`` in the models folder: metadata the .h5 files lack.

Keras files carry no author, licence or human-readable name, and a zoo often has one labels
source for many models; the manifest lets the user say these once instead of per command-line
flag. Everything in it is optional, and a folder without one converts exactly as before.

Format::

    [defaults]              # applies to every model; any per-model key except labels
    author = "Jane Doe"
    license = "MIT"
    version = "1.2.0"       # free text, but quoted: 1.2 would be a TOML number
    preprocessing = "tf"

    [models.cats]           # key = the model's name as coreml-split names it: the file's stem,
                            # or the folder's name for Teachable Machine's keras_model.h5
    display_name = "Cat breeds"
    description = "Tells cat breeds apart"
    labels = ["tabby", "siamese"]   # inline strings, or a labels file's path relative to
                                    # this manifest's folder: labels = "cats.txt"
    author = "..."
    license = "..."
    version = "..."
    preprocessing = "raw"           # tf, unit, raw, caffe or torch
    weights = "float16"             # its weights' storage: float32, float16, int8 or paletteN
    head_weights = "int8"           # (N = 1..8); for a model on a shared backbone, weights
                                    # and head_weights both set its head (head_weights first),
                                    # and its backbone's storage is set under [backbones]
    updatable = true                # its head learns on the device (MLUpdateTask); then:
    updatable_layers = 1            # the last k Dense layers learn (1)
    optimizer = "sgd"               # sgd (learning_rate, batch_size, momentum) or adam
    learning_rate = 0.01            # (learning_rate, batch_size, beta1, beta2, eps), with
    batch_size = 8                  # epochs, shuffle and seed; the defaults: 0.01, 8,
    epochs = 10                     # momentum 0, beta1 0.9, beta2 0.999, eps 1e-8, 10
    shuffle = true                  # epochs, shuffled, no seed
    input_name = "image"            # Core ML feature names: [A-Za-z_][A-Za-z0-9_]*, and the
    label_name = "classLabel"       # three of one model must differ
    probabilities_name = "classLabelProbs"

    [backbones.MobileNetV2] # key = a backbone family ("MobileNetV2"), or a full backbone id
                            # ("MobileNetV2-3fa9c2d1"), which wins over its family
    name = "SharedMobileNet"        # stem of the backbone .mlmodel file: [A-Za-z0-9_.-]+
    weights = "int8"                # the backbone's storage ([defaults] weights otherwise)

    [aliases]               # a layer class a file names -> the Keras class it really is
    CustomDepthwiseConv2D = "DepthwiseConv2D"   # (a subclass saved only to load the file):
                            # read, fingerprinted, converted and verified as that Keras class;
                            # no code is imported, only the name is changed

Every problem is a :class:`ManifestError` naming the manifest and the key path
(``models.cats.labels: ...``), so the user can go straight to the line to fix. This module
imports no TensorFlow or coremltools: ``plan`` reads the manifest too.
"""

from __future__ import annotations

import datetime
import difflib
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from convert.errors import LabelsError, SplitError
from convert.read.labels import read_labels
from convert.read.training import TRAINING_KEYS, training_problem

MANIFEST_NAME = "zoo.toml"

# The keys of convert.read.families.PREPROCESSING, repeated so that this module needs no numpy;
# tests/test_manifest.py checks that the two stay the same.
PREPROCESSING_NAMES = ("tf", "unit", "raw", "caffe", "torch")

# How weights are stored (see convert/build/layers/weights.py); "auto" lets the build choose
# per layer, from the images given (--weights auto).
FLOAT32, FLOAT16, INT8, AUTO = "float32", "float16", "int8", "auto"
PALETTES = tuple(f"palette{n}" for n in range(1, 9))
STORAGES = (FLOAT32, FLOAT16, INT8, *PALETTES)
WEIGHT_CHOICES = (*STORAGES, AUTO)

TOP_LEVEL_KEYS = ("defaults", "models", "backbones", "aliases")
TEXT_KEYS = ("display_name", "description", "author", "license", "version")
FEATURE_KEYS = ("input_name", "label_name", "probabilities_name")
STORAGE_KEYS = ("weights", "head_weights")
MODEL_KEYS = tuple(
    sorted(
        (*TEXT_KEYS, *FEATURE_KEYS, *STORAGE_KEYS, "preprocessing", "labels", "updatable")
        + TRAINING_KEYS
    )
)
DEFAULT_KEYS = tuple(k for k in MODEL_KEYS if k != "labels")
BACKBONE_KEYS = ("name", "weights")

_FEATURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FILE_STEM = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = re.compile(r"\s*\(at end of document\)$")


class ManifestError(SplitError):
    """``zoo.toml`` cannot be read or says something coreml-split cannot honour."""


def palette_bits(storage: str) -> int | None:
    """N for ``paletteN``, else None."""
    return int(storage[7:]) if storage in PALETTES else None


def calibrated(storage: str) -> bool:
    """Whether a storage is quantized from a float32 build, calibrated on images (int8,
    paletteN, auto); float32 and float16 are written as the network is built."""
    return storage not in (FLOAT32, FLOAT16)


def storage_bits(storage: str) -> int:
    """Bits per kernel value of a storage (auto: unknown until built, counted as float16)."""
    bits = palette_bits(storage)
    if bits is not None:
        return bits
    return {FLOAT32: 32, FLOAT16: 16, INT8: 8, AUTO: 16}[storage]


def storage_problem(value: str, allow_auto: bool = True) -> str | None:
    """None if ``value`` names a weight storage, else why not (one line)."""
    choices = WEIGHT_CHOICES if allow_auto else STORAGES
    if value in choices:
        return None
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    shown = f"{FLOAT32}, {FLOAT16}, {INT8}, palette1..palette8" + (", auto" if allow_auto else "")
    return f"unknown weight storage {value!r} ({shown}){hint}"


@dataclass(frozen=True)
class ModelSettings:
    """What the manifest says about one model; None means "not said", so callers keep their own
    default (the detected preprocessing, the labels file beside the model, ...)."""

    display_name: str | None = None
    description: str | None = None
    author: str | None = None
    license: str | None = None
    version: str | None = None
    preprocessing: str | None = None
    input_name: str | None = None
    label_name: str | None = None
    probabilities_name: str | None = None
    weights: str | None = None  # a storage name (STORAGES, or auto)
    head_weights: str | None = None
    labels: tuple[str, ...] | None = None
    labels_source: str | None = None  # the labels file read, or the manifest's name if inline
    updatable: bool | None = None
    training: tuple[tuple[str, Any], ...] | None = None  # (key of TRAINING_KEYS, value) said

    def over(self, defaults: ModelSettings) -> ModelSettings:
        """These settings, with ``defaults`` filling every field left unsaid (training
        settings key by key)."""
        merged = _over(self, defaults)
        if self.training and defaults.training:
            both = dict(defaults.training) | dict(self.training)
            merged = replace(merged, training=tuple(sorted(both.items())))
        return merged


@dataclass(frozen=True)
class BackboneSettings:
    """What the manifest says about one shared backbone."""

    name: str | None = None  # stem of the backbone file, instead of its id
    weights: str | None = None  # its storage, instead of [defaults] weights

    def over(self, fallback: BackboneSettings) -> BackboneSettings:
        """These settings, with ``fallback`` filling every field left unsaid."""
        return _over(self, fallback)


_Settings = TypeVar("_Settings", ModelSettings, BackboneSettings)


def _over(said: _Settings, fallback: _Settings) -> _Settings:
    """``said``'s fields that are not None, over ``fallback``'s."""
    values = {f.name: getattr(said, f.name) for f in fields(said)}
    return replace(fallback, **{k: v for k, v in values.items() if v is not None})


@dataclass
class Manifest:
    """A parsed, validated ``zoo.toml``; ``path`` is None when the folder has none."""

    path: Path | None = None
    defaults: ModelSettings = field(default_factory=ModelSettings)
    models: dict[str, ModelSettings] = field(default_factory=dict)
    backbones: dict[str, BackboneSettings] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # class in the file -> Keras class

    def for_model(self, name: str) -> ModelSettings:
        """The model's own settings over the defaults, field by field."""
        return self.models.get(name, ModelSettings()).over(self.defaults)

    def for_backbone(self, group_id: str, family: str) -> BackboneSettings:
        """Settings for a backbone: its exact id first (one group of a family that has
        several), then its family."""
        by_family = self.backbones.get(family, BackboneSettings())
        return self.backbones.get(group_id, BackboneSettings()).over(by_family)

    def unused_models(self, known_names: Iterable[str]) -> list[str]:
        """Manifest model keys that name no model: most likely typos, worth a warning."""
        known = set(known_names)
        return [name for name in self.models if name not in known]


# -- loading ----------------------------------------------------------------------------------


def manifest_path(folder_or_file: Path) -> Path | None:
    """Where the manifest for a models argument lives: in the folder, beside a single model
    file, or the argument itself when it is a .toml file. None when the argument does not exist
    (finding the models reports that), so that no stray zoo.toml elsewhere is picked up."""
    if folder_or_file.suffix.lower() == ".toml" and not folder_or_file.is_dir():
        return folder_or_file
    if folder_or_file.is_dir():
        return folder_or_file / MANIFEST_NAME
    if folder_or_file.is_file():
        return folder_or_file.parent / MANIFEST_NAME
    return None


def load_manifest(folder_or_file: Path) -> Manifest:
    """The manifest for a models folder (or single .h5 file); empty when there is none.

    A .toml file named explicitly must exist; ``zoo.toml`` beside the models is optional.
    """
    folder_or_file = Path(folder_or_file)
    path = manifest_path(folder_or_file)
    if path is None or (path != folder_or_file and not path.exists()):
        return Manifest()
    return _parse(path, _read_toml(path))


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML document; syntax errors become one line that starts with the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate the BOM some editors write
    except FileNotFoundError:
        raise ManifestError(path, "no such file") from None
    except IsADirectoryError:
        raise ManifestError(path, "is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ManifestError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(path, _toml_reason(str(exc), text)) from None


def _toml_reason(message: str, text: str) -> str:
    """tomllib's "Invalid value (at line 3, column 5)" as "line 3: Invalid value (column 5)"."""
    if match := _TOML_POSITION.search(message):
        line, column = match.groups()
        return f"line {line}: {message[: match.start()]} (column {column})"
    if match := _TOML_END.search(message):
        return f"line {text.count(chr(10)) + 1}: {message[: match.start()]} (at end of file)"
    return message


# -- validation -------------------------------------------------------------------------------


class _Checker:
    """Validates one document; every error names the manifest and the key path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, reason: str) -> ManifestError:
        return ManifestError(self.path, f"{where}: {reason}")

    def table(self, where: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a table, got {_toml_type(value)}")
        return value

    def known_keys(self, where: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                raise self.fail(_join(where, key), _unknown_key(key, known))

    def string(self, where: str, value: Any) -> str:
        if isinstance(value, str):
            return value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        hint = f' (quote it: "{value}")' if number else ""
        raise self.fail(where, f"expected a string, got {_toml_type(value)}{hint}")


def _parse(path: Path, data: dict[str, Any]) -> Manifest:
    check = _Checker(path)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise check.fail(_join("", key), _unknown_key(key, TOP_LEVEL_KEYS))
    defaults = _model_settings(check, path, "defaults", data.get("defaults", {}), defaults=True)
    models: dict[str, ModelSettings] = {}
    for name, table in check.table("models", data.get("models", {})).items():
        where = _join("models", name)
        models[name] = _model_settings(check, path, where, table, defaults=False)
        _distinct_feature_names(check, where, models[name].over(defaults), " (with [defaults])")
    backbones = {
        key: _backbone_settings(check, _join("backbones", key), table)
        for key, table in check.table("backbones", data.get("backbones", {})).items()
    }
    aliases = _aliases(check, data.get("aliases", {}))
    return Manifest(path, defaults, models, backbones, aliases)


def _model_settings(
    check: _Checker, path: Path, where: str, value: Any, *, defaults: bool
) -> ModelSettings:
    table = check.table(where, value)
    if defaults and "labels" in table:
        raise check.fail(
            _join(where, "labels"), "labels differ per model; set them under [models.<name>]"
        )
    check.known_keys(where, table, DEFAULT_KEYS if defaults else MODEL_KEYS)
    said: dict[str, Any] = {}
    for key in (*TEXT_KEYS, *FEATURE_KEYS, *STORAGE_KEYS, "preprocessing"):
        if key in table:
            said[key] = check.string(_join(where, key), table[key])
    for key in STORAGE_KEYS:
        if key in said:
            _storage(check, _join(where, key), said[key])
    for key in FEATURE_KEYS:
        if key in said:
            _feature_name(check, _join(where, key), said[key])
    if "preprocessing" in said:
        _preprocessing(check, _join(where, "preprocessing"), said["preprocessing"])
    if "labels" in table:
        said["labels"], said["labels_source"] = _labels(
            check, path, _join(where, "labels"), table["labels"]
        )
    if "updatable" in table:
        if not isinstance(table["updatable"], bool):
            got = _toml_type(table["updatable"])
            raise check.fail(_join(where, "updatable"), f"expected true or false, got {got}")
        said["updatable"] = table["updatable"]
    training = {key: table[key] for key in TRAINING_KEYS if key in table}
    for key, value in training.items():
        _training_value(check, _join(where, key), key, value)
    if training:
        problem = training_problem(training)
        if problem:
            raise check.fail(where, problem)
        said["training"] = tuple(sorted(training.items()))
    settings = ModelSettings(**said)
    _distinct_feature_names(check, where, settings)
    return settings


_TRAINING_TYPES = {
    "updatable_layers": int,
    "batch_size": int,
    "epochs": int,
    "seed": int,
    "shuffle": bool,
    "optimizer": str,
}


def _training_value(check: _Checker, where: str, key: str, value: Any) -> None:
    """A training setting of the TOML type it needs (a number for the rates)."""
    wanted = _TRAINING_TYPES.get(key, float)
    if wanted is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, wanted) and (wanted is bool or not isinstance(value, bool))
    if not ok:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        raise check.fail(where, f"expected {names[wanted]}, got {_toml_type(value)}")


def _feature_name(check: _Checker, where: str, name: str) -> None:
    """Core ML feature names become Swift properties in Xcode's generated class."""
    if not _FEATURE_NAME.fullmatch(name):
        raise check.fail(
            where, f"{name!r} is not a valid feature name (letters, digits and _, not first digit)"
        )


def _distinct_feature_names(
    check: _Checker, where: str, settings: ModelSettings, context: str = ""
) -> None:
    """A model's input and outputs share one namespace; Core ML refuses a repeated name."""
    seen: dict[str, str] = {}
    for key in FEATURE_KEYS:
        name = getattr(settings, key)
        if name is None:
            continue
        if name in seen:
            raise check.fail(
                where, f"{seen[name]} and {key} are both {name!r}{context}; they must differ"
            )
        seen[name] = key


def _preprocessing(check: _Checker, where: str, name: str) -> None:
    if name not in PREPROCESSING_NAMES:
        raise check.fail(
            where, f"unknown preprocessing {name!r} ({', '.join(PREPROCESSING_NAMES)})"
        )


def _labels(check: _Checker, path: Path, where: str, value: Any) -> tuple[tuple[str, ...], str]:
    """Inline labels, or a labels file read as coreml-split reads any other."""
    if isinstance(value, str):
        return _labels_file(check, path, where, value)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        got = _toml_type(value)
        if isinstance(value, list):
            got = "array of " + ", ".join(sorted({_toml_type(x) for x in value}))
        raise check.fail(where, f"expected a list of strings or a file path, got {got}")
    if not value:
        raise check.fail(where, "empty list; give one label per class")
    blank = [i for i, label in enumerate(value) if not label.strip()]
    if blank:
        raise check.fail(where, f"label {blank[0]} is empty")
    dupes = sorted({x for x in value if value.count(x) > 1})
    if dupes:
        raise check.fail(where, f"duplicate labels: {', '.join(dupes[:5])}")
    return tuple(value), path.name


def _labels_file(check: _Checker, path: Path, where: str, name: str) -> tuple[tuple[str, ...], str]:
    if not name.strip():
        raise check.fail(where, "empty file path")
    source = path.parent / name
    if not source.is_file():
        raise check.fail(where, f"no such file: {name}")
    try:
        labels = read_labels(source)
    except LabelsError as exc:
        raise check.fail(where, f"{name}: {exc.reason}") from None
    return tuple(labels), str(source)


def _backbone_settings(check: _Checker, where: str, value: Any) -> BackboneSettings:
    table = check.table(where, value)
    check.known_keys(where, table, BACKBONE_KEYS)
    weights = None
    if "weights" in table:
        weights = check.string(_join(where, "weights"), table["weights"])
        _storage(check, _join(where, "weights"), weights)
    if "name" not in table:
        return BackboneSettings(weights=weights)
    name = check.string(_join(where, "name"), table["name"])
    if not _FILE_STEM.fullmatch(name) or set(name) == {"."}:
        raise check.fail(
            _join(where, "name"),
            f"{name!r} is not a safe file name (letters, digits, _, . and - only)",
        )
    return BackboneSettings(name=name, weights=weights)


# What an alias may not name, on either side: classes that hold or load code, and models.
_NO_ALIAS = {"Lambda", "TFSMLayer", "TFOpLambda", "Functional", "Sequential", "Model"}


def _aliases(check: _Checker, value: Any) -> dict[str, str]:
    """[aliases]: class name -> Keras class name, both plain identifiers."""
    aliases: dict[str, str] = {}
    for name, target in check.table("aliases", value).items():
        where = _join("aliases", name)
        target = check.string(where, target)
        for said in (name, target):
            if not _CLASS_NAME.fullmatch(said):
                raise check.fail(where, f"{said!r} is not a class name (letters, digits and _)")
            if said in _NO_ALIAS:
                raise check.fail(where, f"{said} cannot be aliased (it holds code or a model)")
        if target in value and target != name:
            raise check.fail(where, f"{target} is itself aliased; name the Keras class directly")
        if target != name:
            aliases[name] = target
    return aliases


def _storage(check: _Checker, where: str, value: str) -> None:
    problem = storage_problem(value)
    if problem:
        raise check.fail(where, problem)


# -- messages ---------------------------------------------------------------------------------


def _join(where: str, key: str) -> str:
    """A TOML key path; keys that are not bare (a dot, a space) are quoted as TOML would."""
    part = key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'
    return f"{where}.{part}" if where else part


def _unknown_key(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key (known: {', '.join(known)}){hint}"


def _toml_type(value: Any) -> str:
    """TOML's name for a value's type, which is what the user wrote."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.datetime):
        return "datetime"
    names = {str: "string", int: "integer", float: "float", list: "array"}
    names |= {datetime.date: "date", datetime.time: "time"}
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)
