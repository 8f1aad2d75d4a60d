"""The nni-effbert CLI: help everywhere, bad input as a one-line error with exit status 2."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nni_effbert import cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny" / "effbert.yml"


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def _assert_one_line_error(lines, command, *needles):
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith(f"nni-effbert {command}: error: "), last
    for needle in needles:
        assert needle in last, last
    assert not any("Traceback" in line for line in lines)


@pytest.mark.parametrize("argv", [[], ["teacher"], ["warmup"], ["trial"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: nni-effbert" in out
    if argv:
        assert "--config" in out and "--set KEY=VALUE" in out
    else:
        assert all(c.name in out for c in cli.COMMANDS)
    if argv == ["warmup"]:
        assert "--stage" in out and "--fixed" in out
    if argv == ["trial"]:
        assert "--arch" in out


def test_bad_config_files_and_overrides(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text(TINY.read_text().replace("task:\n", "taks:\n", 1))
    code, _, err = _run(capsys, "teacher", "-c", str(bad), "--set", f"workdir={tmp_path}")
    assert code == 2
    _assert_one_line_error(err, "teacher", f"{bad}:taks: unknown key")

    code, _, err = _run(capsys, "warmup", "-c", str(tmp_path / "missing.yml"))
    assert code == 2
    _assert_one_line_error(err, "warmup", "config file not found")

    broken = tmp_path / "broken.yml"
    broken.write_text("workdir: [unclosed\n")
    code, _, err = _run(capsys, "trial", "-c", str(broken))
    assert code == 2
    _assert_one_line_error(err, "trial", "malformed YAML")

    code, _, err = _run(capsys, "teacher", "-c", str(TINY), "--set", "evaluator.train_stepz=3")
    assert code == 2
    _assert_one_line_error(err, "teacher", "unknown key 'evaluator.train_stepz'")

    code, _, err = _run(capsys, "teacher", "-c", str(TINY), "--set", "evaluator.batch_size=many")
    assert code == 2
    _assert_one_line_error(err, "teacher", "evaluator.batch_size")


def test_bad_tsv(tmp_path, base_teacher, glue_dir, capsys):
    data = tmp_path / "glue"
    (data / "SST-2").mkdir(parents=True)
    shutil.copy(glue_dir / "SST-2" / "dev.tsv", data / "SST-2" / "dev.tsv")
    (data / "SST-2" / "train.tsv").write_text("sentence\tlabel\na fine film\t1\nragged\t0\textra\n")
    sets = ["--set", f"workdir={tmp_path / 'w'}", "--set", f"teacher.model={base_teacher}", "--set",
            f"task.data_dir={data}"]
    code, _, err = _run(capsys, "teacher", "-q", "-c", str(TINY), *sets)
    assert code == 2
    _assert_one_line_error(err, "teacher", "train.tsv:3: ragged row with 3 fields")

    (data / "SST-2" / "train.tsv").write_text("sentence\tlabel\na fine film\t1\nbad label\tmaybe\n")
    code, _, err = _run(capsys, "teacher", "-q", "-c", str(TINY), *sets)
    assert code == 2
    _assert_one_line_error(err, "teacher", "train.tsv:3: label 'maybe' is not in the task's label set")


def test_missing_prerequisites_and_bad_trial_input(tmp_path, base_teacher, glue_dir, capsys):
    sets = ["--set", f"workdir={tmp_path / 'w'}", "--set", f"teacher.model={base_teacher}", "--set",
            f"task.data_dir={glue_dir}"]
    code, _, err = _run(capsys, "warmup", "-q", "-c", str(TINY), *sets)
    assert code == 2
    _assert_one_line_error(err, "warmup", "no fine-tuned teacher in", "run `nni-effbert teacher -c <config>` first")

    code, _, err = _run(capsys, "warmup", "-q", "-c", str(TINY), *sets, "--stage", "9")
    assert code == 2
    _assert_one_line_error(err, "warmup", "stage 9 does not exist: the config has 3 stage(s), numbered 0..2")

    code, _, err = _run(capsys, "trial", "-q", "-c", str(TINY), *sets)
    assert code == 2
    _assert_one_line_error(err, "trial", "not running inside NNI: pass --arch")

    not_json = tmp_path / "arch.json"
    not_json.write_text("{layer0_width: 8")
    code, _, err = _run(capsys, "trial", "-q", "-c", str(TINY), *sets, "--arch", str(not_json))
    assert code == 2
    _assert_one_line_error(err, "trial", f"--arch {not_json}: not a readable JSON file")


def test_error_exit_status_of_real_processes(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("workdir: w\nseed: zero\n")
    for argv, command in (([sys.executable, "-m", "nni_effbert.cli", "teacher", "-c", str(bad)], "teacher"),
                          ([sys.executable, "-m", "nni_effbert.trial", "-c", str(bad)], "trial")):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"nni-effbert {command}: error: ") and f"{bad}:seed: expected int" in lines[0]


def test_commands_are_extensible(capsys):
    seen = {}

    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--flag", action="store_true")

    def run(args: argparse.Namespace) -> int:
        seen.update(config=args.config, flag=args.flag, set=args.set)
        return 0

    extra = cli.Command("hello", "say hello", run, configure)
    args = cli.build_parser([*cli.COMMANDS, extra]).parse_args(["hello", "-c", "x.yml", "--flag", "--set", "a=1"])
    assert args._command.run(args) == 0
    assert seen == {"config": "x.yml", "flag": True, "set": ["a=1"]}
