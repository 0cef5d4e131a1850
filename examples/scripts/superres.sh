#!/usr/bin/env bash
# Upscale every photo in examples/photos 4x (the shipped default-superres model), resumable.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-out/examples}/superres"
ldmtool superres examples/photos --scale 4 --seed 1 -o "$out" "$@"
