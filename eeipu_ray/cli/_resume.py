"""``eeipu-ray run --resume``: the run's settings, kept in its experiment directory.

``run`` writes ``run_settings.json`` before the sweep starts. A resumed run
takes its options from there: Tune restores the searcher, scheduler and
callbacks the run pickled, so the options that built them cannot change; the
command line may repeat them, and may change only what concerns this driver
process (:data:`DRIVER_OPTIONS`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from eeipu_ray.cli._common import UsageError, write_json

SETTINGS_FILE = "run_settings.json"
SETTINGS_FORMAT = 1
#: Options about this driver process, not the sweep: a resumed run may change them.
DRIVER_OPTIONS = frozenset({"address", "num_cpus", "no_report"})
_NOT_SETTINGS = frozenset({"func", "command", "resume"})


def absolute_paths(args: argparse.Namespace) -> None:
    """Make ``run``'s local paths (``--cache``, ``--storage-path``) absolute: a run
    may be resumed from another working directory."""
    if args.cache and "://" not in args.cache:
        args.cache = os.path.abspath(os.path.expanduser(args.cache))
    args.storage_path = os.path.abspath(os.path.expanduser(args.storage_path))


def save_settings(exp_dir: str, args: argparse.Namespace) -> None:
    """Write ``args``, the run's options, into ``exp_dir/run_settings.json``."""
    from eeipu_ray.cli.parser import package_version

    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    write_json(
        os.path.join(exp_dir, SETTINGS_FILE),
        {"format": SETTINGS_FORMAT, "eeipu_ray": package_version(), "args": settings},
    )


def load_settings(exp_dir: str) -> dict[str, Any] | None:
    """The options ``exp_dir``'s run was started with; ``None`` without the file.

    Raises:
        UsageError: the file is there but unreadable.
    """
    path = os.path.join(exp_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume {exp_dir}: cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != SETTINGS_FORMAT:
        raise UsageError(f"--resume {exp_dir}: {path} is not a settings file of format 1")
    return dict(doc.get("args") or {})


def check_experiment_dir(exp_dir: str) -> None:
    """Refuse ``--resume`` of anything but a Ray Tune experiment directory."""
    if not os.path.isdir(exp_dir):
        raise UsageError(f"--resume {exp_dir}: no such experiment directory")
    from ray import tune

    if not tune.Tuner.can_restore(os.path.abspath(exp_dir)):
        raise UsageError(
            f"--resume {exp_dir}: not a Ray Tune experiment directory (it holds no tuner.pkl; "
            "give the directory 'eeipu-ray run' wrote, --storage-path/--name)"
        )
    check_saved_state(exp_dir)


#: The state files Tune restores from (the newest of each by name, as Tune
#: picks them) and how each is read: the experiment state is JSON, the search
#: generator's and the searcher's states are pickles.
STATE_FILES = (
    ("experiment_state-*.json", "json"),
    ("search_gen_state-*.json", "pickle"),
    ("searcher-state-*.pkl", "pickle"),
)


def check_saved_state(exp_dir: str) -> None:
    """Refuse ``--resume`` when Tune could not read the state it would restore.

    Tune copies its state files into the experiment directory in place, so a
    driver killed during a copy can leave one cut short; ``Tuner.restore`` then
    logs the error and starts the experiment over, with a fresh searcher and
    budget. Refused here instead, naming the file.

    Raises:
        UsageError: the newest experiment state is missing, unreadable or holds
            no trial, or the newest search state is unreadable.
    """
    newest: dict[str, tuple[str, str]] = {}
    for pattern, kind in STATE_FILES:
        paths = glob.glob(os.path.join(glob.escape(exp_dir), pattern))
        if paths:
            newest[pattern] = (max(paths), kind)
    start_again = "nothing to resume: start the sweep again (under another --name)"
    if "experiment_state-*.json" not in newest:
        raise UsageError(f"--resume {exp_dir}: it holds no experiment_state-*.json, {start_again}")
    for path, kind in newest.values():
        try:
            with open(path, "rb") as fh:
                state = json.load(fh) if kind == "json" else _whole_pickle(fh)
        except (OSError, ValueError) as exc:  # cut short: JSON or pickle opcodes end early
            raise UsageError(
                f"--resume {exp_dir}: cannot read {os.path.basename(path)} ({exc!r}); Tune "
                "would start the experiment over. The driver was probably killed while Tune "
                "copied it into the experiment directory."
            ) from exc
        if kind == "json" and not (isinstance(state, dict) and state.get("trial_data")):
            raise UsageError(
                f"--resume {exp_dir}: {os.path.basename(path)} holds no trial, {start_again}"
            )


def _whole_pickle(fh: Any) -> None:
    """Walk a pickle's opcodes to its end without running any (no import of the
    classes it names); ``ValueError`` if it is cut short."""
    import collections
    import pickletools

    last = collections.deque(pickletools.genops(fh), maxlen=1)
    if not last or last[0][0].name != "STOP":
        raise ValueError("the pickle ends before its STOP opcode")


def resume_arguments(argv: Sequence[str] | None, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` of ``run --resume DIR``, with the settings the run was started with.

    Options left out take the run's values; options given must equal them,
    except :data:`DRIVER_OPTIONS`. An experiment without ``run_settings.json``
    (run from Python) is resumed with the options given.

    Raises:
        UsageError: not an experiment directory, or an option that differs from
            the run's (naming both values).
    """
    from eeipu_ray.cli.parser import build_parser

    exp_dir = args.resume
    check_experiment_dir(exp_dir)
    saved = load_settings(exp_dir)
    if saved is None:
        if args.pipeline is None:
            raise UsageError(
                f"--resume {exp_dir}: the directory holds no {SETTINGS_FILE} (it was not "
                "written by 'eeipu-ray run'): give the PIPELINE and the run's options again"
            )
        return args
    # -o appends to its default: read it apart, so that repeating the run's own
    # options is not doubling them.
    argv = list(sys.argv[1:] if argv is None else argv)
    resumed = build_parser(run_defaults={**saved, "option": []}).parse_args(argv)
    if not resumed.option:
        resumed.option = list(saved.get("option") or [])
    absolute_paths(resumed)
    for name, value in saved.items():
        if name in DRIVER_OPTIONS or not hasattr(resumed, name):
            continue
        given = getattr(resumed, name)
        if given != value:
            flag = "PIPELINE" if name == "pipeline" else f"--{name.replace('_', '-')}"
            raise UsageError(
                f"{flag} {_show(given)}: the run in {exp_dir} was started with {_show(value)}, "
                "and a resumed run keeps its settings (leave the option out)"
            )
    return resumed


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(f"-o {v}" for v in value) or "no -o options"
    return repr(value)
