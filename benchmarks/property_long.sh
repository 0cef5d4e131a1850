#!/bin/sh
# The property-based parser tests (tests/test_parsers_property.py, tests/test_file_parsers_property.py)
# with hypothesis's "long" profile (conftest.py): 2000 random examples per test instead of 60, no
# deadline, a fresh random seed each run (the default profile is derandomized so CI is reproducible).
# A failure prints the shrunk input and a @reproduce_failure line; make it a plain regression test.
#
#     sh benchmarks/property_long.sh                 # all of them (tens of minutes on 2 CPU cores)
#     sh benchmarks/property_long.sh -k safetensors  # any pytest arguments narrow the run
#
# Not part of the test suite; it prints pytest's summary, not JSON lines.
set -eu
cd "$(dirname "$0")/.."
LDMTOOL_HYPOTHESIS_PROFILE=long exec python -m pytest -p no:cacheprovider -q \
    tests/test_parsers_property.py tests/test_file_parsers_property.py "$@"
