"""What a piece of torch code asks of the host, counted on any device (the CPU included).

On a GPU every kernel costs the host a launch, and every value read back waits for all queued
work (DESIGN.md "On a GPU"). `HostProbe` counts both while it is active, so the CPU can check what
only a GPU would feel:

* `ops`: aten operators dispatched (each is about one kernel launch on a GPU), of which `views`
  (reshapes, slices, expands) launch none: they cost the host its dispatch only;
* `reads`: operations whose result the host must wait for: `.item()` / `bool(t)` / `int(t)`
  (`aten._local_scalar_dense`), `nonzero`, `unique`, `masked_select`, boolean-mask indexing,
  `repeat_interleave` without `output_size`, `bincount` (CUDA reads the maximum), and calls of
  `Tensor.tolist` / `.numpy` / `.cpu`;
* `uploads`: tensors made from host values (`torch.tensor(list)`): a blocking copy on a GPU.

`reads_by_op` / `uploads_by_op` name where each came from, for a failing test's message.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose output shape or value the host must wait for.
_READS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten._unique.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}
_UPLOADS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
_HOST_METHODS = ("tolist", "numpy", "cpu")


class HostProbe(TorchDispatchMode):
    """Count aten ops, host reads and host uploads inside `with HostProbe() as probe:`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.views = 0
        self.reads_by_op: Counter[str] = Counter()
        self.uploads_by_op: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    @property
    def reads(self) -> int:
        return sum(self.reads_by_op.values())

    @property
    def uploads(self) -> int:
        return sum(self.uploads_by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.views += func.is_view
        if (func in _READS and not _sized(func, kwargs)) or _bool_index(func, args):
            self.reads_by_op[f"{func} at {_caller()}"] += 1
        elif func in _UPLOADS:
            self.uploads_by_op[f"{func} at {_caller()}"] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> HostProbe:
        for name in _HOST_METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, self._saved[name]))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        self._saved.clear()
        return super().__exit__(*exc)

    def _counting(self, name: str, method: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.reads_by_op[f"Tensor.{name} at {_caller()}"] += 1
            return method(tensor, *args, **kwargs)

        return counted


def _sized(func: Any, kwargs: dict[str, Any]) -> bool:
    """repeat_interleave given its output size reads nothing back."""
    return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None


def _bool_index(func: Any, args: tuple) -> bool:
    """Indexing with a boolean mask needs the mask's count on the host."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _caller() -> str:
    """The innermost frame of prunevid's own code (or of the caller) that issued the op."""
    frames = [
        f
        for f in traceback.extract_stack()
        if not f.filename.endswith("probe.py") and "/torch/" not in f.filename
    ]
    ours = [f for f in frames if "/prunevid/" in f.filename]
    frame = (ours or frames)[-1]
    return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} ({frame.name})"
