# tcptrace: set-up, run, test and benchmark on Debian/Ubuntu.
#   sudo make run     install what is missing, then trace TCP state changes
#   sudo make test    install what is missing, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
ARGS ?=
# Packages from the distribution: bcc's Python module (never from PyPI), and
# for the tests nftables (induced packet loss), iproute2 (namespaces), and
# bcc's stock tools with the kernel headers they compile against (one test
# runs tcptrace beside bcc's own tcpstates; tcptrace needs no headers).
ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
RUN_PACKAGES = python3-bpfcc
TEST_PACKAGES = $(RUN_PACKAGES) nftables iproute2 procps util-linux bpftool bpfcc-tools linux-headers-$(ARCH) prometheus nginx-light redis-server redis-tools iperf3 bpftrace
# make test-kernel: more real kernels, Debian's 6.1 and its 6.12 LTS, each
# booted under qemu's software emulation by virtme-ng (from PyPI, in its own
# venv under build/), which needs a static busybox for its initramfs.
KERNEL_PACKAGES = qemu-system-x86 linux-image-amd64 linux-image-6.12-amd64 busybox-static
KERNEL_VENV ?= build/kernel-venv
VIRTME_NG ?= virtme-ng==1.42

.PHONY: run test lint fmt test-unit test-kernel bench soak reliability docs deps test-deps venv clean

run: deps
	$(VENV)/bin/tcptrace states $(ARGS)

test: test-deps lint
	$(VENV)/bin/python -m pytest -ra tests $(ARGS)

# Pyflakes' checks and syntax errors (pyproject.toml's [tool.ruff]): what
# a test run would only find by luck. `make fmt` applies the safe fixes.
lint: venv
	$(VENV)/bin/ruff check tcptrace tests bench scripts

fmt: venv
	$(VENV)/bin/ruff check --fix tcptrace tests bench scripts

test-kernel: test-deps
	@PACKAGES="$(KERNEL_PACKAGES)" sh scripts/apt-ensure.sh
	@test -x $(KERNEL_VENV)/bin/vng || { $(PYTHON) -m venv $(KERNEL_VENV) && \
		$(KERNEL_VENV)/bin/python -m pip install -q --disable-pip-version-check '$(VIRTME_NG)'; }
	VNG=$(KERNEL_VENV)/bin/vng sh scripts/test-kernel.sh

test-unit: venv
	$(VENV)/bin/python -m pytest -ra -m "not privileged" tests $(ARGS)

# The state-change loads against bcc and bpftrace, then the loads of the
# tools they do not drive: iperf3 under probe, redis-benchmark under top, a
# drop-free load under drops; all into one directory of bench/results, and
# docs/performance.md written from it once all have run (a run that stops
# part-way leaves the page as it was; ARGS go to bench/run.py).
bench: test-deps
	set -e; dir=bench/results/$$(date +%Y-%m-%d_%H%M%S); mkdir -p $$dir; \
	$(VENV)/bin/python bench/run.py --out $$dir $(ARGS); \
	$(VENV)/bin/python bench/probe.py --json $$dir/probe.json; \
	$(VENV)/bin/python bench/top_load.py --json $$dir/top.json; \
	$(VENV)/bin/python bench/drops_load.py --json $$dir/drops.json; \
	$(VENV)/bin/python bench/run.py --page $$dir

soak: test-deps
	$(VENV)/bin/python bench/soak.py $(ARGS)

# docs/reliability.md's tables: what the failure tests tried and what happened.
reliability: test-deps
	@mkdir -p bench/results
	TCPTRACE_REPORT=bench/results/reliability.md $(VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_cli.py tests/test_faults.py tests/test_overload.py
	$(VENV)/bin/python scripts/gendocs.py --section reliability --from bench/results/reliability.md \
		docs/reliability.md

# The generated sections of docs/ (JSON keys, metrics, kernels), from the code.
docs: venv
	$(VENV)/bin/python scripts/gendocs.py

deps:
	@PACKAGES="$(RUN_PACKAGES)" sh scripts/apt-ensure.sh
	@$(MAKE) --no-print-directory venv

test-deps:
	@PACKAGES="$(TEST_PACKAGES)" sh scripts/apt-ensure.sh
	@$(MAKE) --no-print-directory venv

venv: $(VENV)/.installed

# The tree on sys.path by a .pth line (editable_mode=compat), not setuptools'
# import hook: the hook costs every start of tcptrace about 12 ms (pathlib and
# importlib machinery), a tenth of the time to the first event.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { PACKAGES=python3-venv sh scripts/apt-ensure.sh && $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
