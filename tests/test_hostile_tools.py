"""Issue 26: `models`, `info` and `manifest` on malformed files give one line and a DESIGN exit code;
recorded model hashes are computed or verified, never trusted from a stale cache entry."""
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from test_models_cli import run  # the CLI in-process: (exit code, stdout, stderr)

ROOT = Path(__file__).resolve().parents[1]


def run_module(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ldmtool", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def assert_one_line(code, err, name, codes=(1, 2, 3)):
    assert code in codes, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldmtool: error: ") and name in lines[0], err


def _safetensors(header: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header


BAD_CHECKPOINTS = {
    "short-prefix.safetensors": b"\x01\x02",
    "truncated.safetensors": _safetensors(b'{"a": {', declared=100),
    "not-json.safetensors": _safetensors(b"hello"),
    "huge-length.safetensors": _safetensors(b"{}", declared=2**64 - 1),
    "list-header.safetensors": _safetensors(b"[1, 2]"),
    "no-offsets.safetensors": _safetensors(json.dumps({"a": {"dtype": "F32", "shape": [1]}}).encode()),
    "bad-offsets.safetensors": _safetensors(
        json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": "xy"}}).encode()),
    "bad-metadata.safetensors": _safetensors(json.dumps({"__metadata__": [1]}).encode()),
    "empty.safetensors": b"",
    "text.ckpt": b"hello, this is not a checkpoint\n",
    "abc.ckpt": b"abc\n",
    "empty.ckpt": b"",
}


@pytest.fixture()
def bad_files(tmp_path):
    for name, data in BAD_CHECKPOINTS.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.safetensors").mkdir()
    return tmp_path


@pytest.mark.parametrize("name", [*BAD_CHECKPOINTS, "folder.safetensors"])
def test_models_inspect_and_convert_bad_file_one_line(capsys, bad_files, name):
    path = bad_files / name
    code, _, err = run(capsys, "models", "inspect", path)
    assert_one_line(code, err, name)
    code, _, err = run(capsys, "models", "convert", path, bad_files / "out.safetensors")
    assert_one_line(code, err, name)
    assert not (bad_files / "out.safetensors").exists()


def test_models_inspect_bad_files_via_python_m(bad_files):
    for name in ("text.ckpt", "list-header.safetensors", "no-offsets.safetensors"):
        proc = run_module("models", "inspect", name, cwd=bad_files)
        assert_one_line(proc.returncode, proc.stderr, name)


@pytest.mark.parametrize("stored", ["{[: not yaml", "- a list\n- of things"])
def test_bad_config_in_safetensors_metadata_is_one_line(capsys, tmp_path, stored):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "odd-config.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"ldmtool_config": stored})
    code, out, err = run(capsys, "models", "inspect", path)
    assert code == 3 and "Traceback" not in err and "problem:" in out and "metadata" in out
    code, _, err = run(capsys, "models", "convert", path, tmp_path / "out.safetensors")
    assert_one_line(code, err, path.name, codes=(3,))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"tEXt", b"parameters\x00a cat")
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


@pytest.fixture()
def bad_images(tmp_path):
    from PIL import Image

    (tmp_path / "bomb.png").write_bytes(_png(100000, 100000))  # over Pillow's own error threshold
    (tmp_path / "big.png").write_bytes(_png(12000, 12000))  # under it, over ldmtool's default limit
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "ok.png").read_bytes()[:20])
    (tmp_path / "text.png").write_text("hello")
    return tmp_path


@pytest.mark.parametrize("name", ["bomb.png", "big.png", "truncated.png", "text.png"])
def test_info_bad_image_one_line_exit_1(capsys, bad_images, name):
    code, out, err = run(capsys, "info", bad_images / name)
    assert_one_line(code, err, name, codes=(1,))
    assert out == ""


def test_info_bomb_via_python_m(bad_images):
    proc = run_module("info", "bomb.png", "big.png", cwd=bad_images)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("ldmtool: error: ") for line in lines), proc.stderr
    assert "decompression bomb" in proc.stderr


