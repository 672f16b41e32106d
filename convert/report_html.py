"""report.html: the size report as one self-contained page, beside report.json and report.md.

The page shows what :mod:`convert.report` knows, for people: a chart of the bytes shipped one
by one against the split build (and the zoo's lower bound in each weight storage), a picture of
the plan (which classifiers share which backbone, and where each group splits), the table of
files, the verify results and the errors.

Everything is inline: CSS, the charts as SVG, no script, no font, no image to fetch; the page's
Content-Security-Policy forbids any fetch, so a reference that slipped in shows as a console
error. Every name comes from a user's files and is escaped. matplotlib draws the savings chart
and is imported only by :func:`savings_svg`, so importing this module stays cheap; the page is
redrawn only when the report (or this module) changed, so a no-op rerun imports nothing.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert import __version__
from convert.files import text_bytes, write_atomic
from convert.report import (
    BUILDER_NOTES,
    BackboneReport,
    ClassifierReport,
    Report,
    kb_or_mb,
    mb,
    summary_line,
    trials_svg,
)

PAGE = "report.html"
DIGEST_META = "coreml-split-report"
# report.svg's palette, so both pictures read alike
COPY, SHARED, HEAD, STANDALONE = "#d1495b", "#edae49", "#2e86ab", "#8d99ae"
INK, MUTED, RULE = "#1f2933", "#616e7c", "#d9dee3"


def write_page(report: Report, out: Path) -> Path:
    """Write ``out/report.html`` and return its path; an unchanged report rewrites nothing."""
    path = out / PAGE
    digest = page_digest(report)
    if _holds(path, digest):
        return path
    # a file name that is not UTF-8 stands in Python's str for its bytes (surrogates): back
    write_atomic(path, text_bytes(page(report, digest)))
    return path


def page_digest(report: Report) -> str:
    """What the page is drawn from: the report and the code that draws it."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps(report.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _holds(path: Path, digest: str) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(2048)
    except OSError:
        return False
    return f'name="{DIGEST_META}" content="{digest}"'.encode() in head


def page(report: Report, digest: str = "") -> str:
    """The whole page, as text."""
    body = [
        _header(report),
        _section("Bytes shipped", _figure(savings_svg(report), _savings_caption(report))),
        _section("The plan", _figure(plan_svg(report), _plan_caption(report))),
        _section("Files", files_table(report)),
        _section("Verification", verify_html(report)),
        _section("Errors", errors_html(report)),
        *(_choice_html(b) for b in report.backbones if b.choice),
        f"<footer>coreml-split {_e(__version__)}; report.json holds every figure.</footer>",
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta name="{DIGEST_META}" content="{_e(digest)}">',
            '<meta http-equiv="Content-Security-Policy" '
            "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>coreml-split report</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            "<main>",
            *body,
            "</main>",
            "</body>",
            "</html>",
        ]
    )


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _section(title: str, content: str) -> str:
    anchor = _e(title.lower().replace(" ", "-"))
    return f'<section id="{anchor}">\n<h2>{_e(title)}</h2>\n{content}\n</section>'


def _figure(svg: str, caption: str) -> str:
    return f'<figure class="chart">\n{svg}\n<figcaption>{caption}</figcaption>\n</figure>'


# -- the header ------------------------------------------------------------------------------


def _header(report: Report) -> str:
    t = report.totals()
    cards = [
        ("shipped", mb(t["written_bytes"]), f"{t['classifiers']} classifiers"),
        ("one by one", mb(t["one_by_one_bytes"]), "each with its own backbone"),
        ("saved", mb(t["saved_bytes"]), f"{t['ratio'] or '-'}x smaller"),
        ("lower bound", mb(t["lower_bound_bytes"]), "each distinct weight once"),
        ("verified", *_verified_card(report)),
    ]
    html_cards = "\n".join(
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value">{_e(value)}</div><div class="note">{_e(note)}</div></div>'
        for label, value, note in cards
    )
    return (
        "<header>\n<h1>coreml-split report</h1>\n"
        f'<p class="summary">{_e(summary_line(report))}</p>\n'
        f'<div class="cards">\n{html_cards}\n</div>\n</header>'
    )


