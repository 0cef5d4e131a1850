"""Benchmarks (issue 8): each script's --dry-run runs and prints only JSON lines with the fields the README
quotes; the measuring helpers are checked on cases with known answers (a child that allocates a known
amount, a streamed safetensors file read back by safetensors itself, the summaries' arithmetic)."""
from __future__ import annotations

import importlib
import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
common = importlib.import_module("_common")


def load(name: str):
    return importlib.import_module(name)


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the benchmark printed nothing"
    return [json.loads(line) for line in lines]  # every line must be JSON


# -- measuring helpers, against known answers ----------------------------------------------------------


def test_child_reports_its_own_peak_not_the_parents():
    """A child's VmHWM sees what it allocated and not the (large) parent's RSS, which `ru_maxrss` would."""
    code = ("import sys; sys.path.insert(0, {bench!r}); import _common, json; b = b'x' * {n}; "
            "print(json.dumps({{'peak': _common.peak_rss()}}))")
    ballast = b"y" * (300 * 2**20)  # this process is at least 300 MiB bigger than the children
    runs = [common.run_child([sys.executable, "-c", code.format(bench=str(BENCHMARKS), n=n)]) for n in (1, 200 * 2**20)]
    del ballast
    small, large = (run.json_lines()[0]["peak"] / 2**20 for run in runs)
    assert small < 100, small
    assert 190 <= large - small <= 230, (small, large)


def test_phase_recorder_nested_peaks():
    recorder = common.PhaseRecorder()
    if not recorder.exact:
        pytest.skip("/proc/self/clear_refs is not writable here")

    def inner():
        # A mapping of its own, written, so every page is resident: malloc may serve a block from memory this
        # process already holds (a batch run earlier in this process keeps freed memory, runtime/allocator.py)
        block = mmap.mmap(-1, 200 * 2**20)
        block.write(b"x" * len(block))
        block.close()

    outer = recorder.wrap("outer", lambda: recorder.wrap("inner", inner)())
    outer()
    phases = {p.name: p for p in recorder.phases}
    assert (phases["inner"].peak_rss - phases["inner"].start_rss) / 2**20 >= 190
    assert phases["outer"].peak_rss >= phases["inner"].peak_rss  # the inner reset does not hide the peak


def test_streamed_safetensors_file_reads_back_exactly(tmp_path):
    from safetensors.torch import load_file

    bench = load("checkpoint_load")
    shapes = {"a.weight": torch.empty(3, 5, device="meta"), "b.bias": torch.empty(7, device="meta"),
              "steps": torch.empty(2, dtype=torch.int64, device="meta")}
    path = tmp_path / "x.safetensors"
    bench.write_safetensors_streaming(path, shapes, torch.float16)
    read = load_file(str(path))
    expected = dict(bench.random_tensors(shapes, torch.float16))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in read.items()} == {
        "a.weight": (torch.float16, (3, 5)), "b.bias": (torch.float16, (7,)), "steps": (torch.int64, (2,))}
    for key, value in expected.items():
        assert torch.equal(read[key], value)
        assert torch.equal(bench.mapped_tensors(path)[key], value)


def test_superres_summary_arithmetic():
    bench = load("superres_memory")
    records = [{"output": 1024, "peak_rss_mib": 1000.0, "seconds_per_mp": 10.0},
               {"output": 2048, "peak_rss_mib": 1100.0, "seconds_per_mp": 12.0},
               {"output": 4096, "peak_rss_mib": 1400.0, "seconds_per_mp": 11.0}]
    summary = bench.summarise(records)
    assert summary["peak_ratio_largest_over_smallest"] == 1.4 and summary["peak_ok"] is False
    assert summary["seconds_per_mp_max_deviation_from_mean"] == pytest.approx(1 / 11, abs=1e-3)
    assert summary["time_ok"] is True
    assert bench.growing_buffers(4096)["output_rgb_float32"] == 192.0


