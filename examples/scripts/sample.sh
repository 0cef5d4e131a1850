#!/usr/bin/env bash
# Four samples from an unconditional (or class-conditional, with --class NAME) model.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-out/examples}/sample"
ldmtool sample --n 4 --seed 1 -o "$out" "$@"
