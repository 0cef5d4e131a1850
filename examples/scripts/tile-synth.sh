#!/usr/bin/env bash
# A wide panorama from a label map stretched to 1024x256, and a texture that tiles in both directions.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-out/examples}/tile-synth"
ldmtool tile-synth examples/labelmaps/landscape.png --width 1024 --height 256 --seed 1 -o "$out" "$@"
