"""The Xcode kit (convert/xcode.py): a README and a Swift file of loaders, written beside the
models and checked against the build they describe.

No Swift toolchain runs here (Debian 12 packages none), so the Swift file is parsed with
tree-sitter-swift: a syntax error or a missing token fails. tree-sitter lets a keyword stand as
a name and a line break stand in a one-line string, so identifiers and string literals are
checked here too, and every loader's linked file and scope against the stub in its pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_swift

from convert.report import BackboneReport, ClassifierReport, Report, kb_or_mb
from convert.xcode import README, SWIFT_FILE, identifiers, write_kit

PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Swift's reserved words (The Swift Programming Language, "Lexical Structure"), and `self`.
KEYWORDS = set(
    """associatedtype class deinit enum extension fileprivate func import init inout internal let
    open operator private precedencegroup protocol public rethrows static struct subscript
    typealias var break case continue default defer do else fallthrough for guard if in repeat
    return switch where while as Any catch false is nil super self Self throw throws true try
    await async some any""".split()
)
SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


# -- reading Swift with tree-sitter -----------------------------------------------------------


def syntax_problems(source: str) -> list[str]:
    """Every ERROR and MISSING node of ``source``, one line each (row, column from 1)."""
    found: list[str] = []

    def visit(node: tree_sitter.Node) -> None:
        row, column = node.start_point.row + 1, node.start_point.column + 1
        if node.is_missing:
            found.append(f"{row}:{column}: missing {node.type}")
        elif node.type == "ERROR":
            found.append(f"{row}:{column}: cannot parse {node.text.decode()[:40]!r}")
        for child in node.children:
            visit(child)

    visit(PARSER.parse(source.encode()).root_node)
    return found


def string_value(node: tree_sitter.Node) -> str:
    """What a one-line Swift string literal holds; it must interpolate nothing, stay on one
    line and use only Swift's escapes."""
    assert node.type == "line_string_literal", node.type
    assert not any(c.type == "interpolated_expression" for c in node.children), node.text
    assert node.start_point.row == node.end_point.row, node.text
    body = node.text.decode()[1:-1]
    assert not any(ord(ch) < 0x20 for ch in body), body

    def unescape(m: re.Match[str]) -> str:
        if m.group(1):
            return chr(int(m.group(1), 16))
        assert m.group(2) in SIMPLE_ESCAPES, f"no such escape: \\{m.group(2)}"
        return SIMPLE_ESCAPES[m.group(2)]

    return re.sub(r"\\(?:u\{([0-9A-Fa-f]{1,8})\}|(.))", unescape, body)


def loaders_in(source: str) -> dict[str, dict[str, str | None]]:
    """The entries of ``extension CoreMLSplitModels``: Swift name -> {argument label: value,
    None for nil}."""
    root = PARSER.parse(source.encode()).root_node
    (namespace,) = [
        n
        for n in root.children
        if n.type == "class_declaration"
        and any(c.type == "extension" for c in n.children)
        and _name(n) == "CoreMLSplitModels"
    ]
    out: dict[str, dict[str, str | None]] = {}
    for prop in namespace.child_by_field_name("body").named_children:
        value = prop.child_by_field_name("value") if prop.type == "property_declaration" else None
        if value is None or value.type != "call_expression":
            continue
        assert value.named_children[0].text == b"Model"
        name = prop.child_by_field_name("name").text.decode()
        assert name not in out, f"{name} declared twice"
        out[name] = {
            arg.child_by_field_name("name").text.decode(): _value(arg.child_by_field_name("value"))
            for arg in _arguments(value)
        }
    return out


def _name(node: tree_sitter.Node) -> str:
    return node.child_by_field_name("name").text.decode()


def _arguments(call: tree_sitter.Node) -> list[tree_sitter.Node]:
    suffix = next(c for c in call.named_children if c.type == "call_suffix")
    arguments = next(c for c in suffix.named_children if c.type == "value_arguments")
    return [a for a in arguments.named_children if a.type == "value_argument"]


def _value(node: tree_sitter.Node) -> str | None:
    if node.text == b"nil":
        return None
    return string_value(node)


# -- checking the loaders against the pipelines ------------------------------------------------


def load_spec(path: Path):
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(path.read_bytes())


def mismatches(source: str, report: Report, folder: Path) -> list[str]:
    """Where a loader disagrees with the file it loads: its resource, or the stub's linked file
    name and its name in the pipeline (the scope); empty when every loader is right."""
    loaders = list(loaders_in(source).values())
    if len(loaders) != len(report.classifiers):
        return [f"{len(loaders)} loaders for {len(report.classifiers)} classifiers"]
    out = []
    for c, loader in zip(report.classifiers, loaders):
        spec = load_spec(folder / c.file)
        expected: dict[str, str | None] = {"resource": Path(c.file).stem}
        if spec.WhichOneof("Type") == "pipelineClassifier":
            pipeline = spec.pipelineClassifier.pipeline
            stub = pipeline.models[0]
            assert stub.WhichOneof("Type") == "linkedModel"
            link = stub.linkedModel.linkedModelFile.linkedModelFileName.defaultValue
            expected |= {"linkedModel": link, "stub": pipeline.names[0]}
        else:
            expected |= {"linkedModel": None, "stub": None}
        out += [
            f"{c.name}: {key} is {loader.get(key)!r}, the file says {want!r}"
            for key, want in expected.items()
            if loader.get(key) != want
        ]
    return out