def _verified_card(report: Report) -> tuple[str, str]:
    if report.verify is None:
        return "not yet", "run coreml-split verify"
    passed = sum(1 for v in report.verify if v["passed"])
    return f"{passed} of {len(report.classifiers)}", "within tolerance"


# -- the savings chart (matplotlib) ----------------------------------------------------------


@dataclass
class Segment:
    """One piece of a bar: what it is, its bytes, its colour."""

    name: str
    bytes: int
    colour: str


def bars(report: Report) -> dict[str, list[Segment]]:
    """The two bars of the chart, each a list of segments that add up to its total: every
    classifier with its own backbone copy (one segment per copy), and the split build (one
    segment per shared backbone). Heads include their stubs in the split build."""
    grouped = [c for c in report.classifiers if c.group]
    alone = [c for c in report.classifiers if not c.group]
    one_by_one = [
        Segment("backbone copies", c.standalone_bytes - c.head_bytes, COPY) for c in grouped
    ]
    one_by_one.append(Segment("heads", sum(c.head_bytes for c in grouped), HEAD))
    one_by_one.append(Segment("standalone", sum(c.standalone_bytes for c in alone), STANDALONE))
    split = [Segment("shared backbones", b.bytes, SHARED) for b in report.backbones]
    split.append(Segment("heads", sum(c.bytes for c in grouped), HEAD))
    split.append(Segment("standalone", sum(c.bytes for c in alone), STANDALONE))
    return {
        "one by one": [s for s in one_by_one if s.bytes > 0],
        "coreml-split": [s for s in split if s.bytes > 0],
    }


def storages_used(report: Report) -> set[str]:
    """The weight storages this build wrote."""
    return {b.weights for b in report.backbones} | {c.weights for c in report.classifiers}


def savings_svg(report: Report) -> str:
    """The bars of :func:`bars` with the lower bound marked and, when the report holds the
    zoo's lower bound in each storage, those bounds below: matplotlib's SVG, inline."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    per_storage = len(report.lower_bounds) > 1
    style = {
        "svg.fonttype": "none",  # text stays text, in the page's fonts
        "svg.hashsalt": "coreml-split",  # the same report draws the same bytes
        "font.size": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.edgecolor": MUTED,
        "xtick.color": MUTED,
        "ytick.color": INK,
    }
    with matplotlib.rc_context(style):
        heights = [2.3, 2.5] if per_storage else [2.3]
        fig = Figure(figsize=(10.5, sum(heights) + 0.3), layout="constrained")
        FigureCanvasSVG(fig)
        axes = fig.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
        _draw_bars(axes[0], report)
        if per_storage:
            _draw_storages(axes[1], report)
        buf = io.StringIO()
        fig.savefig(
            buf, format="svg", metadata=dict.fromkeys(("Date", "Creator", "Format", "Type"))
        )
    return _inline_svg(buf.getvalue(), "bytes shipped, one by one vs split")


def _inline_svg(text: str, label: str) -> str:
    """matplotlib's file as an element of the page: no prolog, no global style, fluid width."""
    text = text[text.index("<svg") :]
    text = text.replace(
        '<style type="text/css">*{stroke-linejoin: round; stroke-linecap: butt}</style>', ""
    )
    head, rest = text.split(">", 1)
    head = re.sub(r'\s(?:width|height)="[^"]*"', "", head)
    return f'{head} width="100%" role="img" aria-label="{_e(label)}">{rest}'


