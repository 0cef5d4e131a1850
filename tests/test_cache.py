"""Process-wide model cache (identity keys, LRU under a byte budget), disk cache folder, cached hashes."""
import hashlib
import os
from pathlib import Path

import pytest
import torch

from ldmtool.errors import UsageError
from ldmtool.runtime import cache
from ldmtool.runtime.cache import (
    HASH_INDEX,
    ModelCache,
    cache_dir,
    file_sha256,
    model_cache,
    object_nbytes,
    parse_bytes,
)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMTOOL_CACHE", str(tmp_path / "cache"))
    cache._hash_memo.clear()


def test_cache_dir_override_and_xdg(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    assert not (tmp_path / "cache").exists()
    assert cache_dir(create=True).is_dir()
    monkeypatch.delenv("LDMTOOL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ldmtool"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ldmtool"


@pytest.mark.parametrize("text, value", [("512", 512), ("4GB", 4 * 1024**3), ("1.5 MiB", 1572864), ("2k", 2048)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "4 parsecs", ""])
def test_parse_bytes_refuses(text):
    with pytest.raises(UsageError):
        parse_bytes(text)


def test_file_hash_matches_hashlib_and_is_cached(tmp_path, monkeypatch):
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    calls = []
    real_hash = cache.hash_file
    monkeypatch.setattr(cache, "hash_file", lambda path: calls.append(path) or real_hash(path))

    assert file_sha256(weights) == expected
    assert file_sha256(weights) == expected
    assert len(calls) == 1
    cache._hash_memo.clear()  # a new process: the disk index answers
    assert file_sha256(weights) == expected and len(calls) == 1
    assert expected in (cache_dir() / HASH_INDEX).read_text()

    weights.write_bytes(b"changed")  # new size and mtime: hashed again
    assert file_sha256(weights) == hashlib.sha256(b"changed").hexdigest() and len(calls) == 2


def test_hash_survives_unwritable_cache(tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    monkeypatch.setenv("LDMTOOL_CACHE", str(tmp_path / "blocker" / "cache"))
    (tmp_path / "w.bin").write_bytes(b"abc")
    assert file_sha256(tmp_path / "w.bin") == hashlib.sha256(b"abc").hexdigest()


def _linear(n):
    return torch.nn.Linear(n, n, bias=False)  # n*n float32 parameters: 4*n*n bytes


def test_object_nbytes():
    shared = _linear(4)
    both = torch.nn.Sequential(shared, shared, _linear(2))
    assert object_nbytes(both) == 4 * (16 + 4)  # a shared weight counts once
    assert object_nbytes(torch.zeros(3, dtype=torch.float16)) == 6
    assert object_nbytes("not a tensor") == 0


def _files(tmp_path, *names):
    paths = []
    for name in names:
        path = tmp_path / name
        path.write_bytes(name.encode())
        paths.append(path)
    return paths


def test_same_file_device_dtype_loads_once(tmp_path):
    a, = _files(tmp_path, "a.ckpt")
    store = ModelCache(budget_bytes=10**6)
    loads = []

    def loader():
        loads.append(1)
        return _linear(4)

    first = store.load_file(a, "cpu", torch.float32, loader)
    again = store.load_file(Path(str(a)).parent / ".." / tmp_path.name / "a.ckpt", "cpu", torch.float32, loader)
    assert first is again and len(loads) == 1
    store.load_file(a, "cpu", torch.float16, loader)
    store.load_file(a, "meta", torch.float32, loader)
    assert len(loads) == 3

    os.utime(a, ns=(1, 1))  # the file changed on disk: a different identity
    store.load_file(a, "cpu", torch.float32, loader)
    assert len(loads) == 4


def test_least_recently_used_is_evicted_under_budget(tmp_path):
    a, b, c = _files(tmp_path, "a", "b", "c")
    store = ModelCache(budget_bytes=2 * 4 * 16)  # room for two 4x4 linears
    key = lambda p: ModelCache.key_for(p, "cpu", torch.float32)  # noqa: E731
    store.get_or_load(key(a), lambda: _linear(4))
    store.get_or_load(key(b), lambda: _linear(4))
    store.get_or_load(key(a), lambda: pytest.fail("a is cached"))  # a is now the most recent
    store.get_or_load(key(c), lambda: _linear(4))
    assert key(a) in store and key(c) in store and key(b) not in store
    assert store.total_bytes == 2 * 64


def test_an_entry_over_budget_is_still_returned(tmp_path):
    a, b = _files(tmp_path, "a", "b")
    store = ModelCache(budget_bytes=10)
    store.get_or_load(ModelCache.key_for(a, "cpu", "f32"), lambda: _linear(4))
    big = store.get_or_load(ModelCache.key_for(b, "cpu", "f32"), lambda: _linear(8))
    assert isinstance(big, torch.nn.Linear) and len(store) == 1


def test_one_cache_per_process(monkeypatch):
    monkeypatch.setattr(cache, "_process_cache", None)
    monkeypatch.setenv("LDMTOOL_MODEL_CACHE", "1MB")
    assert model_cache() is model_cache()
    assert model_cache().budget_bytes == 1024**2
