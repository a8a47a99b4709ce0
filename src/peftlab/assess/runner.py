"""Run a suite: plan, check inputs, run what is not stored yet, write the report.

Resuming: every finished run is a JSON file (see :mod:`.store`). Starting the same suite again
with the same output folder reuses each stored run whose settings are unchanged and runs only the
rest; the report is rewritten after every run, so an interrupted suite still leaves tables of what
finished.

Workers: on a CPU, one small model's training step does not keep several cores busy (a batch of
short sequences is many small operators), so ``workers`` processes with one share of the cores
each finish a suite sooner than one process with all of them. Runs are independent and each
measures its own memory, so the figures do not change; step times are those of ``threads``
threads, which the record states.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .jobs import jobs_for
from .plots import write_plots
from .report import aggregate, baseline_notes, failure_notes, markdown, runs_csv, summary_csv, summary_text
from .store import RunStore, fingerprint, write_json_atomic, write_text_atomic
from .suites import Suite, TaskSpec
from ..core.errors import PeftlabError


@dataclass
class SuiteResult:
    suite: Suite
    out: Path
    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    notes: list[str]
    reused: int = 0
    ran: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    files: list[str] = field(default_factory=list)
    summary: str = ""
    workers: int = 1
    threads: int = 1


def default_workers(suite: Suite) -> int:
    """Two processes for a training suite on a CPU-only machine with at least two cores, else one
    (the efficiency suite times steps against each other: those want the machine to themselves)."""
    import torch

    if suite.kind == "efficiency" or torch.cuda.is_available():
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def run_suite(suite: Suite, out: str | Path, *, progress: bool = True, rerun: bool = False,
              plots: bool = True, echo: Callable[[str], None] = print, workers: int = 1,
              threads: int | None = None) -> SuiteResult:
    """Run (or resume) ``suite`` into folder ``out`` and write the report there, running up to
    ``workers`` runs at a time in separate processes, each with ``threads`` threads (default:
    the cores shared out evenly; with one worker, this process's own setting)."""
    for name, value in (("workers", workers), ("threads", threads)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PeftlabError(f"{name}={value!r}: expected a positive integer, e.g. --{name} 2")
    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(out)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per run (training) under the suite's bar is enough
    jobs = jobs_for(suite, progress)
    methods, notes = suite.method_plan()
    tasks = jobs.tasks()
    jobs.preflight(tasks, methods)  # raises on bad input before anything trains
    notes += jobs.notes
    store = RunStore(out)
    write_json_atomic(out / "suite.json", suite.to_dict())
    plan = [(t, m, s) for t in tasks for m in jobs.methods_for(t, methods) for s in suite.seeds]

    result = SuiteResult(suite, out, [], [], notes)
    done: dict[int, dict[str, Any]] = {}  # plan index -> record; the report keeps the plan's order

    def keep(i: int, record: dict[str, Any]) -> None:
        record["baseline"] = jobs.baseline(plan[i][0])  # known here, from the preflight a worker skips
        done[i] = record
        result.records = [done[j] for j in sorted(done)]

    todo = []
    for i, (task, method, seed) in enumerate(plan):
        record = None if rerun else store.finished(suite.model, task.name, method, seed,
                                                   fingerprint(jobs.settings(task, method, seed)))
        if record is not None:
            keep(i, record)
            result.reused += 1
        else:
            todo.append(i)
    bar = tqdm(total=len(plan), initial=len(done), desc=f"assess {suite.name}", unit="run", disable=not progress,
               position=0)

    def finish(i: int, record: dict[str, Any]) -> None:
        keep(i, record)
        store.save(record)
        result.ran += 1
        if record["status"] != "ok":
            tqdm.write(f"peftlab assess: {_key(plan[i])} failed: {record['error']}")
        _write_tables(result, started, cpu_started, plots=False)
        bar.update(1)

    import torch

    workers = min(workers, max(len(todo), 1))
    if workers == 1 and threads:
        torch.set_num_threads(threads)
    threads = threads or (torch.get_num_threads() if workers == 1 else max(1, (os.cpu_count() or 1) // workers))
    result.workers, result.threads = workers, threads
    jobs.progress = progress and workers == 1  # bars of parallel runs would interleave
    if workers == 1:
        for i in todo:
            bar.set_postfix_str(_key(plan[i]))
            finish(i, jobs.run(*plan[i]))
    else:
        _run_in_workers(suite, plan, todo, workers, threads, finish, bar)
    bar.close()
    _write_tables(result, started, cpu_started, plots=plots)
    echo(result.summary)
    echo(f"\n{result.ran} run(s) done, {result.reused} reused; report: {out / 'report.md'}")
    return result


def _key(entry: tuple[TaskSpec, str, int]) -> str:
    task, method, seed = entry
    return f"{task.name}/{method}/seed{seed}"


_worker_jobs = None  # each worker process builds its Jobs once


def _start_worker(suite: Suite, threads: int) -> None:
    global _worker_jobs
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    _worker_jobs = jobs_for(suite, progress=False)


def _run_in_worker(task: TaskSpec, method: str, seed: int) -> dict[str, Any]:
    return _worker_jobs.run(task, method, seed)


def _run_in_workers(suite: Suite, plan: list[tuple[TaskSpec, str, int]], todo: list[int], workers: int,
                    threads: int, finish: Callable[[int, dict[str, Any]], None], bar: Any) -> None:
    # spawn: a fresh interpreter per worker; forking a process that already ran torch's thread
    # pools can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(suite, threads)) as pool:
        running: dict[Future, int] = {pool.submit(_run_in_worker, *plan[i]): i for i in todo}
        bar.set_postfix_str(f"{workers} workers x {threads} thread(s)")
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(running.pop(future), future.result())  # bad task data re-raises here
        except BaseException:
            for future in running:
                future.cancel()
            raise


def _write_tables(result: SuiteResult, started: float, cpu_started: float, plots: bool) -> None:
    suite, out, records = result.suite, result.out, result.records
    rows = aggregate(records)
    notes = result.notes + failure_notes(records) + baseline_notes(rows, suite)
    result.rows = rows
    result.wall_s = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu_started
    totals = {
        "runs": len(records), "reused": result.reused, "ran": result.ran,
        "wall_s": sum(r.get("wall_s", 0.0) for r in records), "cpu_s": sum(r.get("cpu_s", 0.0) for r in records),
        "invocation_wall_s": result.wall_s, "invocation_cpu_s": result.cpu_s,
        "workers": result.workers, "threads": result.threads,
        "devices": sorted({r["device"] for r in records if r.get("device")}),
        "memory_methods": sorted({r["memory_method"] for r in records if r.get("memory_method")}),
    }
    plot_files = write_plots(rows, out / "plots", f"{suite.name} suite") if plots and rows else []
    write_json_atomic(out / "results.json", {"suite": suite.to_dict(), "totals": totals, "notes": notes,
                                             "summary": rows, "runs": records})
    write_text_atomic(out / "results.csv", runs_csv(records))
    write_text_atomic(out / "summary.csv", summary_csv(rows))
    write_text_atomic(out / "report.md", markdown(suite, rows, notes, totals, plot_files))
    result.summary = summary_text(rows)
    if notes:
        result.summary += "\n\nnotes:\n" + "\n".join(f"- {n}" for n in notes)
    result.files = ["suite.json", "results.json", "results.csv", "summary.csv", "report.md"] + plot_files


def load_results(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "results.json").read_text())
