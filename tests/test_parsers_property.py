"""Property-based tests of the option and text-file parsers (issue 26): every input gives the right value
or one ldmtool error with a one-line message naming the problem, within bounded time and memory.

Profiles are set in conftest.py; `benchmarks/property_long.sh` runs these with many more examples.
Checkpoint readers are in test_checkpoint_parsers_property.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import assume, given, strategies as st

from ldmtool.errors import UsageError
from ldmtool.io.discover import Discovery, Item, discover, generated_items
from ldmtool.io.files import positive_int_env
from ldmtool.io.manifest import Manifest, read_manifest
from ldmtool.io.outputs import NAME_MAX, OutputSpec, check_template, plan_outputs
from ldmtool.pipelines.text import PromptSpec, read_prompts
from ldmtool.runtime.cache import parse_bytes
from ldmtool.runtime.seeds import SEED_LIMIT, item_seed
from ldmtool.runtime.shard import Shard, parse_shard
from ldmtool.tiling.memory import parse_memory
from ldmtool.tiling.seamless import Seamless, parse_seamless
from property_checks import assert_clear, bounded

UNITS = {"": 1, "b": 1, "k": 2**10, "KB": 2**10, "KiB": 2**10, "m": 2**20, "MB": 2**20, "MiB": 2**20,
         "g": 2**30, "GB": 2**30, "GiB": 2**30, "T": 2**40, "tb": 2**40, "TiB": 2**40}
SIZE_CHARS = "0123456789.eE+- \t\nkKmMgGtTiIbBx"
# JSON values of every kind, nested a little (deep nesting has its own regression tests below).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
LINE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=40)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per module (hypothesis runs many examples per test; each overwrites its own files)."""
    return tmp_path_factory.mktemp("prop")


# ---------------------------------------------------------------- sizes, shards, axes, limits


@given(st.text(SIZE_CHARS, max_size=30) | st.text(max_size=30))
def test_parse_memory_gives_bytes_or_a_usage_error(text: str) -> None:
    outcome = bounded(lambda: parse_memory(text))
    if isinstance(outcome, int):
        assert outcome >= 1
    else:
        assert_clear(outcome, UsageError, "--max-memory")


@given(st.integers(1, 2**80), st.sampled_from(sorted(UNITS)), st.sampled_from(["", " "]))
def test_parse_memory_round_trips_exactly(number: int, unit: str, space: str) -> None:
    assert parse_memory(f"{number}{space}{unit}") == number * UNITS[unit]


@given(st.integers(0, 2**20), st.integers(0, 999), st.sampled_from(["k", "MiB", "g"]))
def test_parse_memory_fractions_are_exact(whole: int, thousandths: int, unit: str) -> None:
    assume(whole or thousandths)
    expected = (whole * 1000 + thousandths) * UNITS[unit] // 1000
    outcome = bounded(lambda: parse_memory(f"{whole}.{thousandths:03d}{unit}"))
    if expected:
        assert outcome == expected
    else:
        assert_clear(outcome, UsageError, "more than zero")


@given(st.text(SIZE_CHARS, max_size=30) | st.text(max_size=30))
def test_parse_bytes_gives_bytes_or_a_usage_error(text: str) -> None:
    outcome = bounded(lambda: parse_bytes(text))
    if isinstance(outcome, int):
        assert 0 <= outcome < 2**63
    else:
        assert_clear(outcome, UsageError, repr(text))


@given(st.integers(0, 2**64), st.sampled_from(sorted(UNITS)))
def test_parse_bytes_round_trips_exactly(number: int, unit: str) -> None:
    outcome = bounded(lambda: parse_bytes(f"{number}{unit}"))
    if number * UNITS[unit] < 2**63:
        assert outcome == number * UNITS[unit]
    else:
        assert_clear(outcome, UsageError, "too large")


@pytest.mark.parametrize("text", ["1e400", "1e999999999", "9" * 400 + "GB"])
def test_regression_huge_sizes_are_usage_errors_not_overflow(text: str) -> None:
    # float('1e400') is infinity, and int(infinity) raised OverflowError; '1e999999999' must not become an int
    assert_clear(bounded(lambda: parse_bytes(text)), UsageError, "too large")
    assert parse_memory("9" * 400) == int("9" * 400)  # exact, no OverflowError


@given(st.text("0123456789/ \t", max_size=12) | st.text(max_size=12)
       | st.tuples(st.integers(0, 10**25), st.integers(0, 10**25)).map(lambda kn: f"{kn[0]}/{kn[1]}"))
