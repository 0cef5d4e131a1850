"""Freed memory is kept for reuse during a batch run (runtime/allocator.py; issue 17).

Each case runs in a fresh child process, since malloc's settings are the whole process's. glibc's own
accounting (`mallinfo2`) and the kernel's count of page faults are the oracles: no timing is asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ldmtool.runtime import allocator

ACTIVATION = 8 << 20  # bytes of each activation of the network below
HUGE = 64 << 20  # over glibc's largest mapping threshold (32 MiB)

CHILD = f"""
import json, resource, sys
import torch
from ldmtool.runtime import allocator

applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)]).eval()
x = torch.randn(1, 32, 256, 256)
faults = []
with torch.inference_mode():
    for _ in range(14):  # the same step again and again, as a sampler runs its network
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = net(x) * 2 + 1
        del y
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
before = allocator.mapped_bytes()
huge = torch.empty({HUGE}, dtype=torch.uint8)
huge_mapped = allocator.mapped_bytes() - before
print(json.dumps({{"applied": applied, "steady_faults": sum(faults[6:]), "huge_mapped": huge_mapped}}))
"""

pytestmark = pytest.mark.skipif(allocator.mapped_bytes() is None, reason="not glibc 2.33+: malloc is left alone")


def _child(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.MALLOC_ENV)}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env={**environment, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.splitlines()[-1])


def test_a_repeated_step_reuses_kept_memory_instead_of_faulting_pages_in_again() -> None:
    plain, kept = _child("plain"), _child("keep")
    bound = 4 * ACTIVATION // 4096  # four activations' pages over eight steps (glibc 2.36 on a Xeon: none, once two)
    if plain["steady_faults"] < 4 * bound:
        pytest.skip(f"this malloc keeps memory by itself ({plain['steady_faults']} faults in eight steps)")
    assert kept["applied"] is True
    assert kept["steady_faults"] < bound
    assert plain["huge_mapped"] >= HUGE
    assert kept["huge_mapped"] == 0  # the first stage's activations are larger than any threshold glibc has


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                 {allocator.MALLOC_ENV: "system"}])
def test_a_users_own_malloc_choice_is_kept(env: dict) -> None:
    chosen = _child("keep", **env)
    assert chosen["applied"] is False


def test_a_batch_run_keeps_freed_memory(tmp_path, monkeypatch) -> None:
    from PIL import Image

    from ldmtool.cli.app import main
    from ldmtool.runtime import execution

    calls: list[bool] = []
    monkeypatch.setattr(execution, "keep_freed_memory", lambda: calls.append(True) or True)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "in" / "a.png")
    with pytest.raises(SystemExit) as ended:
        main(["superres", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--steps", "1", "--quiet"])
    assert ended.value.code == 0
    assert calls == [True]
    assert (tmp_path / "out" / "a.png").exists()