@pytest.fixture(scope="module")
def kit(built, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report, list[Path]]:
    """The session build copied aside, with the kit written into the copy."""
    out, code = built
    assert code == 0
    folder = tmp_path_factory.mktemp("kit") / "build"
    shutil.copytree(out, folder)
    report = Report.from_json(json.loads((folder / "report.json").read_text()))
    return folder, report, write_kit(report, folder)


# -- the session build ------------------------------------------------------------------------


def test_the_kit_is_written_beside_the_models(kit) -> None:
    folder, _, paths = kit
    assert paths == [folder / README, folder / SWIFT_FILE]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_the_readme_names_every_file_to_ship_and_each_backbone_once(kit) -> None:
    folder, report, _ = kit
    text = (folder / README).read_text()
    ship, leave = text.split("## 1.")[1].split("## 2.")
    leave = leave.split("## 3.")[0]
    for model in sorted(folder.glob("*.mlmodel")):
        assert f"`{model.name}`" in ship, model.name
        assert model.name not in leave
    for b in report.backbones:
        (row,) = [line for line in ship.splitlines() if line.startswith(f"| `{b.file}`")]
        assert "once" in row and kb_or_mb(b.bytes) in row
        assert all(f"`{m}`" in row for m in b.members)
    for c in report.classifiers:
        (row,) = [line for line in ship.splitlines() if line.startswith(f"| `{c.file}`")]
        assert f"{c.classes} labels" in row and kb_or_mb(c.bytes) in row
        assert ("standalone" in row) == (c.group is None)
    for name in ("report.json", "report.md", "report.svg", ".cache/", README):
        assert f"`{name}`" in leave and name not in ship
    assert f"`{SWIFT_FILE}`" in ship
    assert "iOS 13" in text and "macOS 10.15" in text
    assert "MLUpdateTask" not in text  # no head of this build is updatable


def test_the_swift_file_parses(kit) -> None:
    folder, _, _ = kit
    assert syntax_problems((folder / SWIFT_FILE).read_text()) == []


def test_each_loader_links_what_its_pipelines_stub_links(kit) -> None:
    folder, report, _ = kit
    source = (folder / SWIFT_FILE).read_text()
    assert mismatches(source, report, folder) == []
    loaders = loaders_in(source)
    assert sum(1 for x in loaders.values() if x["linkedModel"]) == 5  # one standalone
    for loader in loaders.values():
        if loader["linkedModel"]:  # the compiled name of a backbone that is in the build
            assert (folder / loader["linkedModel"]).with_suffix(".mlmodel").is_file()
            assert loader["stub"] == "backbone"


def test_a_loader_that_disagrees_with_its_pipeline_is_caught(kit) -> None:
    folder, report, _ = kit
    source = (folder / SWIFT_FILE).read_text()
    wrong_scope = source.replace('stub: "backbone"', 'stub: "head"', 1)
    assert "stub is 'head', the file says 'backbone'" in mismatches(wrong_scope, report, folder)[0]
    name = report.classifiers[0].group
    wrong_file = source.replace(f'"{name}.mlmodelc"', f'"{name}.mlmodel"', 1)
    assert "linkedModel is" in mismatches(wrong_file, report, folder)[0]


# -- names from users' files ------------------------------------------------------------------

QUOTED = 'say "hi" \\(x) back\\slash\nand a new line'
AWKWARD = [
    "2 shapes",
    "class",
    "dog-breed",
    "dog_breed",
    "ünïcode",
    "unicode",
    "日本",
    "猫",
    "all",
    "self",
    "HTTPModel",
    "caf\udce9",  # a file name byte that is not UTF-8, as Python's file system decoding keeps it
    QUOTED,
]


