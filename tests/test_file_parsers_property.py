"""Property-based tests of the file readers (issue 26): checkpoints (`.safetensors` headers, the
weights-only `.ckpt` loader), layout files and palettes. Every file gives the right content or one ldmtool
error with a one-line message naming the file, within bounded time and memory, and no pickle runs code.

Profiles are set in conftest.py; `benchmarks/property_long.sh` runs these with many more examples.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, strategies as st

from ldmtool.checkpoints.files import read_safetensors_metadata, read_state_dict, save_safetensors
from ldmtool.errors import CheckpointError, ItemError, UsageError
from ldmtool.pipelines.layout2img import layout_objects, read_layout
from ldmtool.pipelines.layout_tokens import LayoutObject
from ldmtool.pipelines.semantic2img import load_palette
from property_checks import assert_clear, bounded

DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DEEP_YAML = 1500  # past the recursion limit: PyYAML's composer raises RecursionError (it takes seconds)
CALLS: list[str] = []  # what a pickle's payload ran (must stay empty)
# corrupt legacy pickles make torch warn about their protocol before failing
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


def _record_call(what: str) -> str:
    CALLS.append(what)
    return what


class _RunsCode:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _record_call, ("the payload ran",)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prop-files")


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: float | None) -> bytes:
    """`data` with bytes overwritten at (position, value) pairs, then cut to the fraction `cut` of its length."""
    buffer = bytearray(data)
    for position, value in edits:
        if buffer:
            buffer[position % len(buffer)] = value
    return bytes(buffer[:int(len(buffer) * cut)] if cut is not None else buffer)


EDITS = st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6)
CUT = st.none() | st.floats(0, 1)


# ---------------------------------------------------------------- safetensors


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A small file whose header entries are valid, nearly valid or junk; returns (file, header)."""
    data_len = draw(st.integers(0, 64))
    header: dict[str, Any] = {}
    for index in range(draw(st.integers(0, 3))):
        entry: Any = {
            "dtype": draw(st.sampled_from(sorted(DTYPES)) | st.text(max_size=4)),
            "shape": draw(st.lists(st.integers(0, 4) | st.integers(-2, 2**64), max_size=3)),
            "data_offsets": draw(st.lists(st.integers(0, data_len) | st.integers(-1, 2**64), min_size=0, max_size=3)),
        }
        if draw(st.booleans()):
            entry = draw(JSON)
        header[draw(st.text(max_size=6)) + str(index)] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | JSON)
    text = json.dumps(header).encode() if draw(st.booleans()) else draw(st.binary(max_size=40))
    length = draw(st.just(len(text)) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + text + draw(st.binary(min_size=data_len, max_size=data_len)), header


@given(safetensors_bytes())
def test_safetensors_headers_load_correctly_or_give_a_checkpoint_error(scratch: Path, case: tuple[bytes, Any]) -> None:
    data, header = case
    path = scratch / "model.safetensors"
    path.write_bytes(data)
    outcome = bounded(lambda: read_state_dict(path))
    if isinstance(outcome, dict):
        assert set(outcome) == set(header) - {"__metadata__"}
        for key, tensor in outcome.items():
            start, end = header[key]["data_offsets"]
            assert list(tensor.shape) == header[key]["shape"]
            assert tensor.numel() * DTYPES[header[key]["dtype"]] == end - start
    else:
        assert_clear(outcome, CheckpointError, str(path))
    metadata = bounded(lambda: read_safetensors_metadata(path))
    if isinstance(metadata, dict):
        assert all(isinstance(v, str) for v in metadata.values())
    else:
        assert_clear(metadata, CheckpointError, str(path))


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.lists(st.integers(0, 3), max_size=3), max_size=3),
       st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]), EDITS, CUT)
def test_safetensors_round_trip_and_mutations(scratch: Path, shapes: dict[str, list[int]], dtype: torch.dtype,
                                              edits: list[tuple[int, int]], cut: float | None) -> None:
    state = {key: torch.arange(int(torch.tensor(shape).prod())).reshape(shape).to(dtype) for key, shape in shapes.items()}
    path = scratch / "saved.safetensors"
    save_safetensors(state, path, {"note": "x"})
    if state:
        loaded = read_state_dict(path)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    path.write_bytes(_mutate(path.read_bytes(), edits, cut))
    outcome = bounded(lambda: read_state_dict(path))
    if isinstance(outcome, dict):
        assert all(isinstance(v, torch.Tensor) for v in outcome.values())
    else:
        assert_clear(outcome, CheckpointError, str(path))


def test_regression_safetensors_header_length_past_the_end_is_refused_before_reading(scratch: Path) -> None:
    path = scratch / "huge-header.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    assert_clear(bounded(lambda: read_state_dict(path), peak_bytes=1 << 20), CheckpointError, "header runs past the end")


# ---------------------------------------------------------------- pickle checkpoints


