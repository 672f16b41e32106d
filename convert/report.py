"""The size report: what was written, what one-by-one conversion would have shipped, and a picture.

Every byte figure here is measured from serialised specs or files on disk, except the lower
bound, which is the zoo's unique parameters times 4 bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convert import __version__
from convert.plan.types import ErrorEntry, Plan


@dataclass
class BackboneReport:
    id: str
    file: str
    bytes: int
    parameters: int
    members: list[str]
    split_layer: str
    preprocessing: str
    builder: str = ""  # "direct" (from the .h5 weights) or "coremltools" (ct.convert)
    weights: str = "float32"  # how its weights are stored
    choice: dict[str, Any] | None = None  # auto: what was chosen, and every trial


@dataclass
class ClassifierReport:
    name: str
    source: str
    group: str | None  # None: converted standalone
    file: str
    bytes: int  # the file written: a pipeline, or the standalone model
    head_bytes: int  # the head spec alone, as embedded in the pipeline
    standalone_bytes: int  # backbone + head merged into one classifier, serialised
    classes: int
    labels: list[str] = field(default_factory=list)
    preprocessing: str = "tf"
    weights: str = "float32"  # how its head (or, standalone, the whole model) stores weights
    updatable: list[str] = field(default_factory=list)  # its head's updatable layers (float32)

    @property
    def stored(self) -> str:
        """Its storage, and which layers an app trains (Core ML keeps those float32)."""
        if not self.updatable:
            return self.weights
        return f"{self.weights}, updatable: {', '.join(self.updatable)} float32"


@dataclass
class Report:
    backbones: list[BackboneReport] = field(default_factory=list)
    classifiers: list[ClassifierReport] = field(default_factory=list)
    errors: list[ErrorEntry] = field(default_factory=list)
    lower_bound_bytes: int = 0  # each distinct weight once, in the storage it is written in
    lower_bounds: dict[str, int] = field(default_factory=dict)  # the zoo in each one storage
    verify: list[dict[str, Any]] | None = None  # convert.check.verify.VerifyResult as dicts
    aliases: dict[str, str] = field(default_factory=dict)  # zoo.toml's [aliases], for verify

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(
            backbones=[BackboneReport(**b) for b in data["backbones"]],
            classifiers=[ClassifierReport(**c) for c in data["classifiers"]],
            errors=[ErrorEntry(**e) for e in data["errors"]],
            lower_bound_bytes=data["totals"]["lower_bound_bytes"],
            lower_bounds=data["totals"].get("lower_bounds", {}),
            verify=data.get("verify"),
            aliases=data.get("aliases", {}),
        )

    def totals(self) -> dict[str, Any]:
        backbone = sum(b.bytes for b in self.backbones)
        written = backbone + sum(c.bytes for c in self.classifiers)
        one_by_one = sum(c.standalone_bytes for c in self.classifiers)
        essential = backbone + sum(c.head_bytes for c in self.classifiers)
        return {
            "classifiers": len(self.classifiers),
            "backbones": len(self.backbones),
            "backbone_bytes": backbone,
            "heads_bytes": sum(c.head_bytes for c in self.classifiers),
            "written_bytes": written,
            "one_by_one_bytes": one_by_one,
            "saved_bytes": one_by_one - written,
            "ratio": round(one_by_one / written, 3) if written else None,
            "overhead": round(written / essential, 4) if essential else None,
            "lower_bound_bytes": self.lower_bound_bytes,
            "lower_bounds": dict(self.lower_bounds),
            "errors": len(self.errors),
        }

    def to_json(self) -> dict[str, Any]:
        out = {
            "tool": f"coreml-split {__version__}",
            "backbones": [asdict(b) for b in self.backbones],
            "classifiers": [asdict(c) for c in self.classifiers],
            "totals": self.totals(),
            "errors": [{"file": e.file, "reason": e.reason} for e in self.errors],
        }
        if self.verify is not None:
            out["verify"] = self.verify
        if self.aliases:
            out["aliases"] = self.aliases
        return out


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def kb_or_mb(n: int) -> str:
    return f"{n / 1e3:.1f} kB" if n < 1e6 else mb(n)


# -- plan and size tables (terminal) ---------------------------------------------------------


def plan_table(plan: Plan) -> Any:
    from rich.table import Table

    table = Table(title="Plan", title_justify="left")
    columns = (
        "classifier",
        "backbone",
        "split after",
        "features",
        "head params",
        "head bytes",
        "labels",
    )
    for column in columns:
        table.add_column(column)
    groups = {g.id: g for g in plan.groups}
    for m in plan.models:
        group = groups.get(m.group) if m.group else None
        table.add_row(
            m.name,
            m.group or "standalone",
            m.split_layer.rsplit("/", 1)[-1] if m.split_layer else "-",
            "x".join(str(d) for d in group.feature_shape[1:]) if group else "-",
            f"{m.head_parameters:,}",
            kb_or_mb(m.head_bytes),
            ", ".join(m.labels[:4]) + (" ..." if len(m.labels) > 4 else ""),
        )
    return table


def groups_table(plan: Plan) -> Any:
    from rich.table import Table

    table = Table(title="Shared backbones", title_justify="left")
    for column in (
        "backbone",
        "members",
        "split after",
        "weights",
        "bytes (est.)",
        "saves",
        "best alternative",
    ):
        table.add_column(column)
    total = sum(g.saved_bytes for g in plan.groups)
    for g in plan.groups:
        alternative = g.alternative or "nothing shared"
        table.add_row(
            g.id,
            str(len(g.members)),
            g.split_layer,
            g.weights,
            mb(g.backbone_bytes),
            mb(g.saved_bytes),
            f"{alternative}: the zoo would save {mb(g.alternative_saved_bytes)}, not {mb(total)}",
        )
    return table


def size_table(report: Report) -> Any:
    from rich.table import Table

    table = Table(title="Sizes", title_justify="left")
    for column in ("file", "role", "weights", "bytes", "head", "one by one"):
        left = column in ("file", "role", "weights")
        table.add_column(column, justify="left" if left else "right")
    for b in report.backbones:
        table.add_row(b.file, f"backbone x{len(b.members)}", b.weights, kb_or_mb(b.bytes), "", "")
    for c in report.classifiers:
        role = "pipeline" if c.group else "standalone"
        table.add_row(
            c.file,
            role + (", updatable" if c.updatable else ""),
            c.weights,
            kb_or_mb(c.bytes),
            kb_or_mb(c.head_bytes),
            kb_or_mb(c.standalone_bytes),
        )
    t = report.totals()
    table.add_section()
    table.add_row(
        "total written",
        "",
        "",
        mb(t["written_bytes"]),
        mb(t["heads_bytes"]),
        mb(t["one_by_one_bytes"]),
    )
    return table


def summary_line(report: Report) -> str:
    t = report.totals()
    if not t["written_bytes"]:
        return "nothing was written"
    return (
        f"{t['classifiers']} classifiers, {t['backbones']} shared backbone(s): "
        f"{mb(t['written_bytes'])} instead of {mb(t['one_by_one_bytes'])} one by one "
        f"(saves {mb(t['saved_bytes'])}, {t['ratio']}x smaller; "
        f"lower bound {mb(t['lower_bound_bytes'])})"
    )


# -- files -----------------------------------------------------------------------------------


BUILDER_NOTES = {"direct": ", built from the weights", "coremltools": ", ct.convert"}


def markdown(report: Report, picture: str | None = "report.svg") -> str:
    t = report.totals()
    lines = ["# coreml-split report", "", summary_line(report), ""]
    if picture:
        lines += [f"![bytes shipped, one by one vs split]({picture})", ""]
    lines += [
        "| file | role | weights | bytes | head bytes | one-by-one bytes |",
        "|---|---|---|---:|---:|---:|",
    ]
    for b in report.backbones:
        how = BUILDER_NOTES.get(b.builder, "")
        lines.append(
            f"| {b.file} | backbone, shared by {len(b.members)}{how} | {b.weights} "
            f"| {b.bytes:,} | | |"
        )
    for c in report.classifiers:
        role = f"pipeline on {c.group}" if c.group else "standalone"
        lines.append(
            f"| {c.file} | {role} | {c.stored} | {c.bytes:,} | {c.head_bytes:,} "
            f"| {c.standalone_bytes:,} |"
        )
    lines += [
        f"| **total** | | | **{t['written_bytes']:,}** | {t['heads_bytes']:,} "
        f"| **{t['one_by_one_bytes']:,}** |",
        "",
        f"- Saved: {t['saved_bytes']:,} bytes ({t['ratio']}x smaller than one by one).",
        f"- Written / (backbones + heads): {t['overhead']}.",
        f"- Lower bound (each distinct weight once, in the storage it is written in: "
        f"parameters x bits / 8, plus quantization tables): {t['lower_bound_bytes']:,} bytes.",
        "- One-by-one bytes are measured: each classifier's backbone and head merged into one "
        "NeuralNetworkClassifier, whose exact serialised size protobuf reports.",
    ]
    if report.lower_bounds:
        bounds = ", ".join(f"{s} {n:,}" for s, n in report.lower_bounds.items())
        lines.append(f"- The zoo's lower bound in each storage, in bytes: {bounds}.")
    for b in report.backbones:
        if b.choice:
            lines += _choice_table(b)
    if report.verify is not None:
        lines += [
            "",
            "## Verification",
            "",
            "Keras vs the Core ML pipeline (run by the reference evaluator, backbone linked from "
            "disk), on the same images.",
            "",
            "| classifier | images | max abs diff | mean abs diff | top-1 agreement | weights "
            "| tolerance | result |",
            "|---|---:|---:|---:|---:|---|---:|---|",
        ]
        for v in report.verify:
            lines.append(
                f"| {v['name']} | {v['images']} | {v['max_abs_diff']:.2e} | "
                f"{v['mean_abs_diff']:.2e} | {v['top1_agreement']:.0%} | {v['weights']} | "
                f"{v['tolerance']:.0e} | {'pass' if v['passed'] else '**FAIL**'} |"
            )
    if report.errors:
        lines += ["", "## Errors", ""] + [f"- `{e.file}`: {e.reason}" for e in report.errors]
    return "\n".join(lines) + "\n"


def _choice_table(backbone: BackboneReport) -> list[str]:
    """What --weights auto tried for one backbone: bytes against fidelity, on its images."""
    choice = backbone.choice or {}
    kept = choice.get("layers", {})
    lines = [
        "",
        f"## Weights chosen for {backbone.file}",
        "",
        f"Chosen: {choice.get('base')} for the backbone, with {len(kept)} layers kept larger "
        f"({', '.join(sorted(set(kept.values()))) or 'none'}), heads {choice.get('heads')}; "
        f"{len(choice.get('trials', []))} trials in {choice.get('seconds', 0):.0f} s. Each "
        "trial's fidelity is measured against float32 on the images given.",
        "",
        f"![bytes against max abs dprob, per trial]({_trials_picture(backbone)})",
        "",
        "| trial | bytes | max abs dprob | top-1 agreement | within budget |",
        "|---|---:|---:|---:|---|",
    ]
    for t in choice.get("trials", []):
        lines.append(
            f"| {t['what']} | {t['bytes']:,} | {t['max_dprob']:.2e} | {t['top1']:.0%} "
            f"| {'yes' if t['passed'] else 'no'} |"
        )
    return lines


def _trials_picture(backbone: BackboneReport) -> str:
    return f"report-{Path(backbone.file).stem}-weights.svg"


def trials_svg(backbone: BackboneReport) -> str:
    """Every trial of --weights auto as a point: bytes across, max |dprob| up (log scale);
    filled when within the budget, the chosen one ringed."""
    import math

    trials = [t for t in (backbone.choice or {}).get("trials", []) if t["bytes"] > 0]
    width, height, left, bottom, top = 640, 300, 70, 40, 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">'
    ]
    if not trials:
        return "\n".join([*out, "</svg>"]) + "\n"
    sizes = [t["bytes"] for t in trials]
    errors = [max(t["max_dprob"], 1e-6) for t in trials]
    x0, x1 = min(sizes), max(sizes) * 1.02 or 1
    y0, y1 = math.log10(min(errors)) - 0.1, math.log10(max(errors)) + 0.1
    plot_w, plot_h = width - left - 20, height - top - bottom

    def x(v: float) -> float:
        return left + plot_w * (v - x0) / ((x1 - x0) or 1)

    def y(v: float) -> float:
        return top + plot_h * (1 - (math.log10(max(v, 1e-6)) - y0) / ((y1 - y0) or 1))

    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="#444"/>'
    )
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#444"/>')
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}">bytes</text>')
    out.append(f'<text x="4" y="{top + 10}">max |dprob|</text>')
    for v in (x0, x1):
        out.append(f'<text x="{x(v) - 20:.1f}" y="{top + plot_h + 14}">{mb(int(v))}</text>')
    for v in (min(errors), max(errors)):
        out.append(f'<text x="4" y="{y(v) + 4:.1f}">{v:.1e}</text>')
    chosen = min((t for t in trials if t["passed"]), key=lambda t: t["bytes"], default=None)
    for t in trials:
        fill = "#2e86ab" if t["passed"] else "none"
        cx, cy = x(t["bytes"]), y(t["max_dprob"])
        out.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{fill}" stroke="#2e86ab">'
            f"<title>{t['what']}: {t['bytes']:,} bytes, max |dprob| {t['max_dprob']:.2e}, "
            f"top-1 {t['top1']:.0%}</title></circle>"
        )
        if t is chosen:
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="8" fill="none" stroke="#d1495b"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def svg(report: Report) -> str:
    """Two stacked bars: every classifier with its own backbone copy, and the split build."""
    bars: list[tuple[str, list[tuple[str, int, str]]]] = []
    heads = sum(c.head_bytes for c in report.classifiers if c.group)
    standalone = sum(c.bytes for c in report.classifiers if not c.group)
    copies = sum(c.standalone_bytes - c.head_bytes for c in report.classifiers if c.group)
    bars.append(
        (
            "one by one",
            [
                ("backbone copies", copies, "#d1495b"),
                ("heads", heads, "#2e86ab"),
                ("standalone", standalone, "#8d99ae"),
            ],
        )
    )
    backbone = sum(b.bytes for b in report.backbones)
    wrappers = sum(c.bytes - c.head_bytes for c in report.classifiers if c.group)
    bars.append(
        (
            "coreml-split",
            [
                ("shared backbone", backbone, "#edae49"),
                ("heads", heads + wrappers, "#2e86ab"),
                ("standalone", standalone, "#8d99ae"),
            ],
        )
    )
    widest = max(sum(v for _, v, _ in parts) for _, parts in bars) or 1
    width, left, bar_h = 640, 110, 34
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="150" '
        'font-family="sans-serif" font-size="12">'
    ]
    for row, (label, parts) in enumerate(bars):
        y = 20 + row * (bar_h + 22)
        out.append(f'<text x="4" y="{y + 21}">{label}</text>')
        x = float(left)
        for name, value, colour in parts:
            if value <= 0:
                continue
            w = (width - left - 90) * value / widest
            out.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                f"<title>{name}: {value:,} bytes</title></rect>"
            )
            x += w
        total = sum(v for _, v, _ in parts)
        out.append(f'<text x="{x + 6:.1f}" y="{y + 21}">{mb(total)}</text>')
    legend = [("backbone copies", "#d1495b"), ("shared backbone", "#edae49"), ("heads", "#2e86ab")]
    for i, (name, colour) in enumerate(legend):
        lx = left + i * 150
        out.append(f'<rect x="{lx}" y="128" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{lx + 16}" y="139">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_reports(report: Report, out: Path) -> None:
    from convert.files import text_bytes, write_atomic

    write_atomic(out / "report.json", (json.dumps(report.to_json(), indent=2) + "\n").encode())
    # a file name that is not UTF-8 stands in Python's str for its bytes (surrogates): back
    write_atomic(out / "report.svg", text_bytes(svg(report)))
    for b in report.backbones:
        if b.choice:
            picture = text_bytes(trials_svg(b))
            write_atomic(out / _trials_picture(b), picture)
    write_atomic(out / "report.md", text_bytes(markdown(report)))