def _draw_bars(ax: Any, report: Report) -> None:
    t = report.totals()
    rows = bars(report)
    seen: dict[str, Any] = {}
    for y, segments in zip((1, 0), rows.values(), strict=True):
        left = 0.0
        total = sum(s.bytes for s in segments)
        for s in segments:
            patch = ax.barh(
                y,
                s.bytes / 1e6,
                left=left,
                height=0.62,
                color=s.colour,
                edgecolor="white",
                linewidth=1.2,
            )
            seen.setdefault(s.name, patch)
            left += s.bytes / 1e6
        note = mb(total) + (f"  ({t['ratio']}x smaller)" if y == 0 and t["ratio"] else "")
        ax.text(left, y, "  " + note, va="center", ha="left", color=INK, fontweight="bold")
    widest = max((sum(s.bytes for s in segs) for segs in rows.values()), default=0) / 1e6
    bound = t["lower_bound_bytes"] / 1e6
    if bound > 0:
        ax.axvline(bound, color=INK, linestyle=(0, (4, 3)), linewidth=1.2)
        ax.annotate(
            f"lower bound {mb(t['lower_bound_bytes'])}",
            (bound, 1.52),
            xytext=(5, 0),
            textcoords="offset points",
            color=INK,
            va="center",
        )
    ax.set_yticks([1, 0], list(rows))
    ax.set_ylim(-0.5, 1.8)
    ax.set_xlim(0, max(widest, bound, 1e-6) * 1.22)
    ax.set_xlabel("MB")
    ax.tick_params(axis="y", length=0, labelsize=11)
    if not seen:
        return
    ax.legend(
        list(seen.values()),
        list(seen),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.32),
        ncol=len(seen),
        frameon=False,
    )


def _draw_storages(ax: Any, report: Report) -> None:
    used = storages_used(report)
    bounds = sorted(report.lower_bounds.items(), key=lambda kv: -kv[1])
    names = [s for s, _ in bounds]
    values = [n / 1e6 for _, n in bounds]
    colours = [SHARED if s in used else "#e4e7eb" for s in names]
    ax.bar(names, values, color=colours, edgecolor=[MUTED if s in used else RULE for s in names])
    for x, (_, n) in enumerate(bounds):
        ax.annotate(
            kb_or_mb(n),
            (x, n / 1e6),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=8.5,
            color=INK,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            zorder=3,
        )
    written_bytes = report.totals()["written_bytes"]
    written = written_bytes / 1e6
    ax.axhline(written, color=HEAD, linewidth=1.2)
    ax.text(
        len(names) - 0.5,
        written,
        f"written {mb(written_bytes)} ",
        color=HEAD,
        ha="right",
        va="bottom",
    )
    for tick in ax.get_xticklabels():
        tick.set_fontweight("bold" if tick.get_text() in used else "normal")
    ax.set_ylim(0, max([*values, written]) * 1.18)
    ax.set_ylabel("MB")
    ax.set_title(
        "the zoo's lower bound in each weight storage (highlighted: this build's)",
        loc="left",
        fontsize=10,
        color=MUTED,
    )


def _savings_caption(report: Report) -> str:
    return (
        "One by one: each classifier converted with its own copy of its backbone (measured by "
        "merging backbone and head into one spec). coreml-split: every shared backbone once, "
        "plus each classifier's pipeline (stub and head). The lower bound counts each distinct "
        "weight once, in the storage it is written in."
        + (
            " Below: the same bound in every storage --weights offers."
            if len(report.lower_bounds) > 1
            else ""
        )
    )


# -- the plan picture (hand-made SVG) --------------------------------------------------------


WIDTH = 1040
LEFT_W, RIGHT_X = 420, 610
ROW, ROW_GAP, BAND_GAP, LINE = 30, 8, 22, 19
FONT = 13


@dataclass
class Band:
    """One row of the plan picture: a backbone (or the standalone box) and its classifiers."""

    title: str
    lines: list[str]
    members: list[tuple[str, str]]  # (name, what it holds)
    shared: bool
    split: str = ""  # the layer the backbone ends at

    @property
    def box_height(self) -> int:
        return 16 + LINE * (1 + len(self.lines) + bool(self.split))


