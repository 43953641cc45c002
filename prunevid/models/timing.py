"""Clocks for a device that runs asynchronously: `Interval` for the stage timings a patched model
records (`PruningTrace.timings`), `clock` for a benchmark's wall time.

On a GPU the host only queues work, so a wall-clock reading means "the work so far" only after
the device has caught up, and catching up is a synchronisation: the host stops queueing and the
device runs dry behind it. A server must not pay that in every prefill, so a stage is timed by
two CUDA events recorded on the stream (no wait) and read only when its trace is. A benchmark's
clock (start of generate(), each new token, the vision tower) waits for the device: `clock`.
On the CPU both are the host clock.
"""

from __future__ import annotations

import time

import torch


def clock(device: torch.device) -> float:
    """Wall time (`time.perf_counter`), on a CUDA device after its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Interval:
    """The time between two points of a device's work, measured without waiting for it: CUDA
    events on a GPU (read by `seconds`, when a trace is read), the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._start = self._mark(device)
        self._end = None

    @staticmethod
    def _mark(device: torch.device):
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def stop(self) -> Interval:
        self._end = self._mark(self._device)
        return self

    def seconds(self) -> float:
        if isinstance(self._start, float):
            return self._end - self._start
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1000
