"""Tables from stored runs: JSON, CSV, a Markdown report laid out like the review's tables, and a
one-screen summary.

Rows are methods (full fine-tuning first, then the registry's taxonomy order), columns are tasks;
scores are mean ± std over the seeds that finished. GLUE metrics are fractions in the records and
shown ×100 in the tables, as papers print them; BLEU and ROUGE are already 0-100.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from typing import Any, Iterable

from ..core.registry import all_methods
from .suites import FULL, Suite

MB = 1024 ** 2


def _glue_label(task: str) -> str:
    from ..tasks.glue import GLUE_TASKS

    return GLUE_TASKS[task].dir_name if task in GLUE_TASKS else task


_LABELS = {"wmt16_en_ro": "WMT16 en-ro", "e2e": "E2E"}


def task_label(task: str) -> str:
    return _LABELS.get(task) or _glue_label(task)


def score_scale(record: dict[str, Any]) -> float:
    return 100.0 if record.get("kind") == "glue" else 1.0


def method_order(methods: Iterable[str]) -> list[str]:
    rank = {s.name: i for i, s in enumerate(all_methods())}
    return sorted(set(methods), key=lambda m: (-1 if m == FULL else rank.get(m, len(rank)), m))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method): figures averaged over the seeds that finished."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["task"], rec["method"]), []).append(rec)
    rows = []
    for (task, method), recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        row: dict[str, Any] = {"task": task, "method": method, "family": recs[0].get("family"),
                               "subcategory": recs[0].get("subcategory"),
                               "seeds": len(ok), "failed": len(recs) - len(ok), "kind": recs[0].get("kind")}
        if ok:
            scale = score_scale(ok[0])
            mean, std = _mean_std([r.get("score") for r in ok])
            row.update(
                score_metric=ok[0].get("score_metric"),
                score=None if mean is None else mean * scale, score_std=None if std is None else std * scale,
                baseline=None if ok[0].get("baseline") is None else ok[0]["baseline"] * scale,
                trainable_params=ok[0]["trainable_params"], total_params=ok[0]["total_params"],
                trainable_percent=ok[0]["trainable_percent"],
                peak_memory_mb=_mean_std([_mb(r.get("peak_memory_bytes")) for r in ok])[0],
                median_step_ms=_mean_std([_ms(r.get("median_step_s")) for r in ok])[0],
                tokens_per_s=_mean_std([r.get("tokens_per_s") for r in ok])[0],
                final_loss=_mean_std([r.get("final_loss") for r in ok])[0],
                steps=ok[0].get("steps"), lr=ok[0].get("lr"), metrics=_mean_metrics(ok, scale),
                step_x_floor=_mean_std([_floor_ratio(r, "step") for r in ok])[0],
                memory_x_floor=_mean_std([_floor_ratio(r, "memory") for r in ok])[0],
            )
        rows.append(row)
    return rows


def _floor_ratio(record: dict[str, Any], what: str) -> float | None:
    """A run's step time or peak memory over its frozen floor's, both measured in the run's process
    (step times over the same first steps; see :func:`peftlab.train.glue_job.frozen_floor`)."""
    floor = record.get("floor") or {}
    if what == "step":  # summed over the same steps: identical work on identical batches
        return _ratio(floor.get("run_timed_s"), floor.get("timed_s"))
    return _ratio(record.get("peak_memory_bytes"), floor.get("peak_memory_bytes"))


def _mean_metrics(records: list[dict[str, Any]], scale: float) -> dict[str, float]:
    names = list(dict.fromkeys(k for r in records for k in (r.get("metrics") or {})))
    means = {k: _mean_std([(r.get("metrics") or {}).get(k) for r in records])[0] for k in names}
    return {k: v * scale for k, v in means.items() if v is not None}


def _mb(value: Any) -> float | None:
    return None if value is None else value / MB


def _ms(value: Any) -> float | None:
    return None if value is None or not math.isfinite(value) else 1000.0 * value


# -- notes ---------------------------------------------------------------------------------------
def baseline_notes(rows: list[dict[str, Any]], suite: Suite) -> list[str]:
    """A note for every (task, method) whose score is within ``baseline_margin`` of the constant
    (majority-class) baseline, with what the training loss says about why."""
    from ..tasks.glue import GLUE_TASKS

    notes = []
    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row["task"], {})[row["method"]] = row
    for task, methods in by_task.items():
        at_base = {}
        for method, row in methods.items():
            if row.get("score") is None or row.get("baseline") is None:
                continue
            margin = suite.baseline_margin * score_scale({"kind": row["kind"]})
            if row["score"] <= row["baseline"] + margin:
                at_base[method] = row
        full_too = FULL in at_base
        for method in method_order(at_base):
            row = at_base[method]
            glue = GLUE_TASKS.get(task)
            why = ""
            if glue is not None and not glue.is_regression and row.get("final_loss") is not None:
                chance = math.log(glue.num_labels)
                if row["final_loss"] >= 0.95 * chance:
                    why = (f"its training loss ended at {row['final_loss']:.3f}, the chance level ln {glue.num_labels} "
                           f"= {chance:.3f}: it did not fit the training data in {_steps(row['steps'])} at lr "
                           f"{row['lr']:.2g} (it needs more steps or another learning rate)")
                else:
                    why = (f"its training loss fell to {row['final_loss']:.3f} (chance level {chance:.3f}), but that did "
                           "not carry over to the dev set: the training subset is too small for this task and model")
            elif row.get("final_loss") is not None:
                why = f"its training loss ended at {row['final_loss']:.3f} after {_steps(row['steps'])}"
            also = (" Full fine-tuning is at the baseline too, so the task is out of this model's reach at this "
                    "budget rather than a failure of the method." if full_too and method != FULL else "")
            where = "below" if row["score"] < row["baseline"] - margin else f"within {margin:.1f} of"
            notes.append(f"{method_title(method)} on {task_label(task)}: {row['score_metric']} {row['score']:.1f} is {where} "
                         f"the constant-prediction (majority-class) baseline {row['baseline']:.1f}; {why}.{also}")
    return notes


def _steps(n: int | None) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def failure_notes(records: list[dict[str, Any]]) -> list[str]:
    return [f"{method_title(r['method'])} on {task_label(r['task'])} (seed {r['seed']}) failed: {r.get('error')}"
            for r in records if r.get("status") != "ok"]


DRIFT = 1.25  # full fine-tuning steps of one shape this far apart: the machine's load changed
SPREAD = 5.0  # score points of std over seeds that make a result too unstable to rank on


def floor_drift_notes(records: list[dict[str, Any]]) -> list[str]:
    """The frozen floor of one (task, seed) trains the same batches in every run: where its step time
    varies across runs, the machine's load changed during the suite. The × floor ratios hold (each
    run's floor was timed in its own process, right after it); absolute times do not."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        floor = r.get("floor") or {}
        if r.get("status") == "ok" and floor.get("median_step_s"):
            groups.setdefault((r["task"], r["seed"]), []).append(r)
    notes = []
    for (task, seed), recs in groups.items():
        times = [r["floor"]["median_step_s"] for r in recs]
        if len(times) > 1 and max(times) > DRIFT * min(times):
            notes.append(f"the frozen floor's step time on {task_label(task)} (seed {seed}, the same batches in every "
                         f"run) ranged {min(times) * 1e3:,.0f}-{max(times) * 1e3:,.0f} ms over {len(times)} runs "
                         f"({max(times) / min(times):.2f}x): the machine's load changed during the suite. The x floor "
                         "ratios hold, as each run was timed against its own floor; absolute ms do not")
    return notes