def plan_bands(report: Report) -> list[Band]:
    """A band per backbone, in the report's order, then one for the standalone classifiers."""
    by_name = {c.name: c for c in report.classifiers}
    out = [
        Band(
            b.id,
            [b.file, f"{kb_or_mb(b.bytes)} · {b.weights} · shared by {len(b.members)}"],
            [(m, _member_note(by_name.get(m))) for m in b.members],
            True,
            b.split_layer,
        )
        for b in report.backbones
    ]
    alone = [c for c in report.classifiers if not c.group]
    if alone:
        lines = ["shares no backbone: each file", "holds its whole network"]
        out.append(Band("standalone", lines, [(c.name, _member_note(c)) for c in alone], False))
    return out


def _member_note(c: ClassifierReport | None) -> str:
    if c is None:
        return "not written"
    size = f"head {kb_or_mb(c.head_bytes)}" if c.group else kb_or_mb(c.bytes)
    return f"{size} · {c.classes} classes"


def plan_svg(report: Report) -> str:
    """Each backbone as a box, its classifiers fanned out to the right of where it splits."""
    parts: list[str] = []
    y = 8
    for band in plan_bands(report):
        rows_h = max(len(band.members), 1) * (ROW + ROW_GAP) - ROW_GAP
        height = max(band.box_height, rows_h)
        parts += _band_svg(band, y, height)
        y += height + BAND_GAP
    if not parts:
        parts.append(f'<text x="16" y="28" fill="{MUTED}">nothing was converted</text>')
        y = 48
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {y - BAND_GAP + 8}" '
        f'width="100%" role="img" aria-label="the plan: which classifiers share which backbone" '
        f'font-size="{FONT}" class="plan">\n' + "\n".join(parts) + "\n</svg>"
    )


def _band_svg(band: Band, top: int, height: int) -> list[str]:
    colour = SHARED if band.shared else STANDALONE
    fill = "#fdf3dc" if band.shared else "#f1f3f5"
    dash = "" if band.shared else ' stroke-dasharray="5 4"'
    box_h = band.box_height
    box_y = top + (height - box_h) // 2
    baselines = [box_y + 4 + LINE * (i + 1) for i in range(2 + len(band.lines))]
    room = LEFT_W - 32
    out = [
        f'<rect x="16" y="{box_y}" width="{LEFT_W}" height="{box_h}" rx="6" fill="{fill}" '
        f'stroke="{colour}" stroke-width="1.5"{dash}/>',
        _text(32, baselines[0], band.title, room, bold=True),
        *(_text(32, y, line, room, fill=MUTED) for y, line in zip(baselines[1:], band.lines)),
    ]
    if band.split:
        out.append(_split_text(32, baselines[-1], band.split, room))
    start_x, start_y = 16 + LEFT_W, box_y + box_h // 2
    rows_h = len(band.members) * (ROW + ROW_GAP) - ROW_GAP
    first = top + (height - rows_h) // 2
    for i, (name, note) in enumerate(band.members):
        out += _member_svg(name, note, start_x, start_y, first + i * (ROW + ROW_GAP), band.shared)
    if band.members:
        out.append(f'<circle cx="{start_x}" cy="{start_y}" r="4.5" fill="{colour}"/>')
    return out


def _member_svg(name: str, note: str, x0: int, y0: int, top: int, shared: bool) -> list[str]:
    colour = HEAD if shared else STANDALONE
    mid = top + ROW // 2
    bend = (x0 + RIGHT_X) // 2
    width = WIDTH - 16 - RIGHT_X
    note_w = _width(note, FONT - 1) + 12
    return [
        f'<path d="M{x0},{y0} C{bend},{y0} {bend},{mid} {RIGHT_X},{mid}" fill="none" '
        f'stroke="{colour}" stroke-width="1.5" opacity="0.7"/>',
        f'<rect x="{RIGHT_X}" y="{top}" width="{width}" height="{ROW}" rx="5" '
        f'fill="{"#e6f2f8" if shared else "#f1f3f5"}" stroke="{colour}"/>',
        _text(RIGHT_X + 12, mid + 5, name, width - note_w - 24, bold=True),
        f'<text x="{WIDTH - 28}" y="{mid + 5}" text-anchor="end" fill="{MUTED}" '
        f'font-size="{FONT - 1}">{_e(note)}</text>',
    ]


