#!/usr/bin/env bash
# A landscape from an index label map, and the same from an RGB map with a palette.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-out/examples}/semantic2img"
ldmtool semantic2img examples/labelmaps/landscape.png --seed 1 -o "$out" "$@"
ldmtool semantic2img examples/labelmaps/landscape_rgb.png --palette examples/labelmaps/palette.yaml --seed 1 -o "$out" "$@"