def drift_notes(records: list[dict[str, Any]]) -> list[str]:
    """Full fine-tuning is the reference of the "x full" step-time column; where its step time on
    one task (same data, length limit and batch) varies across seeds, the machine's load changed
    during the suite and the step-time ratios carry that error. Tasks are not compared with each
    other: their sentences fill the length limit differently."""
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("method") == FULL and r.get("status") == "ok" and r.get("median_step_s"):
            settings = r.get("settings") or {}
            key = (r["task"], (settings.get("task") or {}).get("max_length"), settings.get("batch_size"))
            groups.setdefault(key, []).append(r)
    notes = []
    for (task, length, batch), recs in groups.items():
        times = [r["median_step_s"] for r in recs]
        if len(times) > 1 and max(times) > DRIFT * min(times):
            runs = ", ".join(f"seed {r['seed']}: {r['median_step_s'] * 1e3:,.0f} ms" for r in recs)
            notes.append(f"full fine-tuning's step time on {task_label(task)} (max length {length}, batch {batch}) varied "
                         f"{max(times) / min(times):.2f}x across runs ({runs}): the machine's load changed during the "
                         "suite, so step times and their x full ratios carry that much error; rerun on an idle machine "
                         "to compare speeds")
    return notes


def spread_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Results whose seeds disagree by more than :data:`SPREAD` points (std)."""
    return [f"{method_title(r['method'])} on {task_label(r['task'])}: its {r['seeds']} seeds disagree (std {r['score_std']:.1f} "
            f"points on a mean of {r['score']:.1f}); rank it with care, or run more seeds"
            for r in rows if r.get("seeds", 0) > 1 and (r.get("score_std") or 0) > SPREAD]


def search_notes(records: list[dict[str, Any]]) -> list[str]:
    """What each search method's search ran and chose (the run then trained the chosen config)."""
    notes = []
    for r in records:
        search = r.get("search")
        if r.get("status") != "ok" or not search:
            continue
        trials = search.get("trials", [])
        best = max((t["score"] for t in trials), default=float("nan"))
        found = json.dumps({k: v for k, v in search["config"].items() if k != "method"}, separators=(",", ":"))
        notes.append(f"{r['method']} on {task_label(r['task'])} (seed {r['seed']}): searched {len(trials)} candidate(s) "
                     f"of {search['budget']['steps']} steps in {search['seconds']:.0f} s (best held-out score "
                     f"{100 * best:.1f}); trained the chosen config {found[:400]}{'…' if len(found) > 400 else ''}")
    return notes


