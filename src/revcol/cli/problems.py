"""What the ``revcol`` command says about an error a user can cause: one message that names the argument or the file and
what is wrong with it, in place of a traceback. Any other exception is a bug, and keeps its traceback.

A usage error (a malformed command line: Ultralytics' argument checks, ours, and ``model=`` missing) exits with status
2, any other user error with 1. Ultralytics reports some user errors as something else: a dataset that does not exist
as a ``RuntimeError`` raised from the ``FileNotFoundError``, a truncated checkpoint as a ``TypeError``, a YAML that is
no model as a ``KeyError``; the cause, or a look at the file ``model=`` names, tells them from bugs.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from revcol.errors import CheckpointError, ConfigError, RevColError

USER_ERRORS = (RevColError, SyntaxError, FileNotFoundError)

# What each mode of Ultralytics' CLI needs besides a model, for the example of the missing-model message.
MODE_EXAMPLES = {
    "train": "data=path/to/data.yaml",
    "val": "data=path/to/data.yaml",
    "predict": "source=path/to/images",
    "track": "source=path/to/video.mp4",
    "export": "format=onnx",
    "benchmark": "data=path/to/data.yaml",
}
EXAMPLE_CONFIG = "rtdetr-revcol-cpu.yaml"  # the shipped config that trains in minutes on a CPU
CHECKPOINT_SUFFIXES = (".pt", ".pth")
YAML_SUFFIXES = (".yaml", ".yml")


class Problem(NamedTuple):
    """What the command prints for a user error, and its exit status."""

    message: str
    status: int  # 2: the command line itself is wrong; 1: something it names


def explain(error: BaseException, command: str, args: Sequence[str]) -> Problem | None:
    """The message for ``error``, raised by ``revcol COMMAND ARGS...``, if a user can cause it; None for a bug."""
    if isinstance(error, SyntaxError):
        message = str(error).strip()
        return Problem(message if message.startswith("revcol") else f"revcol {command}: {message}", 2)
    found = error if isinstance(error, USER_ERRORS) else model_file_problem(args)
    cause = error.__cause__
    while found is None and cause is not None:  # only causes: an error while handling one may be a bug
        found = cause if isinstance(cause, USER_ERRORS) else None
        cause = cause.__cause__
    if found is None:
        return None
    shown = found if isinstance(found, RevColError) else error  # Ultralytics' outer message says what it was doing
    return Problem(f"{type(found).__name__}: {shown}".rstrip(), 1)


def argument(args: Sequence[str], key: str) -> str | None:
    """The value of ``key=value`` in an Ultralytics command line (``key = value`` too, as Ultralytics merges it)."""
    from ultralytics.cfg import merge_equals_args

    values = [word.partition("=")[2] for word in merge_equals_args(list(args)) if word.partition("=")[0] == key]
    return values[-1] if values else None


def _words(args: Sequence[str]) -> tuple[list[str], set[str] | None]:
    """The bare words of Ultralytics' command line ``args`` and its keys (``--key=value`` read as ``key=value``); the
    keys are None when one is not Ultralytics': it names that one first, before any missing argument."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, merge_equals_args

    words = [word.removeprefix("--") for word in merge_equals_args(list(args))]
    keys = {word.partition("=")[0] for word in words if "=" in word}
    return [word for word in words if "=" not in word], keys if keys <= DEFAULT_CFG_DICT.keys() else None


def check_names_a_model(args: Sequence[str]) -> None:
    """Raise a usage error when Ultralytics' command line ``args`` runs a model but names none (``model=``, or a
    ``cfg=`` file that may): Ultralytics would fall back to downloading ``yolo26n.pt``."""
    from ultralytics.cfg import MODES, TASKS

    bare, keys = _words(args)
    runs_a_model = not bare or any(word in MODES or word in TASKS for word in bare)  # `settings`, `checks`: none
    if keys is None or not runs_a_model or keys & {"model", "cfg"}:
        return
    mode = next((word for word in bare if word in MODES), "predict")  # Ultralytics' mode when none is given
    raise SyntaxError(
        f"revcol {mode}: no model= given: name a model YAML (the shipped ones: `revcol help`) or a checkpoint, e.g. "
        f"`revcol {mode} model={EXAMPLE_CONFIG} {MODE_EXAMPLES[mode]}`"
    )


def check_names_data(args: Sequence[str]) -> None:
    """Raise a usage error when Ultralytics' command line ``args`` trains without ``data=`` (nor ``resume``, nor a
    ``cfg=`` file that may name it): Ultralytics' command would fall back to downloading its sample ``coco8.yaml``,
    even for a checkpoint that knows its own dataset."""
    bare, keys = _words(args)
    if keys is None or "train" not in bare or "resume" in bare or keys & {"data", "resume", "cfg"}:  # resume: bare too
        return
    model = argument(args, "model") or EXAMPLE_CONFIG
    raise SyntaxError(
        f"revcol train: no data= given: name a dataset YAML, e.g. `revcol train model={model} "
        f"{MODE_EXAMPLES['train']}` (Ultralytics' format: https://docs.ultralytics.com/datasets/detect/)"
    )


def model_file_problem(args: Sequence[str]) -> RevColError | None:
    """What is wrong with the file ``model=`` names, if it exists and is a model YAML that is not one, or a checkpoint
    that cannot be read; None when it looks right (or is not there: Ultralytics says so)."""
    name = argument(args, "model") if args else None
    if not name or not Path(name).is_file():
        return None
    suffix = Path(name).suffix.lower()
    if suffix in YAML_SUFFIXES:
        return _yaml_problem(name)
    if suffix in CHECKPOINT_SUFFIXES:
        return _checkpoint_problem(name)
    return None


def _yaml_problem(name: str) -> ConfigError | None:
    import yaml

    try:
        d = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        return ConfigError(f"{name} is not a readable YAML file{where}: {getattr(error, 'problem', None) or error}")
    if isinstance(d, dict) and isinstance(d.get("backbone"), list) and isinstance(d.get("head"), list):
        return None
    found = f"only {', '.join(map(str, list(d)[:6]))}" if isinstance(d, dict) and d else f"a {type(d).__name__}"
    return ConfigError(
        f"{name} is not a model YAML: no `backbone` and `head` lists, {found} (a dataset YAML goes in data=)"
    )


def _checkpoint_problem(name: str) -> CheckpointError | None:
    # Every checkpoint Ultralytics and torch write is a zip archive with a data.pkl: a file that is not one was cut
    # short or is something else, and a damaged entry fails its checksum. Nothing in it is unpickled here.
    size = Path(name).stat().st_size
    try:
        with zipfile.ZipFile(name) as archive:
            members, damaged = archive.namelist(), archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError):
        return CheckpointError(f"{name} ({size:,} bytes) is not a readable checkpoint: empty, truncated or not one")
    if damaged is not None:
        return CheckpointError(f"{name} is damaged: its entry {damaged} fails its checksum")
    if not any(member.rpartition("/")[2] == "data.pkl" for member in members):
        return CheckpointError(f"{name} is a zip archive but not a PyTorch checkpoint (it has no data.pkl)")
    return None
