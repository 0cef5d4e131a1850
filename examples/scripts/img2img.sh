#!/usr/bin/env bash
# Rework the example photos towards a prompt; --strength 0.5 keeps the composition.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-out/examples}/img2img"
ldmtool img2img examples/photos --prompt "a watercolor painting" --strength 0.5 --seed 1 -o "$out" "$@"
