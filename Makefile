# tcptrace: set-up, run, test and benchmark on Debian/Ubuntu.
#   sudo make run     install what is missing, then trace TCP state changes
#   sudo make test    install what is missing, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
ARGS ?=
# Packages from the distribution: bcc's Python module (never from PyPI), and
# for the tests nftables (induced packet loss) and iproute2 (namespaces).
RUN_PACKAGES = python3-bpfcc
TEST_PACKAGES = $(RUN_PACKAGES) nftables iproute2 procps util-linux bpftool

.PHONY: run test test-unit bench soak deps test-deps venv clean

run: deps
	$(VENV)/bin/tcptrace states $(ARGS)

test: test-deps
	$(VENV)/bin/python -m pytest -ra tests $(ARGS)

test-unit: venv
	$(VENV)/bin/python -m pytest -ra -m "not privileged" tests $(ARGS)

bench: test-deps
	$(VENV)/bin/python bench/run.py $(ARGS)

deps:
	@PACKAGES="$(RUN_PACKAGES)" sh scripts/apt-ensure.sh
	@$(MAKE) --no-print-directory venv

test-deps:
	@PACKAGES="$(TEST_PACKAGES)" sh scripts/apt-ensure.sh
	@$(MAKE) --no-print-directory venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { PACKAGES=python3-venv sh scripts/apt-ensure.sh && $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
