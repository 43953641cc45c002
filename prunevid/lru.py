"""One least-recently-used cache, bounded in bytes, safe to share between threads.

Every cache of this project is one of these: the app's decoded videos and vision features,
a patched model's stage-1 results (`models/base.py`) and the lmms-eval plugin's recent videos.
By default they all share ONE process-wide budget (`shared_cache()`, `PRUNEVID_CACHE_MB`), so
what a server holds is bounded by one number whatever mix of videos, models and settings it sees.

An entry's size is the memory its tensors and arrays occupy, counted once per buffer: views of
one buffer, or one tensor held by two entries (the app's features and the stage-1 result that
pins them), cost their bytes once. Python objects around them are not counted (small).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

DEFAULT_CACHE_MB = 512
MIB = 2**20


def buffers(value: Any) -> dict[tuple, int]:
    """The memory buffers `value` holds, {identity: bytes}, found through tensors, numpy arrays,
    mappings, sequences and dataclasses (anything else holds none)."""
    found: dict[tuple, int] = {}
    for item in _leaves(value):
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            found[("torch", item.device.type, storage.data_ptr())] = storage.nbytes()
        else:
            root = item
            while isinstance(root.base, np.ndarray):
                root = root.base
            found[("numpy", id(root))] = root.nbytes
    return found


def _leaves(value: Any) -> Iterator[torch.Tensor | np.ndarray]:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _leaves(getattr(value, field.name))


class ByteLRU:
    """A thread-safe LRU map holding at most `max_bytes` of buffers (and `max_items` entries).

    `put` evicts least-recently-used entries until the new one fits; an entry larger than the
    whole budget is not stored. `get` marks an entry as recently used.
    """

    def __init__(self, max_bytes: int, max_items: int | None = None):
        if max_bytes < 0 or (max_items is not None and max_items < 0):
            raise ValueError(f"a cache needs max_bytes >= 0 and max_items >= 0, got {max_bytes}, {max_items}")
        self.max_bytes, self.max_items = max_bytes, max_items
        self._entries: OrderedDict[Hashable, tuple[Any, dict[tuple, int]]] = OrderedDict()
        self._holders: dict[tuple, int] = {}  # buffer -> number of entries holding it
        self._sizes: dict[tuple, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held now (each buffer once)."""
        return self._total

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            if key not in self._entries:
                return default
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def put(self, key: Hashable, value: Any) -> bool:
        """Store `value` under `key` (replacing any); False when it alone exceeds the budget."""
        held = buffers(value)
        with self._lock:
            self._remove(key)
            if self.max_items == 0 or sum(held.values()) > self.max_bytes:
                return False
            self._entries[key] = (value, held)
            for buffer, size in held.items():
                if buffer not in self._holders:
                    self._holders[buffer], self._sizes[buffer] = 0, size
                    self._total += size
                self._holders[buffer] += 1
            while len(self._entries) > 1 and (
                self._total > self.max_bytes
                or (self.max_items is not None and len(self._entries) > self.max_items)
            ):
                self._remove(next(iter(self._entries)))
            return True

    def discard(self, where: Callable[[Hashable], bool]) -> int:
        """Remove every entry whose key satisfies `where`; returns how many."""
        with self._lock:
            keys = [key for key in self._entries if where(key)]
            for key in keys:
                self._remove(key)
            return len(keys)

    def clear(self) -> None:
        self.discard(lambda key: True)

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for buffer in entry[1]:
            self._holders[buffer] -= 1
            if not self._holders[buffer]:
                self._total -= self._sizes.pop(buffer)
                del self._holders[buffer]


def cache_bytes() -> int:
    """The shared budget: $PRUNEVID_CACHE_MB mebibytes (default 512)."""
    text = os.environ.get("PRUNEVID_CACHE_MB", "").strip()
    if not text:
        return DEFAULT_CACHE_MB * MIB
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise ValueError(f"PRUNEVID_CACHE_MB must be a number of megabytes >= 0, got {text!r}")
    return int(megabytes * MIB)


_shared: ByteLRU | None = None
_shared_lock = threading.Lock()


def shared_cache() -> ByteLRU:
    """The process-wide cache (created on first use with `cache_bytes()`)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ByteLRU(cache_bytes())
        return _shared