def method_title(method: str) -> str:
    """The method as the review writes it (its spec's title); a name no longer registered stays as stored."""
    if method == FULL:
        return "full fine-tuning"
    spec = next((s for s in all_methods() if s.name == method), None)
    return (spec.title or spec.name) if spec else method


# -- formatting ----------------------------------------------------------------------------------
def _fmt_score(row: dict[str, Any] | None) -> str:
    if not row or row.get("score") is None:
        return "failed" if row and row.get("failed") else "–"
    text = f"{row['score']:.1f}"
    if row["seeds"] > 1:
        text += f" ± {row['score_std']:.1f}"
    return text


def _fmt(value: Any, spec: str, dash: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return dash
    return format(value, spec)


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def markdown_table(head: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A Markdown table: the first ``text_columns`` columns left-aligned, the figures right-aligned."""
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] * text_columns + ["---:"] * (len(head) - text_columns)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def grid(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = method_order(r["method"] for r in rows)
    return tasks, methods, {(r["task"], r["method"]): r for r in rows}


def _first(cell: dict[tuple[str, str], dict[str, Any]], tasks: list[str], method: str, key: str) -> Any:
    for task in tasks:
        row = cell.get((task, method))
        if row and row.get(key) is not None:
            return row[key]
    return None


def score_table(rows: list[dict[str, Any]]) -> str:
    tasks, methods, cell = grid(rows)
    metric = {t: next((cell[(t, m)].get("score_metric") for m in methods
                       if cell.get((t, m), {}).get("score_metric")), None) for t in tasks}
    head = ["Method", "Family: sub-category", "Trainable params", "Trainable %"] + [
        f"{task_label(t)} ({metric[t]})" if metric[t] else task_label(t) for t in tasks] + ["Avg."]
    body = []
    baselines = [next((cell[(t, m)]["baseline"] for m in methods if cell.get((t, m), {}).get("baseline") is not None),
                      None) for t in tasks]
    if any(b is not None for b in baselines):
        body.append(["constant-prediction baseline", "", "", ""] + [_fmt(b, ".1f") for b in baselines] + [""])
    for m in methods:
        scores = [cell.get((t, m), {}).get("score") for t in tasks]
        avg = statistics.fmean(scores) if scores and all(s is not None for s in scores) else None
        family, sub = _first(cell, tasks, m, "family") or "", _first(cell, tasks, m, "subcategory")
        body.append([method_title(m), f"{family}: {sub}" if sub else family,
                     _count(_first(cell, tasks, m, "trainable_params")),
                     _fmt(_first(cell, tasks, m, "trainable_percent"), ".3f")]
                    + [_fmt_score(cell.get((t, m))) for t in tasks] + [_fmt(avg, ".1f")])
    return markdown_table(head, body, text_columns=2)


def trainable_table(rows: list[dict[str, Any]]) -> str:
    """Trainable parameters per model (the efficiency suite's tasks are model sizes)."""
    tasks, methods, cell = grid(rows)
    head = ["Method", "Family"] + [f"{task_label(t)} trainable" for t in tasks] + [f"{task_label(t)} %" for t in tasks]
    body = [[method_title(m), str(_first(cell, tasks, m, "family") or "")]
            + [_count(cell.get((t, m), {}).get("trainable_params")) for t in tasks]
            + [_fmt(cell.get((t, m), {}).get("trainable_percent"), ".3f") for t in tasks] for m in methods]
    return markdown_table(head, body, text_columns=2)


# The review's order of the families (its Figure 1, left to right).
FAMILIES = ("additive", "partial", "reparameterized", "hybrid", "unified")


def has_floor(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("step_x_floor") is not None for r in rows)


def cost_table(rows: list[dict[str, Any]]) -> str:
    """Peak memory and step time per task, as ratios to the frozen floor measured in each run's
    process where the runs have one, else to full fine-tuning's run on the task."""
    tasks, methods, cell = grid(rows)
    floor = has_floor(rows)
    ref = "× floor" if floor else "× full"
    full_mem = {t: cell.get((t, FULL), {}).get("peak_memory_mb") for t in tasks}
    full_step = {t: cell.get((t, FULL), {}).get("median_step_ms") for t in tasks}
    head = ["Method", "Trainable %"]
    for t in tasks:
        head += [f"{task_label(t)} peak {ref}", "peak MB", f"step {ref}", "step ms", "tokens/s"]
    body = []
    for m in methods:
        line = [method_title(m), _fmt(_first(cell, tasks, m, "trainable_percent"), ".3f")]
        for t in tasks:
            row = cell.get((t, m), {})
            mem, step = row.get("peak_memory_mb"), row.get("median_step_ms")
            mem_x = row.get("memory_x_floor") if floor else _ratio(mem, full_mem[t])
            step_x = row.get("step_x_floor") if floor else _ratio(step, full_step[t])
            line += [_fmt(mem_x, ".2f"), _fmt(mem, ",.0f"), _fmt(step_x, ".2f"), _fmt(step, ",.0f"),
                     _fmt(row.get("tokens_per_s"), ",.0f")]
        body.append(line)
    return markdown_table(head, body)


def taxonomy_table(rows: list[dict[str, Any]]) -> str:
    """One line per method, grouped by family and sub-category as the review sorts them: trainable
    share, the score on each task (mean ± std over seeds), and the cost as ratios to the frozen floor."""
    tasks, methods, cell = grid(rows)
    head = ["Family", "Sub-category", "Method", "Trainable (entries)", "Trainable %"] + [
        f"{task_label(t)} score" for t in tasks] + ["Peak memory × floor", "Step time × floor"]
    family_rank = {f: i for i, f in enumerate(FAMILIES)}
    order = sorted(methods, key=lambda m: (m != FULL, family_rank.get(_first(cell, tasks, m, "family"), len(FAMILIES)),
                                           _first(cell, tasks, m, "subcategory") or "", method_title(m).lower()))
    body = []
    for m in order:
        mem = [cell.get((t, m), {}).get("memory_x_floor") for t in tasks]
        step = [cell.get((t, m), {}).get("step_x_floor") for t in tasks]
        mem, step = [x for x in mem if x is not None], [x for x in step if x is not None]
        body.append([str(_first(cell, tasks, m, "family") or ""), str(_first(cell, tasks, m, "subcategory") or ""),
                     method_title(m), _count(_first(cell, tasks, m, "trainable_params")),
                     _fmt(_first(cell, tasks, m, "trainable_percent"), ".3f")]
                    + [_fmt_score(cell.get((t, m))) for t in tasks]
                    + [_fmt(statistics.fmean(mem) if mem else None, ".2f"),
                       _fmt(statistics.fmean(step) if step else None, ".2f")])
    return markdown_table(head, body, text_columns=3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def metrics_table(rows: list[dict[str, Any]]) -> str:
    tasks, methods, cell = grid(rows)
    columns: list[tuple[str, str]] = []
    for t in tasks:
        names: list[str] = []
        for m in methods:
            for k in (cell.get((t, m), {}).get("metrics") or {}):
                if k not in names:
                    names.append(k)
        if "score" in names and len(names) == 2:  # one official metric: the score repeats it
            names.remove("score")
        columns += [(t, k) for k in names]
    main = {t: next((cell[(t, m)].get("score_metric") for m in methods if cell.get((t, m), {}).get("score_metric")),
                    None) for t in tasks}
    if not columns or all(k == main[t] for t, k in columns):  # the score tables show every metric already
        return ""
    head = ["Method"] + [f"{task_label(t)} {'mean of the metrics' if k == 'score' else k}" for t, k in columns]
    body = [[method_title(m)] + [_fmt((cell.get((t, m), {}).get("metrics") or {}).get(k), ".2f") for t, k in columns]
            for m in methods]
    return markdown_table(head, body)


def summary_text(rows: list[dict[str, Any]], width: int = 100) -> str:
    """A plain-text table that fits one screen: method, trainable %, score per task and their mean,
    peak memory (largest over tasks) and step time (mean over tasks); the headers say which."""
    tasks, methods, cell = grid(rows)
    has_scores = any(r.get("score") is not None for r in rows)
    floor = has_floor(rows)
    mem_key, step_key = ("memory_x_floor", "step_x_floor") if floor else ("peak_memory_mb", "median_step_ms")
    head = ["method", "trainable%"] + ([task_label(t)[:12] for t in tasks] + ["mean"] if has_scores else []) + (
        ["max peak x floor", "mean step x floor"] if floor else ["max peak MB", "mean step ms"])
    lines = []
    for m in methods:
        scores = [cell.get((t, m), {}).get("score") for t in tasks]
        mems = [cell.get((t, m), {}).get(mem_key) for t in tasks]
        steps = [cell.get((t, m), {}).get(step_key) for t in tasks]
        mems = [x for x in mems if x is not None]
        steps = [x for x in steps if x is not None]
        line = [method_title(m)[:22], _fmt(_first(cell, tasks, m, "trainable_percent"), ".3f")]
        if has_scores:
            line += [_fmt_score(cell.get((t, m))).replace(" ± ", "±").replace("–", "-") if s is not None else
                     ("fail" if cell.get((t, m), {}).get("failed") else "-") for s, t in zip(scores, tasks)]
            line += [_fmt(statistics.fmean(scores) if all(s is not None for s in scores) else None, ".1f", "-")]
        spec = ".2f" if floor else ",.0f"
        line += [_fmt(max(mems) if mems else None, spec, "-"), _fmt(statistics.fmean(steps) if steps else None, spec, "-")]
        lines.append(line)
    widths = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    text = [fmt(head), "-" * min(width, len(fmt(head)))] + [fmt(r) for r in lines]
    return "\n".join(text)


# -- files ---------------------------------------------------------------------------------------
CSV_FIELDS = ["suite", "model", "task", "method", "family", "subcategory", "seed", "status", "score_metric", "score", "baseline",
              "trainable_params", "total_params", "trainable_percent", "peak_memory_bytes", "held_memory_bytes",
              "memory_method", "median_step_s", "tokens_per_s", "steps", "final_loss", "lr", "device",
              "wall_s", "cpu_s", "error"]


def runs_csv(records: list[dict[str, Any]]) -> str:
    metric_names = list(dict.fromkeys(k for r in records for k in (r.get("metrics") or {})))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS + [f"metric:{k}" for k in metric_names])
    for r in records:
        metrics = r.get("metrics") or {}
        writer.writerow([_csv(r.get(k)) for k in CSV_FIELDS] + [_csv(metrics.get(k)) for k in metric_names])
    return buf.getvalue()


def summary_csv(rows: list[dict[str, Any]]) -> str:
    fields = ["task", "method", "family", "subcategory", "seeds", "failed", "score_metric", "score", "score_std", "baseline",
              "trainable_params", "total_params", "trainable_percent", "peak_memory_mb", "median_step_ms",
              "tokens_per_s", "final_loss", "steps", "lr"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow([_csv(row.get(k)) for k in fields])
    return buf.getvalue()


def _csv(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def markdown(suite: Suite, rows: list[dict[str, Any]], notes: list[str], totals: dict[str, Any],
             plots: list[str]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    budget = ", ".join(_budget(t, suite) for t in suite.tasks if t.name in tasks or t.name == "*") or "–"
    devices = ", ".join(sorted({str(d) for d in totals.get("devices", [])})) or "–"
    lines = [
        f"# Assessment: `{suite.name}` suite",
        "",
        f"- Model: `{suite.model}`" + (f"; data: `{suite.data_dir}`" if suite.data_dir else ""),
        f"- Tasks and budget: {budget}; batch {suite.batch_size}"
        + (" (batches split by length)" if suite.split_by_length and suite.kind == "glue" else "") + ", "
        + (f"{suite.max_steps} steps" if suite.max_steps else f"{suite.epochs:g} epoch(s)")
        + f", seeds {', '.join(map(str, suite.seeds))}" if suite.kind != "efficiency" else
        f"- Models (random weights, built from their configurations): {budget}; a fixed batch of "
        f"{suite.batch_size} random sequences; 1 warm-up step, 1 step probed for memory, {max(1, suite.timed_steps)} "
        "timed step(s)",
        f"- Learning rate: each method's `default_lr` × {suite.lr_scale:g}; full fine-tuning {suite.full_lr:g}",
        f"- Device: {devices}; {totals.get('runs', 0)} runs ({totals.get('reused', 0)} reused from an earlier "
        f"invocation), {totals.get('wall_s', 0) / 60:.1f} min wall and {totals.get('cpu_s', 0) / 60:.1f} min CPU "
        "summed over the runs; this invocation took "
        f"{totals.get('invocation_wall_s', 0) / 60:.1f} min wall with {totals.get('workers', 1)} worker process(es) "
        f"of {totals.get('threads', 1)} thread(s)",
        "",
    ]
    if suite.kind != "efficiency" and str(suite.model).startswith("random:"):
        lines += ["> **These scores say nothing about PEFT.** The model was built with random weights "
                  f"(`{suite.model}`): no method adapts pretrained knowledge here, so the table only checks "
                  "that the pipeline runs. Pass a pretrained model with `--model` (a folder or a hub id such "
                  "as `t5-small`) for a meaningful comparison.", ""]
    floor = has_floor(rows)
    if any(r.get("score") is not None for r in rows):
        scale = "×100, " if any(r.get("kind") == "glue" for r in rows) else ""
        if floor:
            lines += [f"## The methods side by side (dev; {scale}mean ± std over seeds)", "",
                      "Grouped as the review sorts them. Trainable: entries that training can change (for masked "
                      "methods, the entries their masks select). Costs are ratios to the frozen floor (see Memory "
                      "and speed), each run timed against its own floor in its own process.",
                      "", taxonomy_table(rows), ""]
        if len(tasks) > 1 or not floor:
            lines += [f"## Task scores (dev; {scale}mean ± std over seeds)", "", score_table(rows), ""]
    else:
        lines += ["## Trainable parameters", "", trainable_table(rows), ""]
    reference = (f"the frozen floor: after each run, its first {suite.floor_steps} batches trained again in the "
                 "same process with every pretrained weight frozen, only the head trained, and the backward run "
                 "through every layer (activation gradients, no weight gradient), as the benchmarks define the "
                 "floor; step time: the summed time of the same timed steps of both, identical work on identical "
                 "batches") if floor else "full fine-tuning's run on the same task"
    lines += ["## Memory and speed", "",
              f"Per task: peak training memory and median training-step time as ratios to {reference}; then the "
              "absolute figures, which move with the machine's load.", "", cost_table(rows), ""]
    lines += published_section(rows)
    table = metrics_table(rows)
    if table:
        lines += ["## Every official metric", "", table, ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## How the figures are measured", "",
              "Trainable parameters: parameters with `requires_grad` after the method is applied (the new "
              "classification head included), over all parameters of the wrapped model. Peak memory: "
              f"{', '.join(sorted({str(m) for m in totals.get('memory_methods', [])})) or 'not measured'}, over the "
              "first training steps. Step time: median over the training steps that were not probed for memory "
              "(after warm-up). Tokens/s: non-padding input tokens per second of those steps. "
              "See docs/assessment.md for what each measurement misses.", ""]
    return "\n".join(lines)


def published_section(rows: list[dict[str, Any]]) -> list[str]:
    """Published figures beside the measured ones, for the tasks both have, and whether the two
    rank the methods they share alike (Spearman's rho over the methods in both)."""
    from scipy.stats import spearmanr

    from .published import PUBLISHED

    tasks, methods, cell = grid(rows)
    lines: list[str] = []
    for table in PUBLISHED:
        shared = [t for t in tasks if any(t in r.scores for r in table.rows)]
        if not shared:
            continue
        head = ["Published row", "Trainable (published)"] + [f"{task_label(t)} published" for t in shared] + [
            f"{task_label(t)} measured here" for t in shared]
        body = [[r.label, r.trainable] + [_fmt(r.scores.get(t), ".1f") for t in shared]
                + [_fmt_score(cell.get((t, r.method))) if cell.get((t, r.method)) else "not run" for t in shared]
                for r in table.rows]
        agree = []
        for t in shared:
            best: dict[str, float] = {}
            for r in table.rows:  # a method with several published sizes: its best
                if t in r.scores and (cell.get((t, r.method)) or {}).get("score") is not None:
                    best[r.method] = max(best.get(r.method, -1e9), r.scores[t])
            names = sorted(best)
            if len(names) < 3:
                agree.append(f"{task_label(t)}: {len(names)} method(s) in both, too few to compare rankings")
                continue
            rho = spearmanr([best[m] for m in names], [cell[(t, m)]["score"] for m in names]).statistic
            agree.append(f"{task_label(t)}: Spearman's rho {rho:.2f} between the published and the measured "
                         f"ranking of {', '.join(method_title(m) for m in names)}")
        lines += [f"### {table.source}", "",
                  f"**Published figures on {table.model}, not measured here**: a larger model trained on the full "
                  "training sets with tuned learning rates, so only the ranking of methods can be compared with "
                  "this suite's.", "", markdown_table(head, body, text_columns=2), ""] + [f"- {a}" for a in agree] + [""]
    return (["## Published reference figures", ""] + lines) if lines else []


def _budget(task: Any, suite: Suite) -> str:
    name = "every GLUE task present" if task.name == "*" else task_label(task.name)
    if suite.kind == "efficiency":
        return f"{name} ({task.max_length} tokens)"
    parts = [f"{task.train_limit:,} train" if task.train_limit else "all train"]
    if task.eval_limit:
        parts.append(f"{task.eval_limit:,} eval")
    parts.append(f"max length {task.max_length}")
    return f"{name} ({', '.join(parts)})"
