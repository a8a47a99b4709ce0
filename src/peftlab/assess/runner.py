"""Run a suite: plan, check inputs, run what is not stored yet, write the report.

Resuming: every finished run is a JSON file (see :mod:`.store`). Starting the same suite again
with the same output folder reuses each stored run whose settings are unchanged and runs only the
rest; the report is rewritten after every run, so an interrupted suite still leaves tables of what
finished.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .jobs import jobs_for
from .plots import write_plots
from .report import aggregate, baseline_notes, failure_notes, markdown, runs_csv, summary_csv, summary_text
from .store import RunStore, fingerprint, write_json_atomic, write_text_atomic
from .suites import Suite


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


def run_suite(suite: Suite, out: str | Path, *, progress: bool = True, rerun: bool = False,
              plots: bool = True, echo: Callable[[str], None] = print) -> SuiteResult:
    """Run (or resume) ``suite`` into folder ``out`` and write the report there."""
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
    bar = tqdm(plan, desc=f"assess {suite.name}", unit="run", disable=not progress, position=0)
    for task, method, seed in bar:
        key = f"{task.name}/{method}/seed{seed}"
        bar.set_postfix_str(key)
        record = None if rerun else store.finished(suite.model, task.name, method, seed,
                                                   fingerprint(jobs.settings(task, method, seed)))
        if record is not None:
            result.reused += 1
        else:
            record = jobs.run(task, method, seed)
            store.save(record)
            result.ran += 1
            if record["status"] != "ok":
                tqdm.write(f"peftlab assess: {key} failed: {record['error']}")
        result.records.append(record)
        _write_tables(result, started, cpu_started, plots=False)
    bar.close()
    _write_tables(result, started, cpu_started, plots=plots)
    echo(result.summary)
    echo(f"\n{result.ran} run(s) done, {result.reused} reused; report: {out / 'report.md'}")
    return result


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
