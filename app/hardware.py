"""The machine the page runs on: ZeroGPU (`spaces.GPU`), CUDA, and the process heap.

On ZeroGPU Spaces the model work of one answer runs under `spaces.GPU` (`on_gpu`), in a worker
process: what crosses over is pickled, so tensors travel on the CPU (`move_to`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def zero_gpu() -> bool:
    """Whether this process runs on a ZeroGPU Space (as the `spaces` package reads it)."""
    try:
        from spaces.config import Config
    except ImportError:
        return False
    return bool(Config.zero_gpu)


def has_gpu() -> bool:
    return zero_gpu() or torch.cuda.is_available()


def on_gpu(task: Callable, duration: Callable[..., int]) -> Callable:
    """`task` under `spaces.GPU(duration=...)` when the `spaces` package is installed: on ZeroGPU
    each call then gets a GPU for `duration(*args)` seconds (in a worker process: arguments and
    results are pickled); anywhere else `spaces.GPU` returns `task` itself, so nothing changes."""
    try:
        import spaces
    except ImportError:
        return task
    return spaces.GPU(duration=duration)(task)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def bound_heap(arenas: int = 2) -> None:
    """Keep glibc's heap from growing with the number of threads that ever ran a question.

    glibc gives each thread its own arena and keeps the memory freed there (decoded frames,
    images): a server answering in a pool of threads grew by ~20 MB per distinct HD upload
    without this; with two arenas and a trim after each answer (`release_memory`), it stays flat.
    No-op where glibc is absent.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, arenas)


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc only)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def move_to(value: Any, device: torch.device | str) -> Any:
    """Tensors inside `value` (tensor, mapping, tuple or list) on `device`, same structure."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)(**{key: move_to(item, device) for key, item in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(item, device) for item in value)
    return value
