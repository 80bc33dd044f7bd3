"""The prompt-state cache: longest prefix, LRU within the byte budget, spill to safetensors and back."""

from __future__ import annotations

from pathlib import Path

import torch

from retentive.serving import PrefixCache
from retentive.serving.prefix_cache import LOGITS, model_fingerprint


def state(value: float) -> dict[str, torch.Tensor]:
    return {"S.0": torch.full((2, 4, 4), float(value)), LOGITS: torch.full((8,), float(value))}  # 160 bytes


def test_lookup_finds_the_longest_cached_prefix():
    cache = PrefixCache("m", max_bytes=10_000)
    cache.insert([1, 2], state(1))
    cache.insert([1, 2, 3, 4], state(2))
    cache.insert([9, 9, 9], state(3))
    assert cache.lookup([1, 2, 3, 4, 5]).length == 4
    assert cache.lookup([1, 2, 3]).length == 2
    assert cache.lookup([1, 2, 3, 4]).tensors["S.0"][0, 0, 0] == 2  # the whole prompt
    assert cache.lookup([1]) is None and cache.lookup([9, 9]) is None
    assert (cache.hits, cache.misses) == (3, 2)


def test_least_recently_used_entries_leave_first_within_the_budget():
    cache = PrefixCache("m", max_bytes=400)  # two entries of 160 bytes
    cache.insert([1], state(1))
    cache.insert([2], state(2))
    cache.lookup([1])  # [1] is now the most recent
    cache.insert([3], state(3))
    assert cache.lookup([2]) is None
    assert cache.lookup([1]) is not None and cache.lookup([3]) is not None
    assert cache.bytes == 320 and cache.lengths == {1: 2}


def test_evicted_entries_spill_to_disk_and_come_back_exact(tmp_path):
    cache = PrefixCache("m", max_bytes=400, directory=tmp_path, max_disk_bytes=10_000)
    for i in range(4):
        cache.insert([i, i], state(float(i)))
    assert len(cache.memory) == 2 and len(cache.disk) == 2
    entry = cache.lookup([0, 0, 7])
    assert entry.length == 2
    torch.testing.assert_close(entry.tensors["S.0"], state(0.0)["S.0"], rtol=0, atol=0)
    # a new server on the same directory finds what the previous one spilled
    later = PrefixCache("m", max_bytes=400, directory=tmp_path, max_disk_bytes=10_000)
    assert later.lookup([1, 1]) is not None
    other_model = PrefixCache("other", max_bytes=400, directory=tmp_path, max_disk_bytes=10_000)
    assert other_model.lookup([1, 1]) is None


def test_the_disk_budget_is_kept_and_a_damaged_file_is_a_miss(tmp_path):
    cache = PrefixCache("m", max_bytes=200, directory=tmp_path, max_disk_bytes=400)
    for i in range(5):
        cache.insert([i], state(float(i)))
    files = sorted((tmp_path / "m").glob("*.safetensors"))
    assert len(files) == len(cache.disk) == 2 and cache.disk_bytes <= 400
    for f in files:
        f.write_bytes(b"not safetensors")
    assert cache.lookup([3]) is None and cache.lookup([2]) is None


def test_the_fingerprint_changes_with_the_weights():
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"to_json_string": lambda self, use_diff: "{}"})()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert model_fingerprint(model) != before


def spilled(tmp_path, n: int = 3) -> tuple[PrefixCache, list[Path]]:
    """A cache that spilled the states of [0, 0] .. [n - 2, n - 2] to disk (one stays in memory)."""
    cache = PrefixCache("m", max_bytes=200, directory=tmp_path, max_disk_bytes=10_000)
    for i in range(n):
        cache.insert([i, i], state(float(i)))
    return cache, [tmp_path / "m" / f"{cache.key([i, i])}.safetensors" for i in range(n - 1)]


def test_a_flipped_bit_is_a_miss_and_the_file_is_deleted(tmp_path):
    cache, files = spilled(tmp_path)
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0x10  # in the tensors, past the header
    files[0].write_bytes(bytes(data))
    assert cache.lookup([0, 0]) is None and not files[0].exists()
    assert cache.lookup([1, 1]) is not None


def test_another_prompts_file_copied_over_is_a_miss_even_after_a_restart(tmp_path):
    _, files = spilled(tmp_path)
    files[0].write_bytes(files[1].read_bytes())
    later = PrefixCache("m", max_bytes=200, directory=tmp_path, max_disk_bytes=10_000)
    assert later.lookup([0, 0]) is None and not files[0].exists()
    assert later.lookup([1, 1]).tensors["S.0"][0, 0, 0] == 1


def test_garbage_files_are_deleted_when_indexed(tmp_path):
    _, files = spilled(tmp_path)
    files[0].write_bytes(b"\x00garbage")
    PrefixCache("m", max_bytes=200, directory=tmp_path, max_disk_bytes=10_000)
    assert not files[0].exists() and files[1].exists()


def test_an_entry_read_from_disk_is_kept_only_when_inserted_back(tmp_path):
    cache, _ = spilled(tmp_path)
    entry = cache.lookup([0, 0])
    assert [0, 0] not in cache  # off the disk, not yet in memory: the caller has not used it
    cache.insert([0, 0], entry.tensors)
    assert [0, 0] in cache and cache.lookup([0, 0]) is not None
    cache.discard([0, 0])
    assert [0, 0] not in cache and cache.lookup([0, 0]) is None
