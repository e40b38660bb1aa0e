#!/bin/bash
# Re-measures classes.tsv on this kernel: records every skb:kfree_skb (reason, location) in a
# private tracefs instance while a lab scenario runs, then counts them per (reason, function).
# Usage (root, from the repository): agent/src/event/classes-measure.sh healthy
set -euo pipefail
scenario=${1:-healthy}
inst=/sys/kernel/tracing/instances/lbtclasses$$
out=$(mktemp)
mkdir "$inst"
trap 'echo 0 > "$inst/events/skb/kfree_skb/enable"; rmdir "$inst"; rm -f "$out"' EXIT
echo 8192 > "$inst/buffer_size_kb"
echo 1 > "$inst/events/skb/kfree_skb/enable"
cat "$inst/trace_pipe" > "$out" &
reader=$!
cargo xtask lab run "$scenario" >&2 || true
sleep 1
kill "$reader"
grep -o 'location=[^ ]* reason: [A-Z_0-9]*' "$out" | sed 's/+0x[0-9a-fx/]*//' | sort | uniq -c | sort -rn
