"""The ``revcol`` command: Ultralytics' ``yolo`` with the backbones registered, plus ``demo``, ``info``,
``download`` and ``version``."""

from revcol.cli.commands import help_text, main

__all__ = ["HELP", "help_text", "main"]


def __getattr__(name: str) -> str:
    # HELP, the text of `revcol help`, is built from the shipped configs when asked for (see commands.help_text).
    if name == "HELP":
        return help_text()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
