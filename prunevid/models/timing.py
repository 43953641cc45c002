"""The clock of the stage timings a patched model records (`PruningTrace.timings`).

On a GPU the host only queues work, so a wall-clock reading means "the work so far" only after
the device has caught up, and catching up is a synchronisation: the host stops queueing and the
device runs dry behind it. A server must not pay that in every prefill, and a benchmark must.
So the stages' clock is fenced only inside `fenced_timings()` (what `prunevid bench` and a
profile set); outside it, on a GPU, the timings say how long the host took to queue each stage.
On the CPU every reading is exact and the fence is nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

import torch

# Set by `fenced_timings`; a context variable, so one thread's benchmark fences no other thread.
_FENCED = contextvars.ContextVar("prunevid_fenced_timings", default=False)


@contextlib.contextmanager
def fenced_timings() -> Iterator[None]:
    """Inside, `clock` waits for the device before reading the time (stage timings are exact)."""
    token = _FENCED.set(True)
    try:
        yield
    finally:
        _FENCED.reset(token)


def clock(device: torch.device, fence: bool | None = None) -> float:
    """Wall time (`time.perf_counter`); on a CUDA device after its queued work when `fence`
    (default: inside `fenced_timings()`)."""
    if device.type == "cuda" and (_FENCED.get() if fence is None else fence):
        torch.cuda.synchronize(device)
    return time.perf_counter()