def _saved(obj: object, zip_format: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


CHECKPOINTS = {
    "lightning": {"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}, "epoch": 3},
    "plain": {"w": torch.ones(3, dtype=torch.float16)},
    "payload": {"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode()},
}


@given(st.sampled_from(sorted(CHECKPOINTS)), st.booleans(), EDITS, CUT, st.sampled_from([".ckpt", ".pt"]))
def test_pickle_checkpoints_load_or_give_a_checkpoint_error_and_never_run_code(
        scratch: Path, name: str, zip_format: bool, edits: list[tuple[int, int]], cut: float | None, suffix: str) -> None:
    path = scratch / f"model{suffix}"
    data = _saved(CHECKPOINTS[name], zip_format)
    path.write_bytes(_mutate(data, edits, cut))
    outcome = bounded(lambda: read_state_dict(path), seconds=10)
    assert CALLS == []
    if isinstance(outcome, dict):
        assert outcome and all(isinstance(v, torch.Tensor) for v in outcome.values())
        if not edits and cut is None:
            expected = CHECKPOINTS[name].get("state_dict", CHECKPOINTS[name])
            assert outcome.keys() == expected.keys() and all(torch.equal(outcome[k], expected[k]) for k in expected)
    else:
        assert_clear(outcome, CheckpointError, str(path))
        if name == "payload" and not edits and cut is None:
            assert "never runs" in str(outcome)
        if name != "payload" and not edits and cut is None:
            pytest.fail(f"an intact checkpoint was refused: {outcome}")


def test_regression_every_cut_and_zeroed_byte_of_a_legacy_checkpoint(scratch: Path) -> None:
    # a legacy (non-zip) file cut after its magic number raised struct.error, and some zeroed bytes an
    # AssertionError inside torch ('storage key ... not found'), instead of a CheckpointError
    data = _saved(CHECKPOINTS["lightning"], zip_format=False)
    path = scratch / "legacy.ckpt"
    for variant in [data[:cut] for cut in range(len(data))] + [_mutate(data, [(i, 0)], None) for i in range(len(data))]:
        path.write_bytes(variant)
        try:
            loaded = read_state_dict(path)
        except CheckpointError as err:
            assert_clear(err, CheckpointError, str(path))
        else:
            assert all(isinstance(v, torch.Tensor) for v in loaded.values())


def test_regression_zip_end_record_naming_another_disk(scratch: Path) -> None:
    # zipfile.is_zipfile raised BadZipFile ('zipfiles that span multiple disks are not supported')
    data = bytearray(_saved(CHECKPOINTS["lightning"], zip_format=True))
    locator = data.rfind(b"PK\x06\x07")  # the zip64 end of central directory locator; +4: its disk number
    data[locator + 4] = 1
    path = scratch / "multi-disk.ckpt"
    path.write_bytes(bytes(data))
    assert_clear(bounded(lambda: read_state_dict(path)), CheckpointError, str(path))


@given(st.binary(max_size=300) | st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x80\x02\x8a\x0alp\xfc\x9cF\xf9 j\xa8P\x19."]))
def test_random_bytes_named_ckpt(scratch: Path, data: bytes) -> None:
    path = scratch / "random.ckpt"
    path.write_bytes(data)
    outcome = bounded(lambda: read_state_dict(path))
    assert CALLS == []
    if not isinstance(outcome, dict):
        assert_clear(outcome, CheckpointError, str(path))


# ---------------------------------------------------------------- layouts


BOX = st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)).filter(
    lambda b: b[0] < b[2] and b[1] < b[3])


@given(st.lists(st.tuples(st.sampled_from(["Cat", "Dog", "Tree", "Car"]), BOX), min_size=1, max_size=4),
       st.sampled_from([(256, 256), (512, 384)]))
def test_layout_boxes_round_trip_as_fractions(objects: list[tuple[str, tuple[float, ...]]], size: tuple[int, int]) -> None:
    width, height = size
    doc = {"units": "pixels", "objects": [{"label": label, "box": [box[0] * width, box[1] * height, box[2] * width,
                                                                   box[3] * height]} for label, box in objects]}
    parsed = layout_objects(doc, "layout.json", width, height)
    assert len(parsed) == len(objects)
    for got, (_, box) in zip(parsed, objects):
        assert got.box == pytest.approx(box, abs=1e-9)


@given(JSON | st.fixed_dictionaries({"objects": st.lists(st.fixed_dictionaries(
    {"label": st.sampled_from(["Cat", "cat", "Kat"]) | JSON, "box": st.lists(st.floats() | st.integers(), max_size=5) | JSON}),
    max_size=3)}, optional={"units": st.sampled_from(["pixels", "relative", "inches"]), "size": JSON}))
def test_layout_documents_give_objects_or_an_item_error(doc: Any) -> None:
    outcome = bounded(lambda: layout_objects(doc, "layout.json", 256, 256))
    if isinstance(outcome, list):
        for obj in outcome:
            assert isinstance(obj, LayoutObject)
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    else:
        assert_clear(outcome, ItemError, "layout.json")


@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()), st.sampled_from([".json", ".yaml"]))
def test_layout_files_of_any_bytes(scratch: Path, data: bytes, suffix: str) -> None:
    path = scratch / f"layout{suffix}"
    path.write_bytes(data)
    outcome = bounded(lambda: read_layout(path, 256, 256))
    if not isinstance(outcome, list):
        assert_clear(outcome, ItemError, str(path))


