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

Stopping: each worker stores its run as soon as it finishes (then the parent stores it again with
its baseline), so a run that finished is on disk however the suite ends. Workers die with the
suite's process: on SIGINT and SIGTERM the parent kills them before it exits (SIGTERM is turned
into :class:`Terminated`, a KeyboardInterrupt); on SIGKILL, which the parent cannot handle, the
kernel kills them (Linux: PR_SET_PDEATHSIG), or else a thread in each that waits for the parent.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .jobs import jobs_for
from .plots import write_plots
from .report import (aggregate, baseline_notes, drift_notes, failure_notes, floor_drift_notes, markdown, runs_csv,
                     search_notes, spread_notes, summary_csv, summary_text)
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
    suite, fallback = suite.with_reachable_model()
    jobs = jobs_for(suite, progress)
    methods, notes = suite.method_plan()
    notes = ([fallback] if fallback else []) + notes
    tasks = jobs.tasks()
    jobs.preflight(tasks, methods)  # raises on bad input before anything trains
    notes += jobs.notes
    store = RunStore(out)
    write_json_atomic(out / "suite.json", suite.to_dict())
    # Seed by seed: an interrupted suite has every method at its first seeds, and the ETA knows each
    # method's time after the first round.
    plan = [(t, m, s) for s in suite.seeds for t in tasks for m in jobs.methods_for(t, methods)]

    result = SuiteResult(suite, out, [], [], notes)
    done: dict[int, dict[str, Any]] = {}  # plan index -> record; the report keeps the plan's order

    def keep(i: int, record: dict[str, Any]) -> None:
        record["baseline"] = jobs.baseline(plan[i][0])  # known here, from the preflight a worker skips
        done[i] = record
        result.records = [done[j] for j in sorted(done)]

    import torch

    # Fixed before looking up stored runs: the thread count is part of a run's fingerprint, so a
    # resumed suite runs its remaining runs as the first invocation did, even when fewer remain.
    threads = threads or (torch.get_num_threads() if workers == 1 else max(1, (os.cpu_count() or 1) // workers))
    jobs.threads = threads
    todo = []
    for i, (task, method, seed) in enumerate(plan):
        record = None if rerun else store.finished(suite.model, task.name, method, seed,
                                                   fingerprint(jobs.settings(task, method, seed)))
        if record is not None:
            keep(i, record)
            result.reused += 1
        else:
            todo.append(i)
    # tqdm's own ETA (rate of finished runs) is misleading while few runs have finished: the postfix
    # carries ours, from each method's measured run time.
    bar = tqdm(total=len(plan), initial=len(done), desc=f"assess {suite.name}", unit="run", disable=not progress,
               position=0, bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed}{postfix}")
    eta = _Eta(plan, todo)

    def finish(i: int, record: dict[str, Any]) -> None:
        # Storing a run and rewriting the tables happen together: a Ctrl-C or SIGTERM waits for both,
        # so the tables of an interrupted suite name exactly the runs it stored.
        with _signals_held():
            keep(i, record)
            store.save(record)
            result.ran += 1
            if record["status"] != "ok":
                tqdm.write(f"peftlab assess: {_key(plan[i])} failed: {record['error']}")
            _write_tables(result, started, cpu_started, plots=False)
        line = eta.finished(i, record, result.workers)
        if progress:
            tqdm.write(line)
        bar.update(1)
        bar.set_postfix_str(eta.postfix(done, result.workers), refresh=True)

    workers = min(workers, max(len(todo), 1))
    if workers == 1:
        torch.set_num_threads(threads)
    result.workers, result.threads = workers, threads
    jobs.progress = progress and workers == 1  # bars of parallel runs would interleave
    if progress:
        tqdm.write(f"peftlab assess {suite.name}: {len(todo)} run(s) to go, {result.reused} stored ({len(methods)} "
                   f"method(s) x {len(tasks)} task(s) x {len(suite.seeds)} seed(s)); {workers} worker(s) x "
                   f"{threads} thread(s)")
    try:
        with _sigterm_interrupts():
            if workers == 1:
                for i in todo:
                    bar.set_postfix_str(eta.postfix(done, 1))
                    finish(i, jobs.run(*plan[i]))
            else:
                bar.set_postfix_str(eta.postfix(done, workers))
                _run_in_workers(suite, out, plan, todo, workers, threads, finish, bar)
    except KeyboardInterrupt:
        # A worker stores its run before the parent receives it: pick up those the stop overtook,
        # so the tables of an interrupted suite name every run it leaves on disk.
        for i in todo:
            if i not in done and (record := store.finished(suite.model, plan[i][0].name, plan[i][1], plan[i][2],
                                                           fingerprint(jobs.settings(*plan[i])))) is not None:
                keep(i, record)
                result.ran += 1
        if result.records:  # the tables of an interrupted suite are complete (see finish)
            _write_tables(result, started, cpu_started, plots=False)
        raise
    bar.close()
    _write_tables(result, started, cpu_started, plots=plots)
    echo(result.summary)
    echo(f"\n{result.ran} run(s) done, {result.reused} reused; report: {out / 'report.md'}")
    return result


def _key(entry: tuple[TaskSpec, str, int]) -> str:
    task, method, seed = entry
    return f"{task.name}/{method}/seed{seed}"


class _Eta:
    """Progress per run: what finished (score, time), what runs now, and the time left, estimated
    from this invocation's runs: a method's own mean run time once one of its runs finished (seeds
    come round by round), else the mean over all finished runs."""

    def __init__(self, plan: list[tuple[TaskSpec, str, int]], todo: list[int]) -> None:
        self.plan, self.todo = plan, todo
        self.times: dict[tuple[str, str], list[float]] = {}
        self.count = 0

    def _estimate(self, i: int) -> float | None:
        task, method, _ = self.plan[i]
        own = self.times.get((task.name, method))
        every = [x for xs in self.times.values() for x in xs]
        chosen = own or every
        return sum(chosen) / len(chosen) if chosen else None

    def left_s(self, done: dict[int, Any], workers: int) -> float | None:
        pending = [i for i in self.todo if i not in done]
        estimates = [self._estimate(i) for i in pending]
        if any(e is None for e in estimates):
            return None
        return sum(estimates) / max(1, min(workers, len(pending)))

    def running(self, done: dict[int, Any], workers: int) -> list[int]:
        # Runs start in plan order (one process pool, submitted in order): the first unfinished ones run.
        return [i for i in self.todo if i not in done][:workers]

    def postfix(self, done: dict[int, Any], workers: int) -> str:
        now = ", ".join(_key(self.plan[i]) for i in self.running(done, workers))
        left = self.left_s(done, workers)
        when = f"about {_minutes(left)} left" if left is not None else "time left known after the first run"
        return f"running {now}; {when}" if now else when

    def finished(self, i: int, record: dict[str, Any], workers: int) -> str:
        task, method, seed = self.plan[i]
        self.count += 1
        wall = float(record.get("wall_s") or 0.0)
        self.times.setdefault((task.name, method), []).append(wall)
        if record.get("status") == "ok" and record.get("score") is not None:
            scale = 100.0 if record.get("kind") == "glue" else 1.0
            outcome = f"{record.get('score_metric') or 'score'} {record['score'] * scale:.1f}"
        else:
            outcome = "failed" if record.get("status") != "ok" else "done"
        return (f"[{self.count}/{len(self.todo)}] {task.name} {method} seed {seed}: {outcome} in {wall:.0f} s "
                f"({record.get('steps') or 0} steps)")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM are held (delivered on exit) within, where the platform allows it."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a suite: stops it as Ctrl-C does (callers that handle one handle both)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"stopped by signal {signum} (SIGTERM)")


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within, SIGTERM raises :class:`Terminated` in the main thread instead of ending the process
    where it stands, so the workers are stopped first. A handler set by the caller is left alone."""
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if ours:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


_worker_jobs = None  # each worker process builds its Jobs once
_worker_store: RunStore | None = None


def _die_with_parent() -> None:
    """End this worker process when its parent ends, SIGKILL included."""
    if sys.platform.startswith("linux"):
        try:  # PR_SET_PDEATHSIG (1): the kernel sends SIGKILL, even while an operator runs
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl (e.g. a libc without it): the thread below still does it
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        # Portable, and covers a parent that died before prctl: join() returns once it is gone.
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="peftlab-parent-watch", daemon=True).start()


def _start_worker(suite: Suite, threads: int, out: Path) -> None:
    global _worker_jobs, _worker_store
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    _worker_jobs = jobs_for(suite, progress=False)
    _worker_jobs.threads = threads
    _worker_store = RunStore(out)


def _run_in_worker(task: TaskSpec, method: str, seed: int) -> dict[str, Any]:
    record = _worker_jobs.run(task, method, seed)
    _worker_store.save(record)  # stored now: the parent may be stopped before it receives the record
    return record


def _run_in_workers(suite: Suite, out: Path, plan: list[tuple[TaskSpec, str, int]], todo: list[int],
                    workers: int, threads: int, finish: Callable[[int, dict[str, Any]], None], bar: Any) -> None:
    # spawn: a fresh interpreter per worker; forking a process that already ran torch's thread
    # pools can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(suite, threads, out)) as pool:
        running: dict[Future, int] = {}
        try:  # submitting spawns the workers: a stop from there on must kill them
            for i in todo:
                running[pool.submit(_run_in_worker, *plan[i])] = i
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(running.pop(future), future.result())  # bad task data re-raises here
        except BaseException:
            _kill_workers(pool)
            raise


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now, mid-run: leaving the pool would wait for their runs (minutes), and a
    stopped suite has seconds. Their finished runs are stored already."""
    processes = list((pool._processes or {}).values())  # no public way before Python 3.14's kill_workers
    for process in processes:
        process.kill()
    for process in processes:
        process.join(10)
    pool.shutdown(wait=True, cancel_futures=True)  # its thread sees the workers gone and cleans up


def _write_tables(result: SuiteResult, started: float, cpu_started: float, plots: bool) -> None:
    suite, out, records = result.suite, result.out, result.records
    rows = aggregate(records)
    notes = (result.notes + failure_notes(records) + baseline_notes(rows, suite) + spread_notes(rows)
             + (floor_drift_notes(records) if any(r.get("floor") for r in records) else drift_notes(records))
             + search_notes(records))
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
