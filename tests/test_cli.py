"""`peftlab train` / `eval` / `--help`: a user's mistake gives one line, `peftlab: error: ...` (or
argparse's usage error), exit code 2 and no traceback; only a bug in peftlab shows a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import peftlab.cli as cli
from peftlab.cli import main
from tests.assess.conftest import write_glue, write_tiny_model

PEFTLAB = Path(sys.executable).with_name("peftlab")  # the venv's console script


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def sst2(tmp_path: Path) -> Path:
    """A small SST-2 task folder, named as GLUE names it."""
    return write_glue(tmp_path / "glue", tasks=("SST-2",)) / "SST-2"


def _train(tiny_model: Path, task: Path | str, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny_model), "--task", str(task), "--max-length", "16", "--batch-size", "8",
            "--out", str(tmp_path / "out"), *extra]


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI in-process; it must fail with exit code 2 and end with one `peftlab: error:` line
    (transformers' progress bars may come before it)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("peftlab: error: ") and "Traceback" not in err, err
    return last


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Refused by argparse: usage and one error line, exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err


# -- 1: a model folder that does not exist ---------------------------------------------------------
def test_missing_model_folder_is_named_in_a_subprocess(tmp_path: Path, sst2: Path) -> None:
    missing = tmp_path / "models" / "nope"
    missing.parent.mkdir()
    proc = subprocess.run([str(PEFTLAB), "train", "--model", str(missing), "--task", str(sst2), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Repo id must be" not in proc.stderr
    assert proc.stderr.startswith("peftlab: error: ")
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr
    assert "not a valid hub id" in proc.stderr


# -- 2: non-positive numbers are refused when the arguments are parsed ------------------------------
@pytest.mark.parametrize("command,flag,value", [
    ("train", "--train-limit", "0"), ("train", "--eval-limit", "-1"), ("train", "--batch-size", "0"),
    ("train", "--max-length", "0"), ("train", "--epochs", "0"), ("train", "--epochs", "nan"),
    ("train", "--lr", "-1e-3"), ("train", "--train-limit", "1.5"), ("eval", "--eval-limit", "0"),
    ("eval", "--max-length", "-4"), ("assess", "--batch-size", "0"), ("assess", "--epochs", "-1"),
    ("assess", "--max-length", "0"), ("assess", "--max-steps", "0"),
])
def test_non_positive_numbers_are_refused_at_parsing(command: str, flag: str, value: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    required = {"train": ["--model", "m", "--task", "sst2"], "eval": ["--model", "m", "--task", "sst2",
                                                                      "--adapter", "a"], "assess": []}[command]
    err = _usage_error(capsys, [command, *required, f"{flag}={value}"])
    assert f"argument {flag}: {value!r}: expected a positive" in err


# -- 4: a bad regex target names the pattern --------------------------------------------------------
def test_bad_regex_target_is_one_line(tiny_model: Path, sst2: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, _train(tiny_model, sst2, tmp_path, "--targets", "re:("))
    assert "'('" in err and "regular expression" in err


# -- 5: a task folder that does not exist, or whose name is not a GLUE task -------------------------
def test_missing_task_folder_says_it_does_not_exist(tiny_model: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, _train(tiny_model, tmp_path / "glue" / "SST-2", tmp_path))
    assert str(tmp_path / "glue" / "SST-2") in err and "does not exist" in err
    assert "unknown GLUE task" not in err


def test_task_folder_with_another_name_says_what_picks_the_task(tiny_model: Path, sst2: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    renamed = sst2.rename(sst2.with_name("SST-2-small"))
    err = _error(capsys, _train(tiny_model, renamed, tmp_path))
    assert "exists" in err and "'SST-2-small' is not a GLUE task" in err
    assert "CoLA, SST-2" in err and f"--task sst2 --data-dir {renamed}" in err


def test_task_name_with_the_folder_as_data_dir_trains(tiny_model: Path, sst2: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    renamed = sst2.rename(sst2.with_name("SST-2-small"))  # the fix the message above suggests
    assert main(_train(tiny_model, "sst2", tmp_path, "--data-dir", str(renamed), "--method", "bitfit")) == 0
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert "dev accuracy=" in capsys.readouterr().out


def test_unknown_task_name(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, _train(tiny_model, "sst", tmp_path))
    assert "'sst' is neither a folder nor a GLUE task name" in err and "SST-2" in err


# -- 6: every split is checked before the model loads ------------------------------------------------
@pytest.mark.parametrize("split", ["train", "dev"])
def test_bad_row_fails_before_the_model_loads(split: str, tiny_model: Path, sst2: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = sst2 / f"{split}.tsv"
    path.write_text(path.read_text() + "a bad row\tmaybe\n")
    lines = len(path.read_text().splitlines())

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("peftlab.train.glue_job.load_classifier", no_model)
    err = _error(capsys, _train(tiny_model, sst2, tmp_path))
    assert f"{path}:{lines}: label 'maybe'" in err


def test_eval_checks_the_dev_split_before_loading(tiny_model: Path, sst2: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from peftlab import LoraConfig

    (sst2 / "dev.tsv").write_text("sentence\tlabel\n")  # a header and no rows
    LoraConfig().save(tmp_path / "adapter_config.json")  # the adapter's config is read first, and is fine

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("peftlab.train.glue_job.load_classifier", no_model)
    err = _error(capsys, ["eval", "--model", str(tiny_model), "--task", str(sst2), "--adapter", str(tmp_path)])
    assert "SST-2 dev split" in err and "no examples" in err


# -- 7: help text is plain ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["methods"], ["train"], ["eval"], ["assess"]])
def test_help_has_no_markup(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: peftlab" in out
    assert "`" not in out


# -- main(): the user's errors are one line; bugs keep their traceback -------------------------------
def test_user_errors_are_one_line_and_bugs_are_not_hidden(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from peftlab.core.errors import PeftlabError
    from peftlab.tasks.errors import TaskDataError

    for error in (PeftlabError("bad option"), TaskDataError("bad row"), FileNotFoundError("no such file")):
        def fail(args: object, error: Exception = error) -> int:
            raise error

        monkeypatch.setattr(cli, "cmd_methods", fail)
        assert f"peftlab: error: {error}" in _error(capsys, ["methods"])

    def bug(args: object) -> int:
        raise ValueError("a bug in peftlab")

    monkeypatch.setattr(cli, "cmd_methods", bug)
    with pytest.raises(ValueError, match="a bug in peftlab"):  # not swallowed: its traceback shows
        main(["methods"])


def test_missing_adapter_folder(tiny_model: Path, sst2: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["eval", "--model", str(tiny_model), "--task", str(sst2), "--max-length", "16",
                          "--adapter", str(tmp_path / "no-adapter")])
    assert str(tmp_path / "no-adapter") in err