def _text(
    x: float,
    y: float,
    text: str,
    room: float,
    bold: bool = False,
    fill: str = INK,
    keep_end: bool = False,
) -> str:
    """A line of SVG text cut to ``room`` pixels, the whole of it in a tooltip when cut."""
    shown = _clip(text, room, FONT * (1.08 if bold else 1.0), keep_end)
    weight = ' font-weight="bold"' if bold else ""
    title = f"<title>{_e(text)}</title>" if shown != text else ""
    return f'<text x="{x}" y="{y}" fill="{fill}"{weight}>{title}{_e(shown)}</text>'


def _split_text(x: float, y: float, layer: str, room: float) -> str:
    """ "split after <layer>", the layer in bold and cut at its start when too long."""
    lead = "split after "
    shown = _clip(layer, room - _width(lead, FONT), FONT * 1.08, keep_end=True)
    title = f"<title>{_e(layer)}</title>" if shown != layer else ""
    return (
        f'<text x="{x}" y="{y}" fill="{MUTED}">{title}{lead}'
        f'<tspan fill="{INK}" font-weight="bold">{_e(shown)}</tspan></text>'
    )


def _width(text: str, size: float) -> float:
    """A generous estimate of the width of ``text`` in a sans-serif font at ``size`` pixels:
    DejaVu Sans gives lower case about 0.6 em, capitals and digits up to 0.75."""
    return size * sum(_em(ch) for ch in text)


def _em(ch: str) -> float:
    if unicodedata.combining(ch):
        return 0.0
    if unicodedata.east_asian_width(ch) in "WF":
        return 1.0
    return 0.75 if ch.isupper() or ch.isdigit() else 0.6


def _clip(text: str, room: float, size: float, keep_end: bool = False) -> str:
    """``text`` cut with an ellipsis (at its end, or at its start with ``keep_end``) to fit."""
    if _width(text, size) <= room:
        return text
    order = text[::-1] if keep_end else text
    used, kept = _width("…", size), 0
    for ch in order:
        used += _width(ch, size)
        if used > room:
            break
        kept += 1
    return "…" + text[len(text) - kept :] if keep_end else text[:kept] + "…"


def _plan_caption(report: Report) -> str:
    n = len(report.backbones)
    return (
        f"{n} shared backbone{'s' if n != 1 else ''}: each one file that its classifiers' "
        "pipelines link to, cut after the layer named in its box; every classifier ships a stub "
        "and its own head. Standalone classifiers share nothing and hold their whole network."
    )


# -- tables ----------------------------------------------------------------------------------


def _table(
    head: list[str], rows: list[list[str]], numeric: set[int], foot: list[str] | None = None
) -> str:
    """An HTML table; cells are HTML already; columns in ``numeric`` align right."""

    def cells(tag: str, row: list[str]) -> str:
        return "".join(
            f"<{tag}{' class=num' if i in numeric else ''}>{cell}</{tag}>"
            for i, cell in enumerate(row)
        )

    body = "\n".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    tail = f"\n<tfoot><tr>{cells('td', list(foot))}</tr></tfoot>" if foot else ""
    return (
        f'<div class="scroll"><table>\n<thead><tr>{cells("th", head)}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody>{tail}\n</table></div>"
    )


def _bytes(n: int) -> str:
    return f'<span title="{n:,} bytes">{_e(kb_or_mb(n))}</span>'


def files_table(report: Report) -> str:
    """Every file written, as report.md lists them, with the one-by-one size per classifier."""
    rows = [_backbone_row(b) for b in report.backbones]
    rows += [_classifier_row(c) for c in report.classifiers]
    t = report.totals()
    foot = [
        "<b>total written</b>",
        "",
        "",
        f"<b>{_bytes(t['written_bytes'])}</b>",
        _bytes(t["heads_bytes"]),
        f"<b>{_bytes(t['one_by_one_bytes'])}</b>",
        "",
        "",
    ]
    head = ["file", "role", "storage", "bytes", "head", "one by one", "classes", "labels"]
    return _table(head, rows, {3, 4, 5, 6}, foot)


