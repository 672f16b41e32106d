"""report.html: what the page says (no browser), and how a real headless Chromium renders it.

The browser tests need ``chromium`` (Debian's package; ``chromium-browser`` or Google Chrome
will do) on PATH. Without one they skip, unless ``COREML_SPLIT_BROWSER=required``, which ``make
test`` sets after installing it: there a missing browser fails. The checker of a rendering is
shown to fail on a blank page, a script error, a fetch the page's policy blocks, and our page
without its chart.

Run as a script, this file renders a build's report to a PNG, cropped to the page (the README's
picture, docs/report.png, is the demo zoo converted and verified):

    PYTHONPATH=. .venv/bin/python tests/test_report_html.py build docs/report.png
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from convert.check.verify import VerifyResult, as_json
from convert.plan.types import ErrorEntry
from convert.report import BackboneReport, ClassifierReport, Report
from convert.report_html import COPY, PAGE, SHARED, page, plan_svg, write_page

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RENDER_SECONDS = 60
LONG = "a_classifier_with_a_name_far_too_long_for_any_box_" * 3


def classifier(
    name: str, group: str | None, head: int = 20_000, classes: int = 3
) -> ClassifierReport:
    backbone = 1_500_000
    size = head + 1_200 if group else backbone + head
    return ClassifierReport(
        name=name,
        source=f"/models/{name}.h5",
        group=group,
        file=f"{name}.mlmodel",
        bytes=size,
        head_bytes=head if group else size,
        standalone_bytes=backbone + head,
        classes=classes,
        labels=[f"label {i}" for i in range(classes)],
    )


def backbone(ident: str, members: list[str], weights: str = "float32") -> BackboneReport:
    return BackboneReport(
        id=ident,
        file=f"{ident}.mlmodel",
        bytes=1_500_000 if weights == "float32" else 750_000,
        parameters=410_208,
        members=members,
        split_layer="mobilenetv2_0.35_96/block_16_project_BN/a_layer_with_a_long_name",
        preprocessing="tf",
        builder="direct",
        weights=weights,
    )


# Names come from users' files: markup, quotes, any script, and bytes that are not UTF-8.
AWKWARD = [
    '<script>alert("x")</script>',
    "chats & chiens 'n' \"co\"",
    "猫の分類器",
    "caf\udce9",
    LONG,
]


def zoo_report(verified: bool = False) -> Report:
    """Three backbones (one shared by a dozen), a standalone classifier, awkward names, errors."""
    groups = {
        "MobileNetV2-0a1b2c3d": [f"head_{i:02d}" for i in range(12)],
        "MobileNetV2-float16-4e5f6a7b": AWKWARD,
        "EfficientNetB0-8c9d0e1f": ["only_two", "of_them"],
    }
    report = Report(
        backbones=[
            backbone(ident, members, "float16" if "float16" in ident else "float32")
            for ident, members in groups.items()
        ],
        classifiers=[classifier(m, ident) for ident, members in groups.items() for m in members]
        + [classifier("alone", None)],
        errors=[ErrorEntry("models/broken <1>.h5", "is not an HDF5 file")],
        lower_bound_bytes=3_000_000,
        lower_bounds={"float32": 4_000_000, "float16": 2_000_000, "int8": 1_000_000},
    )
    if verified:
        report.verify = as_json(
            [verify_result("head_00", 4e-5), verify_result(AWKWARD[0], 3e-3, top1=0.75)]
        )
    return report


def verify_result(name: str, diff: float, top1: float = 1.0) -> VerifyResult:
    return VerifyResult(
        name=name,
        file=f"{name}.mlmodel",
        images=12,
        max_abs_diff=diff,
        mean_abs_diff=diff / 5,
        top1_agreement=top1,
        weights="float32",
        tolerance=1e-4,
        passed=diff <= 1e-4,
        bound=["MobileNetV2-0a1b2c3d.mlmodel"],
        top1_gap=None if top1 == 1.0 else 7.5e-4,
    )


def built_report(built: tuple[Path, int]) -> Report:
    out, code = built
    assert code == 0
    return Report.from_json(json.loads((out / "report.json").read_text()))


def text_of(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "surrogateescape")


# -- the page, without a browser -----------------------------------------------------------


def test_the_page_of_a_real_build_holds_its_charts_and_every_name(
    built: tuple[Path, int], tmp_path: Path
) -> None:
    report = built_report(built)
    path = write_page(report, tmp_path)
    assert path == tmp_path / PAGE
    text = text_of(path)
    assert text.startswith("<!DOCTYPE html>")
    assert 'aria-label="bytes shipped, one by one vs split"' in text  # matplotlib's chart
    assert 'id="figure_1"' in text and "<?xml" not in text and "<!DOCTYPE svg" not in text
    assert 'aria-label="the plan: which classifiers share which backbone"' in text
    for b in report.backbones:
        assert b.id in text and b.file in text
    for c in report.classifiers:
        assert f">{c.name}<" in text and c.file in text
    assert "Not verified yet: run <code>coreml-split verify" in text
    assert "None: every model file found was planned." in text


def test_every_name_is_escaped_and_bytes_that_are_not_utf8_come_back(tmp_path: Path) -> None:
    report = zoo_report()
    data = write_page(report, tmp_path).read_bytes()
    text = data.decode("utf-8", "surrogateescape")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "chats &amp; chiens &#x27;n&#x27; &quot;co&quot;" in text
    assert "猫の分類器".encode() in data
    assert b"caf\xe9" in data  # the file name's own byte, as report.md writes it
    for c in report.classifiers:
        assert html.escape(c.name, quote=True) in text
    assert "broken &lt;1&gt;.h5</code>: is not an HDF5 file" in text


def test_a_long_name_is_cut_in_the_picture_and_whole_in_its_tooltip() -> None:
    svg = plan_svg(zoo_report())
    assert f"<title>{LONG}</title>" in svg
    shown = re.search(rf"<title>{LONG}</title>([^<]*)</text>", svg)
    assert shown and shown.group(1).endswith("…") and len(shown.group(1)) < 60
    layer = re.search(r"<tspan[^>]*>(…[^<]*a_layer_with_a_long_name)</tspan>", svg)
    assert layer, "a split layer keeps its end"


@pytest.mark.parametrize("count", [1, 3])
def test_the_plan_picture_grows_with_the_backbones(count: int) -> None:
    report = zoo_report()
    report.backbones = report.backbones[:count]
    svg = plan_svg(report)
    boxes = len(re.findall(r"<rect ", svg))
    members = sum(len(b.members) for b in report.backbones)
    assert boxes == count + 1 + members + 1  # backbones, the standalone box, their classifiers
    height = float(re.search(r'viewBox="0 0 \d+ (\d+)"', svg).group(1))
    assert height >= 38 * (members + 1)


def test_what_weights_auto_tried_is_shown() -> None:
    report = zoo_report()
    trial = {"what": "palette6", "bytes": 400_000, "max_dprob": 0.01, "top1": 1.0, "passed": True}
    report.backbones[0].choice = {"base": "palette6", "heads": "int8", "trials": [trial]}
    text = page(report)
    assert "Weights chosen for MobileNetV2-0a1b2c3d.mlmodel" in text
    assert "Chosen: palette6 for the backbone, heads int8; 1 trials." in text
    assert "<title>palette6: 400,000 bytes" in text  # report.py's picture of the trials


def test_verify_results_are_rows_and_missing_ones_are_named() -> None:
    text = page(zoo_report(verified=True))
    assert "Not verified yet" not in text
    assert "4.00e-05" in text and "3.00e-03" in text
    assert '<span class="badge ok">passed</span>' in text
    assert '<span class="badge bad">beyond tolerance</span>' in text
    assert "where it differs, Keras had the two within 7.5e-04" in text
    assert "Not compared in the last run: head_01, head_02" in text
    assert ">1 of 20</div>" in text  # the verified card


def test_the_page_reaches_for_nothing_on_the_network() -> None:
    for text in (page(zoo_report(verified=True)), page(Report())):
        assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
        assert not re.search(r"""url\(\s*["']?\s*(?:https?:)?//""", text, re.I)
        assert "@import" not in text and "<link" not in text and "<script" not in text.lower()
        assert "Content-Security-Policy" in text and "default-src 'none'" in text


def test_importing_it_or_rewriting_an_unchanged_page_does_not_import_matplotlib(
    tmp_path: Path,
) -> None:
    report_json = tmp_path / "report.json"
    report_json.write_text(json.dumps(zoo_report().to_json()))
    write_page(zoo_report(), tmp_path)
    before = (tmp_path / PAGE).stat()
    script = f"""
import json, sys
from pathlib import Path
from convert.report import Report
from convert.report_html import write_page
assert "matplotlib" not in sys.modules, "imported by convert.report_html"
report = Report.from_json(json.loads(Path({str(report_json)!r}).read_text()))
write_page(report, Path({str(tmp_path)!r}))
assert "matplotlib" not in sys.modules, "imported to rewrite an unchanged page"
report.lower_bound_bytes += 1
write_page(report, Path({str(tmp_path)!r}))
assert "matplotlib" in sys.modules, "a changed report is drawn again"
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    after = (tmp_path / PAGE).stat()
    assert after.st_ino != before.st_ino  # the changed report was written, atomically


# -- a real browser --------------------------------------------------------------------------


@dataclass
class Rendering:
    png: Path
    console: list[str]  # what the page logged: any message at all is a problem here


@pytest.fixture(scope="session")  # before `built`: without a browser, skip at once
def browser() -> str:
    found = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if found:
        return found
    reason = f"no headless browser on PATH ({', '.join(BROWSERS)}): apt-get install chromium"
    if os.environ.get("COREML_SPLIT_BROWSER") == "required":
        pytest.fail(f"COREML_SPLIT_BROWSER=required, but {reason}")
    pytest.skip(reason)


def render(browser: str, html: Path, png: Path, height: int = 1600) -> Rendering:
    """Load ``html`` in a fresh headless profile and screenshot a 1200-pixel-wide window."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",  # root on CI
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size=1200,{height}",
            f"--screenshot={png}",
            "--enable-logging=stderr",
            "--v=0",
            html.resolve().as_uri(),
        ]
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            _, err = proc.communicate(timeout=RENDER_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and every process it started
            proc.communicate()
            pytest.fail(f"{browser} did not render {html} within {RENDER_SECONDS} s")
    lines = err.decode(errors="replace").splitlines()
    assert png.is_file(), f"{browser} wrote no screenshot:\n" + "\n".join(lines[-20:])
    return Rendering(png, [line for line in lines if ":CONSOLE" in line])


def problems(rendering: Rendering, chart: bool = True) -> list[str]:
    """What is wrong with a rendering: console messages, a (nearly) blank page, and with
    ``chart``, no savings chart drawn (too few pixels in its bar colours)."""
    from PIL import Image

    pixels = np.asarray(Image.open(rendering.png).convert("RGB")).astype(np.int16)
    found = [f"console: {line.split('] ', 1)[-1]}" for line in rendering.console]
    sample = pixels[::4, ::4].reshape(-1, 3).astype(np.int32)  # one pixel in 16 will do
    colours, counts = np.unique(sample @ [1 << 16, 1 << 8, 1], return_counts=True)
    common = int(colours[counts.argmax()])
    background = np.array([common >> 16, (common >> 8) & 255, common & 255])
    ink = np.abs(pixels - background).max(axis=2) > 24
    rows = ink.any(axis=1).mean()
    if ink.mean() < 0.03 or rows < 0.25:
        found.append(f"blank: {ink.mean():.1%} of pixels, {rows:.0%} of rows hold anything")
    if chart:
        for name, colour in (("backbone copies", COPY), ("shared backbone", SHARED)):
            rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
            area = (np.abs(pixels - rgb).max(axis=2) <= 8).sum()
            if area < 4000:
                found.append(f"chart: the {name} bar covers {area} pixels")
    return found


def test_a_real_report_renders_with_its_chart_and_no_console_message(
    browser: str, built: tuple[Path, int], tmp_path: Path
) -> None:
    path = write_page(built_report(built), tmp_path)
    assert problems(render(browser, path, tmp_path / "page.png")) == []


def test_awkward_names_render_without_a_console_message(browser: str, tmp_path: Path) -> None:
    path = write_page(zoo_report(verified=True), tmp_path)
    assert problems(render(browser, path, tmp_path / "page.png")) == []


def _without_chart(real: str) -> str:
    return re.sub(r"<svg xmlns:xlink=.*?</svg>", "", real, count=1, flags=re.S)


# What the checker must report: a page of our own broken on purpose, or a tiny one.
BROKEN = {
    "blank": (lambda real: "<!DOCTYPE html><html><body></body></html>", "blank:", ""),
    "thrown": (
        lambda real: '<!DOCTYPE html><p>hi</p><script>throw new Error("x")</script>',
        "console:",
        "Uncaught Error: x",
    ),
    "fetching": (
        lambda real: real.replace("<main>", '<main><img src="https://example.invalid/x.png">'),
        "console:",
        "violates the following Content Security Policy directive",
    ),
    "no chart": (_without_chart, "chart:", "the backbone copies bar covers"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_checker_reports_a_broken_page(
    case: str, browser: str, built: tuple[Path, int], tmp_path: Path
) -> None:
    make, kind, said = BROKEN[case]
    broken = tmp_path / "broken.html"
    broken.write_text(make(text_of(write_page(built_report(built), tmp_path))))
    found = problems(render(browser, broken, tmp_path / "broken.png"))
    assert any(p.startswith(kind) and said in p for p in found), found
    if case in ("fetching", "no chart"):  # the rest of our page is still fine
        assert all(p.startswith(kind) for p in found), found


# -- the README's picture ---------------------------------------------------------------------


def screenshot(build: Path, png: Path) -> None:
    """Write ``build``'s report.html and render it, cropped below the page's last pixel."""
    from PIL import Image

    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        sys.exit(f"no browser on PATH ({', '.join(BROWSERS)})")
    report = Report.from_json(json.loads((build / "report.json").read_text()))
    found = problems(render(browser, write_page(report, build), png, height=4000))
    if found:
        sys.exit("\n".join(found))
    image = Image.open(png).convert("RGB")
    pixels = np.asarray(image).astype(np.int16)
    ink = np.abs(pixels - pixels[-1, 0]).max(axis=2) > 0
    last = int(np.nonzero(ink.any(axis=1))[0].max())
    image.crop((0, 0, image.width, min(image.height, last + 24))).save(png, optimize=True)


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))


def test_a_lone_surrogate_from_a_config_becomes_a_replacement_character(tmp_path: Path) -> None:
    """A JSON config may spell a layer name "\\ud800...": no report file fails on it, and a
    file name's own bytes still come back as they were."""
    from convert.report import write_reports
    from convert.xcode import write_kit

    report = Report(
        backbones=[backbone("MobileNetV2-0a1b2c3d", ["caf\udce9", "\ud800evil"])],
        classifiers=[classifier("caf\udce9", "MobileNetV2-0a1b2c3d")]
        + [classifier("\ud800evil", "MobileNetV2-0a1b2c3d")],
        errors=[ErrorEntry("models/odd.keras", "layer '\ud800lambda' is a Lambda layer")],
    )
    write_reports(report, tmp_path)
    write_page(report, tmp_path)
    write_kit(report, tmp_path)
    for name in ("report.md", "report.html", "README.md"):  # report.svg names no model
        data = (tmp_path / name).read_bytes()
        assert b"caf\xe9" in data and "\ufffdevil".encode() in data, name
    assert "\ufffdlambda".encode() in (tmp_path / "report.md").read_bytes()
