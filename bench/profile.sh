#!/bin/sh
# Profile fimwatch (py-spy by default) on the set-up and baseline benchmarks.
# Usage: sudo bench/profile.sh [setup] [baseline] [--quick] [--profiler pyinstrument]
exec python3 "$(dirname "$0")/bench.py" profile "$@"