def _members(folder, index, count, keys):
    (folder / f"ldmtool-shard-{index}-of-{count}.json").write_text(
        json.dumps({"shard": f"{index}/{count}", "keys": keys}) + "\n")


def test_manifest_merge_huge_shard_count_does_not_hang(capsys, tmp_path):
    count = 999999999999
    part = tmp_path / f"ldmtool-manifest.shard-1-of-{count}.jsonl"
    part.write_text(json.dumps({"key": "a.png", "status": "done"}) + "\n")
    _members(tmp_path, 1, count, ["a.png"])
    code, out, err = run(capsys, "manifest", "merge", tmp_path, "--json")
    report = json.loads(out)
    assert code == 1 and "Traceback" not in err
    assert report["missing_shard_count"] == count - 1 and len(report["missing_shards"]) == 1000
    assert report["missing_shards"][:2] == [2, 3] and report["done"] == 1 and not report["complete"]
    code, out, err = run(capsys, "manifest", "merge", tmp_path)
    assert code == 1 and len(err.splitlines()) == 1001 and f"{count - 1001} more shards" in err


ODD_LINES = [
    b"[1, 2, 3]",
    b'"just a string"',
    b"42",
    b"null",
    b'{"key": ["a", "list"], "status": "done"}',
    b'{"key": 7, "status": "done"}',
    b'{"key": {"x": 1}}',
    b'{"status": "done"}',
    b'{"key": "big.png", "status": "done", "seconds": 1e999999}',
    b'{"key": "bignum.png", "status": "done", "seed": ' + b"9" * 5000 + b"}",
    b'{"key": "surrogate-\\ud800.png", "status": "done"}',
    b'{"key": "bad-\xff\xfe-utf8.png", "status": "done"}',
    b"[" * 100000,
    b'{"key": "cut-short.png", "sta',
    b'{"key": "ok.png", "status": 5}',
]


def test_manifest_merge_odd_json_lines_never_crash(capsys, tmp_path):
    lines = [json.dumps({"key": "a.png", "status": "done"}).encode(), *ODD_LINES,
             json.dumps({"key": "b.png", "status": "failed"}).encode()]
    (tmp_path / "ldmtool-manifest.shard-1-of-2.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "ldmtool-manifest.shard-2-of-2.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    _members(tmp_path, 1, 2, ["a.png", "b.png", "c.png", 5, None])
    (tmp_path / "ldmtool-shard-2-of-2.json").write_text("[1, 2]")  # odd membership file: shard 2 counts as missing
    code, out, err = run(capsys, "manifest", "merge", tmp_path, "--json")
    assert code == 1 and "Traceback" not in err, err
    report = json.loads(out)
    assert report["failed"] == ["b.png"] and report["missing"] == ["c.png"] and report["missing_shards"] == [2]
    assert report["skipped"] >= 10
    merged = (tmp_path / "ldmtool-manifest.jsonl").read_text(encoding="utf-8").splitlines()
    keys = [json.loads(line)["key"] for line in merged]
    assert "a.png" in keys and "b.png" in keys and all(isinstance(k, str) for k in keys)
    code, _, err = run(capsys, "manifest", "merge", tmp_path)
    assert code == 1 and "Traceback" not in err and "skipped" in err


def test_manifest_merge_not_a_folder_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "absent"):
        code, _, err = run(capsys, "manifest", "merge", path)
        assert_one_line(code, err, str(path), codes=(2,))


@pytest.fixture()
def hash_cache(tmp_path, monkeypatch):
    from ldmtool.runtime import cache

    monkeypatch.setenv("LDMTOOL_CACHE", str(tmp_path / "cache"))
    cache._hash_memo.clear()
    calls = []
    real_hash = cache.hash_file
    monkeypatch.setattr(cache, "hash_file", lambda path: calls.append(path) or real_hash(path))
    yield cache, calls
    cache._hash_memo.clear()


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hashlib_of(data):
    return hashlib.sha256(data).hexdigest()


