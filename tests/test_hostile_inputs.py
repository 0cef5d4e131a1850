"""Hostile inputs and names (issue 26): special files, unbounded reads, non-UTF-8 and over-long names.

Run through the real CLI (the test-only `_invert` command) in a subprocess with a timeout, so a read
that blocks (a FIFO) or never ends (/dev/zero) fails the test instead of hanging it, and odd names reach a
real process's stdout and stderr; over-long names, which neither concerns, run in this process. A bad entry
fails its own item with one line naming it; the batch goes on and exits 1; no traceback.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldmtool.errors import ItemError
from ldmtool.runtime.seeds import derive_seed

NON_UTF8 = b"caf\xe9.png"  # Latin-1 bytes: a name a Linux file system allows, not valid UTF-8


def _run(cwd: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, LDMTOOL_TEST_COMMANDS="1", LDMTOOL_CACHE=str(cwd / "cache"),
                       HOME=str(cwd), PYTHONIOENCODING="utf-8", **env)
    environment.pop("LDMTOOL_DEBUG", None)
    command = [sys.executable, "-m", "ldmtool", "_invert", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, timeout=timeout, env=environment)


def _run_here(cwd: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> subprocess.CompletedProcess:
    """`_run` in this process (no start-up): for names that block nothing and are plain ASCII."""
    from clirun import ensure_test_commands, run_cli

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LDMTOOL_CACHE", str(cwd / "cache"))
    monkeypatch.setenv("HOME", str(cwd))
    monkeypatch.delenv("LDMTOOL_DEBUG", raising=False)
    ensure_test_commands()
    result = run_cli("_invert", *args)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout.encode(), result.stderr.encode())


def _events(stdout: bytes) -> dict[str, dict]:
    events = [json.loads(line) for line in stdout.decode("utf-8").splitlines()]
    return {event["key"]: event for event in events if event["event"] not in ("summary", "plan")}


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert b"Traceback" not in result.stderr and b"Traceback" not in result.stdout, result.stderr.decode()


def _special_folder(folder: Path) -> None:
    folder.mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(folder / "good.png")
    os.symlink("/dev/zero", folder / "x.png")
    os.mkfifo(folder / "y.png")
    (folder / "z.png").mkdir()


def test_special_files_fail_their_items_and_the_batch_goes_on(tmp_path):
    _special_folder(tmp_path / "in")
    result = _run(tmp_path, "in", "-o", "out", "--json")
    _no_traceback(result)
    assert result.returncode == 1, result.stderr.decode()
    events = _events(result.stdout)
    assert set(events) == {"good.png", "x.png", "y.png"}  # a folder named z.png is a folder, not an item
    assert events["good.png"]["event"] == "done"
    assert events["x.png"]["event"] == "failed"
    assert "x.png: not a regular file (a character device)" in events["x.png"]["error"]
    assert events["y.png"]["event"] == "failed"
    assert "y.png: not a regular file (a FIFO)" in events["y.png"]["error"]
    failed = [line for line in result.stderr.decode().splitlines() if line.startswith("ldmtool: failed: ")]
    assert len(failed) == 2


def test_named_special_files_and_globs_are_items_that_fail(tmp_path):
    _special_folder(tmp_path / "in")
    result = _run(tmp_path, "in/y.png", "in/x.png", "in/*.png", "-o", "out", "--json")
    _no_traceback(result)
    assert result.returncode == 1, result.stderr.decode()
    events = _events(result.stdout)
    assert {key: e["event"] for key, e in events.items()} == {"good.png": "done", "x.png": "failed",
                                                              "y.png": "failed"}


def test_read_image_refuses_special_files_without_opening_them(tmp_path):
    from ldmtool.io.images import read_image, read_mask

    os.mkfifo(tmp_path / "y.png")  # opening it for reading would block this test forever
    with pytest.raises(ItemError, match=r"y.png: not a regular file \(a FIFO\)"):
        read_image(tmp_path / "y.png")
    with pytest.raises(ItemError, match=r"y.png: not a regular file \(a FIFO\)"):
        read_mask(tmp_path / "y.png")
    os.symlink("/dev/zero", tmp_path / "x.png")
    with pytest.raises(ItemError, match=r"x.png: not a regular file \(a character device\)"):
        read_image(tmp_path / "x.png")
    (tmp_path / "z.png").mkdir()
    with pytest.raises(ItemError, match=r"z.png: is a folder"):
        read_image(tmp_path / "z.png")


def test_file_size_bound_refuses_before_reading(tmp_path, monkeypatch):
    from ldmtool.io.images import read_image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    size = (tmp_path / "big.png").stat().st_size
    monkeypatch.setenv("LDMTOOL_MAX_FILE_BYTES", str(size - 1))
    with pytest.raises(ItemError, match=rf"big.png: the file is {size} bytes, over the limit of {size - 1}"):
        read_image(tmp_path / "big.png")
    monkeypatch.setenv("LDMTOOL_MAX_FILE_BYTES", str(size))
    assert read_image(tmp_path / "big.png").size == (64, 64)


def test_input_hash_refuses_special_files(tmp_path):
    from ldmtool.runtime.identity import file_sha256

    os.mkfifo(tmp_path / "y.png")
    with pytest.raises(OSError, match="not a regular file"):
        file_sha256(tmp_path / "y.png")


def test_derive_seed_keeps_utf8_seeds_and_takes_any_bytes():
    assert derive_seed(7, "photos/été.png") == 1577244707  # today's value: existing runs keep their seeds
    assert derive_seed(7, "a.png") == 3301503724
    key = os.fsdecode(b"photos/" + NON_UTF8)
    seed = derive_seed(7, key)
    assert seed == derive_seed(7, key) and seed != derive_seed(7, "photos/café.png")


def test_non_utf8_name_is_processed_and_shown_escaped(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(os.path.join(os.fsencode(folder), NON_UTF8))
    Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / "plain.png")
    result = _run(tmp_path, "in", "-o", "out", "--json", "--seed", "5")
    _no_traceback(result)
    assert result.returncode == 0, result.stderr.decode()
    events = _events(result.stdout)
    key = os.fsdecode(NON_UTF8)
    assert set(events) == {key, "plain.png"} and events[key]["event"] == "done"
    assert events[key]["seed"] == derive_seed(5, key)
    assert os.path.exists(os.path.join(os.fsencode(tmp_path / "out"), NON_UTF8))
    manifest = (tmp_path / "out" / "ldmtool-manifest.jsonl").read_bytes().decode("utf-8")  # valid UTF-8
    assert any(json.loads(line).get("key") == key for line in manifest.splitlines())
    # the second run resumes: the existing output is found and skipped
    again = _run(tmp_path, "in", "-o", "out", "--json", "--seed", "5")
    _no_traceback(again)
    assert again.returncode == 0 and _events(again.stdout)[key]["event"] == "skipped"
    # and replays: the recipe keeps the name's exact bytes beside its escaped text
    output = os.path.join(os.fsencode(tmp_path / "out"), NON_UTF8)
    environment = dict(os.environ, LDMTOOL_TEST_COMMANDS="1", LDMTOOL_CACHE=str(tmp_path / "cache"))
    replay = subprocess.run([sys.executable, "-m", "ldmtool", "replay", os.fsdecode(output), "-o", "again.png",
                             "--verify"], cwd=tmp_path, capture_output=True, timeout=60, env=environment)
    _no_traceback(replay)
    assert replay.returncode == 0, replay.stderr.decode()
    assert (tmp_path / "again.png").is_file()


def test_non_utf8_name_failure_message_is_escaped(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "plain.png").write_bytes(b"")
    with open(os.path.join(os.fsencode(folder), NON_UTF8), "wb") as handle:
        handle.write(b"not an image")
    result = _run(tmp_path, "in", "-o", "out", "--json")
    _no_traceback(result)
    assert result.returncode == 1
    stderr = result.stderr.decode("utf-8")  # valid UTF-8, the odd byte shown as \xe9
    assert "caf\\xe9.png: not an image file" in stderr


def _write(folder: Path, name: bytes, data: bytes) -> None:
    folder.mkdir(exist_ok=True)
    with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
        handle.write(data)


@pytest.mark.parametrize(("name", "escaped"), [(b"bad\nname.png", "bad\\nname.png"), (NON_UTF8, "caf\\xe9.png")])
def test_a_failure_names_an_odd_file_once_on_one_line(tmp_path, name, escaped):
    _write(tmp_path / "in", name, b"\x89PNG not really")
    _write(tmp_path / "in", b"read\nme.txt", b"text")
    result = _run(tmp_path, "in", "-o", "out")
    _no_traceback(result)
    assert result.returncode == 1
    lines = result.stderr.decode("utf-8").splitlines()
    assert f"ldmtool: failed: in/{escaped}: not an image file (unknown format, or the header is damaged)" in lines
    assert "ldmtool: skipped 1 non-image file(s): in/read\\nme.txt" in lines


def test_a_collision_and_a_dry_run_show_odd_names_on_one_line(tmp_path):
    image = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(image)
    _write(tmp_path / "in", b"x\ny.png", image.read_bytes())
    _write(tmp_path / "in", b"x\ny.jpg", image.read_bytes())
    clash = _run(tmp_path, "in", "-o", "out")
    _no_traceback(clash)
    assert clash.returncode == 2
    assert clash.stderr.decode("utf-8").startswith(
        "ldmtool: error: in/x\\ny.jpg and in/x\\ny.png would both be written to out/x\\ny.png; add {seed}")
    os.remove(os.path.join(os.fsencode(tmp_path / "in"), b"x\ny.jpg"))
    dry = _run(tmp_path, "in", "-o", "out", "--dry-run", "--seed", "1")
    _no_traceback(dry)
    assert dry.returncode == 0
    assert dry.stdout.decode("utf-8").splitlines()[0].startswith("run  in/x\\ny.png -> out/x\\ny.png (seed ")


def test_output_name_too_long_fails_that_item_only(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    long_stem = "a" * 240
    Image.new("RGB", (4, 4)).save(folder / f"{long_stem}.png")
    Image.new("RGB", (4, 4)).save(folder / "short.png")
    result = _run_here(tmp_path, monkeypatch, "in", "-o", "out", "--json", "--name", "{stem}-upscaled-{seed}.{ext}")
    _no_traceback(result)
    assert result.returncode == 1, result.stderr.decode()
    events = _events(result.stdout)
    assert events["short.png"]["event"] == "done"
    bad = events[f"{long_stem}.png"]
    assert bad["event"] == "failed" and "name too long" in bad["error"].lower(), bad
    failed = [line for line in result.stderr.decode().splitlines() if line.startswith("ldmtool: failed: ")]
    assert len(failed) == 1


def test_an_output_name_up_to_the_file_system_limit_is_written(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    stem = "b" * 251  # 255 bytes with ".png": the temporary name falls back to a fixed-length digest
    Image.new("RGB", (4, 4)).save(folder / f"{stem}.png")
    result = _run_here(tmp_path, monkeypatch, "in", "-o", "out", "--json")
    _no_traceback(result)
    assert result.returncode == 0, result.stderr.decode()
    assert (tmp_path / "out" / f"{stem}.png").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".thumbs", f"{stem}.png", "index.html",
                                                                     "ldmtool-manifest.jsonl"]


def test_stale_temporary_file_of_a_long_name_is_removed(tmp_path):
    from ldmtool.io.writer import remove_stale_temps, temp_name

    output = tmp_path / ("c" * 250 + ".png")
    temp = temp_name(output)
    assert len(temp.name) <= 255
    dead = temp.with_name(temp.name.replace(f".{os.getpid()}.", ".999999999."))
    dead.write_bytes(b"partial")
    assert remove_stale_temps([output]) == 1 and not dead.exists()


def test_name_template_too_long_for_every_item_is_a_usage_error(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    result = _run_here(tmp_path, monkeypatch, "in", "-o", "out", "--name", "x" * 300 + "-{stem}.{ext}")
    _no_traceback(result)
    assert result.returncode == 2, result.stderr.decode()
    assert "too long" in result.stderr.decode()


# Every file a user names is read with the same guard as images: a FIFO is refused, never waited on, and
# /dev/zero is not read without end. The readers run in one child process with a timeout (one start-up and
# one import of ldmtool for all of them), so a regression fails the test instead of hanging it. The child
# announces each case before it runs it: a case that blocks or reads without end is the one it announced last.
_READERS = {
    "prompt file": "from ldmtool.pipelines.text import read_prompts; read_prompts(None, PATH)",
    "list file": "from ldmtool.io.discover import discover; discover(['@' + PATH])",
    "palette": "from ldmtool.pipelines.semantic2img import load_palette; load_palette(PATH)",
    "label map": "from ldmtool.pipelines.semantic2img import read_label_map; read_label_map(PATH, 182)",
    "layout": "from ldmtool.pipelines.layout2img import read_layout; read_layout(Path(PATH), 256, 256)",
    "config": "from ldmtool.checkpoints.config import load_config; load_config(PATH)",
    "metadata": "from ldmtool.io.metadata import read_metadata; read_metadata(PATH)",
}
_SPECIALS = ("fifo", "dev-zero")
_READER_CHILD = """
import json, sys
from pathlib import Path
from ldmtool.errors import LdmError
for reader, special, path, code in json.loads(sys.argv[1]):
    print(json.dumps({"start": [reader, special]}), flush=True)
    try:
        exec(code, {"PATH": path, "Path": Path})
        result = {"code": 0, "message": ""}
    except LdmError as err:
        result = {"code": 7, "message": str(err)}
    except Exception as err:  # any other failure is this case's, not the next one's
        result = {"code": 1, "message": f"{type(err).__name__}: {err}"}
    print(json.dumps({"case": [reader, special], **result}), flush=True)
