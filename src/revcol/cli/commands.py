"""The ``revcol`` command: Ultralytics' ``yolo`` command with the RevCol backbones registered, plus extras.

    revcol train|val|predict|export|track|benchmark key=value ...   exactly as ``yolo <mode> key=value ...``
    revcol demo [--output DIR] [--epochs N] [--imgsz N] [--device D] ...
    revcol info [VARIANT | MODEL.yaml] [--imgsz N]
    revcol download VARIANT [TAG]
    revcol help | --help | version

Everything that is not one of our commands (``demo``, ``info``, ``download``, ``help``, ``version``) goes to
Ultralytics' own CLI entry point after ``import revcol``, so arguments, outputs, ``runs/`` folders,
progress bars and error messages are Ultralytics' own. Errors a user can cause (bad arguments, a
wrong model YAML, a missing file) are printed without a traceback: exit status 2 for a malformed
command line, 1 otherwise (``revcol.cli.problems``); set ``REVCOL_TRACEBACK=1`` to see the traceback. Called from
Python (``main([...])``), every command leaves ``os.environ`` and the loggers as it found them."""

from __future__ import annotations

import argparse
import contextlib
import os
import string
import sys
from collections.abc import Sequence

from revcol._process import process_state_kept
from revcol.cli.info import (
    _published_of,
    cache_status,
    configs_table,
    layout_table,
    options_table,
    releases_table,
    shipped_config,
    variant_table,
    weights_table,
)
from revcol.cli.problems import check_names_a_model, check_names_data, explain

OUR_COMMANDS = ("demo", "info", "download", "help", "version")


HELP_ALIASES = frozenset({"help", "-h", "--help", "-help", "h"})

# The line under a user error's message, by exit status: 2 for a malformed command line, 1 for anything else.
HINTS = {
    2: "revcol: see `revcol help`",
    1: "revcol: see `revcol help` (REVCOL_TRACEBACK=1 shows the traceback)",
}


_HELP = string.Template("""\
revcol: RevCol (Reversible Column Networks) backbones for Ultralytics, from the command line.

Usage:
    revcol MODE key=value ...           Ultralytics' `yolo MODE key=value ...`, with the RevCol backbones registered
    revcol demo [options]               offline demo: synthetic shapes, train RT-DETR-RevCol on the CPU, predict
    revcol info [VARIANT|MODEL.yaml] [--imgsz N]
                                        RevCol variants (channels, depths, columns, parameters, GFLOPs), the
                                        authors' published weights, the shipped configs, a RevCol row's layers
                                        and options, the Ultralytics release each head needs
    revcol download VARIANT [TAG]       fetch published weights into torch's hub cache, print the path
    revcol help | version

Modes (same arguments and outputs as `yolo`, see `yolo help` or https://docs.ultralytics.com/usage/cli/):
    train, val, predict, export, track, benchmark; other `yolo` commands (checks, settings, cfg, ...) work too.
    Each mode needs model=: a model YAML (a shipped config below, or your copy under any name) or a checkpoint.
    Runs are saved under runs/ in the folder the command runs in, unless project= or your Ultralytics
    settings (`revcol settings`, runs_dir) name another folder.

Shipped model configs, loadable by bare name:
$configs

Examples:
    revcol train model=rtdetr-revcol.yaml data=path/to/data.yaml epochs=72 imgsz=640 batch=16
    revcol val model=runs/detect/train/weights/best.pt data=path/to/data.yaml
    revcol predict model=runs/detect/train/weights/best.pt source=path/to/images
    revcol export model=runs/detect/train/weights/best.pt format=onnx
    revcol demo --output revcol-demo     (`revcol demo --help` for options)
    revcol info revcol_small --imgsz 640
    revcol info rtdetr-revcol.yaml --imgsz 640
    revcol download revcol_small        (then `pretrained: true` in a YAML needs no network)

In a model YAML, a RevCol backbone is one row that expands into layers $layers:
    - [-1, 1, revcol_small, [{pretrained: true, save_memory: true, drop_path: 0.2}]]   (or a tag, or a path)
    - [-1, 1, $custom_name, [$custom_example]]
$layout_text

Set REVCOL_TRACEBACK=1 to see full tracebacks of errors.
""")


