#!/bin/sh
# Inside the guest that scripts/test-kernel.sh boots: save what this kernel
# reports (tests/kernel/harvest.py: its tracepoint formats and BTF facts, the
# source of tests/data/formats/<version>), run tests/kernel, and leave the
# results in $2 (the one writable directory shared with the host). The root
# filesystem is the host's, read-only: tcptrace's cache (its BTF offsets and
# the generated header set) goes to the guest's /tmp.
ROOT=$1
OUT=$2
date +%s >"$OUT/guest-start"
uname -r >"$OUT/release"
echo "test-kernel: $(uname -r) up after $(cut -d' ' -f1 /proc/uptime) s of guest time" >&2
cd "$ROOT" || exit 1
# In the guest a skipped privileged test is a failure, as in CI.
export CI=true TCPTRACE_KERNEL_SMOKE=1 TCPTRACE_KERNEL_RESULTS="$OUT"
export TCPTRACE_CACHE_DIR=/tmp/tcptrace-cache PYTHONDONTWRITEBYTECODE=1
"$ROOT/.venv/bin/python" tests/kernel/harvest.py "$OUT/formats" || echo "test-kernel: harvest failed" >&2
rc=0
"$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider -ra -v --junitxml="$OUT/junit.xml" tests/kernel || rc=$?
echo "$rc" >"$OUT/rc"
exit "$rc"