def awkward_report() -> Report:
    backbone = BackboneReport(
        id="MobileNetV2-0a1b2c3d",
        file="MobileNetV2-0a1b2c3d.mlmodel",
        bytes=1_566_754,
        parameters=410_208,
        members=AWKWARD[:-1],
        split_layer="global_average_pooling2d",
        preprocessing="tf",
    )
    classifiers = [
        ClassifierReport(
            name=name,
            source=f"models/{name}.h5",
            group=None if name == QUOTED else backbone.id,
            file=f"{name}.mlmodel",
            bytes=20_000 + i,
            head_bytes=19_000,
            standalone_bytes=1_600_000,
            classes=3,
            updatable=["dense_1"] if name == "class" else [],
        )
        for i, name in enumerate(AWKWARD)
    ]
    return Report(backbones=[backbone], classifiers=classifiers)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (
            ["flat_k2", "dog-breed", "HTTPModel", "MobileNet"],
            ["flatK2", "dogBreed", "httpModel", "mobileNet"],
        ),
        (
            ["2 shapes", "class", "all", "ünïcode", "日本"],
            ["model2Shapes", "classModel", "allModel", "unicode", "model"],
        ),
        (
            ["dog-breed", "dog_breed", "dogBreed2", "猫", "犬"],
            ["dogBreed", "dogBreed2", "dogBreed22", "model", "model2"],
        ),
    ],
)
def test_identifiers(names: list[str], expected: list[str]) -> None:
    assert identifiers(names) == expected


def test_awkward_names_give_valid_unique_identifiers_and_escaped_literals(tmp_path: Path) -> None:
    report = awkward_report()
    (tmp_path / "old.mlmodel").write_bytes(b"")  # left by an earlier run
    readme, swift = write_kit(report, tmp_path)
    source = swift.read_bytes().decode("utf-8")  # valid UTF-8 whatever the names
    assert syntax_problems(source) == []
    loaders = loaders_in(source)
    assert len(loaders) == len(AWKWARD)
    for name in loaders:
        assert IDENTIFIER.fullmatch(name) and name not in KEYWORDS, name
    resources = [x["resource"] for x in loaders.values()]
    assert resources == [n.replace("\udce9", "\ufffd") for n in AWKWARD]
    assert '"say \\"hi\\" \\\\(x) back\\\\slash\\nand a new line"' in source
    assert [x["stub"] for x in loaders.values()] == ["backbone"] * (len(AWKWARD) - 1) + [None]

    text = readme.read_bytes()
    assert b"`caf\xe9.mlmodel`" in text  # the README names the file's own bytes
    lines = text.decode("utf-8", "surrogateescape").splitlines()
    assert all(line.endswith("|") for line in lines if line.startswith("|"))
    assert any("`old.mlmodel`: not part of this build" in line for line in lines)
    assert any("MLUpdateTask" in line for line in lines)  # "class" is updatable
    assert any("`class`: `dense_1`" in line for line in lines)


def test_an_unchanged_kit_is_not_written_again(tmp_path: Path) -> None:
    paths = write_kit(awkward_report(), tmp_path)
    for p in paths:
        os.utime(p, ns=(1, 1))
    assert write_kit(awkward_report(), tmp_path) == paths
    assert [p.stat().st_mtime_ns for p in paths] == [1, 1]
    fewer = awkward_report()
    fewer.classifiers.pop()
    write_kit(fewer, tmp_path)
    assert all(p.stat().st_mtime_ns != 1 for p in paths)


def test_an_empty_build_still_gives_a_kit_that_parses(tmp_path: Path) -> None:
    _, swift = write_kit(Report(), tmp_path)
    source = swift.read_text()
    assert syntax_problems(source) == [] and loaders_in(source) == {}


# -- the checks can fail ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "broken",
    [
        'enum A {\n    static let x = Model(resource: "a", linkedModel: nil,\n}\n',
        'let name = "never closed\nlet next = 1\n',
        "struct S {\n    func f() -> Int {\n        return 1\n}\n",
        "enum A { static let 2shapes = 1 }\n",
    ],
)
def test_broken_swift_is_reported(broken: str) -> None:
    assert syntax_problems(broken)


@pytest.mark.parametrize(
    "literal", ['"\\(name)"', '"a\\qb"', '"two\nlines"'], ids=["interpolates", "escape", "lines"]
)
def test_an_unsafe_literal_is_reported(literal: str) -> None:
    (node,) = [
        n
        for n in PARSER.parse(f"let x = {literal}\n".encode()).root_node.children[0].named_children
        if n.type == "line_string_literal"
    ]
    with pytest.raises(AssertionError):
        string_value(node)


def test_a_readme_coreml_split_did_not_write_is_never_overwritten(tmp_path: Path) -> None:
    """``--out`` may be a folder with the user's own README.md: it stays, and a warning says
    why the kit has no README there; the Swift file is still written."""
    own = tmp_path / README
    own.write_text("# My app\n\nNotes I keep here.\n")
    said: list[str] = []
    paths = write_kit(awkward_report(), tmp_path, warn=said.append)
    assert own.read_text() == "# My app\n\nNotes I keep here.\n"
    assert paths == [tmp_path / SWIFT_FILE] and (tmp_path / SWIFT_FILE).is_file()
    assert said == [f"{own}: not written by coreml-split; left as it is (no Xcode kit file)"]
    own.unlink()
    assert write_kit(awkward_report(), tmp_path, warn=said.append) == [own, tmp_path / SWIFT_FILE]
    assert own.read_bytes().startswith(b"<!-- written by coreml-split") and len(said) == 1