def test_parse_shard_gives_a_shard_or_a_usage_error(text: str) -> None:
    outcome = bounded(lambda: parse_shard(text))
    if isinstance(outcome, Shard):
        assert 1 <= outcome.index <= outcome.count
        assert parse_shard(str(outcome)) == outcome
    else:
        assert_clear(outcome, UsageError, "--shard")


@given(st.integers(1, 10**6).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))), st.text(max_size=20))
def test_shard_round_trip_and_exactly_one_owner(kn: tuple[int, int], key: str) -> None:
    index, count = kn
    assert parse_shard(f" {index} / {count} ") == Shard(index, count)
    owners = [k for k in range(1, min(count, 50) + 1) if Shard(k, count).owns(key)]
    assert len(owners) <= 1 and (owners or count > 50)


def test_regression_shard_with_thousands_of_digits() -> None:
    # int() of over 4300 digits raised ValueError; a K outside 1..N printed the raw text (newlines too)
    assert_clear(bounded(lambda: parse_shard("1/" + "9" * 5000)), UsageError, "K/N")
    assert_clear(bounded(lambda: parse_shard("0/3\n")), UsageError, "--shard 0/3")


@given(st.text(max_size=6) | st.sampled_from(["x", "Y", " xy ", "yx", "xx", ""]))
def test_parse_seamless(text: str) -> None:
    outcome = bounded(lambda: parse_seamless(text))
    if isinstance(outcome, Seamless):
        value = text.strip().lower()
        assert (outcome.x, outcome.y) == ("x" in value, "y" in value)
    else:
        assert_clear(outcome, UsageError, "--seamless")


@given(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=25)
       | st.integers(-5, 10**30).map(str))
def test_positive_int_env(raw: str) -> None:
    with mock.patch.dict(os.environ, {"LDMTOOL_PROP_LIMIT": raw}):
        outcome = bounded(lambda: positive_int_env("LDMTOOL_PROP_LIMIT", 7, "bytes"))
    if not raw:
        assert outcome == 7
    elif isinstance(outcome, int):
        assert outcome == int(raw) >= 1
    else:
        assert_clear(outcome, UsageError, "LDMTOOL_PROP_LIMIT")


@given(st.integers(0, SEED_LIMIT - 1), st.integers(0, 10**6), st.text(max_size=20), st.none() | st.integers(0, 10**6))
def test_item_seeds_are_32_bit_and_stable(base: int, offset: int, key: str, own: int | None) -> None:
    key = os.fsdecode(os.fsencode(key.encode("utf-8", "replace").decode("utf-8")))  # as keys come from names
    for seed in (item_seed(base, key=key, offset=offset), item_seed(base, key=key)):
        assert 0 <= seed < SEED_LIMIT
    assert item_seed(base, key=key) == item_seed(base, key=key)
    assert item_seed(base, key=key, own=own) == (own if own is not None else item_seed(base, key=key))


# ---------------------------------------------------------------- name templates


TEMPLATE = st.lists(st.sampled_from(list("{}:>.!/0123456789abcdrsx_-") + ["{stem}", "{index:04d}", "{seed}",
                                                                           "{ext}", "..", "\x00", "é"]),
                    max_size=12).map("".join)


@given(TEMPLATE | st.text(max_size=16))
def test_check_template_refuses_clearly_and_never_allocates_much(template: str) -> None:
    outcome = bounded(lambda: check_template(template), peak_bytes=1 << 20)
    if outcome is not None:
        assert_clear(outcome, UsageError, "--name")


@given(TEMPLATE, st.lists(st.text(max_size=30), min_size=1, max_size=4), st.integers(0, SEED_LIMIT - 1))
def test_rendered_names_stay_in_the_output_folder(scratch: Path, template: str, prompts: list[str], seed: int) -> None:
    folder = scratch / "out"
    items = generated_items(prompts)
    outcome = bounded(lambda: plan_outputs(items, [seed + i for i in range(len(items))], OutputSpec(folder, template)),
                      peak_bytes=1 << 20)
    if isinstance(outcome, UsageError):
        assert_clear(outcome, UsageError)
        return
    root = folder.resolve()
    for path in outcome:
        assert root in path.resolve().parents
        assert len(os.fsencode(path.name)) <= NAME_MAX + 5  # + '.png' added after the template's check


@given(st.lists(st.text(max_size=60), min_size=1, max_size=5))
def test_a_prompt_never_adds_folders_to_the_default_name(scratch: Path, prompts: list[str]) -> None:
    folder = scratch / "out"
    paths = plan_outputs(generated_items(prompts), list(range(len(prompts))), OutputSpec(folder))
    assert [p.parent for p in paths] == [folder] * len(prompts)
    assert all("/" not in p.name and p.suffix == ".png" for p in paths)


