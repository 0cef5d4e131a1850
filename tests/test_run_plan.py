"""The run plan (issue 26): outputs too large for `--max-output-pixels` or for the memory are refused before
any work, with exit 2 and one line; `--json` gets a `plan` event before the items; a long run says its plan
on stderr even when stderr is not a terminal; output sizes of file tasks come from image headers only."""
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import run_cli
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.io.manifest import MANIFEST_NAME, read_manifest

FAST = ["--steps", "2", "--sampler", "euler"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, preset in (("celeba", "ldm-celebahq256"), ("sr", "ldm-bsr-sr")):
        paths[name] = folder / f"{name}.safetensors"
        save_tiny_checkpoint(paths[name], preset, seed=3, with_config=True)
    return paths


def _png(path, width, height):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _images(folder):
    return sorted(p.name for p in Path(folder).glob("*.png")) if Path(folder).is_dir() else []


# -- refusals at the start


def _peak_rss_kb(args, tmp_path):
    """Exit code, stderr and peak RSS (KiB) of `python -m ldmtool ARGS` run by a wrapper whose only child it
    is (RUSAGE_CHILDREN of the wrapper), under an address-space limit so that a run that grows cannot take
    the machine down."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "def limit():\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
        "done = subprocess.run([sys.executable, '-m', 'ldmtool', *sys.argv[1:]], preexec_fn=limit,\n"
        "                      capture_output=True, text=True, timeout=120)\n"
        "sys.stderr.write(done.stderr)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", wrapper, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=180)
    code, rss = done.stdout.split()
    return int(code), done.stderr, int(rss)


@pytest.fixture(scope="module")
def empty_rss(tmp_path_factory):
    """Peak RSS of a run refused as soon as it starts (a usage error in the runner, models imported)."""
    code, stderr, rss = _peak_rss_kb(["tile-synth", "--width", 64, "--height", 64, "--existing", "bogus", "-o", "out"],
                                     tmp_path_factory.mktemp("empty"))
    assert code == 2, stderr
    return rss


def test_a_huge_canvas_is_refused_at_once_without_growing(tmp_path, empty_rss):
    code, stderr, rss = _peak_rss_kb(["tile-synth", "--width", 100000, "--height", 100000, "-o", "out"], tmp_path)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "100000x100000 = 10000000000 pixels, over --max-output-pixels 268435456" in lines[0]
    assert rss < empty_rss + 150 * 1024, (rss, empty_rss)  # KiB: no canvas was ever allocated
    assert _images(tmp_path / "out") == []


def test_without_the_pixel_limit_the_memory_refuses_it(tmp_path, empty_rss):
    code, stderr, rss = _peak_rss_kb(["tile-synth", "--width", 100000, "--height", 100000, "--max-output-pixels", 0,
                                      "-o", "out"], tmp_path)
    assert code == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert "a 100000x100000 output needs about" in line and "of memory at its peak" in line
    assert "GB available on cpu; make the output smaller" in line
    assert rss < empty_rss + 150 * 1024, (rss, empty_rss)


def test_the_pixel_limit_is_an_option_and_counts_the_output(tmp_path, models):
    out = tmp_path / "out"
    result = run_cli("sample", "--model", models["celeba"], "--width", 64, "--height", 32, "--n", 3,
                     "--max-output-pixels", 2047, "-o", out, *FAST)
    assert result.exit_code == 2, result.output
    assert "sample-0000/0: the output would be 64x32 = 2048 pixels, over --max-output-pixels 2047" in result.output
    assert "give --max-output-pixels 2048 (0 = no limit)" in result.output
    assert _images(out) == []
    result = run_cli("sample", "--model", models["celeba"], "--width", 64, "--height", 32,
                     "--max-output-pixels", 2048, "-o", out, "--seed", 1, *FAST)
    assert result.exit_code == 0, result.output
    # Not part of the job's identity (it never changes pixels): a rerun with another limit resumes.
    result = run_cli("sample", "--model", models["celeba"], "--width", 64, "--height", 32, "--json",
                     "--max-output-pixels", 0, "-o", out, "--seed", 1, *FAST)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["skipped", "summary"], result.output


def test_an_input_too_large_for_the_pixel_limit_fails_alone_and_the_batch_goes_on(tmp_path, models, monkeypatch):
    """Sized from the header times the scale: the panorama of a folder fails on one line, the rest is written."""
    monkeypatch.chdir(tmp_path)
    Path("photos").mkdir()
    _png(tmp_path / "photos" / "big.png", 12, 10)  # x4: 48x40 = 1920 pixels
    _png(tmp_path / "photos" / "small.png", 8, 8)
    unlimited = ["superres", "photos", "--model", models["sr"], "--scale", 4, "-o", "out", "--seed", 1, *FAST]
    args = [*unlimited, "--max-output-pixels", 48 * 40 - 1]
    result = run_cli(*args, "--json")
    assert result.exit_code == 1, result.output
    reason = ("photos/big.png: the output would be 48x40 = 1920 pixels, over --max-output-pixels 1919; make it smaller, "
              "or give --max-output-pixels 1920 (0 = no limit) if this machine can hold it")
    assert [line for line in result.stderr.splitlines() if "big.png" in line] == [f"ldmtool: failed: {reason}"], \
        result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    by_key = {e["key"]: e for e in events if "key" in e}
    assert by_key["small.png"]["event"] == "done"
    assert by_key["big.png"]["event"] == "failed" and by_key["big.png"]["error"] == reason
    assert by_key["big.png"]["seconds"] == 0  # refused before anything was computed
    plan = next(e for e in events if e["event"] == "plan")
    assert plan["largest"] == [32, 32] and plan["items"] == 1  # the plan is of the items that run
    assert events[-1]["exit_code"] == 1
    assert _images("out") == ["small.png"]
    records = {r["key"]: r for r in read_manifest(Path("out", MANIFEST_NAME))}
    assert records["big.png"]["status"] == "failed" and records["small.png"]["status"] == "done"
    # The limit never changes pixels: written once without it, a rerun under it resumes (skips), not fails.
    assert run_cli(*unlimited, "--max-output-pixels", 0).exit_code == 0
    rerun = run_cli(*args, "--json")
    assert rerun.exit_code == 0, rerun.output
    assert [e["event"] for e in map(json.loads, rerun.stdout.splitlines())] == ["skipped", "skipped", "summary"]


def test_when_every_input_is_too_large_each_fails_on_one_line_and_nothing_loads(tmp_path, models, monkeypatch):
    from ldmtool.pipelines.engine import Engine

    monkeypatch.chdir(tmp_path)
    def refuse(self):
        raise AssertionError("a run whose every item is refused loaded the model")

    monkeypatch.setattr(Engine, "open", refuse)
    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png", 40, 30)
    args = ["superres", "a.png", "b.png", "--model", models["sr"], "--scale", 4, "--max-output-pixels", 1000,
            "-o", "out", *FAST]
    result = run_cli(*args)
    assert result.exit_code == 1, result.output
    *failed, summary = result.stderr.strip().splitlines()
    assert [line.split(":")[:3] for line in failed] == [["ldmtool", " failed", " a.png"],
                                                        ["ldmtool", " failed", " b.png"]], result.stderr
    assert summary.startswith("0 done, 0 skipped, 2 failed")
    assert "Traceback" not in result.output
    result = run_cli(*args, "--fail-fast")  # the first failure stops the run, as for any failed item
    assert result.exit_code == 1 and result.stderr.count("ldmtool: failed:") == 1, result.output


@pytest.mark.parametrize("known", ["before the model opens", "once it is open"])
def test_an_input_too_large_for_the_memory_fails_alone(tmp_path, models, monkeypatch, known):
    """Available memory simulated: 200 MB from the start, or only once the model is open (the plan made then,
    with the real weights, refuses what the first one let through)."""
    import ldmtool.pipelines.planning as planning
    from ldmtool.runtime.execution import JobRunner

    monkeypatch.chdir(tmp_path)
    available = [200 * 2**20 if known == "before the model opens" else 2**40]
    monkeypatch.setattr(planning, "available_host_memory", lambda: available[0])
    monkeypatch.setattr(planning, "resident_bytes", lambda: 0)
    open_model = JobRunner.open

    def opened(self):
        open_model(self)
        available[0] = 200 * 2**20

    monkeypatch.setattr(JobRunner, "open", opened)
    Image.new("RGB", (1000, 1000)).save(tmp_path / "huge.png")  # x4: 4000x4000, 288 MB of image buffers alone
    _png(tmp_path / "small.png", 8, 8)
    result = run_cli("superres", "huge.png", "small.png", "--model", models["sr"], "--scale", 4, "-o", "out", "--json",
                     *FAST)
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("ldmtool: failed")]
    assert line.startswith("ldmtool: failed: huge.png: a 4000x4000 output needs about ") and \
        line.endswith(" MB available on cpu; make the output smaller") and "more than the 200 MB" in line, line
    plan = next(e for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "plan")
    assert plan["largest"] == [32, 32] and plan["peak_memory"] < plan["available_memory"] == 200 * 2**20
    assert _images(tmp_path / "out") == ["small.png"]


def test_the_plan_describes_the_model_once_however_many_sizes_it_checks(tmp_path, models, monkeypatch):
    """Each output size over the memory is checked alone: the model file is still described (built on the meta
    device, ~0.3 s for SDXL) once, not once per size."""
    import ldmtool.checkpoints.api as api
    import ldmtool.pipelines.planning as planning

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(planning, "available_host_memory", lambda: 50 * 2**20)
    monkeypatch.setattr(planning, "resident_bytes", lambda: 0)
    calls = []
    describe = api.describe_model
    monkeypatch.setattr(api, "describe_model", lambda *args, **kwargs: calls.append(args) or describe(*args, **kwargs))
    for side in (400, 450, 500):  # x4: each over 50 MB
        Image.new("RGB", (side, side)).save(f"huge{side}.png")
    _png(tmp_path / "small.png", 8, 8)
    result = run_cli("superres", ".", "--model", models["sr"], "--scale", 4, "-o", "out", "--dry-run", *FAST)
    assert result.exit_code == 0 and "1 to run, 0 skipped, 3 would fail" in result.stdout, result.output
    assert len(calls) <= 1  # 0 when an earlier test in this process described the same file version


def test_an_input_whose_output_is_too_wide_for_webp_fails_unrun_and_the_batch_goes_on(tmp_path, models):
    _png(tmp_path / "wide.png", 4100, 8)  # x4: 16400 pixels wide, over WebP's 16383
    _png(tmp_path / "small.png", 16, 8)
    args = ["superres", tmp_path / "wide.png", tmp_path / "small.png", "--model", models["sr"], "--scale", 4,
            "--format", "webp", "-o", tmp_path / "out", "--seed", 1, *FAST]
    result = run_cli(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "fail " in result.output and "1 to run, 0 skipped, 1 would fail" in result.output
    result = run_cli(*args, "--json")
    assert result.exit_code == 1, result.output
    events = {e["key"]: e for e in map(json.loads, result.stdout.splitlines()) if "key" in e}
    assert events["small.png"]["event"] == "done"
    failed = events["wide.png"]
    assert failed["event"] == "failed" and failed["seconds"] == 0  # refused before anything was computed
    assert "wide.png: the output would be 16400x32 pixels, and webp images hold at most 16383 pixels a side" \
        in failed["error"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.webp")) == ["small.webp"]


def test_a_width_too_large_for_the_format_is_a_usage_error(tmp_path, models):
    for extra in ([], ["--dry-run"]):
        result = run_cli("sample", "--model", models["celeba"], "--width", 16416, "--height", 64,
                         "-o", tmp_path / "big.webp", *FAST, *extra)
        assert result.exit_code == 2, result.output
        assert "sample: the output would be 16416x64 pixels, and webp images hold at most 16383 pixels a side; " \
            "make --width/--height smaller, or write png or tiff" in result.output
    assert not (tmp_path / "big.webp").exists()


def test_an_exif_rotated_photo_is_planned_upright(tmp_path):
    from ldmtool.io.images import header_size

    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (40, 30)).save(tmp_path / "turned.jpg", exif=exif)
    assert header_size(tmp_path / "turned.jpg") == (30, 40)
    assert header_size(tmp_path / "turned.jpg", upright=False) == (40, 30)


def test_header_size_never_decodes_pixels(tmp_path):
    """A PNG that declares 30000x30000 and holds almost nothing: its size comes from the header alone."""
    from ldmtool.io.images import header_size

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                       + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    tracemalloc.start()
    try:
        assert header_size(tmp_path / "big.png", max_pixels=10**9) == (30000, 30000)
        assert tracemalloc.get_traced_memory()[1] < 10 * 2**20
    finally:
        tracemalloc.stop()
    assert header_size(tmp_path / "big.png") is None  # over the input limit: the item's load says why
    assert header_size(tmp_path / "missing.png") is None


# -- the plan event and the plan line


def test_json_gets_one_plan_event_before_the_items_even_when_quiet(tmp_path, models):
    result = run_cli("sample", "--model", models["celeba"], "--width", 64, "--height", 32, "--n", 2, "--json",
                     "--quiet", "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["plan", "done", "done", "summary"]
    plan = events[0]
    assert plan["items"] == 2 and plan["pixels"] == 2 * 64 * 32 and plan["largest"] == [64, 32]
    assert plan["peak_memory"] > 0 and plan["available_memory"] > plan["peak_memory"]
    assert plan["seconds"] is None  # short by construction: no probe
    assert plan["device"] == "cpu"
    assert "plan:" not in result.stderr


@pytest.fixture
def long_runs(monkeypatch):
    """Every run counts as long: probed, and its plan announced."""
    import ldmtool.pipelines.planning as planning
    import ldmtool.runtime.plan as plan

    monkeypatch.setattr(planning, "SHORT_WORK", 0)
    monkeypatch.setattr(plan, "ANNOUNCE_SECONDS", 0.0)


def test_a_long_run_says_its_plan_on_stderr_when_it_is_not_a_terminal(tmp_path, models, long_runs):
    result = run_cli("sample", "--model", models["celeba"], "--width", 64, "--height", 32, "--json",
                     "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.splitlines()[0])
    assert plan["event"] == "plan" and plan["seconds"] is not None  # probed (a fast machine may round it to 0)
    lines = [line for line in result.stderr.splitlines() if line.startswith("ldmtool: plan:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ldmtool: plan: 1 item, 64x32 output (0.0 MP), peak memory ~")
    assert lines[0].endswith((" on cpu in fp32", " on cpu in bf16")) and ", about " in lines[0]
    quiet = run_cli("sample", "--model", models["celeba"], "--width", 64, "--height", 32, "--json", "--quiet",
                    "--overwrite", "-o", tmp_path / "out", *FAST)
    assert "plan:" not in quiet.stderr
    assert json.loads(quiet.stdout.splitlines()[0])["event"] == "plan"


def test_the_time_estimate_probes_cheaply(tmp_path, models, long_runs):
    import time

    from ldmtool.options import ModelChoice, SamplingChoice
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.sample import SampleTask

    task = SampleTask(Engine(ModelChoice(model=str(models["celeba"])), SamplingChoice(steps=50)), width=512,
                      height=512)
    task.start(None)
    started = time.monotonic()
    demand = task.planned_demand({(512, 512): 4}, 1)
    assert time.monotonic() - started < 2.0
    assert demand.seconds is not None and demand.seconds > 0
    assert demand.parts["weights"] > 0 and demand.parts["images"] == 512 * 512 * 18


# -- generated items planned lazily


class _Flat:
    """A trivial task whose items are all 64x64."""

    command = "flat"
    params: dict = {}
    model_path = None

    def planned_size(self, item):
        return (64, 64)


def test_generated_items_are_made_on_demand_as_the_eager_list_made_them():
    from ldmtool.io.discover import generated_items

    items = generated_items(["a red fox", ""], samples=3, kind="prompt")
    assert getattr(items, "lazy", False) and len(items) == 6
    assert [(i.key, i.stem, i.seed_offset, i.data["index"], i.data["sample"]) for i in items] == [
        ("prompt-0000/0", "0000-0-a-red-fox", 0, 0, 0), ("prompt-0000/1", "0000-1-a-red-fox", 1, 0, 1),
        ("prompt-0000/2", "0000-2-a-red-fox", 2, 0, 2), ("prompt-0001/0", "0001-0", 3, 1, 0),
        ("prompt-0001/1", "0001-1", 4, 1, 1), ("prompt-0001/2", "0001-2", 5, 1, 2)]
    assert items[-1] == list(items)[5] and items[1:3] == list(items)[1:3]
    assert [(item.key, count) for item, count in items.representatives()] == [("prompt-0000/0", 3), ("prompt-0001/0", 3)]


@pytest.mark.parametrize("template", ["{stem}.{ext}", "{index:05d}-{seed}.png"])
def test_lazy_jobs_are_the_jobs_an_eager_plan_makes(tmp_path, template):
    from ldmtool.io.discover import generated_items
    from ldmtool.runtime.jobs import RunOptions
    from ldmtool.runtime.report import Reporter
    from ldmtool.runtime.runner import BatchRun

    run = BatchRun(_Flat(), RunOptions(output=tmp_path / "out", seed=7, name_template=template), Reporter(quiet=True))
    items = generated_items(["x", "y"], samples=4, kind="sample")
    lazy, eager = run._plan(items), run._plan(list(items))
    assert not isinstance(lazy, list) and isinstance(eager, list)
    assert [(j.item, j.index, j.seed, j.output) for j in lazy] == [(j.item, j.index, j.seed, j.output) for j in eager]


def test_a_hundred_million_samples_are_planned_in_bounded_memory_and_time(tmp_path):
    import time

    from ldmtool.io.discover import generated_items
    from ldmtool.runtime.jobs import RunOptions
    from ldmtool.runtime.plan import check_run
    from ldmtool.runtime.report import Reporter
    from ldmtool.runtime.runner import BatchRun
    from ldmtool.runtime.seeds import item_seed

    assert getattr(generated_items([""], samples=2), "lazy", False)  # else 10^8 items would fill the memory
    n = 10**8
    options = RunOptions(output=tmp_path / "out", seed=5)
    tracemalloc.start()
    started = time.monotonic()
    try:
        run = BatchRun(_Flat(), options, Reporter(quiet=True))
        jobs = run._plan(generated_items([""], samples=n, kind="sample"))
        plan = check_run(run.task, jobs, options)
        first, last = jobs[0], jobs[n - 1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5.0
    assert peak < 50 * 2**20, peak
    assert len(jobs) == plan.items == n and plan.pixels == n * 64 * 64 and plan.largest == (64, 64)
    assert first.output == tmp_path / "out" / "0000-0.png" and first.seed == 5
    assert last.output == tmp_path / "out" / f"0000-{n - 1}.png"
    assert last.seed == item_seed(5, key=last.item.key, offset=n - 1, own=None) and last.index == n - 1


def test_the_probe_never_changes_pixels(tmp_path, models, monkeypatch):
    args = ["--model", models["celeba"], "--width", 64, "--height", 32, "--n", 2, "--seed", 3, "--quiet", *FAST]
    assert run_cli("sample", *args, "-o", tmp_path / "plain").exit_code == 0
    import ldmtool.pipelines.planning as planning

    monkeypatch.setattr(planning, "SHORT_WORK", 0)
    probed = run_cli("sample", *args, "--json", "-o", tmp_path / "probed")
    assert probed.exit_code == 0 and json.loads(probed.stdout.splitlines()[0])["seconds"] is not None
    names = _images(tmp_path / "plain")
    assert len(names) == 2 and _images(tmp_path / "probed") == names
    for name in names:
        with Image.open(tmp_path / "plain" / name) as plain, Image.open(tmp_path / "probed" / name) as probed_image:
            assert np.array_equal(np.asarray(plain), np.asarray(probed_image))


def _stop_after_two():
    from ldmtool.runtime.jobs import BaseTask, Output

    class StopAfterTwo(BaseTask):
        """Writes two small items, then interrupts the run (as Ctrl-C would)."""

        command = "flat"

        def planned_size(self, item):
            return (64, 64)

        def run(self, jobs):
            if jobs[0].index >= 2:
                raise KeyboardInterrupt
            return [Output(image=np.zeros((8, 8, 3), np.uint8)) for _ in jobs]

    return StopAfterTwo()


def test_a_hundred_million_samples_stream_through_a_run_in_bounded_memory(tmp_path):
    import time

    from ldmtool.errors import Interrupted
    from ldmtool.io.discover import generated_items
    from ldmtool.io.manifest import MANIFEST_NAME, read_manifest
    from ldmtool.runtime.jobs import RunOptions
    from ldmtool.runtime.report import Reporter
    from ldmtool.runtime.runner import run_task

    out = tmp_path / "out"
    out.mkdir()
    (out / ".0000-7.png.999999999.ldmtool-tmp").write_bytes(b"left by a killed run")
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            run_task(_stop_after_two(), generated_items([""], samples=10**8, kind="sample"),
                     RunOptions(output=out, seed=5), reporter=Reporter(quiet=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 20.0
    assert peak < 50 * 2**20, peak  # planning, housekeeping, resume and processing never list the jobs
    assert sorted(p.name for p in out.glob("*.png")) == ["0000-0.png", "0000-1.png"]
    assert [r["key"] for r in read_manifest(out / MANIFEST_NAME)] == ["sample-0000/0", "sample-0000/1"]
    assert not list(out.glob(".*.ldmtool-tmp")), "a dead run's temporary file is removed"
