#!/usr/bin/env bash
# Nightly job: upscale whatever arrived in INBOX since the last run. Finished files are skipped (resume),
# failures are listed in the manifest, and the exit code tells cron what happened:
# 0 all done or skipped, 1 some items failed, 2 usage error, 3 could not start, 130 interrupted.
set -uo pipefail
INBOX="${INBOX:-/srv/photos/inbox}"
DONE="${DONE:-/srv/photos/upscaled}"
mkdir -p "$DONE"
ldmtool superres "$INBOX" --recursive --scale 4 --seed 1 -o "$DONE" --quiet --json >> "$DONE/events.jsonl"
status=$?
[ "$status" -eq 1 ] && echo "ldmtool: some images failed; see $DONE/ldmtool-manifest.jsonl" >&2
exit "$status"
