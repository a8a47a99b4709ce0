"""Stopping `peftlab assess --workers 2` for real: SIGTERM or SIGKILL to its process leaves no worker
running, and every run that finished is on disk (SIGTERM: and a rerun reuses them)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.cli import main
from tests.assess.conftest import write_glue

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")

# Runs of ~1-2 s each after the first, so that runs are still going when the first one is stored.
ARGS = ["assess", "--suite", "glue", "--methods", "lora", "--tasks", "qnli", "--max-steps", "150",
        "--batch-size", "4", "--no-progress", "--no-plots", "--threads", "1"]
SEEDS = "0,1,2,3"


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (zombies count as gone: nobody here may reap them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # ended while read
        if int(pgrp) == pgid and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _stored(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").rglob("*.json"))]


def _start_and_stop(tmp_path: Path, model: Path, sig: signal.Signals) -> tuple[Path, Path, int, str]:
    """Start the suite with 2 workers in its own process group, send ``sig`` once a run is stored,
    and return (data, out, exit status, stderr) once no process of the group is left."""
    data = write_glue(tmp_path / "glue", tasks=("QNLI",), n_train=64)
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-c", "import sys; from peftlab.cli import main; sys.exit(main(sys.argv[1:]))", *ARGS,
           "--seeds", SEEDS, "--workers", "2", "--model", str(model), "--data-dir", str(data), "--out", str(out)]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "runs").exists() or not any((out / "runs").rglob("*.json")):
            assert proc.poll() is None, f"assess ended (status {proc.returncode}) first:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no run stored within 120 s"
            time.sleep(0.05)
        before = _group(proc.pid)
        assert len(before) >= 3, f"expected the parent and 2 workers in the group, found pids {before}"
        os.kill(proc.pid, sig)
        status = proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while (left := _group(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"processes of the suite still alive after {sig.name}: {left} (before: {before})"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _group(proc.pid):  # only on failure: leave no worker behind on the test machine
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return data, out, status, log.read_text()


def test_sigterm_stops_workers_keeps_finished_runs_and_resumes(tmp_path, tiny_model, capsys):
    data, out, status, err = _start_and_stop(tmp_path, tiny_model, signal.SIGTERM)
    assert status == 143 and "interrupted; finished runs are kept" in err, (status, err)
    stored = _stored(out)
    assert stored and all(r["status"] == "ok" for r in stored)
    reported = json.loads((out / "results.json").read_text())["runs"]
    key = lambda r: (r["method"], r["seed"])  # noqa: E731
    # including runs a worker stored that the parent had not received when the signal came
    assert {key(r) for r in reported} == {key(r) for r in stored}, "the tables and the stored runs differ"
    assert len(stored) < 8, "the suite had finished before the signal: nothing was tested"

    # the same command again (over the seeds that have a stored run) reuses every stored run
    seeds = sorted({r["seed"] for r in stored})
    assert main(ARGS + ["--seeds", ",".join(map(str, seeds)), "--workers", "1", "--model", str(tiny_model),
                        "--data-dir", str(data), "--out", str(out)]) == 0
    assert f"{2 * len(seeds) - len(stored)} run(s) done, {len(stored)} reused" in capsys.readouterr().out


def test_sigkill_of_the_parent_kills_the_workers(tmp_path, tiny_model):
    _, out, status, _ = _start_and_stop(tmp_path, tiny_model, signal.SIGKILL)
    assert status == -signal.SIGKILL
    stored = _stored(out)  # each parses: files are written whole or not at all
    assert stored and all(r["status"] == "ok" for r in stored)