def help_text() -> str:
    """The text of ``revcol help``, written from the data it shows: the shipped configs with their descriptions and
    the Ultralytics release a head needs above the supported floor, and the layers a RevCol row expands into."""
    from revcol.ultralytics.releases import head_release, supported_floor
    from revcol.ultralytics.yaml_rows import CUSTOM_EXAMPLE, CUSTOM_NAME, LAYOUT, LAYOUT_TEXT, shipped_configs

    names = shipped_configs()
    width = max(map(len, names))
    lines = []
    for name in names:
        config = shipped_config(name)
        release = head_release(config.head)
        needs = f" (ultralytics>={release})" if release != supported_floor() else ""
        lines.append(f"    {name.ljust(width)}  {config.description}{needs}")
    return _HELP.substitute(
        configs="\n".join(lines),
        layers=f"{LAYOUT[0].index}-{LAYOUT[-1].index}",
        custom_name=CUSTOM_NAME,
        custom_example=CUSTOM_EXAMPLE,
        layout_text=LAYOUT_TEXT,
    )


def __getattr__(name: str) -> str:
    # HELP is built on first use, not at import: it reads the shipped configs, which `revcol train` does not need.
    if name == "HELP":
        return help_text()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``revcol`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].lower() in HELP_ALIASES:
        print(help_text(), end="")
        return 0
    command = args[0].lower()
    try:
        with process_state_kept():  # Ultralytics sets environment variables while it trains
            return _run(command, args)
    except KeyboardInterrupt:
        print("revcol: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        problem = explain(error, command, () if command in OUR_COMMANDS else args)
        if problem is None or _env_true("REVCOL_TRACEBACK"):
            raise  # a bug, or the traceback asked for
        print(problem.message, file=sys.stderr)
        print(HINTS[problem.status], file=sys.stderr)
        return problem.status


def _run(command: str, args: list[str]) -> int:
    if command == "demo":
        return _demo(args[1:])
    if command == "info":
        return _info(args[1:])
    if command == "download":
        return _download(args[1:])
    if command in {"version", "--version", "-v"}:
        return _version()
    return _ultralytics(args)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _ultralytics(args: list[str]) -> int:
    """Ultralytics' own ``yolo`` entry point on ``args``, with the RevCol backbones registered."""
    from ultralytics import cfg

    import revcol  # noqa: F401  (registers the backbones)
    from revcol.ultralytics import hooks

    check_names_a_model(args)
    check_names_data(args)
    # Ultralytics reads the command line from module globals (copies of sys.argv) and recognises its CLI by the
    # program name, e.g. `yolo predict` saves annotated results by default: the `cli` group of revcol.hooks.HOOKS
    # makes this, seen from there, `yolo` with our arguments.
    with contextlib.ExitStack() as stack:
        stack.enter_context(hooks.applied(hooks.CLI, args=tuple(args)))
        if _env_true("YOLO_OFFLINE"):
            stack.enter_context(hooks.applied(hooks.OFFLINE))
        cfg.entrypoint()
    return 0


def _version() -> int:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    print(f"revcol {installed('revcol')} (ultralytics {installed('ultralytics')}, torch {installed('torch')})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with errors raised (``main`` prints them) rather than ``sys.exit`` from inside."""

    def error(self, message: str):
        raise SyntaxError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}")


def _demo(argv: list[str]) -> int:
    from revcol.demo import DEMO_DEFAULTS

    d = DEMO_DEFAULTS
    parser = _Parser(
        prog="revcol demo",
        description=(
            "Offline demo: generate a synthetic shapes dataset (circles, squares, triangles), train a small "
            "RT-DETR-RevCol on it, evaluate on held-out images, save annotated predictions. Nothing is downloaded."
        ),
    )
    parser.add_argument("--output", "--project", default="revcol-demo", help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs (default: %(default)s)")
    parser.add_argument("--imgsz", type=int, default=d["imgsz"], help="image size, multiple of 32 (%(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, 0, 0,1, mps ... (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=d["batch"], help="batch size (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=d["n_train"], help="(default: %(default)s)")
    parser.add_argument("--val-images", type=int, default=d["n_val"], help="(default: %(default)s)")
    parser.add_argument("--test-images", type=int, default=d["n_test"], help="(default: %(default)s)")
    parser.add_argument("--lr0", type=float, default=d["lr0"], help="initial AdamW learning rate (%(default)s)")
    parser.add_argument(
        "--denoising", type=int, default=d["denoising"], help="RT-DETR denoising queries in training (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=d["seed"], help="dataset and training seed (%(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers (default: %(default)s)")
    options = parser.parse_args(argv)
    if options.imgsz < 32 or options.imgsz % 32:
        parser.error(f"--imgsz must be a positive multiple of 32, got {options.imgsz}")
    if options.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {options.epochs}")
    if options.denoising < 0:
        parser.error(f"--denoising must be >= 0, got {options.denoising}")

    from revcol.demo import run_demo

    run_demo(
        output=options.output,
        epochs=options.epochs,
        imgsz=options.imgsz,
        device=options.device,
        batch=options.batch,
        n_train=options.train_images,
        n_val=options.val_images,
        n_test=options.test_images,
        lr0=options.lr0,
        denoising=options.denoising,
        seed=options.seed,
        workers=options.workers,
    )
    return 0


def _info(argv: list[str]) -> int:
    parser = _Parser(
        prog="revcol info",
        description="Parameters and GFLOPs of the RevCol variants (or of one variant, or of a model YAML).",
    )
    parser.add_argument("target", nargs="?", help="a variant (e.g. revcol_small) or a model YAML; default: all")
    parser.add_argument("--imgsz", type=int, default=224, help="square input size for GFLOPs (default: %(default)s)")
    options = parser.parse_args(argv)
    if options.imgsz < 32 or options.imgsz % 32:
        parser.error(f"--imgsz must be a positive multiple of 32, got {options.imgsz}")

    from revcol.core.variants import VARIANTS

    target = options.target
    if target is not None and target.endswith((".yaml", ".yml")):
        return _info_yaml(target, options.imgsz)
    if target is not None and target not in VARIANTS:
        parser.error(f"unknown variant {target!r}; choose from {', '.join(VARIANTS)} or give a model .yaml")
    names = [target] if target else list(VARIANTS)
    statuses = {entry: cache_status(entry) for name in names for entry in _published_of(name)}
    tables = [variant_table(names, options.imgsz), weights_table(names, statuses)]
    if not target:
        tables += [configs_table(), layout_table(), options_table(), releases_table()]
    print(*tables, sep="\n\n")
    damaged = [(entry, problem) for entry, (state, problem) in statuses.items() if problem]
    for entry, problem in damaged:
        print(f"revcol: {problem}\n  `revcol download {entry.variant} {entry.tag}` fetches it again", file=sys.stderr)
    return 1 if damaged else 0


def _download(argv: list[str]) -> int:
    from revcol import weights
    from revcol.core.variants import VARIANTS
    from revcol.weights.pretrained import check_published

    parser = _Parser(
        prog="revcol download",
        description="Fetch the authors' published weights of a variant into torch's hub cache (where "
        "pretrained=True looks) and print the cached file's path. REVCOL_WEIGHTS_URL replaces the base URL.",
    )
    parser.add_argument("variant", help=f"one of {', '.join(weights.WEIGHTS)}")
    parser.add_argument("tag", nargs="?", help="a published tag (see `revcol info VARIANT`); default: the variant's")
    options = parser.parse_args(argv)
    if options.variant not in VARIANTS:
        parser.error(f"unknown variant {options.variant!r}; choose from {', '.join(VARIANTS)}")
    tags = weights.WEIGHTS.get(options.variant, {})
    if options.tag is not None and options.tag not in tags:
        parser.error(f"{options.variant} has no published weights tagged {options.tag!r}; tags: {', '.join(tags)}")
    entry = weights.named_entry(options.variant, options.tag or True)
    state, problem = cache_status(entry)
    if problem and state == "damaged":
        print(f"revcol: {problem}\n  downloading it again", file=sys.stderr)
    path = weights.download(entry, replace=state == "damaged")
    check_published(entry)  # what is reported is a checkpoint that loads into the variant
    print(path)
    return 0


def _info_yaml(path: str, imgsz: int) -> int:
    """Ultralytics' model summary (layers, parameters, GFLOPs at ``imgsz``) of a model YAML; for a RevCol model, the
    layers its RevCol row expands into too."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import ClassificationModel, RTDETRDetectionModel, guess_model_task, yaml_model_load
    from ultralytics.utils.torch_utils import model_info

    import revcol  # noqa: F401  (registers the backbones)
    from revcol.ultralytics.yaml_rows import names_revcol_backbone

    d = yaml_model_load(path)
    head = (d.get("head") or [[None, None, ""]])[-1]
    if head[2] == "RTDETRDecoder":
        model = RTDETRDetectionModel(path, verbose=False)
    elif guess_model_task(d) == "classify":
        # It logs a summary of its own while it is built, whatever verbose says: the one printed is ours, at imgsz.
        quiet = type("ClassificationModel", (ClassificationModel,), {"info": lambda self, *args, **kwargs: None})
        model = quiet(path, verbose=False)
    else:
        model = YOLO(path).model
    model_info(model, imgsz=imgsz)
    if names_revcol_backbone(d):
        print(layout_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
