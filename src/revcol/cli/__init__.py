"""The ``revcol`` command: Ultralytics' ``yolo`` with the backbones registered, plus ``demo``, ``info``,
``download`` and ``version``."""

from revcol.cli.commands import HELP, main

__all__ = ["HELP", "main"]
