#!/bin/sh
# make test-kernel: the smoke suite (tests/kernel) on a second real kernel.
#
# Boots Debian's 6.1 kernel (linux-image-amd64) with virtme-ng under qemu's
# software emulation (this VM's /dev/kvm runs only specially built guests):
# this machine's root filesystem is shared read-only, $OUT writable for the
# results (junit.xml, each tracer's output, doctor.json, the suite's status).
# Fails when a test fails inside, or when the guest never reports.
#
#   TEST_KERNEL=/boot/vmlinuz-...   another kernel image (default: the newest 6.1)
#   TEST_KERNEL_OUT=DIR             where results go (default: build/test-kernel)
#   TEST_KERNEL_TIMEOUT=SECONDS     the whole guest run, boot included (default: 600)
#   VNG=PATH                        virtme-ng's vng (default: build/kernel-venv/bin/vng)
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VNG=${VNG:-$ROOT/build/kernel-venv/bin/vng}
OUT=${TEST_KERNEL_OUT:-$ROOT/build/test-kernel}
TIMEOUT=${TEST_KERNEL_TIMEOUT:-600}
KERNEL=${TEST_KERNEL:-$(ls /boot/vmlinuz-6.1.* 2>/dev/null | sort -V | tail -n 1)}

if [ -z "$KERNEL" ] || [ ! -f "$KERNEL" ]; then
    echo "test-kernel: no 6.1 kernel image in /boot: apt-get install --no-install-recommends linux-image-amd64" >&2
    exit 1
fi
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
case "$VNG" in /*) ;; *) VNG="$ROOT/$VNG" ;; esac
if [ ! -x "$VNG" ]; then
    echo "test-kernel: virtme-ng not found at $VNG: run make test-kernel" >&2
    exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"

echo "test-kernel: booting $KERNEL under qemu (software emulation, no KVM)" >&2
start=$(date +%s)
echo "$start" >"$OUT/host-start"
vng_status=0
# vng runs virtme-run through PATH.
PATH="$(dirname "$VNG"):$PATH" timeout "$TIMEOUT" "$VNG" --disable-kvm --memory 4G --cpus 2 \
    --rwdir="$OUT" --run "$KERNEL" \
    --exec "sh '$ROOT/scripts/test-kernel-guest.sh' '$ROOT' '$OUT'" </dev/null >"$OUT/console.log" 2>&1 \
    || vng_status=$?
end=$(date +%s)
# The guest's console goes to a file first: qemu reopens the output it is
# given, and over a file shared with the host it wrote from the start of it.
cat "$OUT/console.log"

rc=$(cat "$OUT/rc" 2>/dev/null || echo "none")
booted=$(cat "$OUT/guest-start" 2>/dev/null || echo "")
if [ -n "$booted" ]; then
    echo "test-kernel: guest up $((booted - start)) s after start; total $((end - start)) s" >&2
fi
if [ "$rc" = "none" ]; then
    echo "test-kernel: the guest never reported a result (vng exited $vng_status; timeout is $TIMEOUT s)" >&2
    exit 1
fi
if [ "$rc" != 0 ]; then
    echo "test-kernel: the smoke suite failed on $(cat "$OUT/release" 2>/dev/null) (pytest exited $rc); results in $OUT" >&2
    exit 1
fi
echo "test-kernel: the smoke suite passed on $(cat "$OUT/release"); results in $OUT" >&2
