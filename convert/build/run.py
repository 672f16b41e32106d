"""Carrying out a plan: convert each group's backbone once, then every head, and write the files.

:func:`build` cuts the plan into jobs (:mod:`convert.build.jobs`), skips those with nothing stale,
runs the rest (:mod:`convert.build.workers`, :mod:`convert.build.work`), records what was written
in the cache, and collects the report. A failure is recorded against the files it concerns and
the rest of the zoo still converts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from convert.build.cache import Cache
from convert.build.jobs import (
    DEFAULT_JOBS,
    Calibration,
    Job,
    JobResult,
    Progress,
    Step,
    plan_jobs,
)
from convert.build.workers import Workers, run_jobs
from convert.plan.types import Plan
from convert.read.graph import Graph
from convert.read.manifest import AUTO, Manifest
from convert.read.sources import SourceCache
from convert.report import BackboneReport, ClassifierReport, Report


def build(
    plan: Plan,
    graphs: Mapping[str, Graph],
    out: Path,
    progress: Progress | None = None,
    manifest: Manifest | None = None,
    jobs: int = DEFAULT_JOBS,
    sources: SourceCache | None = None,
    backbone_converter: str = "auto",
    warn: Progress | None = None,
    calibration: Calibration | None = None,
    step: Step | None = None,
) -> Report:
    """Build what is stale: one job here, several in up to ``jobs`` worker processes.

    ``backbone_converter``: "auto" builds each backbone straight from the weights when every
    layer is covered (convert/build/layers/) and converts it with ct.convert otherwise;
    "coremltools" always converts with ct.convert.

    ``warn`` gets one line per damaged cache entry that was dropped (and rebuilt). ``calibration``
    holds the images (and auto's budget) that quantized storages are calibrated on. ``step``
    counts the jobs done out of those to run."""
    say = progress or (lambda _msg: None)
    manifest = manifest or Manifest()
    report = Report(
        errors=list(plan.errors),
        lower_bound_bytes=plan.lower_bound_bytes,
        lower_bounds=plan.lower_bounds(),
        aliases=dict(manifest.aliases),
    )
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out)
    work = plan_jobs(
        plan,
        graphs,
        out,
        manifest,
        cache,
        sources or SourceCache(None),
        backbone_converter,
        calibration or Calibration(None, 0, 0.0),
    )
    todo = [job for job in work if job.stale or job.write_backbone]
    # TensorFlow costs seconds to import; coremltools imports it unless told not to. When no
    # job converts with ct.convert or loads a Keras model, the whole run goes without it.
    free = not any(job.needs_tensorflow for job in todo)
    for job in todo:
        job.tensorflow_free = free
    fresh = len(work) - len(todo)
    if fresh:
        say(f"{fresh} of {len(work)} jobs up to date")
    workers = Workers(jobs) if len(todo) > 1 and jobs > 1 else None
    try:
        results = run_jobs(todo, workers, say, step)
    finally:
        if workers is not None:
            workers.close()
    warnings = list(cache.warnings)
    for job in work:
        result = results.get(job.label, JobResult())
        report.errors.extend(result.errors)
        warnings.extend(w for w in result.warnings if w not in warnings)
        for file, wanted in job.recipes.items():
            if file in result.written:
                cache.record(file, wanted, result.written[file])
            elif cache.fresh(file, wanted) is None:
                cache.forget(file)
        _collect(job, cache, report)
    _remove_leftovers(plan, work, cache, say)
    cache.save()
    for line in warnings:
        (warn or say)(line)
    return report


def _remove_leftovers(plan: Plan, work: list[Job], cache: Cache, say: Progress) -> None:
    """Delete files an earlier build wrote for models or backbones the zoo no longer has, so that
    ``build/`` never offers an orphan to Xcode. Only files this tool recorded writing are
    touched, and none while a file of the zoo could not be read (its outputs stay)."""
    if plan.errors:
        return
    current = {file for job in work for file in job.recipes}
    for file in sorted(set(cache.entries) - current):
        (cache.out / file).unlink(missing_ok=True)
        cache.forget(file)
        say(f"removed {file}: no longer in the zoo")


def _choice(cache: Cache, key: str) -> dict | None:
    """What --weights auto chose for a backbone (kept in the cache beside its spec)."""
    import json

    from convert.build.work import choice_key

    data = cache.get(choice_key(key))
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _collect(job: Job, cache: Cache, report: Report) -> None:
    """Report rows for the job's files that exist and are current."""
    if job.group is not None:
        group = job.group
        file = f"{group.id}.mlmodel"
        entry = cache.fresh(file, job.recipes[file])
        if entry is not None:
            report.backbones.append(
                BackboneReport(
                    id=group.id,
                    file=file,
                    bytes=entry.size,
                    parameters=group.backbone_parameters,
                    members=list(group.members),
                    split_layer=group.split_layer,
                    preprocessing=group.preprocessing,
                    builder=job.backbone_builder,
                    weights=group.weights,
                    choice=_choice(cache, job.recipes[file]) if group.weights == AUTO else None,
                )
            )
    for model in job.models:
        file = f"{model.name}.mlmodel"
        entry = cache.fresh(file, job.recipes[file])
        if entry is not None and entry.row:
            report.classifiers.append(ClassifierReport(**(entry.row | {"source": model.source})))
