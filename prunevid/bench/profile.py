"""`prunevid bench speed --profile`: what each method asks of the host and of the device.

Per method, from the same precomputed features as the timed runs: a prefill (generate() of one
new token) and the same with `DECODE_STEPS` more tokens; a decode step is their difference over
the steps. Each call runs three ways, so that no instrument's overhead enters another's numbers:

* plain, fenced at both ends (`timing.clock`): the wall time (median of 3);
* under torch.profiler: on a GPU the kernels launched, the host synchronisations
  (`cuda*Synchronize` and blocking `cudaMemcpy`: every `.item()`, `.cpu()`, `nonzero`...), the
  device-host copies (either way) and the GPU-busy time (the union of the intervals in which a
  kernel or a copy ran); on the CPU, which has no device, the busy time is the ops' own CPU time
  (the profiler's self-CPU total);
* under `HostProbe` (probe.py): aten ops dispatched (on a GPU about one launch each), host reads
  and host uploads, on any device.

Host overhead = wall - busy: on a GPU the time the device sat idle waiting for the host; on the
CPU the time spent outside torch's ops (Python, dispatch, generate()'s bookkeeping).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..accuracy import Method
from ..api import unpatch
from ..models.timing import clock
from .measure import Prompt, apply, generate
from .probe import HostProbe

DECODE_STEPS = 8
WALL_REPEATS = 3
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class Event(NamedTuple):
    """One profiler event: its name, whether it ran on the device, its interval and own time (us)."""

    name: str
    on_device: bool
    start_us: float
    end_us: float
    self_us: float = 0.0


@dataclass
class Cost:
    """What one call (or one decode step) asks: wall, busy and host-overhead ms, aten ops, host
    reads and uploads (HostProbe); on a GPU also kernels, synchronisations and device-host copies
    (torch.profiler; None on the CPU)."""

    wall_ms: float
    busy_ms: float
    ops: float
    reads: float
    uploads: float
    kernels: float | None = None
    syncs: float | None = None
    copies: float | None = None

    @property
    def host_ms(self) -> float:
        return self.wall_ms - self.busy_ms

    def per_step(self, longer: Cost, steps: int) -> Cost:
        """(longer - self) / steps, field by field: one decode step, from a call `steps` tokens longer."""
        values = {}
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(longer, f.name)
            values[f.name] = None if mine is None or theirs is None else (theirs - mine) / steps
        return Cost(**values)

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"host_ms": self.host_ms}


@dataclass
class MethodProfile:
    name: str
    prefill: Cost
    decode_step: Cost

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "prefill": self.prefill.record(), "decode_step": self.decode_step.record()}


def device_counts(events: Iterable[Event]) -> dict[str, float]:
    """Kernels, synchronisations, device-host copies and GPU-busy ms of a profiled CUDA run.

    Device events are kernels, `Memcpy ...` and `Memset ...`; busy is the union of their
    intervals (kernels on several streams overlap). Host events named in `SYNC_CALLS` wait for
    the device."""
    events = list(events)
    device = sorted((e for e in events if e.on_device), key=lambda e: e.start_us)
    kernels = sum(not e.name.startswith(("Memcpy", "Memset")) for e in device)
    copies = sum(e.name.startswith("Memcpy") and ("DtoH" in e.name or "HtoD" in e.name) for e in device)
    syncs = sum(not e.on_device and e.name in SYNC_CALLS for e in events)
    busy, reach = 0.0, float("-inf")
    for e in device:
        start = max(e.start_us, reach)
        if e.end_us > start:
            busy += e.end_us - start
        reach = max(reach, e.end_us)
    return {"kernels": kernels, "syncs": syncs, "copies": copies, "busy_ms": busy / 1000}


def cpu_busy_ms(events: Iterable[Event]) -> float:
    """The ops' own CPU time (ms): the profiler's self-CPU total over the host events."""
    return sum(e.self_us for e in events if not e.on_device) / 1000


def profiled_events(profile: torch.profiler.profile) -> list[Event]:
    """torch.profiler's events as `Event`s (times relative to the trace, in us), without user
    annotations (`record_function` ranges, which kineto also draws on the GPU's timeline)."""
    from torch.autograd import DeviceType

    return [
        Event(
            e.name,
            e.device_type != DeviceType.CPU,
            e.time_range.start,
            e.time_range.end,
            e.self_cpu_time_total,
        )
        for e in profile.events()
        if not getattr(e, "is_user_annotation", False)
    ]


def call_cost(model: torch.nn.Module, prompt: Prompt, new_tokens: int) -> Cost:
    """Wall (fenced, median of `WALL_REPEATS`), profiler and HostProbe figures of one generate()."""
    device = model.device
    walls = []
    for _ in range(WALL_REPEATS):
        start = clock(device)
        generate(model, prompt, new_tokens)
        walls.append(1000 * (clock(device) - start))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        generate(model, prompt, new_tokens)
        clock(device)  # every kernel of the call inside the trace
    events = profiled_events(profile)
    with HostProbe() as probe:
        generate(model, prompt, new_tokens)
    cost = Cost(statistics.median(walls), cpu_busy_ms(events), probe.ops, probe.reads, probe.uploads)
    if device.type == "cuda":
        counts = device_counts(events)
        counts["syncs"] -= 1  # the closing fence above is the profile's, not the call's
        cost.busy_ms = counts.pop("busy_ms")
        cost = dataclasses.replace(cost, **counts)
    return cost


def profile_methods(
    model: torch.nn.Module, methods: Sequence[Method], prompt: Prompt, steps: int = DECODE_STEPS
) -> list[MethodProfile]:
    """Prefill and decode-step costs of every method (the model warm: run after `measure`)."""
    rows = []
    for method in methods:
        apply(model, method)
        prefill = call_cost(model, prompt, 1)
        longer = call_cost(model, prompt, 1 + steps)
        rows.append(MethodProfile(method.name, prefill, prefill.per_step(longer, steps)))
    unpatch(model)
    return rows
