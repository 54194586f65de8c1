#!/bin/bash
# [watch] append_only cost: CPU time of the daemon for 20 appends to a
# 1 GiB log, as an append-only log (size + running sha256 + 64 KiB windows)
# and as an ordinary watched file (hashed again after each settled write).
# Usage: bench/append_only.sh [DIR]   (DIR: where the 1 GiB file goes, default
# /var/tmp/fimwatch-append-bench; removed at the end)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
dir=${1:-/var/tmp/fimwatch-append-bench}
mkdir -p "$dir/tree" "$dir/log" "$dir/etc"
chmod 700 "$dir/etc"
trap 'rm -rf "$dir"' EXIT
head -c 805306368 /dev/urandom | base64 -w 100 | head -c 1073741824 > "$dir/tree/big.log"

run() {
    rm -rf "$dir/state" "$dir/log/events.jsonl"
    cat > "$dir/etc/f.conf" <<EOC
[fimwatch]
state_dir = $dir/state
settle = 100ms
scan_interval = 0
package_check = no
hash_max_size = 2G
[watch]
paths = $dir/tree
backend = inotify
append_only = $1
[syslog]
enabled = no
[log]
events_file = $dir/log/events.jsonl
EOC
    chmod 600 "$dir/etc/f.conf"
    "$py" "$here/fimwatch.py" --config "$dir/etc/f.conf" run >/dev/null 2>&1 &
    pid=$!
    until grep -q '"started"' "$dir/log/events.jsonl" 2>/dev/null; do sleep 0.2; done
    cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }
    ticks=$(getconf CLK_TCK)
    cf=$(cpu)
    echo "first append" >> "$dir/tree/big.log"; sleep 3
    c0=$(cpu)
    for i in $(seq 1 20); do echo "append $i" >> "$dir/tree/big.log"; sleep 0.4; done
    sleep 2
    c1=$(cpu)
    echo "append_only=${1:-(none)}: first append $(( (c0 - cf) * 1000 / ticks )) ms CPU;" \
         "20 more appends $(( (c1 - c0) * 1000 / ticks )) ms CPU;" \
         "events about the log: $(grep -c big.log "$dir/log/events.jsonl" || true)"
    kill "$pid"
    wait "$pid" || true
}

run "$dir/tree/big.log"
run ""
