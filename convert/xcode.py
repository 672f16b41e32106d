"""The Xcode hand-off kit: a README and a Swift file of loaders, written beside the models.

Both are made from the :class:`~convert.report.Report` alone. The README says which files of the
build folder go into the app target (each backbone once, every pipeline, standalone classifiers)
and which stay out; the Swift file gives every classifier a loader that points its pipeline's
linked-model stub at the backbone compiled into the app bundle, through
``MLModelConfiguration.parameters``, so a pipeline compiled at run time (in a temporary folder,
where the stub's ``.`` finds nothing) loads as well as the bundled one.

Names come from users' files, so every one of them is made safe where it lands: a Swift
identifier (ASCII lowerCamelCase, never a keyword, unique in the file), a Swift string literal
(escaped), a Swift comment or a Markdown code span (no line breaks, no control characters).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from convert import __version__
from convert.files import CACHE_DIR, text_bytes, write_atomic
from convert.report import ClassifierReport, Report, kb_or_mb, mb

README = "README.md"
SWIFT_FILE = "CoreMLSplitModels.swift"
NAMESPACE = "CoreMLSplitModels"
# The stub's name in every pipeline (Pipeline.names, set by build/pipeline.make_pipeline). Core ML
# scopes a pipeline's parameters by these names: MLParameterKey.scoped(to:).
STUB = "backbone"
SEARCH_PATH = ".:$BUNDLE_MAIN"  # what the stubs search (build/spec.SEARCH_PATH)
# Linked models need specification version 4; MLParameterKey came to tvOS in 14.
AVAILABLE = "@available(iOS 13.0, macOS 10.15, tvOS 14.0, watchOS 6.0, *)"
MLUPDATETASK_DOCS = "https://developer.apple.com/documentation/coreml/mlupdatetask"

# Swift's keywords, and the names `Type.name` cannot take; "all" is the namespace's own list.
RESERVED = frozenset(
    """
    associatedtype borrowing class consume consuming copy deinit discard each enum extension
    fileprivate func import init inout internal let macro nonisolated open operator
    precedencegroup private protocol public rethrows some static struct subscript typealias var
    break case catch continue default defer do else fallthrough for guard if in repeat return
    switch throw where while Any any as async await false is nil self Self super throws true try
    Type Protocol dynamicType all
    """.split()
)
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # control, format, surrogate, line breaks
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}


@dataclass(frozen=True)
class Loader:
    """One classifier's entry in the Swift file."""

    classifier: ClassifierReport
    identifier: str  # its Swift name, unique in the namespace
    resource: str  # its compiled model's name in the bundle, without ``.mlmodelc``
    linked: str | None  # the compiled backbone its stub links; None: a standalone classifier