@pytest.mark.parametrize("template", ["{stem:>100000000}", "{index:0100000000d}", "{index:{seed}}", "a\x00{stem}"])
def test_regression_template_refused_before_rendering(template: str) -> None:
    # a huge width was rendered (100 MB) before the length check; '{index:{seed}}' took its width from each
    # item's seed at render time; a NUL reached Path.resolve() as a ValueError
    assert_clear(bounded(lambda: check_template(template), peak_bytes=1 << 20), UsageError, "--name")
    check_template("{stem:>" + "0" * 5000 + "9}")  # width 9: fine (the width check must not int() 5000 digits)


# ---------------------------------------------------------------- manifests


RECORD = st.dictionaries(st.text(max_size=10), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8), max_size=5)


@given(st.binary(max_size=300), st.lists(RECORD, max_size=3))
def test_manifest_records_read_back_after_any_cut_off_tail(scratch: Path, garbage: bytes, records: list[dict]) -> None:
    path = scratch / "m" / "ldmtool-manifest.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(garbage)
    before = bounded(lambda: list(read_manifest(path)))
    assert isinstance(before, list) and all(isinstance(r, dict) for r in before)
    for record in records:
        Manifest(path).append(record)
    after = list(read_manifest(path))
    assert after[len(after) - len(records):] == records  # appended records come back equal, in order


def test_regression_manifest_of_deep_json_is_skipped(scratch: Path) -> None:
    path = scratch / "deep.jsonl"
    path.write_text("[" * 100_000 + "\n" + json.dumps({"key": "a"}) + "\n")
    assert list(read_manifest(path)) == [{"key": "a"}]


# ---------------------------------------------------------------- prompt files


PROMPT = st.builds(
    lambda p, n, s, st_, c, w, h: {k: v for k, v in dict(prompt=p, negative=n, seed=s, steps=st_, cfg=c, width=w,
                                                          height=h).items() if v is not None},
    st.text(max_size=30), st.none() | st.text(max_size=10), st.none() | st.integers(0, SEED_LIMIT - 1),
    st.none() | st.integers(1, 200), st.none() | st.floats(0, 30), st.none() | st.integers(1, 4096),
    st.none() | st.integers(1, 4096))


@given(st.lists(PROMPT, min_size=1, max_size=5))
def test_jsonl_prompts_round_trip(scratch: Path, records: list[dict]) -> None:
    path = scratch / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert read_prompts(None, path) == [PromptSpec(**r) for r in records]


@given(st.lists(JSON.map(json.dumps) | LINE, min_size=0, max_size=5), st.sampled_from([".jsonl", ".txt"]))
def test_prompt_files_give_prompts_or_a_usage_error_naming_the_line(scratch: Path, lines: list[str], suffix: str) -> None:
    path = scratch / f"prompts{suffix}"
    path.write_text("\n".join(lines), encoding="utf-8")
    outcome = bounded(lambda: read_prompts(None, path))
    kept = [line.strip() for line in "\n".join(lines).split("\n") if line.strip() and not line.strip().startswith("#")]
    if isinstance(outcome, list):
        assert len(outcome) == len(kept)
        if suffix == ".txt" and not kept[0].startswith("{"):
            assert [spec.prompt for spec in outcome] == kept
    else:
        assert_clear(outcome, UsageError, str(path))


@given(st.binary(max_size=200))
def test_prompt_files_of_random_bytes(scratch: Path, data: bytes) -> None:
    path = scratch / "random.txt"
    path.write_bytes(data)
    outcome = bounded(lambda: read_prompts(None, path))
    if not isinstance(outcome, list):
        assert_clear(outcome, UsageError, str(path))


@pytest.mark.parametrize("line", ["[" * 100_000, '{"prompt": "a", "seed": ' + "1" * 5000 + "}",
                                  '{"prompt": "a", "cfg": NaN}', '{"prompt": "a", "cfg": 1e999}'])
def test_regression_jsonl_lines_that_raised_or_passed(scratch: Path, line: str) -> None:
    # deep nesting raised RecursionError, a 5000-digit number ValueError; NaN/infinite cfg was accepted
    path = scratch / "bad.jsonl"
    path.write_text(line + "\n")
    assert_clear(bounded(lambda: read_prompts(None, path)), UsageError, f"{path}:1")


def test_regression_prompt_file_that_is_a_fifo_is_refused(scratch: Path) -> None:
    fifo = scratch / "prompts.fifo"
    os.mkfifo(fifo)
    try:
        assert_clear(bounded(lambda: read_prompts(None, fifo)), UsageError, "FIFO")
    finally:
        fifo.unlink()


# ---------------------------------------------------------------- @list files


