"""``eeipu-ray``'s options without a sweep: --version, --help's defaults, sizes,
schedulers, trackers and bad input, each refused with a message that names it."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
from ray.tune.schedulers import ASHAScheduler

from eeipu_ray.cli._common import UsageError, parse_size
from eeipu_ray.cli._integrations import make_scheduler
from eeipu_ray.cli.parser import build_parser
from eeipu_ray.tune.sm2 import SM2Scheduler
from tests.cli.helpers import run_cli, run_main


def test_version_is_the_installed_package_version(tmp_path: Path) -> None:
    proc = run_cli("--version", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"eeipu-ray {importlib.metadata.version('eeipu-ray')}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["run", "report", "cache"])
def test_help_shows_every_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main([command, "--help"], capsys)
    assert status == 0
    text = " ".join(out.split())  # argparse wraps lines
    sub = _subparsers(build_parser())[command]
    shown = 0
    for action in sub._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            # No default worth printing: the help says what leaving it out does.
            continue
        assert f"(default: {default})" in text, (action.option_strings, text)
        shown += 1
    assert shown >= {"run": 15, "report": 0, "cache": 1}[command]
    if command == "run":
        for expected in ("(default: eeipu)", "(default: fifo)", "(default: results)"):
            assert expected in text
        assert "unset: a local cluster" in text  # --address: no default, says why


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1", 1),
        ("4096", 4096),
        ("12B", 12),
        ("1KB", 1000),
        ("1kb", 1000),
        ("1KiB", 1024),
        ("1.5KiB", 1536),
        ("500MB", 500 * 1000**2),
        ("500MiB", 500 * 1024**2),
        ("20GB", 20 * 1000**3),
        ("20GiB", 20 * 1024**3),
        ("2TB", 2 * 1000**4),
        ("2TiB", 2 * 1024**4),
        (" 3 GiB ", 3 * 1024**3),
    ],
)
def test_sizes_decimal_and_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["20G", "5M", "10XB", "1e9", "-1KB", "KB", "", "1.5", "0.1KiB"])
def test_bad_sizes_name_the_value(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid size {text!r}"):
        parse_size(text)


def test_size_options_refuse_bad_units_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["cache", "gc", str(tmp_path), "--max-bytes", "20G"], capsys)
    assert status == 2 and "--max-bytes" in err and "'20G'" in err and "GiB" in err
    argv = ["run", "synthetic", "--budget", "5", "--cache-budget", "1XB"]
    status, _, err = run_main(argv, capsys)
    assert status == 2 and "--cache-budget" in err and "'1XB'" in err
    status, _, err = run_main(["run", "synthetic", "--budget", "5", "--cache-budget", "0"], capsys)
    assert status == 2 and "'0'" in err and "at least 1 byte" in err


def _run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "synthetic", *argv])


def test_scheduler_names_map_to_tune_schedulers() -> None:
    assert make_scheduler(_run_args()) is None  # fifo: Tune's default
    asha = make_scheduler(_run_args("--scheduler", "asha", "--mode", "min", "--metric", "loss"))
    assert isinstance(asha, ASHAScheduler)
    assert (asha.metric, asha._mode) == ("loss", "min")
    sm2 = make_scheduler(_run_args("--scheduler", "sm2", "--energy-weight", "0.2"))
    assert isinstance(sm2, SM2Scheduler)
    assert sm2.options.energy_weight == 0.2
    assert sm2.options.energy_attr == "total_cpu_seconds"  # no meter needed with --cost time
    assert sm2.options.time_attr == "training_iteration"
    sm2_energy = make_scheduler(_run_args("--scheduler", "sm2", "--cost", "energy"))
    assert sm2_energy.options.energy_attr == "total_energy_joules"
    for bad, flag in (
        (("--grace-period", "0"), "--grace-period"),
        (("--max-t", "0.5"), "--max-t"),
        (("--reduction-factor", "1"), "--reduction-factor"),
    ):
        with pytest.raises(UsageError, match=flag):
            make_scheduler(_run_args("--scheduler", "asha", *bad))


def test_unknown_scheduler_is_refused_naming_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = run_main(["run", "synthetic", "--budget", "5", "--scheduler", "pbt"], capsys)
    assert status == 2
    assert "--scheduler" in err and "'pbt'" in err
    assert all(name in err for name in ("fifo", "asha", "sm2"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["run", "synthetic", "--budget", "5", "--wandb", "my-project"]
    status, _, err = run_main(argv, capsys)
    assert status == 2
    assert "--wandb needs the 'wandb' package" in err and "pip install wandb" in err
    assert not (tmp_path / "results").exists()  # refused before anything started


def test_run_without_a_pipeline_or_resume_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_main(["run", "--budget", "5"], capsys)
    assert status == 2 and "PIPELINE" in err and "--resume" in err


def test_run_refuses_a_directory_that_holds_an_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp_dir = tmp_path / "results" / "taken"
    exp_dir.mkdir(parents=True)
    (exp_dir / "run_settings.json").write_text("{}")
    argv = ["run", "synthetic", "--budget", "5", "--storage-path", str(tmp_path / "results")]
    status, _, err = run_main([*argv, "--name", "taken"], capsys)
    assert status == 2 and "holds an experiment already" in err
    assert f"--resume {exp_dir}" in err and "another --name" in err


def test_resume_of_what_is_not_an_experiment_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    status, _, err = run_main(["run", "--resume", str(missing)], capsys)
    assert status == 2 and str(missing) in err and "no such experiment directory" in err
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    status, _, err = run_main(["run", "--resume", str(tmp_path / "empty")], capsys)
    assert status == 2 and "not a Ray Tune experiment directory" in err
    # A driver killed before Tune saved any experiment state: nothing to resume.
    (tmp_path / "unsaved").mkdir()
    (tmp_path / "unsaved" / "tuner.pkl").write_bytes(b"")
    status, _, err = run_main(["run", "--resume", str(tmp_path / "unsaved")], capsys)
    assert status == 2 and "holds no experiment_state-*.json" in err and "start the sweep" in err
