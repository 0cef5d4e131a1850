"""Cold start of the CLI, in JSON lines: wall time of `ldmtool --help` (and of a command's --help), of a
command's first image (the README's main job on one example photo with the shipped default, split into the
item's own time from the `--json` event and everything before it: imports, model load), of the whole
main job (`ldmtool superres examples/photos --scale 4 -o out/`, start-up included), and of an SD 1.x job
(`--sd-job-repeat`: `ldmtool txt2img` with a small random SD 1.x checkpoint made here, one 64-pixel image in
two steps, so nearly all of it is start-up: imports, loading the CLIP text encoder and tokenizer).

Usage: python benchmarks/cold_start.py [--repeat 10] [--first-image-repeat 3] [--main-job-repeat 5] [--steps N]
       python benchmarks/cold_start.py --main-job-repeat 5 --sd-job-repeat 5 --compare /path/to/other/checkout
Targets: `ldmtool --help` <= 0.3 s on the 2-core CI machine, torch never imported (issue 8); the main job
<= 6 s there (issue 17). `--compare DIR` times the jobs of another checkout too (`python -m ldmtool`
run from DIR), alternating the two, so a change's effect is measured under the same load.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from _common import machine

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "photos" / "leaf.png"

PROBE = (
    "import sys\n"
    "from ldmtool.cli.app import main\n"
    "try:\n    main(sys.argv[1:])\n"
    "except SystemExit:\n    pass\n"
    "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
)


def time_command(argv: list[str], repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}


def torch_imported(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    return "NO-TORCH" not in out.stderr


def _events(stdout: str) -> list[dict]:
    """The `--json` events a command printed."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def first_image(exe: list[str], repeat: int, steps: Optional[int]) -> dict:
    """`ldmtool superres PHOTO --scale 4` from a cold process: total wall time and the item's own part."""
    totals, items = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="ldm-cold-") as out:
            start = time.perf_counter()
            chosen = ["--steps", str(steps)] if steps else []  # none: the model's default
            done = subprocess.run([*exe, "superres", str(PHOTO), "--scale", "4", *chosen, "--seed", "0",
                                   "--json", "-o", out], capture_output=True, text=True, check=False)
            totals.append(time.perf_counter() - start)
        item = next((e["seconds"] for e in _events(done.stdout) if e.get("event") == "done"), None)
        if done.returncode != 0 or item is None:
            return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        items.append(item)
    total, item = statistics.median(totals), statistics.median(items)
    return {"median_s": round(total, 3), "item_s": round(item, 3), "startup_s": round(total - item, 3), "runs": repeat}


MAIN_JOB = ["superres", str(ROOT / "examples" / "photos"), "--scale", "4"]


def sd_job(folder: Path) -> list[str]:
    """`ldmtool txt2img` arguments for a small random SD 1.x checkpoint written into `folder` (with its YAML)."""
    from ldmtool.checkpoints.tiny import save_tiny_checkpoint

    model = folder / "sd1-tiny.safetensors"
    save_tiny_checkpoint(model, "sd1", with_config=True)
    return ["txt2img", "--model", str(model), "--config", str(model.with_suffix(".yaml")), "--prompt", "a red fox",
            "-W", "64", "-H", "64", "--steps", "2", "--seed", "0"]


def timed_job(commands: dict[str, tuple[list[str], Path]], job: list[str], repeat: int) -> dict[str, dict]:
    """A job (a command's arguments), run by each of `commands` (name: (argv prefix, working folder)) in turn,
    `repeat` times: wall seconds of the whole command and the job's own seconds (its `--json` summary), median
    and min."""
    totals: dict[str, list[float]] = {name: [] for name in commands}
    jobs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, (argv, folder) in commands.items():
            with tempfile.TemporaryDirectory(prefix="ldm-job-") as out:
                start = time.perf_counter()
                done = subprocess.run([*argv, *job, "--json", "-o", out], cwd=folder, capture_output=True, text=True,
                                      check=False)
                totals[name].append(time.perf_counter() - start)
            summary = next((e for e in _events(done.stdout) if e.get("event") == "summary"), None)
            if done.returncode != 0 or summary is None:
                return {name: {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}}
            jobs[name].append(float(summary["seconds"]))
    return {name: {"median_s": round(statistics.median(totals[name]), 3), "min_s": round(min(totals[name]), 3),
                   "job_median_s": round(statistics.median(jobs[name]), 3), "runs": repeat} for name in commands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--first-image-repeat", type=int, default=3, help="0 skips the first-image measurement")
    parser.add_argument("--steps", type=int, help="sampling steps of the first image (default: the model's)")
    parser.add_argument("--main-job-repeat", type=int, default=0, help="runs of the whole main job (0: none)")
    parser.add_argument("--sd-job-repeat", type=int, default=0, help="runs of the SD 1.x job (0: none)")
    parser.add_argument("--compare", type=Path, help="another checkout whose jobs are timed alongside")
    parser.add_argument("--dry-run", action="store_true", help="everything once, this checkout compared with itself")
    args = parser.parse_args()
    if args.dry_run:
        args.repeat = args.first_image_repeat = args.main_job_repeat = args.sd_job_repeat = 1
        args.compare = args.compare or ROOT
    installed = shutil.which("ldmtool")  # the entry point users run; else this Python's module (venv not on PATH)
    exe = [installed] if installed else [sys.executable, "-m", "ldmtool"]
    where = machine()  # the CPU beside every figure
    cases = [["--help"], ["info", "--help"]]
    for case in cases:
        record = {"bench": "cold_start", **where, "command": "ldmtool " + " ".join(case)}
        record.update(time_command([*exe, *case], args.repeat))
        record["torch_imported"] = torch_imported(case)
        print(json.dumps(record), flush=True)
    if args.first_image_repeat:
        record = {"bench": "cold_start", **where, "command": f"ldmtool superres {PHOTO.name} --scale 4 (shipped default)",
                  "steps": args.steps or "model default"}
        record.update(first_image(exe, args.first_image_repeat, args.steps))
        print(json.dumps(record), flush=True)
    commands = {"this": ([sys.executable, "-m", "ldmtool"], ROOT)}
    if args.compare:
        commands["compare"] = ([sys.executable, "-m", "ldmtool"], args.compare.resolve())
    with tempfile.TemporaryDirectory(prefix="ldm-sd-") as models:
        jobs = []
        if args.main_job_repeat:
            jobs.append(("ldmtool superres examples/photos --scale 4 (main job)", MAIN_JOB, args.main_job_repeat))
        if args.sd_job_repeat:
            jobs.append(("ldmtool txt2img, small random SD 1.x, 64 px, 2 steps (SD job)", sd_job(Path(models)),
                         args.sd_job_repeat))
        for title, job, repeat in jobs:
            for name, result in timed_job(commands, job, repeat).items():
                source = commands[name][1]
                print(json.dumps({"bench": "cold_start", **where, "command": title, "checkout": str(source),
                                  "commit": _commit(source), **result}), flush=True)


def _commit(folder: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
