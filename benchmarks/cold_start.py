"""Cold start of the CLI: wall time of `ldmtool --help` (and of a command's --help), in JSON lines.

Usage: python benchmarks/cold_start.py [--repeat 10]
Target (issue 8): `ldmtool --help` <= 0.3 s on the 2-core CI machine, torch never imported.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    exe = shutil.which("ldmtool") or "ldmtool"
    cases = [["--help"], ["info", "--help"]]
    for case in cases:
        record = {"bench": "cold_start", "command": "ldmtool " + " ".join(case)}
        record.update(time_command([exe, *case], args.repeat))
        record["torch_imported"] = torch_imported(case)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
