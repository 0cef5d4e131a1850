"""Issue 16 surprise 7: `--engine ray` leaves stderr to ldmtool (Ray's own warnings and INFO lines stay off)."""
import pytest

pytest.importorskip("ray", reason="Ray is not installed here (pip install 'ldmtool[ray]'); CI installs it")

from test_ray_engine import _folder, _ldmtool  # noqa: E402 - after the skip, as that module does


def test_ray_run_writes_only_ldmtool_lines_to_stderr(tmp_path):
    inputs = _folder(tmp_path / "in", 3)
    proc = _ldmtool("_invert", inputs, "-o", tmp_path / "out", "--seed", 3, "--engine", "ray", env={"LDMTOOL_RAY_WORKERS": "1"})
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("3 done, 0 skipped, 0 failed in "), stderr
