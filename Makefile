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
ARGS       ?=
FULL       ?=
QEMU       ?=
BENCH_ARGS ?=

APT_PACKAGES := qemu-system-x86 qemu-utils ovmf
export DEBIAN_FRONTEND := noninteractive

.PHONY: all setup deps venv guest run test bench fuzz soak dist rpm rpm-deps clean help

all: help

help:
	@echo "make run    - set up, then run vmbridged in the foreground with a demo VM"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make bench  - set up, then run the benchmarks (FULL=1 for the long run, QEMU=PATH for another"
	@echo "              QEMU build, BENCH_ARGS='--only fanout' ...; docs/performance.md)"
	@echo "make fuzz / make soak - long robustness runs (not part of make test)"
	@echo "make dist   - the source tarball (sdist) in dist/"
	@echo "make rpm    - source and binary RPMs from that tarball, checked with rpmlint"

setup: deps venv guest

# System packages: only what is missing, with apt-get (we run as root on CI).
deps:
	@missing=""; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v qemu-img >/dev/null || missing="$$missing qemu-utils"; \
	[ -e /usr/share/ovmf/OVMF.fd ] || missing="$$missing ovmf"; \
	command -v groff >/dev/null || missing="$$missing groff-base"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	[ -e /usr/share/bash-completion/bash_completion ] || missing="$$missing bash-completion"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v dpkg-deb >/dev/null || missing="$$missing dpkg"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[test]"
	@touch $@

venv: deps $(VENV)/.installed

# The demo/test guest: Debian's kernel and a busybox initramfs, fetched with
# apt-get download into $(CACHE) (nothing is installed on the host).
guest: deps $(GUEST)

$(GUEST) &: contrib/guest/build-guest contrib/guest/init
	$(PYTHON) contrib/guest/build-guest --out $(GUEST_DIR)

run: setup
	$(VPY) bin/vmbridged --runtime-dir $(RUNTIME_DIR) --config-dir $(CURDIR)/$(CACHE)/etc --demo $(GUEST_DIR) $(ARGS)

test: setup
	VMBRIDGE_GUEST_DIR=$(CURDIR)/$(GUEST_DIR) $(VPY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	VMBRIDGE_GUEST_DIR=$(CURDIR)/$(GUEST_DIR) $(VPY) bench/run.py $(if $(FULL),--full) $(if $(QEMU),--qemu $(QEMU)) $(BENCH_ARGS)

fuzz: setup
	VMBRIDGE_FUZZ_CASES=200000 $(VPY) -m pytest -q tests/test_fuzz.py

soak: setup
	$(VPY) bench/soak.py

# Packaging (contrib/rpm/README.md). `make dist` writes the sdist, which is
# the RPM's Source0; `make rpm` builds the source and binary RPMs from it (the
# spec too comes out of the tarball) with rpmbuild and runs rpmlint on them. On a host without Fedora's rpm macros
# (Debian: `apt-get install rpm` has no python/systemd macros and an empty rpm
# database) it loads contrib/rpm/macros.fallback and skips the BuildRequires
# check; the spec itself stays as Fedora builds it.
VERSION     = $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' vmbridge/__init__.py)
DIST_DIR   ?= $(CURDIR)/dist
SDIST       = $(DIST_DIR)/vmbridge-$(VERSION).tar.gz
RPM_DIR    ?= $(DIST_DIR)
RPM_TOPDIR ?= $(CURDIR)/$(CACHE)/rpmbuild
# setuptools' PEP 517 backend, called directly: any python3 with setuptools
# does (the venv's, else the system's); no `build` package, no network.
SDIST_PYTHON ?= $(if $(wildcard $(VPY)),$(VPY),$(PYTHON))
RPM_FALLBACK = $(if $(shell rpm --eval '%{?pyproject_wheel:yes}' 2>/dev/null),,--load $(CURDIR)/contrib/rpm/macros.fallback)
RPM_NODEPS   = $(if $(shell rpm -q --whatprovides python3-devel >/dev/null 2>&1 && echo yes),,--nodeps)
RPMLINT_CONFIG = $(if $(RPM_FALLBACK),-c $(CURDIR)/contrib/rpm/rpmlint-fedora.toml)

dist:
	@mkdir -p $(DIST_DIR)
	rm -f $(SDIST)
	$(SDIST_PYTHON) -c 'import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])' $(DIST_DIR) >/dev/null
	@test -f $(SDIST) && echo "dist: $(SDIST)"

# rpmbuild, rpmlint and what the fallback macros build with, from apt-get when
# missing (as `deps` does for QEMU).
rpm-deps:
	@missing=""; \
	command -v rpmbuild >/dev/null || missing="$$missing rpm"; \
	command -v rpmlint >/dev/null || missing="$$missing rpmlint"; \
	if [ -n "$(RPM_FALLBACK)" ]; then \
		{ /usr/bin/python3 -c 'import setuptools, wheel, packaging' && /usr/bin/python3 -m pip --version; } >/dev/null 2>&1 || \
			missing="$$missing python3-pip python3-wheel python3-setuptools python3-packaging"; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

rpm: rpm-deps dist
	rm -rf $(RPM_TOPDIR)
	mkdir -p $(RPM_TOPDIR)/SPECS $(RPM_DIR)
	rm -f $(RPM_DIR)/vmbridge-$(VERSION)-*.rpm
	tar -xzOf $(SDIST) vmbridge-$(VERSION)/contrib/rpm/vmbridge.spec > $(RPM_TOPDIR)/SPECS/vmbridge.spec
	chmod 0644 $(RPM_TOPDIR)/SPECS/vmbridge.spec
	rpmbuild -ba --quiet $(RPM_NODEPS) $(RPM_FALLBACK) \
		--define "_topdir $(RPM_TOPDIR)" \
		--define "_sourcedir $(DIST_DIR)" \
		--define "_srcrpmdir $(RPM_DIR)" \
		--define "_rpmdir $(RPM_DIR)" \
		--define "_rpmfilename %{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm" \
		$(RPM_TOPDIR)/SPECS/vmbridge.spec
	rpmlint $(RPMLINT_CONFIG) $(RPM_TOPDIR)/SPECS/vmbridge.spec $(RPM_DIR)/vmbridge-$(VERSION)-*.rpm
	@ls -1 $(RPM_DIR)/vmbridge-$(VERSION)-*.rpm

clean:
	rm -rf $(VENV) $(CACHE) build dist *.egg-info