def test_replaced_model_same_size_and_mtime_gets_a_fresh_hash(tmp_path, hash_cache):
    cache, calls = hash_cache
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"A" * 4096)
    old = os.stat(model)
    assert cache.file_hash(model) == (_sha(model), "computed")
    cache._hash_memo.clear()  # a new process: the disk index answers, verified against the file
    assert cache.file_hash(model) == (_sha(model), "cache") and len(calls) == 1

    fresh = tmp_path / "model.new"
    fresh.write_bytes(b"B" * 4096)  # same size
    os.utime(fresh, ns=(old.st_atime_ns, old.st_mtime_ns))  # mtime forced back to the old value
    os.replace(fresh, model)  # a new inode at the same path
    assert os.stat(model).st_size == old.st_size and os.stat(model).st_mtime_ns == old.st_mtime_ns
    assert os.stat(model).st_ino != old.st_ino
    for _ in range(2):  # in this process, and in a new one
        assert cache.file_sha256(model) == _sha(model) == hashlib_of(b"B" * 4096)
        cache._hash_memo.clear()
    assert len(calls) == 2


def test_touched_model_is_rehashed(tmp_path, hash_cache):
    cache, calls = hash_cache
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"weights")
    assert cache.file_sha256(model) == hashlib_of(b"weights")
    stat = os.stat(model)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    cache._hash_memo.clear()
    assert cache.file_hash(model) == (hashlib_of(b"weights"), "computed") and len(calls) == 2


def test_old_or_mismatched_index_entries_are_not_trusted(tmp_path, hash_cache):
    cache, calls = hash_cache
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"real bytes")
    stat = os.stat(model)
    wrong = "f" * 64
    index = {f"{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}": wrong}  # the old path|size|mtime form
    folder = cache.cache_dir(create=True)
    (folder / cache.HASH_INDEX).write_text(json.dumps(index))
    assert cache.file_hash(model) == (hashlib_of(b"real bytes"), "computed")
    entry = json.loads((folder / cache.HASH_INDEX).read_text())[str(model.resolve())]
    entry.update(sha256=wrong, inode=entry["inode"] + 1)  # an entry for another file at this path
    (folder / cache.HASH_INDEX).write_text(json.dumps({str(model.resolve()): entry}))
    cache._hash_memo.clear()
    assert cache.file_hash(model) == (hashlib_of(b"real bytes"), "computed") and len(calls) == 2


def test_recipe_says_how_the_model_hash_was_obtained(tmp_path, hash_cache, monkeypatch):
    from PIL import Image

    from clirun import run_cli
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint
    from ldmtool.runtime.cache import model_cache

    cache, _ = hash_cache
    model = tmp_path / "tiny.safetensors"
    save_tiny_checkpoint(model, "ldm-celebahq256", seed=2, with_config=True)
    Image.new("RGB", (32, 32), (120, 60, 30)).save(tmp_path / "in.png")
    sources = []
    for run_index in range(2):
        out = tmp_path / f"out{run_index}.png"
        result = run_cli("img2img", tmp_path / "in.png", "--model", model, "-o", out, "--seed", 1, "--steps", 2,
                         "--sampler", "euler", "--strength", 0.5, "--quiet")
        assert result.exit_code == 0, result.output
        with Image.open(out) as image:
            recipe = json.loads(image.info["ldmtool"])
        assert recipe["model_sha256"] == _sha(model)
        sources.append(recipe["model_sha256_source"])
        cache._hash_memo.clear()  # the next run is a new process
        model_cache().clear()
    assert sources == ["computed", "cache"]


def test_info_recipe_nested_too_deep_is_one_line(capsys, tmp_path):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat")
    info.add_text("ldmtool", "[" * 100000 + "]" * 100000)
    Image.new("RGB", (4, 4)).save(tmp_path / "deep.png", pnginfo=info)
    code, _, err = run(capsys, "info", tmp_path / "deep.png")
    assert_one_line(code, err, "deep.png", codes=(1,))


def test_models_convert_onto_a_folder_is_one_line(capsys, tmp_path):
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "tiny.safetensors", "ldm-celebahq256", seed=2, with_config=True)
    (tmp_path / "out.safetensors").mkdir()
    code, _, err = run(capsys, "models", "convert", tmp_path / "tiny.safetensors", tmp_path / "out.safetensors")
    assert_one_line(code, err, "out.safetensors", codes=(2,))
