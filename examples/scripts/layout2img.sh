#!/usr/bin/env bash
# An image from labelled boxes (OpenImages labels); --draw-boxes also writes a preview of the layout.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-out/examples}/layout2img"
ldmtool layout2img examples/layouts --draw-boxes --seed 1 -o "$out" "$@"