"""


@pytest.fixture(scope="module")
def reader_results(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("special")
    cases = []
    for reader in sorted(_READERS):
        for special in _SPECIALS:
            path = folder / f"{reader.replace(' ', '-')}-{special}.yaml"  # a file of its own per case
            if special == "fifo":
                os.mkfifo(path)
            else:
                os.symlink("/dev/zero", path)
            cases.append((reader, special, str(path), _READERS[reader]))
    try:
        done = subprocess.run([sys.executable, "-c", _READER_CHILD, json.dumps(cases)], capture_output=True,
                              timeout=90, text=True)
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = "timed out"
    results, started = {}, None
    for line in stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = tuple(record["start"])
        else:
            results[tuple(record["case"])] = record
    return {"results": results, "last_started": started, "stderr": stderr}


@pytest.mark.parametrize("special", _SPECIALS)
@pytest.mark.parametrize("reader", sorted(_READERS))
def test_every_user_file_reader_refuses_special_files(reader_results, reader, special):
    result = reader_results["results"].get((reader, special))
    assert result is not None, (f"no answer: the child blocked or read without end at {reader_results['last_started']}"
                                f" ({reader_results['stderr'][-2000:]})")
    assert result["code"] == 7, result
    kind = "a FIFO" if special == "fifo" else "a character device"
    assert f"not a regular file ({kind})" in result["message"] and len(result["message"].splitlines()) == 1


@pytest.mark.parametrize("args, named", [
    ([b"txt2img", b"--prompt", b"a red \xff circle"], "--prompt: not UTF-8 text (character 7 is the byte 0xff)"),
    ([b"img2img", b"in.png", b"--negative", b"x\xfe"], "--negative: not UTF-8 text (character 2 is the byte 0xfe)"),
    ([b"txt2img", b"--prompts", b"prompts.jsonl"], "prompts.jsonl:2: 'prompt': not UTF-8 text (character 3 is a lone "
                                                   "surrogate U+D800)"),
])
def test_a_prompt_that_is_not_utf8_text_is_a_one_line_usage_error(tmp_path, args, named):
    """Bytes that are not UTF-8 in an argument arrive as lone surrogates, as a JSON \\ud800 escape does; no
    tokenizer takes them (it failed each item with an internal TypeError before)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "a \\ud800 b"}\n')
    environment = dict(os.environ, LDMTOOL_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path), PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-m", "ldmtool", *args, b"--steps", b"1", b"-o", b"out"], cwd=tmp_path,
                            capture_output=True, timeout=120, env=environment)
    _no_traceback(result)
    assert result.returncode == 2, result.stderr.decode()
    assert result.stderr.decode("utf-8").strip().splitlines() == [f"ldmtool: error: {named}"]
    assert not (tmp_path / "out").exists()


BOM = "\ufeff"


def test_a_byte_order_mark_starts_no_prompt_and_no_listed_path(tmp_path):
    """Notepad's UTF-8 files begin with a byte order mark: it made a JSON-lines prompt file plain text (the
    whole JSON line became the prompt) and the first path of an @list a file that does not exist."""
    from ldmtool.io.discover import discover
    from ldmtool.pipelines.text import read_prompts

    lines = tmp_path / "p.txt"
    lines.write_text(BOM + "a red fox\nblue bird\n", encoding="utf-8")
    assert [spec.prompt for spec in read_prompts(None, lines)] == ["a red fox", "blue bird"]
    records = tmp_path / "p.jsonl"
    records.write_text(BOM + json.dumps({"prompt": "a fox", "cfg": 3.0}) + "\n", encoding="utf-8")
    (spec,) = read_prompts(None, records)
    assert (spec.prompt, spec.cfg) == ("a fox", 3.0)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    listed = tmp_path / "list.txt"
    listed.write_text(BOM + "a.png\n", encoding="utf-8")
    (item,) = discover([f"@{listed}"]).items
    assert item.path == tmp_path / "a.png"
