"""Drop-path draws a reversible column records in forward and reuses in its backward's recompute.

The recompute must draw the same masks as the forward; replaying the random generator would not do, since other
threads share it. ``apply_drop_path`` runs a block's drop-path module under the level's ``DrawTape``, which
records each ``bernoulli_`` in forward and hands the recorded masks back in the recompute.
"""

from __future__ import annotations

import contextvars

import torch
from torch.overrides import TorchFunctionMode


class DrawTape(TorchFunctionMode):
    """The ``bernoulli_`` draws of one level's drop-path modules: recorded in forward, fed back in the recompute.

    Replaying the generator's state instead gave other masks whenever another thread drew from it in
    between (it is global), and the draws are small: one (N, 1, 1, 1) mask per block. The recompute
    runs the drop-path modules' own code; only their draws are the forward's.
    """

    def __init__(self, draws: list[tuple[object, torch.Tensor]] | None = None) -> None:
        """A recording tape, or with ``draws`` (each a probability and its draw) one that replays them in order."""
        super().__init__()
        self.replaying = draws is not None
        self.draws: list[tuple[object, torch.Tensor]] = [] if draws is None else draws
        self.used = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.Tensor.bernoulli_:
            return func(*args, **kwargs)
        # timm scales the drawn tensor in place by 1 / p afterwards, so a replayed draw is only the forward's
        # if p is the same too.
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        if not self.replaying:
            drawn = func(*args, **kwargs)
            self.draws.append((p, drawn.clone()))
            return drawn
        target = args[0]
        if self.used == len(self.draws):
            raise changed_drop_path()
        recorded_p, drawn = self.draws[self.used]
        if drawn.shape != target.shape or not _same_probability(recorded_p, p):
            raise changed_drop_path()
        self.used += 1
        return target.copy_(drawn)


def _same_probability(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
    return a == b


# The tape of the level being run by a reversible column in this thread (or task): None outside one.
TAPE: contextvars.ContextVar[DrawTape | None] = contextvars.ContextVar("revcol_drop_path_tape", default=None)


def apply_drop_path(module: torch.nn.Module, branch: torch.Tensor) -> torch.Tensor:
    """``module(branch)`` for a block's drop-path module (timm's ``DropPath``, or ``nn.Identity`` at rate 0).

    Inside a reversible column its random draws go through the level's ``DrawTape``; elsewhere this is
    the plain call, so its outputs and its use of the random generator are timm's.
    """
    if not module.training or not getattr(module, "drop_prob", 0.0):
        return module(branch)  # before the ContextVar: torch 2.6's dynamo breaks the graph at ContextVar.get
    tape = TAPE.get()
    if tape is None:
        return module(branch)
    drawn = len(tape.draws)
    with tape:
        out = module(branch)
    if not tape.replaying and len(tape.draws) == drawn:
        raise RuntimeError(
            f"RevCol: the drop-path module {type(module).__name__} drew its mask without Tensor.bernoulli_, so the "
            "reversible backward (save_memory=True) cannot reuse it; use timm's DropPath or save_memory=False."
        )
    return out


def changed_drop_path() -> RuntimeError:
    return RuntimeError(
        "RevCol: the drop-path modules of a column drew differently in the reversible backward's recompute than in "
        "its forward (drop_prob or a module changed in between); call backward first, or build with save_memory=False."
    )