def _backbone_row(b: BackboneReport) -> list[str]:
    role = f"backbone, shared by {len(b.members)}{BUILDER_NOTES.get(b.builder, '')}"
    detail = f"{b.parameters:,} parameters, split after {b.split_layer}; {', '.join(b.members)}"
    return [
        f'<code class="name">{_e(b.file)}</code><div class="sub">{_e(b.id)}</div>',
        f'{_e(role)}<div class="sub">{_e(detail)}</div>',
        _e(b.weights),
        _bytes(b.bytes),
        "",
        "",
        "",
        "",
    ]


def _classifier_row(c: ClassifierReport) -> list[str]:
    role = f"pipeline on {c.group}" if c.group else "standalone"
    labels = ", ".join(c.labels[:6]) + (f" … ({len(c.labels)})" if len(c.labels) > 6 else "")
    return [
        f'<code class="name">{_e(c.file)}</code><div class="sub">{_e(c.name)}</div>',
        _e(role),
        _e(c.stored),
        _bytes(c.bytes),
        _bytes(c.head_bytes),
        _bytes(c.standalone_bytes),
        str(c.classes),
        f'<div class="sub labels">{_e(labels)}</div>',
    ]


def verify_html(report: Report) -> str:
    """The verify results, row by row, or the line that says how to get them."""
    if report.verify is None:
        return (
            '<p class="pending">Not verified yet: run <code>coreml-split verify '
            "&lt;build folder&gt; --images DIR</code> to compare every classifier with its Keras "
            "model on the same images.</p>"
        )
    head = [
        "classifier",
        "result",
        "max |Δprob|",
        "of tolerance",
        "mean |Δprob|",
        "top-1 agreement",
        "images",
        "precision",
    ]
    rows = [_verify_row(v) for v in report.verify]
    compared = {v["name"] for v in report.verify}
    missing = [c.name for c in report.classifiers if c.name not in compared]
    note = (
        f'<p class="pending">Not compared in the last run: {_e(", ".join(missing))} '
        "(verify's output says why).</p>"
        if missing
        else ""
    )
    intro = (
        "<p>Keras against the Core ML pipeline, run by the reference evaluator with the backbone "
        "linked from disk, on the same images.</p>"
    )
    return intro + "\n" + _table(head, rows, {2, 4, 5, 6}) + note


def _verify_row(v: dict[str, Any]) -> list[str]:
    passed = bool(v["passed"])
    status = v.get("status") or ("passed" if passed else "beyond tolerance")
    share = v["max_abs_diff"] / v["tolerance"] if v["tolerance"] else 0.0
    gap = v.get("top1_gap")
    compute = v.get("compute", "float32")
    precision = v["weights"] + ("" if compute == "float32" else f" weights, {compute} compute")
    bound = ", ".join(v.get("bound", []))
    return [
        _e(v["name"]) + (f'<div class="sub">bound {_e(bound)}</div>' if bound else ""),
        f'<span class="badge {"ok" if passed else "bad"}">{_e(status)}</span>',
        f"{v['max_abs_diff']:.2e}",
        _meter(share, v["tolerance"]),
        f"{v['mean_abs_diff']:.2e}",
        f"{v['top1_agreement']:.0%}"
        + (
            f'<div class="sub">where it differs, Keras had the two within {gap:.1e}</div>'
            if gap is not None
            else ""
        ),
        str(v["images"]),
        _e(precision),
    ]


def _meter(share: float, tolerance: float) -> str:
    """How much of its tolerance a difference takes, as a bar and in words."""
    width = min(share, 1.0) * 100
    over = " over" if share > 1 else ""
    bar = f'<span class="meter{over}"><span style="width:{width:.0f}%"></span></span>'
    return f'<span class="nowrap">{bar} {share:.0%} of {tolerance:.0e}</span>'


