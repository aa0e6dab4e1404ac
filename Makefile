# vmbridge — set-up, run, test, bench.
# `make run` and `make test` install whatever is missing on a Debian 12 host
# (QEMU via apt-get, the Python packages into ./.venv) before doing their job.

PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
CACHE      := .cache
GUEST_DIR  := $(CACHE)/guest
GUEST      := $(GUEST_DIR)/vmlinuz $(GUEST_DIR)/initramfs.img
RUNTIME_DIR ?= $(CURDIR)/$(CACHE)/run
PYTEST_ARGS ?=
FULL       ?=

APT_PACKAGES := qemu-system-x86 qemu-utils ovmf
export DEBIAN_FRONTEND := noninteractive

.PHONY: all setup deps venv guest run test bench fuzz soak dist rpm clean help

all: help

help:
	@echo "make run    - set up, then run vmbridged in the foreground with a demo VM"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make bench  - set up, then run the benchmarks (FULL=1 for the long run)"
	@echo "make fuzz / make soak - long robustness runs (not part of make test)"

setup: deps venv guest

# System packages: only what is missing, with apt-get (we run as root on CI).
deps:
	@missing=""; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v qemu-img >/dev/null || missing="$$missing qemu-utils"; \
	[ -e /usr/share/OVMF/OVMF_CODE.fd ] || [ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing="$$missing ovmf"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v dpkg-deb >/dev/null || missing="$$missing dpkg"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e . pytest
	@touch $@

venv: deps $(VENV)/.installed

# The demo/test guest: Debian's kernel and a busybox initramfs, fetched with
# apt-get download into $(CACHE) (nothing is installed on the host).
guest: deps $(GUEST)

$(GUEST) &: contrib/guest/build-guest contrib/guest/init
	$(PYTHON) contrib/guest/build-guest --out $(GUEST_DIR)

run: setup
	$(VPY) bin/vmbridged --runtime-dir $(RUNTIME_DIR) --demo $(GUEST_DIR) --verbose

test: setup
	VMBRIDGE_GUEST_DIR=$(CURDIR)/$(GUEST_DIR) $(VPY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	VMBRIDGE_GUEST_DIR=$(CURDIR)/$(GUEST_DIR) $(VPY) bench/run.py $(if $(FULL),--full)

fuzz: setup
	VMBRIDGE_FUZZ_CASES=200000 $(VPY) -m pytest -q tests/test_fuzz.py

soak: setup
	$(VPY) bench/soak.py

clean:
	rm -rf $(VENV) $(CACHE) build dist *.egg-info
