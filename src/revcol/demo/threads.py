"""How many torch threads the demo runs with on the CPU: the cores that other processes leave free.

Torch's threads meet at a barrier after every parallel operation, so one thread that waits for a core busy with
another process holds back all of them: on a loaded machine more threads than free cores train slower than fewer
(issue #22: with a thread per core, the demo took 4 min 32 s beside two CPU-bound processes on 2 cores, and 10 min at
a load of 2.7). The rule, read at the start of every training epoch and before the test and the predictions
(``IdleCores``; ``metered_threads`` applies it to Ultralytics' training, validation and prediction):

    free cores = the cores the process may run on (its affinity: one under ``taskset -c 0``), less the CPU time that
                 other processes took on them since the previous reading (Linux: ``/proc/stat``'s idle time of those
                 cores plus this process's own CPU time), in cores
    threads    = free cores rounded down, except that 0.75 of a core or more counts as a whole one; at least 1

Where ``/proc/stat`` cannot be read, the one-minute load average stands in for the other processes' use, once,
at the first reading; where that is missing too, every core is used.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ultralytics.engine.model import Model

PROC_STAT = Path("/proc/stat")
MIN_INTERVAL = 0.5  # seconds: a shorter reading waits; /proc/stat counts in 10 ms ticks
ROUND_UP_FROM = 0.75  # a fraction of a free core this large counts as a whole one
LOAD_AVERAGE = getattr(os, "getloadavg", None)  # missing on Windows


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity mask, e.g. under ``taskset``); None where the OS cannot tell."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return None


def available_cores() -> int:
    """The number of CPU cores this process may run on."""
    cpus = allowed_cpus()
    return len(cpus) if cpus is not None else os.cpu_count() or 1


def threads_for(free: float, cores: int) -> int:
    """Torch threads for ``free`` idle cores out of ``cores``: ``free`` rounded down unless its fraction is at least
    ``ROUND_UP_FROM``, and between 1 and ``cores``."""
    return max(1, min(cores, math.floor(free + 1.0 - ROUND_UP_FROM)))


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """Per CPU of ``/proc/stat``'s ``text``: (idle ticks, all ticks) since boot.

    Idle includes iowait (a CPU waiting for a disk runs nothing); all ticks are user, nice, system, idle, iowait,
    irq, softirq and steal (guest time is already inside user and nice).
    """
    ticks = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            ticks[int(name[3:])] = (values[3] + values[4], sum(values))
    return ticks


class IdleCores:
    """Reads the cores among ``cpus`` that other processes left free since the previous reading (or since it was
    made): see the module's rule. ``read_stat``, ``own_time`` and ``clock`` stand in for ``/proc/stat``, this
    process's CPU time and a monotonic clock (tests give fakes); ``load_average`` for ``os.getloadavg``."""

    def __init__(
        self,
        cpus: set[int] | None = None,
        read_stat: Callable[[], str] = PROC_STAT.read_text,
        own_time: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        load_average: Callable[[], tuple[float, float, float]] | None = LOAD_AVERAGE,
    ) -> None:
        self.cpus = allowed_cpus() if cpus is None else cpus
        self.cores = len(self.cpus) if self.cpus is not None else available_cores()
        self._read_stat, self._own_time, self._clock, self._load_average = read_stat, own_time, clock, load_average
        self._last = self._sample()
        self._threads = self.cores

    def _sample(self) -> tuple[float, float, dict[int, tuple[int, int]]] | None:
        """(wall clock, own CPU seconds, per-CPU ticks of our CPUs), or None without a readable ``/proc/stat``."""
        try:
            ticks = parse_proc_stat(self._read_stat())
        except OSError:
            return None
        if self.cpus is not None:
            ticks = {cpu: t for cpu, t in ticks.items() if cpu in self.cpus}
        return (self._clock(), self._own_time(), ticks) if ticks else None

    def free(self) -> float | None:
        """Free cores since the previous reading (waiting until ``MIN_INTERVAL`` has passed), or None where there
        is no ``/proc/stat``. Each CPU's idle share of its ticks, summed, plus the cores this process kept busy."""
        if self._last is None:
            return None
        wait = MIN_INTERVAL - (self._clock() - self._last[0])
        if wait > 0:
            time.sleep(wait)
        now = self._sample()
        if now is None:
            return None
        (wall0, own0, ticks0), (wall1, own1, ticks1) = self._last, now
        self._last = now
        idle = 0.0
        for cpu, (idle1, total1) in ticks1.items():
            idle0, total0 = ticks0.get(cpu, (idle1, total1))
            idle += (idle1 - idle0) / (total1 - total0) if total1 > total0 else 1.0  # no tick: nothing ran
        own = (own1 - own0) / (wall1 - wall0) if wall1 > wall0 else 0.0
        return min(float(len(ticks1)), idle + own)

    def threads(self) -> int:
        """Threads for the free cores since the last reading. Where there is no ``/proc/stat``, the first call
        reads the load average instead; calls without any reading keep the last count (at first: every core)."""
        free = self.free()
        if free is None and self._load_average is not None:
            free = max(0.0, self.cores - self._load_average()[0])
            self._load_average = None  # it counts this process's own threads too: only good before training
        if free is not None:
            self._threads = threads_for(free, self.cores)
        return self._threads


@contextlib.contextmanager
def metered_threads(meter: IdleCores | None, model: Model, event: str, used: list[int] | None = None) -> Iterator[None]:
    """Inside the block, ``model``'s ``event`` callbacks set torch's threads from ``meter`` (None: leave Ultralytics'
    count) and append the count to ``used``; after it, torch's count is what it was.

    ``event`` is one that Ultralytics runs after its ``select_device``, which sets a thread count of its own.
    """
    import torch

    def set_threads(_) -> None:
        if meter is not None:
            torch.set_num_threads(meter.threads())
        if used is not None:
            used.append(torch.get_num_threads())

    model.add_callback(event, set_threads)
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