@pytest.mark.parametrize("suffix, text", [
    (".json", "[" * 100_000), (".yaml", "[" * DEEP_YAML), (".json", '{"objects": [{"label": "Cat", "box": [0, 0, 1' + "0" * 400 + ", 1]}]}"),
    (".yaml", "objects: [{label: Cat, box: [.nan, 0, 1, 1]}]"), (".json", "[" + "1" * 5000 + "]")])
def test_regression_layouts_that_raised_or_passed(scratch: Path, suffix: str, text: str) -> None:
    # deep nesting: RecursionError; a 401-digit int: OverflowError in float(); a NaN box was accepted;
    # 5000 digits: ValueError from json
    path = scratch / f"bad{suffix}"
    path.write_text(text)
    assert_clear(bounded(lambda: read_layout(path, 256, 256), peak_bytes=None), ItemError, str(path))


# ---------------------------------------------------------------- palettes


@given(st.dictionaries(st.integers(0, 10**6), st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
                       min_size=1, max_size=6), st.booleans(), st.booleans())
def test_palettes_round_trip(scratch: Path, classes: dict[int, tuple[int, int, int]], as_hex: bool, wrapped: bool) -> None:
    path = scratch / "palette.yaml"
    doc: dict[Any, Any] = {k: "#{:02x}{:02x}{:02x}".format(*c) if as_hex else list(c) for k, c in classes.items()}
    path.write_text(yaml.safe_dump({"palette": doc} if wrapped else doc))
    outcome = bounded(lambda: load_palette(path))
    if len(set(classes.values())) == len(classes):
        assert outcome == {colour: k for k, colour in classes.items()}
    else:
        assert_clear(outcome, UsageError, str(path), "same colour")


@given(st.binary(max_size=200) | JSON.map(lambda v: yaml.safe_dump(v).encode()))
def test_palette_files_of_any_bytes(scratch: Path, data: bytes) -> None:
    path = scratch / "any-palette.yaml"
    path.write_bytes(data)
    outcome = bounded(lambda: load_palette(path))
    if isinstance(outcome, dict):
        assert all(isinstance(k, tuple) and len(k) == 3 and isinstance(v, int) and v >= 0 for k, v in outcome.items())
    else:
        assert_clear(outcome, UsageError, str(path))


def test_regression_palette_nested_too_deep(scratch: Path) -> None:
    path = scratch / "deep-palette.yaml"
    path.write_text("[" * DEEP_YAML)
    assert_clear(bounded(lambda: load_palette(path), peak_bytes=None), UsageError, str(path))


def test_regression_legacy_pickle_declaring_a_huge_string_allocates_only_the_file(scratch: Path) -> None:
    # a BINUNICODE opcode whose 4-byte length says 4 GiB made the unpickler's read() allocate that much
    path = scratch / "declares-4GiB.ckpt"
    header = _saved({"w": torch.zeros(1)}, zip_format=False)[:10]  # the legacy magic number's pickle starts it
    path.write_bytes(header[:2] + b"X" + struct.pack("<I", 2**32 - 1) + b"abc")
    assert_clear(bounded(lambda: read_state_dict(path), peak_bytes=8 << 20), CheckpointError, str(path))


# ---------------------------------------------------------------- CompVis YAML configs


@given(st.binary(max_size=200) | JSON.map(lambda v: yaml.safe_dump(v).encode())
       | st.dictionaries(st.sampled_from(["model", "target", "params"]), JSON, max_size=3).map(
           lambda v: yaml.safe_dump(v).encode()))
def test_config_files_give_a_model_block_or_a_checkpoint_error(scratch: Path, data: bytes) -> None:
    from ldmtool.checkpoints.config import load_config

    path = scratch / "config.yaml"
    path.write_bytes(data)
    outcome = bounded(lambda: load_config(path))
    if isinstance(outcome, dict):
        assert "target" in outcome["model"]
    else:
        assert_clear(outcome, CheckpointError, str(path))


@pytest.mark.parametrize("data", [b"\xff\xfe", b"[" * DEEP_YAML])
def test_regression_config_bad_utf8_or_nested_too_deep(scratch: Path, data: bytes) -> None:
    # both raised raw UnicodeDecodeError / RecursionError
    from ldmtool.checkpoints.config import load_config

    path = scratch / "bad-config.yaml"
    path.write_bytes(data)
    assert_clear(bounded(lambda: load_config(path), peak_bytes=None), CheckpointError, str(path))