def test_folder_extrapolation_arithmetic():
    bench = load("folder_throughput")
    one = {"images": 10, "seconds": 30.0, "fixed_seconds": 10.0, "item_seconds_after_first": 1.5}
    sep = {"invocations": 3, "seconds": 36.0, "per_invocation_mean": 12.0}
    summary = bench.extrapolate(one, sep, 100)
    assert summary["one_process_seconds"] == 160.0 and summary["separate_seconds"] == 1200.0
    assert summary["ratio_one_over_separate"] == pytest.approx(160 / 1200, abs=1e-4)
    assert summary["extrapolated"] is True


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA H200", 989.0)])
def test_gpu_peak_table_prefers_the_specific_name(name, peak):
    bench = load("gpu_unet")
    assert next(value for key, value in bench.PEAK_TFLOPS if key in name) == peak


def test_gpu_flop_count_matches_closed_form_for_one_conv():
    """The meta-device counter counts a 3x3 conv as 2*Cin*9*Cout*H*W per item (multiply and add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        x = torch.empty(2, 8, 10, 12)
    with FlopCounterMode(display=False) as counter:
        conv(x)
    assert counter.get_total_flops() == 2 * 2 * 8 * 9 * 16 * 10 * 12


# -- each script's dry run --------------------------------------------------------------------------
# The dry runs that measure a process (its peak memory, page faults, malloc mode, start-up) or start
# children of their own run as subprocesses, started together when the first of them is asked for (they
# spend most of their time starting Python and importing torch, so on two cores they overlap well). The
# others only compute in torch: they run in this process when asked for (torch, ldmtool and diffusers are
# imported once), as `python SCRIPT --dry-run` would, and each test checks its own script's output.

DRY_RUNS = {"gpu_unet": ["--dtypes", "fp32"], "unet_step": [], "superres_memory": [], "folder_throughput": [], "checkpoint_load": [],
            "fewstep": [], "first_stage_ceiling": [], "malloc_run": [],
            "attention_heads": [], "cold_start": []}
IN_PROCESS = {"gpu_unet", "fewstep", "first_stage_ceiling", "attention_heads"}
# unet_step stays a child: it sets malloc to keep freed memory (runtime/allocator.py) and reads its own page faults


class DryRuns:
    def __init__(self, folder: Path):
        self.procs = {}
        self.done: dict[str, str] = {}
        for name, extra in DRY_RUNS.items():
            workdir = folder / name
            workdir.mkdir()
            if name in IN_PROCESS:
                continue
            argv = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--dry-run", *extra]
            if name not in ("unet_step", "cold_start"):
                argv += ["--workdir", str(workdir)]
            out = (folder / f"{name}.out").open("w+")
            self.procs[name] = (subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, text=True), out, workdir)
        self.folder = folder

    def _run_here(self, name: str) -> str:
        """`python benchmarks/NAME.py --dry-run ...` in this process: its stdout."""
        import contextlib
        import io
        import runpy

        argv, stdout = sys.argv, io.StringIO()
        sys.argv = [str(BENCHMARKS / f"{name}.py"), "--dry-run", *DRY_RUNS[name]]
        try:
            with contextlib.redirect_stdout(stdout):
                runpy.run_path(sys.argv[0], run_name="__main__")
        finally:
            sys.argv = argv
        return stdout.getvalue()

    def records(self, name: str) -> tuple[list[dict], Path]:
        if name in IN_PROCESS:
            if name not in self.done:
                self.done[name] = self._run_here(name)
            return json_lines(self.done[name]), self.folder / name
        proc, out, workdir = self.procs[name]
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        out.seek(0)
        return json_lines(out.read()), workdir


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    runs = DryRuns(tmp_path_factory.mktemp("dry-runs"))
    yield runs
    for proc, out, _ in runs.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        out.close()


def test_first_stage_ceiling_dry_run(dry_runs):
    """The shipped first stage's reconstruction, back-projected, on the corpus's held-out crops: the ceiling of
    any latent SR model on it, beside bicubic (the room is their difference, as printed)."""
    records, _ = dry_runs.records("first_stage_ceiling")
    assert records[0]["machine"]["cpu"] and records[0]["sets"] == ["corpus"]
    (corpus,) = [r for r in records if r.get("set") == "corpus"]
    assert corpus["crops"] >= 1 and set(corpus["psnr"]) == {"bicubic", "bicubic+bp", "ae", "ae+bp"}
    assert corpus["room_over_bicubic_db"] == round(corpus["psnr"]["ae+bp"] - corpus["psnr"]["bicubic"], 2)
    assert all(15 < value < 60 for value in corpus["psnr"].values())


def test_gpu_unet_dry_run(dry_runs):
    records, _ = dry_runs.records("gpu_unet")
    timed = [r for r in records if "seconds_per_image" in r and "impl" in r]
    assert {r["impl"] for r in timed} == {"ldmtool", "diffusers"}
    ours = next(r for r in timed if r["impl"] == "ldmtool")
    assert ours["max_rel_diff_vs_diffusers"] < 1e-4  # same weights, same function
    assert records[0]["gflops_per_step"] > 0
    assert any(r.get("summary") and "ratio_best_ldmtool_over_best_diffusers" in r for r in records)


def test_unet_step_dry_run_names_the_cpu_and_its_peaks(dry_runs):
    records, _ = dry_runs.records("unet_step")
    assert records[0]["auto_precision"] in ("fp32", "bf16") and records[0]["isa"]
    (ratio,) = [r for r in records if "ratio_cpu" in r]
    assert ratio["fp32_matmul_gflops"] > 0 and ratio["bf16_matmul_gflops"] > 0
    assert ratio["gflop_per_step"] > 0 and 0 < ratio["fraction_of_best_matmul_peak"]
    assert {r["impl"] for r in records if "impl" in r} == {"ldmtool", "diffusers"}
    assert all(r["max_abs_diff"] < 1e-4 for r in records if "impl" in r)  # the same weights, the same function
    assert all(r["page_faults"] >= 0 and r["kernel_cpu_s"] >= 0 for r in records if "impl" in r)
    assert records[0]["malloc"] in ("kept", "system")  # system where the C library is not glibc


def test_malloc_run_dry_run_times_a_real_txt2img_run_in_both_modes(dry_runs):
    records, _ = dry_runs.records("malloc_run")
    runs = [r for r in records if "malloc" in r]
    assert [r["malloc"] for r in runs] == ["kept", "system"]
    for r in runs:
        assert r["exit_code"] == 0 and r["wall_s"] > 0 and r["page_faults"] > 0 and r["peak_rss_mib"] > 50
    assert set(records[-1]["summary"]) == {"kept", "system"}


def test_cold_start_dry_run_times_help_a_first_image_the_main_job_and_an_sd_job(dry_runs):
    records, _ = dry_runs.records("cold_start")
    assert all(r["cpu"] and r["cores"] for r in records)
    helps = [r for r in records if r["command"].endswith("--help")]
    assert helps and not any(r["torch_imported"] for r in helps)
    (first,) = [r for r in records if "first image" in r["command"] or "leaf.png" in r["command"]]
    assert 0 < first["item_s"] < first["median_s"]
    for kind in ("main job", "SD job"):
        jobs = [r for r in records if kind in r["command"]]
        assert len(jobs) == 2 and jobs[0]["checkout"] == jobs[1]["checkout"]  # this checkout, compared with itself
        assert all(0 < r["job_median_s"] < r["median_s"] and r["commit"] for r in jobs), jobs


def test_attention_heads_dry_run_times_every_head_size_and_the_equivalent_forms(dry_runs):
    records, _ = dry_runs.records("attention_heads")
    assert records[0]["cpu"] and records[0]["tokens"] == 256
    timed = [r for r in records if "how" in r]
    assert {(r["dtype"], r["head"]) for r in timed if r["how"] == "sdpa"} == {
        (d, h) for d in ("bfloat16", "float32") for h in (8, 16, 40, 64, 128)}
    others = [r for r in timed if r["how"] != "sdpa"]
    assert len(others) == 6 and all(r["ms"] > 0 for r in timed)
    assert all(r["max_abs_diff"] < (0.02 if r["dtype"] == "bfloat16" else 1e-5) for r in others)  # the same result


def test_superres_memory_dry_run(dry_runs):
    records, _ = dry_runs.records("superres_memory")
    sizes = [r for r in records if "output" in r]
    assert [r["output"] for r in sizes] == [64, 128]
    for r in sizes:
        assert r["exit_code"] == 0 and r["peak_rss_mib"] > 50 and r["seconds_per_mp"] > 0
        assert 0 < r["cpu_seconds_per_mp"]  # CPU time of the item: flatness free of other jobs
        assert {"open_model", "sample", "decode", "write"} <= {p["phase"] for p in r["phases"]}
    assert "peak_ratio_largest_over_smallest" in records[-1]
    assert records[-1]["cpu_seconds_per_mp_max_deviation_from_mean"] is not None


def test_folder_throughput_dry_run(dry_runs):
    records, _ = dry_runs.records("folder_throughput")
    one = next(r for r in records if r.get("mode") == "one_process")
    assert one["images"] == 2
    assert records[-1]["ratio_one_over_separate"] > 0 and records[-1]["extrapolated"] is True


def test_checkpoint_load_dry_run(dry_runs):
    records, workdir = dry_runs.records("checkpoint_load")
    loads = [r for r in records if "format" in r]
    assert {r["format"] for r in loads} == {"safetensors", "ckpt"}
    for r in loads:
        assert r["exit_code"] == 0 and r["load_s"] > 0 and r["weights_mib"] > 1
        assert r["peak_rss_mib"] >= r["rss_after_import_mib"]
    assert "load_time_ratio_safetensors_over_ckpt" in records[-1]
    assert not list(workdir.iterdir())  # the checkpoint files are deleted


def test_compare_outputs_reports_identical_different_and_missing_images(tmp_path, capsys):
    from PIL import Image

    compare_outputs = load("compare_outputs")
    pixels = np.zeros((4, 4, 3), np.uint8)
    for side, changed in (("before", 0), ("after", 3)):
        (tmp_path / side / "sub").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / side / "same.png")
        Image.fromarray(pixels + changed).save(tmp_path / side / "sub" / "changed.png")
    Image.fromarray(pixels).save(tmp_path / "before" / "gone.png")
    assert compare_outputs.main([str(tmp_path / "before"), str(tmp_path / "after")]) == 1
    records = {r.get("file", "summary"): r for r in json_lines(capsys.readouterr().out)}
    assert records["same.png"]["identical"] and records["gone.png"]["missing"] == "after"
    assert records["sub/changed.png"]["max_diff"] == 3 and records["sub/changed.png"]["differing"] == 1.0
    assert records["summary"]["identical"] == 1 and records["summary"]["different_or_missing"] == 2



def test_sdxl_unet_step_dry_run():
    """Issue 18's step-time benchmark on a tiny SDXL UNet: JSON lines with the fields the README quotes.
    (`sdxl_memory.py --dry-run` is left out of the suite: it writes and loads a file in a child process.)"""
    run = subprocess.run([sys.executable, str(BENCHMARKS / "sdxl_unet_step.py"), "--dry-run", "--dtypes", "bf16"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = [r for r in json_lines(run.stdout) if "dtype" in r and "round" not in r]
    assert len(measured) == 1
    assert {"wall_s_median", "cpu_s_median", "parameters", "peak_rss_mib"} <= set(measured[0])


def test_mmdit_step_dry_run_times_ours_and_diffusers_on_the_same_weights(capsys):
    """Issue 24's step-time benchmark on a tiny MMDiT, in this process (diffusers is imported once): both
    networks' lines, and their outputs agree."""
    load("mmdit_step").main(["--dry-run", "--dtypes", "fp32"])
    measured = [r for r in json_lines(capsys.readouterr().out) if "dtype" in r and "round" not in r]
    assert [r["net"] for r in measured] == ["ldmtool", "diffusers"]
    assert {"wall_s_median", "cpu_s_median", "parameters", "peak_rss_mib"} <= set(measured[0])
    assert measured[1]["max_relative_difference"] <= 1e-4


def test_fewstep_dry_run_counts_one_unet_call_per_lcm_step_and_two_per_guided_step(dry_runs):
    records, _ = dry_runs.records("fewstep")
    lcm, dpm = (next(r for r in records if r.get("sampler") == name) for name in ("lcm", "dpmpp_2m"))
    assert (lcm["unet_calls"], dpm["unet_calls"]) == (4, 50) and lcm["finite"] and dpm["finite"]
    summary = records[-1]
    assert summary["ratio_unet_calls"] == 0.08 and 0 < summary["ratio_cpu"] < 1
