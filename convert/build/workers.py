"""Worker processes: the jobs of one build, two at a time by default.

Each worker is spawned (not forked) so that it starts clean, and converts one backbone with one
Keras model in memory, so peak memory depends on the largest backbone, not on the number of
models. With one job, or ``--jobs 1``, everything runs in this process.
"""

from __future__ import annotations

import os
import time
from typing import Any

from convert.build.jobs import Job, JobResult, Progress, Step
from convert.build.work import run_job
from convert.plan.types import ErrorEntry


class Workers:
    """Worker processes for the jobs, spawned (not forked) so that each starts clean."""

    def __init__(self, jobs: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        self.pool = ProcessPoolExecutor(
            max(1, min(jobs, os.cpu_count() or 1)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(self.queue,),
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.queue.close()
        self.queue.join_thread()


_QUEUE: Any = None


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def _run_in_worker(job: Job) -> JobResult:
    return run_job(job, _QUEUE.put)


def run_jobs(
    todo: list[Job], workers: Workers | None, say: Progress, step: Step | None = None
) -> dict[str, JobResult]:
    """Every job's result, by label; ``step(done, total)`` is told before each job ends."""
    tick = step or (lambda _done, _total: None)
    results: dict[str, JobResult] = {}
    if workers is None:
        for job in todo:
            tick(len(results), len(todo))
            results[job.label] = run_job(job, say)
        tick(len(results), len(todo))
        return results
    tick(0, len(todo))
    futures = {workers.pool.submit(_run_in_worker, job): job for job in todo}
    pending = set(futures)
    while pending:
        _drain(workers.queue, say)
        done = {f for f in pending if f.done()}
        for future in done:
            job = futures[future]
            try:
                results[job.label] = future.result()
            except Exception as exc:  # a worker that died: its files are reported, not lost
                results[job.label] = JobResult(
                    errors=[
                        ErrorEntry(m.source, f"conversion process failed: {exc}")
                        for m in job.models
                        if m.name in job.stale
                    ]
                )
            tick(len(results), len(todo))
        pending -= done
        if pending:
            time.sleep(0.05)
    _drain(workers.queue, say)
    return results


def _drain(queue: Any, say: Progress) -> None:
    import queue as queues

    while True:
        try:
            say(queue.get_nowait())
        except queues.Empty:
            return
