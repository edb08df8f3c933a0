#!/bin/sh
# make test-kernel: the smoke suite (tests/kernel) on further real kernels.
#
# Boots each of Debian's 6.1 (linux-image-amd64) and 6.12 LTS
# (linux-image-6.12-amd64) kernels in turn with virtme-ng under qemu's
# software emulation (this VM's /dev/kvm runs only specially built guests):
# this machine's root filesystem is shared read-only, $OUT/<version> writable
# for that kernel's results (junit.xml, each tracer's output, doctor.json,
# the formats and BTF facts it reports, the suite's status). Fails when a
# test fails inside any of them, or when a guest never reports; every kernel
# runs even when an earlier one failed.
#
#   TEST_KERNEL_SERIES="6.1 6.12"   the kernels: the newest /boot/vmlinuz-<series>.* of each
#   TEST_KERNEL=/boot/vmlinuz-...   one kernel image instead
#   TEST_KERNEL_OUT=DIR             where results go (default: build/test-kernel)
#   TEST_KERNEL_TIMEOUT=SECONDS     one guest run, boot included (default: 1200)
#   VNG=PATH                        virtme-ng's vng (default: build/kernel-venv/bin/vng)
#   TEST_KERNEL_SAVE=1              also make what each guest reported the saved
#                                   data: tests/data/formats/<version> (formats and
#                                   BTF facts) and tests/data/doctor/<version>.json
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VNG=${VNG:-$ROOT/build/kernel-venv/bin/vng}
OUT=${TEST_KERNEL_OUT:-$ROOT/build/test-kernel}
TIMEOUT=${TEST_KERNEL_TIMEOUT:-1200}
SERIES=${TEST_KERNEL_SERIES:-6.1 6.12}
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
case "$VNG" in /*) ;; *) VNG="$ROOT/$VNG" ;; esac
if [ ! -x "$VNG" ]; then
    echo "test-kernel: virtme-ng not found at $VNG: run make test-kernel" >&2
    exit 1
fi

# "version image" lines: the series a kernel's results are filed under.
if [ -n "${TEST_KERNEL:-}" ]; then
    version=$(basename "$TEST_KERNEL" | sed -n 's/^vmlinuz-\([0-9]*\.[0-9]*\).*/\1/p')
    KERNELS="${version:-custom} $TEST_KERNEL"
else
    KERNELS=""
    for series in $SERIES; do
        image=$(ls /boot/vmlinuz-"$series".* 2>/dev/null | sort -V | tail -n 1)
        if [ -z "$image" ]; then
            package=linux-image-$series-amd64
            [ "$series" = 6.1 ] && package=linux-image-amd64
            echo "test-kernel: no $series kernel image in /boot: apt-get install --no-install-recommends $package" >&2
            exit 1
        fi
        KERNELS="$KERNELS
$series $image"
    done
fi

# One kernel: boot it, run the suite, judge what the guest left in $1.
run_one() {
    dir=$1
    kernel=$2
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "test-kernel: booting $kernel under qemu (software emulation, no KVM)" >&2
    start=$(date +%s)
    echo "$start" >"$dir/host-start"
    vng_status=0
    # vng runs virtme-run through PATH.
    PATH="$(dirname "$VNG"):$PATH" timeout "$TIMEOUT" "$VNG" --disable-kvm --memory 4G --cpus 2 \
        --rwdir="$dir" --run "$kernel" \
        --exec "sh '$ROOT/scripts/test-kernel-guest.sh' '$ROOT' '$dir'" </dev/null >"$dir/console.log" 2>&1 \
        || vng_status=$?
    end=$(date +%s)
    echo $((end - start)) >"$dir/seconds"
    # The guest's console goes to a file first: qemu reopens the output it is
    # given, and over a file shared with the host it wrote from the start of it.
    cat "$dir/console.log"
    rc=$(cat "$dir/rc" 2>/dev/null || echo "none")
    booted=$(cat "$dir/guest-start" 2>/dev/null || echo "")
    if [ -n "$booted" ]; then
        echo "test-kernel: guest up $((booted - start)) s after start; total $((end - start)) s" >&2
    fi
    if [ "$rc" = "none" ]; then
        echo "test-kernel: $kernel: the guest never reported a result (vng exited $vng_status; timeout is $TIMEOUT s)" >&2
        return 1
    fi
    if [ "$rc" != 0 ]; then
        echo "test-kernel: the smoke suite failed on $(cat "$dir/release" 2>/dev/null) (pytest exited $rc); results in $dir" >&2
        return 1
    fi
    echo "test-kernel: the smoke suite passed on $(cat "$dir/release") in $((end - start)) s; results in $dir" >&2
}

# What a guest reported becomes the saved data of its kernel (a set read
# from a running kernel is replaced whole: a tracepoint may have gone).
save_one() {
    dir=$1
    version=$2
    if [ -f "$dir/formats/KERNEL_RELEASE" ] && [ -f "$dir/formats/btf.json" ]; then
        rm -rf "$ROOT/tests/data/formats/$version"
        cp -r "$dir/formats" "$ROOT/tests/data/formats/$version"
        echo "test-kernel: saved tests/data/formats/$version ($(cat "$dir/release"))" >&2
    fi
    if [ -s "$dir/doctor.json" ]; then
        cp "$dir/doctor.json" "$ROOT/tests/data/doctor/$version.json"
        echo "test-kernel: saved tests/data/doctor/$version.json" >&2
    fi
}

mkdir -p "$OUT"
failed=""
summary=""
echo "$KERNELS" | {
    while read -r version image; do
        [ -n "$version" ] || continue
        run_one "$OUT/$version" "$image" || failed="$failed $version"
        [ "${TEST_KERNEL_SAVE:-}" = 1 ] && save_one "$OUT/$version" "$version"
        summary="$summary $version:$(cat "$OUT/$version/seconds")s"
    done
    echo "test-kernel: seconds per kernel:$summary" >&2
    if [ -n "$failed" ]; then
        echo "test-kernel: failed on$failed" >&2
        exit 1
    fi
}