def errors_html(report: Report) -> str:
    if not report.errors:
        return '<p class="quiet">None: every model file found was planned.</p>'
    items = "\n".join(
        f'<li><code class="name">{_e(e.file)}</code>: {_e(e.reason)}</li>' for e in report.errors
    )
    return f'<ul class="errors">\n{items}\n</ul>'


def _choice_html(b: BackboneReport) -> str:
    """What --weights auto tried for one backbone, as report.md shows it."""
    choice = b.choice or {}
    text = (
        f"Chosen: {choice.get('base')} for the backbone, heads {choice.get('heads')}; "
        f"{len(choice.get('trials', []))} trials. Each point is a trial (bytes across, max "
        "|Δprob| against float32 up); filled when within the budget, the chosen one ringed."
    )
    svg = trials_svg(b)
    return _section(f"Weights chosen for {b.file}", _figure(svg, _e(text)))


CSS = f"""
:root {{ color-scheme: light; }}
* {{ box-sizing: border-box; }}
body {{ margin: 0; background: #f5f7f9; color: {INK};
  font: 15px/1.45 "DejaVu Sans", -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
  overflow-wrap: anywhere; }}
main {{ max-width: 1100px; margin: 0 auto; padding: 24px 28px 40px; }}
h1 {{ font-size: 26px; margin: 0 0 4px; }}
h2 {{ font-size: 18px; margin: 0 0 12px; }}
section {{ background: #fff; border: 1px solid {RULE}; border-radius: 8px; padding: 18px 20px;
  margin: 18px 0; }}
.summary {{ color: {MUTED}; margin: 0 0 14px; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ flex: 1 1 160px; background: #fff; border: 1px solid {RULE}; border-radius: 8px;
  padding: 10px 14px; }}
.card .label {{ color: {MUTED}; font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }}
.card .value {{ font-size: 22px; font-weight: bold; }}
.card .note, .sub {{ color: {MUTED}; font-size: 12px; }}
figure {{ margin: 0; }}
figcaption {{ color: {MUTED}; font-size: 13px; margin-top: 6px; }}
.chart svg {{ display: block; height: auto; }}
.chart svg * {{ stroke-linejoin: round; stroke-linecap: butt; }}
.plan text {{ font-family: inherit; }}
.scroll {{ overflow-x: auto; }}
table {{ border-collapse: collapse; width: 100%; font-size: 14px; }}
th, td {{ text-align: left; padding: 6px 10px; border-bottom: 1px solid {RULE};
  vertical-align: top; }}
th {{ font-size: 12px; color: {MUTED}; font-weight: bold; white-space: nowrap; }}
.labels {{ min-width: 140px; }}
td:first-child {{ min-width: 170px; }}
td.num, th.num {{ text-align: right; white-space: nowrap; }}
td.num .sub {{ white-space: normal; }}
tfoot td {{ border-top: 2px solid {MUTED}; border-bottom: none; }}
tbody tr:nth-child(even) {{ background: #fafbfc; }}
code, .name {{ font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }}
.badge {{ display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  font-weight: bold; white-space: nowrap; }}
.badge.ok {{ background: #dcf2e3; color: #1b6b3a; }}
.badge.bad {{ background: #fbe1e4; color: #9b1c2c; }}
.meter {{ display: inline-block; width: 60px; height: 8px; background: #e4e7eb;
  border-radius: 4px; overflow: hidden; vertical-align: middle; }}
.meter span {{ display: block; height: 100%; background: {HEAD}; }}
.meter.over span {{ background: {COPY}; }}
.pending {{ background: #fff8e6; border-left: 4px solid {SHARED}; padding: 8px 12px; }}
.quiet {{ color: {MUTED}; }}
.nowrap {{ white-space: nowrap; }}
.errors li {{ margin: 4px 0; }}
footer {{ color: {MUTED}; font-size: 12px; text-align: center; }}
"""