@given(st.lists(LINE, max_size=6) | st.binary(max_size=100).map(lambda b: [b.decode("latin-1")]))
def test_list_files_give_items_or_a_usage_error(scratch: Path, lines: list[str]) -> None:
    base = scratch / "lists" / "a" / "b"  # '..' lines stay inside scratch
    base.mkdir(parents=True, exist_ok=True)
    for name in ("img2.png", "img10.png"):
        (base / name).write_bytes(b"")
    listing = base / "list.txt"
    listing.write_bytes("\n".join(line.replace("/", "_").replace("~", "_") for line in lines).encode("utf-8", "surrogateescape"))
    outcome = bounded(lambda: discover([f"@{listing}"]))
    if isinstance(outcome, Discovery):
        assert outcome.items and all(isinstance(item, Item) for item in outcome.items)
    else:
        assert_clear(outcome, UsageError)


@given(st.lists(st.integers(0, 10**30), min_size=1, max_size=6, unique=True), st.sampled_from(["0123456789", "٠١٢٣٤٥٦٧٨٩"]))
def test_list_items_sort_by_number(scratch: Path, numbers: list[int], digits: str) -> None:
    def name(n: int) -> str:
        return "img" + "".join(digits[int(c)] for c in str(n)) + ".png"

    listing = scratch / "numbers.txt"
    listing.write_text("\n".join(name(n) for n in numbers), encoding="utf-8")
    keys = [item.key for item in discover([f"@{listing}"]).items]
    assert keys == [name(n) for n in sorted(numbers)]


@pytest.mark.parametrize("content", [b"\xff\xfe\n", "1\u00b22.png\n".encode(), b"a\x00b.png\n", b"9" * 5000 + b".png\n",
                                     b"\x01\r?\n"])
def test_regression_list_files_that_raised(scratch: Path, content: bytes) -> None:
    # bad UTF-8 raised UnicodeDecodeError; '1²2' (isdigit, not decimal) and 5000 digits raised ValueError
    # from int() in the natural sort; a NUL raised ValueError from Path.resolve(); a '\r' in a line that
    # matched no file went into the message as it was
    listing = scratch / "bad-list.txt"
    listing.write_bytes(content)
    outcome = bounded(lambda: discover([f"@{listing}"]))
    if not isinstance(outcome, Discovery):
        assert_clear(outcome, UsageError)


def test_regression_manifest_record_with_a_line_separator_in_a_string(scratch: Path) -> None:
    # read_manifest split on str.splitlines(), which also ends lines at U+2028/U+0085 inside JSON strings:
    # such a record (a prompt holding one) was lost, so a resumed run redid the item
    path = scratch / "sep" / "ldmtool-manifest.jsonl"
    records = [{"key": "a\u2028b", "prompt": "x\x85y\x1cz"}, {"key": "c"}]
    for record in records:
        Manifest(path).append(record)
    assert list(read_manifest(path)) == records


def test_regression_read_bounded_allocates_the_file_not_the_limit(scratch: Path) -> None:
    # read(limit + 1) made a 1 GiB buffer for every small input file
    from ldmtool.io.files import read_bounded

    path = scratch / "small.bin"
    path.write_bytes(b"abc")
    assert bounded(lambda: read_bounded(path), peak_bytes=1 << 20) == b"abc"
    assert bounded(lambda: read_bounded(path, limit=3), peak_bytes=1 << 20) == b"abc"
    with pytest.raises(OSError, match="over the limit of 2"):
        read_bounded(path, limit=2)


# ---------------------------------------------------------------- class names and numbers


@given(st.text(max_size=30) | st.integers(-5, 10**40).map(str) | st.sampled_from(["tench", "Tench ", "goldfish", "٣"]),
       st.sampled_from([10, 1000]))
def test_class_ids_are_in_range_or_a_usage_error(text: str, n_classes: int) -> None:
    from ldmtool.pipelines.sample import class_id, imagenet_names, normalize_name

    outcome = bounded(lambda: class_id(text, n_classes))
    if isinstance(outcome, int):
        assert 0 <= outcome < n_classes
        if not text.strip().isdecimal():
            assert normalize_name(imagenet_names()[outcome]) == normalize_name(text)
    else:
        assert_clear(outcome, UsageError, "--class")


def test_regression_class_number_of_thousands_of_digits() -> None:
    from ldmtool.pipelines.sample import class_id

    # int() of over 4300 digits raised ValueError; the message now shows the start of the number only
    assert_clear(bounded(lambda: class_id("9" * 5000, 1000)), UsageError, "classes 0 to 999")
    assert class_id("0" * 5000 + "7", 1000) == 7
