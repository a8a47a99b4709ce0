"""Bad input stops `peftlab assess` before anything trains, with one line naming the file, the
line where there is one, and the fix; never a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.cli import main
from tests.assess.conftest import write_glue


def _run(capsys, tmp_path: Path, *args: str) -> str:
    code = main(["assess", "--suite", "glue", "--methods", "lora", "--max-steps", "1", "--batch-size", "4",
                 "--no-progress", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("peftlab: error: ")
    assert not (tmp_path / "out" / "runs").exists(), "nothing may train before the input is checked"
    return err


def _replace_line(path: Path, index: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")


def test_missing_task_folder(tmp_path, tiny_model, capsys):
    data = write_glue(tmp_path / "glue", tasks=("QNLI",))
    err = _run(capsys, tmp_path, "--model", str(tiny_model), "--data-dir", str(data), "--tasks", "qnli,mrpc")
    assert "MRPC" in err and str(data / "MRPC") in err and "QNLI/" in err  # what was expected, what is there


def test_malformed_row_names_file_and_line(tmp_path, tiny_model, capsys):
    data = write_glue(tmp_path / "glue", tasks=("QNLI",))
    train = data / "QNLI" / "train.tsv"
    _replace_line(train, 4, "7\tonly two columns")
    err = _run(capsys, tmp_path, "--model", str(tiny_model), "--data-dir", str(data))
    assert f"{train}:5:" in err and "malformed" in err and "expected 4" in err


def test_label_outside_the_task_set(tmp_path, tiny_model, capsys):
    data = write_glue(tmp_path / "glue", tasks=("QNLI",))
    dev = data / "QNLI" / "dev.tsv"
    _replace_line(dev, 2, "1\twho ran ?\tthe cat ran\tmaybe")
    err = _run(capsys, tmp_path, "--model", str(tiny_model), "--data-dir", str(data))
    assert f"{dev}:3:" in err and "'maybe'" in err and "entailment, not_entailment" in err


def test_model_without_a_head_for_the_task(tmp_path, capsys):
    data = write_glue(tmp_path / "glue", tasks=("STS-B",))
    model = tmp_path / "marian"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "marian", "d_model": 16, "vocab_size": 50}))
    err = _run(capsys, tmp_path, "--model", str(model), "--data-dir", str(data))
    assert str(model / "config.json") in err and "'marian'" in err
    assert "sequence classification" in err and "STS-B" in err and "Fix:" in err


def test_missing_model_folder(tmp_path, capsys):
    data = write_glue(tmp_path / "glue", tasks=("QNLI",))
    err = _run(capsys, tmp_path, "--model", str(tmp_path / "nope"), "--data-dir", str(data))
    assert str(tmp_path / "nope") in err and "not found" in err


def test_bad_yaml_field_names_the_file(tmp_path, capsys):
    config = tmp_path / "suite.yaml"
    config.write_text("suite: quick\nmethods: [lora]\nlearning_rate: 3\n")
    err = _run(capsys, tmp_path, "--config", str(config))
    assert str(config) in err and "learning_rate" in err and "allowed" in err


def test_unknown_method_is_named(tmp_path, tiny_model, capsys):
    data = write_glue(tmp_path / "glue", tasks=("QNLI",))
    err = _run(capsys, tmp_path, "--model", str(tiny_model), "--data-dir", str(data), "--methods", "lorra")
    assert "'lorra'" in err and "'lora'" in err


@pytest.mark.parametrize("flag", ["--train-limit", "--eval-limit"])
def test_bad_limit_is_an_argparse_error(flag, capsys):
    with pytest.raises(SystemExit):
        main(["assess", flag, "-3"])
    assert "positive number" in capsys.readouterr().err


def test_typo_in_method_options_names_option_method_and_file(tmp_path, capsys):
    config = tmp_path / "suite.yaml"
    config.write_text("suite: quick\nmethods: [lora]\nmethod_options:\n  lora: {rr: 8}\n")
    err = _run(capsys, tmp_path, "--config", str(config))
    assert str(config) in err and "method_options.lora" in err and "'rr'" in err  # the file, method, option
    assert "LoraConfig" in err and "'r'" in err and "'alpha'" in err  # and the options there are
    assert "unexpected keyword" not in err


@pytest.mark.parametrize("options,expected", [
    ("{lroa: {r: 8}}", "unknown method 'lroa'"),
    ("{lora: {r: -1}}", "LoraConfig.r=-1"),
    ("{lora: 8}", "method_options.lora=8: expected a mapping"),
    ("[lora]", "expected a mapping of method names"),
])
def test_bad_method_options_name_the_file(options, expected, tmp_path, capsys):
    config = tmp_path / "suite.yaml"
    config.write_text(f"suite: quick\nmethods: [lora]\nmethod_options: {options}\n")
    err = _run(capsys, tmp_path, "--config", str(config))
    assert str(config) in err and expected in err
