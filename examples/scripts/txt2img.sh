#!/usr/bin/env bash
# One image per line of a prompt file (JSON lines may set their own seed, cfg, steps, size).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-out/examples}/txt2img"
ldmtool txt2img --prompts examples/prompts/prompts.txt --seed 1 -o "$out" "$@"