def write_kit(report: Report, out: Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``out/README.md`` and ``out/CoreMLSplitModels.swift`` for the build ``report``
    describes; return the paths written or already current. A file whose bytes would not change
    is left alone, so an Xcode project that references it in place has nothing to rebuild, and a
    file of that name that coreml-split did not write is never overwritten (``warn`` says so)."""
    loaders = make_loaders(report)
    files = {
        out / README: readme(report, loaders, _folder_entries(out)),
        out / SWIFT_FILE: swift_source(loaders),
    }
    kept = []
    for path, text in files.items():
        # a file name that is not UTF-8 stands in Python's str for its bytes (surrogates): back
        data = text_bytes(text)
        if path.is_file() and not _written_by_us(path, data):
            if warn is not None:
                warn(f"{path}: not written by coreml-split; left as it is (no Xcode kit file)")
            continue
        if not (path.is_file() and path.read_bytes() == data):
            write_atomic(path, data)
        kept.append(path)
    return kept


def _written_by_us(path: Path, data: bytes) -> bool:
    """Whether ``path`` starts as the kit file ``data`` does (its first line names the tool)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    return first == data.split(b"\n", 1)[0] + b"\n"


def make_loaders(report: Report) -> list[Loader]:
    """Every classifier of ``report`` with its Swift name and what its loader loads."""
    backbone_files = {b.id: b.file for b in report.backbones}
    names = identifiers([c.name for c in report.classifiers])
    return [
        Loader(c, name, Path(c.file).stem, _linked(c, backbone_files))
        for c, name in zip(report.classifiers, names)
    ]


def _linked(classifier: ClassifierReport, backbone_files: dict[str, str]) -> str | None:
    """The compiled name Xcode gives the classifier's backbone: ``X.mlmodel`` → ``X.mlmodelc``."""
    if classifier.group is None:
        return None
    file = backbone_files.get(classifier.group, f"{classifier.group}.mlmodel")
    return Path(file).stem + ".mlmodelc"


# -- Swift ------------------------------------------------------------------------------------


def identifier(name: str) -> str:
    """A lowerCamelCase Swift identifier for ``name``: accents dropped, any other character that
    is not an ASCII letter or digit separates words; never a keyword, never a leading digit."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    words = re.findall(r"[A-Za-z0-9]+", folded)
    if not words:
        return "model"
    first = re.sub(r"^[A-Z]+(?=[A-Z][a-z])|^[A-Z]+", lambda m: m.group().lower(), words[0])
    text = first + "".join(w[0].upper() + w[1:] for w in words[1:])
    if text[0].isdigit():
        text = "model" + text
    return text + "Model" if text in RESERVED else text


def identifiers(names: list[str]) -> list[str]:
    """:func:`identifier` of each name, numbered from 2 where two would be the same."""
    taken: set[str] = set()
    out = []
    for name in names:
        base = candidate = identifier(name)
        n = 2
        while candidate in taken:
            candidate, n = f"{base}{n}", n + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def swift_string(text: str) -> str:
    """``text`` as a Swift string literal: nothing in it can end the literal or interpolate.
    A lone surrogate (a file name byte that is not UTF-8) has no Swift form: it becomes U+FFFD."""
    return '"' + "".join(_swift_char(ch) for ch in text) + '"'


def _swift_char(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    category = unicodedata.category(ch)
    if category == "Cs":
        return "\\u{FFFD}"
    return f"\\u{{{ord(ch):X}}}" if category in _UNPRINTABLE else ch


def plain(text: str) -> str:
    """``text`` on one line, for Markdown: control characters and line breaks become U+FFFD.
    Lone surrogates stay: written back with ``surrogateescape``, they are the file name's bytes."""
    return "".join(
        "\ufffd" if unicodedata.category(ch) in _UNPRINTABLE - {"Cs"} else ch for ch in text
    )


def _comment(text: str) -> str:
    """``plain`` with surrogates replaced too: a Swift file must be valid UTF-8."""
    return "".join("\ufffd" if unicodedata.category(ch) == "Cs" else ch for ch in plain(text))


def swift_source(loaders: list[Loader]) -> str:
    """The Swift file: the shared code, then one ``CoreMLSplitModels.Model`` per classifier."""
    entries = [line for loader in loaders for line in _swift_entry(loader)]
    listed = [f"        {loader.identifier}," for loader in loaders]
    all_models = ["[", *listed, "    ]"] if listed else ["[]"]
    lines = [
        f"// {SWIFT_FILE}: generated by coreml-split {__version__} for the models beside it.",
        "// Do not edit: `coreml-split convert` writes it again. README.md says how to use it.",
        _SHARED_SWIFT.replace("@AVAILABLE", AVAILABLE).replace("NAMESPACE", NAMESPACE),
        f"/// The classifiers of this build, one loader each: `try {NAMESPACE}.<name>.load()`.",
        AVAILABLE,
        f"extension {NAMESPACE} {{",
        *entries,
        "    /// Every classifier above, in the report's order.",
        f"    static let all: [Model] = {all_models[0]}",
        *all_models[1:],
        "}",
    ]
    return "\n".join(lines) + "\n"


def _swift_entry(loader: Loader) -> list[str]:
    c = loader.classifier
    what = f"pipeline on {c.group}" if c.group else "standalone classifier"
    linked = swift_string(loader.linked) if loader.linked else "nil"
    stub = swift_string(STUB) if loader.linked else "nil"
    return [
        f"    /// `{_comment(c.name)}`: {_comment(what)}, {c.classes} labels "
        f"({_comment(c.file)}, {kb_or_mb(c.bytes)}).",
        f"    static let {loader.identifier} = Model(",
        f"        resource: {swift_string(loader.resource)},",
        f"        linkedModel: {linked},",
        f"        stub: {stub}",
        "    )",
        "",
    ]


# Only NAMESPACE stands at the top level: Xcode generates a class per .mlmodel (and its Input and
# Output), and a model named like a helper type here must not clash with it.
_SHARED_SWIFT = r"""
import CoreGraphics
import CoreML
import Foundation

/// Loaders for the Core ML models of this build.
@AVAILABLE
enum NAMESPACE {
    /// One classifier: its compiled model and, for a pipeline, the backbone it links.
    struct Model {
        /// The compiled model's name in the bundle, without `.mlmodelc`.
        let resource: String
        /// The compiled backbone the pipeline's linked-model stub names; `nil`: standalone.
        let linkedModel: String?
        /// The stub's name in the pipeline: the scope of the linked-model parameters.
        let stub: String?

        /// The compiled model in `bundle`, where Xcode put it.
        func url(in bundle: Bundle = .main) throws -> URL {
            guard let url = bundle.url(forResource: resource, withExtension: "mlmodelc") else {
                throw ModelError(message: "\(resource).mlmodelc is not in \(bundle.bundlePath)")
            }
            return url
        }

        /// `base` with the stub pointed at the backbone beside the model or compiled into
        /// `bundle`, for `MLModel` and `MLUpdateTask` alike.
        func configuration(
            _ base: MLModelConfiguration = MLModelConfiguration(),
            backboneIn bundle: Bundle = .main
        ) -> MLModelConfiguration {
            guard let linkedModel = linkedModel, let stub = stub else { return base }
            let configuration = base.copy() as! MLModelConfiguration
            let folder = bundle.resourcePath ?? bundle.bundlePath
            var parameters = configuration.parameters ?? [:]
            parameters[MLParameterKey.linkedModelFileName.scoped(to: stub)] = linkedModel
            parameters[MLParameterKey.linkedModelSearchPath.scoped(to: stub)] = ".:" + folder
            configuration.parameters = parameters
            return configuration
        }

        /// The model from `bundle`, or from `compiledURL` (what `MLModel.compileModel(at:)`
        /// gave, say).
        func load(
            from compiledURL: URL? = nil, backboneIn bundle: Bundle = .main,
            configuration base: MLModelConfiguration = MLModelConfiguration()
        ) throws -> MLModel {
            let url = try compiledURL ?? self.url(in: bundle)
            let configured = configuration(base, backboneIn: bundle)
            return try MLModel(contentsOf: url, configuration: configured)
        }
    }

    /// A model that is not where it was looked for, or not an image classifier.
    struct ModelError: LocalizedError {
        let message: String
        var errorDescription: String? { message }
    }

    /// What a classifier says about one image.
    struct Classification {
        /// The most likely label.
        let label: String
        /// Every label's probability.
        let probabilities: [String: Double]
    }
}

@AVAILABLE
extension MLModel {
    /// Classify one image; Core ML scales and converts it to the model's image input.
    func classify(_ image: CGImage) throws -> NAMESPACE.Classification {
        let description = modelDescription
        let inputs = description.inputDescriptionsByName.values
        guard
            let input = inputs.first(where: { $0.type == .image }),
            let constraint = input.imageConstraint,
            let labelName = description.predictedFeatureName,
            let probabilitiesName = description.predictedProbabilitiesName
        else {
            throw NAMESPACE.ModelError(message: "the model is not an image classifier")
        }
        let value = try MLFeatureValue(cgImage: image, constraint: constraint, options: nil)
        let features = try MLDictionaryFeatureProvider(dictionary: [input.name: value])
        let output = try prediction(from: features)
        var probabilities: [String: Double] = [:]
        for (key, score) in output.featureValue(for: probabilitiesName)?.dictionaryValue ?? [:] {
            if let key = key as? String {
                probabilities[key] = score.doubleValue
            }
        }
        let label = output.featureValue(for: labelName)?.stringValue ?? ""
        return NAMESPACE.Classification(label: label, probabilities: probabilities)
    }
}
"""


# -- README -----------------------------------------------------------------------------------

REPORT_FILES = re.compile(r"report(-.+)?\.(json|md|svg|html)")


def readme(report: Report, loaders: list[Loader], found: list[str]) -> str:
    """The README: what to ship, what not, what Xcode makes of it, and the Swift side."""
    sections = [
        _overview(report),
        _ship(report),
        _leave_out(report, found),
        _what_xcode_makes(report),
        _loading(loaders),
        _downloaded(loaders),
        _minimum_os(),
        _training(loaders),
        _not_converted(report),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _code(text: str, table: bool = False) -> str:
    """``text`` as a Markdown code span, on one line; ``|`` escaped inside a table."""
    text = plain(text)
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    span = f"{fence}{pad}{text}{pad}{fence}"
    return span.replace("|", "\\|") if table else span


def _names(names: list[str]) -> str:
    return ", ".join(_code(n, table=True) for n in names)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _overview(report: Report) -> str:
    t = report.totals()
    pipelines = sum(1 for c in report.classifiers if c.group)
    standalone = len(report.classifiers) - pipelines
    return (
        "<!-- written by coreml-split for this build; `coreml-split convert` rewrites it -->\n"
        "# Using these models in Xcode\n\n"
        f"coreml-split {__version__} wrote this build: "
        f"{_count(len(report.classifiers), 'classifier')}, {pipelines} of them pipelines on "
        f"{_count(len(report.backbones), 'shared backbone')} and {standalone} standalone. The "
        f"app ships {mb(t['written_bytes'])} of models ({mb(t['one_by_one_bytes'])} converted "
        "one by one)."
    )


def _ship(report: Report) -> str:
    rows = [
        f"| {_code(b.file, True)} | backbone of {_names(b.members)}: add it **once** "
        f"| {kb_or_mb(b.bytes)} |"
        for b in report.backbones
    ]
    for c in report.classifiers:
        what = f"pipeline on {_code(c.group, True)}" if c.group else "standalone classifier"
        rows.append(
            f"| {_code(c.file, True)} | {_code(c.name, True)}: {what}, {c.classes} labels "
            f"| {kb_or_mb(c.bytes)} |"
        )
    rows.append(f"| {_code(SWIFT_FILE, True)} | a loader for each classifier (generated) | |")
    return (
        "## 1. Drag these into the app target\n\n"
        "| file | what it is | bytes |\n|---|---|---:|\n" + "\n".join(rows) + "\n\n"
        "Ship each backbone once, however many pipelines use it: a pipeline holds only its head "
        "and a stub that names the backbone. A standalone classifier carries its own backbone. "
        "Tick every target that classifies (an app extension too) under *Target Membership*."
    )


def _leave_out(report: Report, found: list[str]) -> str:
    shipped = {b.file for b in report.backbones} | {c.file for c in report.classifiers}
    reasons: dict[str, list[str]] = {}
    for name in sorted({*found, README} - shipped - {SWIFT_FILE}):
        reasons.setdefault(_why_not(name), []).append(name + ("/" if name == CACHE_DIR else ""))
    lines = [f"- {', '.join(_code(n) for n in names)}: {why}." for why, names in reasons.items()]
    return "## 2. Leave these out\n\n" + "\n".join(lines)


def _why_not(name: str) -> str:
    if name == README:
        return "this file"
    if name == CACHE_DIR:
        return "coreml-split's cache, which makes the next run fast"
    if REPORT_FILES.fullmatch(name):
        return "the size report, for you and not for the app"
    if name.endswith(".mlmodel"):
        return "not part of this build (left by an earlier run?)"
    return "not written by coreml-split"


def _what_xcode_makes(report: Report) -> str:
    compiled = [Path(b.file).stem + ".mlmodelc" for b in report.backbones]
    compiled += [Path(c.file).stem + ".mlmodelc" for c in report.classifiers]
    listed = ", ".join(_code(n) for n in compiled) or "nothing yet"
    return (
        "## 3. What Xcode makes of them\n\n"
        "Xcode compiles each `X.mlmodel` into `X.mlmodelc` in the app bundle (`Contents/Resources`"
        f" on macOS): {listed}. Each pipeline's stub names its backbone's `.mlmodelc` and "
        f"searches `{SEARCH_PATH}`: beside the pipeline, then the main bundle. Xcode also "
        f"generates a Swift class per model; {_code(SWIFT_FILE)} does not use them, so a model "
        "downloaded later, which has none, loads the same way."
    )


def _example(loaders: list[Loader]) -> Loader | None:
    return next((x for x in loaders if x.linked), loaders[0] if loaders else None)


def _loading(loaders: list[Loader]) -> str:
    rows = [
        f"| {_code(x.classifier.name, True)} | `{NAMESPACE}.{x.identifier}` "
        f"| {_code(x.resource + '.mlmodelc', True)} "
        f"| {_code(x.linked, True) if x.linked else 'nothing: standalone'} |"
        for x in loaders
    ]
    text = (
        f"## 4. Loading them from Swift\n\n{_code(SWIFT_FILE)} has one loader per classifier, "
        "returning an `MLModel`:\n\n| classifier | Swift | loads | links |\n|---|---|---|---|\n"
        + "\n".join(rows)
    )
    example = _example(loaders)
    if example is None:
        return text
    return (
        f"{text}\n\n```swift\nlet model = try {NAMESPACE}.{example.identifier}.load()"
        "  // from the app bundle\nlet result = try model.classify(cgImage)"
        "  // Core ML scales the image to the input\nprint(result.label, "
        "result.probabilities[result.label] ?? 0)\n```\n\n"
        "`load()` sets `MLModelConfiguration.parameters`: "
        f'`MLParameterKey.linkedModelFileName.scoped(to: "{STUB}")` to the backbone\'s compiled '
        f'name and `MLParameterKey.linkedModelSearchPath.scoped(to: "{STUB}")` to `.` and the '
        f"bundle's resource folder. `{STUB}` is the stub's name in every pipeline, and Core ML "
        "scopes a pipeline's parameters by its models' names. Pass `backboneIn:` for a backbone "
        "in another bundle (a framework), `configuration:` for your own settings (compute units)."
        " With Vision: `VNCoreMLModel(for: model)`."
    )


def _downloaded(loaders: list[Loader]) -> str:
    example = next((x for x in loaders if x.linked), None)
    if example is None:
        return ""
    sizes = sorted(x.classifier.bytes for x in loaders if x.linked)
    linked = swift_string(example.linked or "")
    return (
        "## 5. A pipeline downloaded at run time\n\n"
        f"A pipeline is small ({kb_or_mb(sizes[0])} to {kb_or_mb(sizes[-1])} here), so an app "
        "can fetch a new or retrained head and keep the backbone it ships:\n\n```swift\n"
        "let compiled = try MLModel.compileModel(at: downloadedFile)  // a temporary folder\n"
        f"let model = try {NAMESPACE}.{example.identifier}.load(from: compiled)\n```\n\n"
        "`compileModel(at:)` compiles into a temporary folder, where the stub's `.` finds no "
        "backbone; `load(from:)` points the stub at the one in the bundle. Move the compiled "
        "folder to Application Support to keep it. For a classifier this build does not have, "
        f'use `{NAMESPACE}.Model(resource: "name", linkedModel: {linked}, stub: "{STUB}")'
        ".load(from: compiled)`; it must have been converted on the same "
        "backbone (the hash in a backbone's name identifies what it computes)."
    )


def _minimum_os() -> str:
    return (
        "## 6. Minimum OS\n\n"
        "iOS 13, macOS 10.15 (tvOS 14, watchOS 6). Linked models need Core ML specification "
        "version 4, which came with iOS 13 and macOS 10.15, and so did "
        "`MLModelConfiguration.parameters`, `MLParameterKey.linkedModelFileName`, "
        "`MLParameterKey.linkedModelSearchPath` and `scoped(to:)`. Set the app's deployment "
        "target no lower."
    )


def _training(loaders: list[Loader]) -> str:
    updatable = [x for x in loaders if x.classifier.updatable]
    if not updatable:
        return ""
    rows = [
        f"- {_code(x.classifier.name)}: {', '.join(_code(n) for n in x.classifier.updatable)}"
        for x in updatable
    ]
    name = f"{NAMESPACE}.{updatable[0].identifier}"
    return (
        "## 7. Training on the device\n\nThese heads are updatable (the layers that learn):\n\n"
        + "\n".join(rows)
        + f"\n\nTrain them with [`MLUpdateTask`]({MLUPDATETASK_DOCS}), given the same "
        "configuration so that the backbone is found:\n\n```swift\n"
        f"let task = try MLUpdateTask(\n    forModelAt: try {name}.url(), "
        f"trainingData: examples,\n    configuration: {name}.configuration(),\n"
        "    completionHandler: { context in try? context.model.write(to: personalCopy) })\n"
        "task.resume()  // later: load(from: personalCopy)\n```\n\n"
        "Each example holds the image and its true label "
        "(`modelDescription.trainingInputDescriptionsByName`). Only the head learns; the "
        "backbone stays shared and frozen."
    )


def _not_converted(report: Report) -> str:
    if not report.errors:
        return ""
    lines = [f"- {_code(e.file)}: {_code(e.reason)}" for e in report.errors]
    return "## Not converted\n\nThese files are not in the build:\n\n" + "\n".join(lines)


def _folder_entries(out: Path) -> list[str]:
    """The names at the top of the build folder, without write_atomic's temporary files."""
    if not out.is_dir():
        return []
    return sorted(
        p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )
