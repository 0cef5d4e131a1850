import os

import pytest

# The suite runs tiny models on a small shared machine: one thread each is fastest there and keeps runs
# predictable (set before torch is imported, so subprocesses inherit it too).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `--precision auto` computes in bf16 on CPUs with AMX or AVX512-BF16 and in fp32 elsewhere: the suite pins
# the CPU flags it sees to a CPU without native bf16 (fp32), so that it checks the same thing, against fp32
# oracles, on every machine. Tests of the choice itself set the flags they need (tests/test_precision.py);
# real bf16 is measured by benchmarks/precision_quality.py and unet_step.py.
os.environ.setdefault("LDMTOOL_TEST_CPU_FLAGS", "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c")


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Nothing in the test suite may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread in every test (tiny models on a shared machine: a second thread only adds
    contention), restored afterwards so no test leaks a `--threads` setting into the next."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Property-based parser tests (tests/test_*_property.py). The default profile keeps the normal suite short
# and reproducible on any machine (derandomize: the same examples every run); `LDMTOOL_HYPOTHESIS_PROFILE=long`
# (benchmarks/property_long.sh) searches far more inputs, without a deadline.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the test extra; the rest of the suite runs without it
    pass
else:
    # database=None: nothing is written into the working tree; a failure prints its @reproduce_failure blob.
    settings.register_profile("default", max_examples=60, deadline=2000, derandomize=True, print_blob=True,
                              database=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=2000, deadline=None, derandomize=False, print_blob=True,
                              database=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("LDMTOOL_HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _sigint_not_left_ignored(request):
    """A test, or a library it loads, that leaves SIGINT ignored in this process passes that on to every child
    process later tests start (an ignored signal survives exec): their Ctrl-C tests would then see a run that
    cannot be interrupted (it happened in CI, the culprit unknown). Restore Python's handler and name the test."""
    import signal
    import warnings

    yield
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        warnings.warn(f"{request.node.nodeid} left SIGINT ignored (restored)", stacklevel=1)


@pytest.fixture(autouse=True)
def _commands_registered_once(request):
    """The in-process CLI tests share one Typer app per worker. A test that registers its commands again
    (`_register_commands()` appends every command once more) makes every later `main()` in that worker build
    all the copies: one file doing it 21 times made in-process CLI calls up to 20x slower for the files after it."""
    import sys

    yield
    app_module = sys.modules.get("ldmtool.cli.app")
    if app_module is None:
        return
    app = app_module.app
    names = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    if len(names) != len(set(names)):
        repeated = sorted({name for name in names if names.count(name) > 1})
        pytest.fail(f"{request.node.nodeid} registered CLI commands twice ({', '.join(map(str, repeated))}): "
                    "use tests/clirun.py ensure_test_commands()")
