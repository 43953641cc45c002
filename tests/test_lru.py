"""The one cache helper: least-recently-used eviction by bytes, buffers counted once, thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from prunevid.config import PruneVidConfig
from prunevid.lru import ByteLRU, buffers, cache_bytes, shared_cache
from prunevid.models.base import Runtime


def array(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes, np.uint8)


def test_evicts_least_recently_used_first_by_bytes():
    cache = ByteLRU(max_bytes=1000)
    for key in "abc":
        assert cache.put(key, array(300))
    assert cache.nbytes == 900
    assert cache.get("a") is not None  # "a" is now the most recent: "b" goes first
    cache.put("d", array(300))
    assert "b" not in cache and set("acd") == {k for k in "abcd" if k in cache}
    cache.put("e", array(650))  # needs two entries' room: the two least recent go
    assert [k for k in "abcde" if k in cache] == ["d", "e"] and cache.nbytes == 950


def test_an_entry_larger_than_the_budget_is_refused_and_evicts_nothing():
    cache = ByteLRU(max_bytes=100)
    cache.put("small", array(60))
    assert cache.put("huge", array(101)) is False
    assert "huge" not in cache and "small" in cache and cache.nbytes == 60


def test_replacing_a_key_releases_its_old_bytes():
    cache = ByteLRU(max_bytes=100)
    cache.put("k", array(80))
    cache.put("k", array(30))
    assert len(cache) == 1 and cache.nbytes == 30


def test_a_buffer_held_by_two_entries_costs_its_bytes_once():
    features = torch.zeros(10, 25)  # 1000 bytes
    view = features[2:5]  # a view: the same storage
    cache = ByteLRU(max_bytes=1500)
    cache.put(("video", 1), {"features": features, "frames": array(200)})
    cache.put(("stage1", 1), (view, torch.zeros(50)))  # the pinned tokens + a 200-byte result
    assert cache.nbytes == 1000 + 200 + 200
    cache.discard(lambda key: key[0] == "video")
    assert cache.nbytes == 1000 + 200, "the storage stays counted while the stage-1 entry holds it"
    cache.clear()
    assert cache.nbytes == 0 and len(cache) == 0


def test_buffers_walk_dataclasses_mappings_and_sequences():
    from prunevid.video import Video

    frames = np.zeros((2, 4, 4, 3), np.uint8)
    video = Video(frames[:1], np.zeros(1), 1.0, 1.0, "x.mp4")  # a view of `frames`
    found = buffers({"video": video, "more": [frames, (torch.ones(3),)], "name": "text"})
    assert sorted(found.values()) == [8, 12, 96]  # timestamps (8), the tensor (12), frames once (96)


def test_max_items_bounds_the_count_too():
    cache = ByteLRU(max_bytes=10**6, max_items=2)
    for key in range(4):
        cache.put(key, array(10))
    assert [key for key in range(4) if key in cache] == [2, 3]
    assert ByteLRU(10**6, max_items=0).put("k", array(1)) is False


def test_concurrent_use_keeps_the_budget_and_the_count_consistent():
    cache = ByteLRU(max_bytes=10_000)
    shared = array(500)  # held by many entries at once

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in range(300):
            key = int(rng.integers(0, 40))
            if i % 3 == 0:
                cache.get(key)
            else:
                cache.put(key, (array(int(rng.integers(1, 2000))), shared))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each array once, by identity: `shared` is in every entry and costs its 500 bytes once.
    held = {}
    for key in range(40):
        value = cache.get(key)
        if value is not None:
            own, common = value
            assert common is shared
            held[id(own)], held[id(shared)] = own.nbytes, shared.nbytes
    assert len(held) >= 2 and cache.nbytes == sum(held.values()) <= 10_000


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("PRUNEVID_CACHE_MB", "64")
    assert cache_bytes() == 64 * 2**20
    monkeypatch.delenv("PRUNEVID_CACHE_MB")
    assert cache_bytes() == 512 * 2**20
    monkeypatch.setenv("PRUNEVID_CACHE_MB", "lots")
    with pytest.raises(
        ValueError, match=r"^PRUNEVID_CACHE_MB must be a number of megabytes >= 0, got 'lots'$"
    ):
        cache_bytes()


def test_stage1_results_share_the_process_budget():
    assert Runtime(PruneVidConfig()).stage1_cache is shared_cache()
