#!/usr/bin/env bash
# Repaint the white area of examples/inpaint/coffee_mask.png (pairs x.png with x_mask.png in folder mode).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-out/examples}/inpaint"
ldmtool inpaint examples/inpaint --feather 4 --seed 1 -o "$out" "$@"
