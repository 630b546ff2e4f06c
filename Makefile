# ozone: the two commands of the README, plus helpers. Every target is idempotent.
#
#   make demo   install what is missing, start libvirtd, build the guest image,
#               define + boot examples/demo.json, show it working, stop it
#   make test   the same set-up, then the whole test suite
#
# This build machine cannot run KVM guests (see README): guests run under TCG unless
# you say otherwise, e.g. `make demo OZONE_ACCEL=auto` on a host with working KVM.

SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
OZONE := $(VENV)/bin/ozone
OZONE_ACCEL ?= tcg
export OZONE_ACCEL
export LIBVIRT_DEFAULT_URI ?= qemu:///system

.PHONY: setup setup-test guest demo test unit lint xml readme clean-demo bench chaos

setup:
	@scripts/setup-host

setup-test:
	@scripts/setup-host --test

guest: setup
	@scripts/build-guest-iso

demo: guest
	@scripts/demo

PY_SOURCES := ozone_libvirt tests scripts/*.py scripts/bench-exec scripts/bench-run scripts/bench-share scripts/chaos

test: setup-test
	@scripts/build-guest-iso
	@# the two Debian images at once (each mostly waits on one core); each is cached
	@scripts/build-debian-image & test_image=$$!; \
	  OZONE_IMAGE_DIR=$(CURDIR)/build/images $(OZONE) image build examples/debian.yaml; \
	  example=$$?; wait $$test_image && [ $$example -eq 0 ]
	@$(VENV)/bin/ruff check $(PY_SOURCES)
	@$(VENV)/bin/ruff format --check $(PY_SOURCES)
	@$(PY) -m mypy
	@$(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

# quick tests only: no guest boots
unit: setup
	@$(PY) -m pytest -ra -m "not guest" $(PYTEST_ARGS)

lint: setup
	@$(VENV)/bin/ruff check $(PY_SOURCES)
	@$(VENV)/bin/ruff format --check $(PY_SOURCES)
	@$(PY) -m mypy

# regenerate the golden domain XML in xml/ from examples/ (then review the diff)
xml: setup
	@$(PY) -m pytest -q tests/test_golden.py --regenerate-output

# regenerate README.md's config reference from ozone_libvirt/schema.py (then review the diff)
readme: setup
	@$(PY) -m ozone_libvirt.schema --update-readme README.md

clean-demo:
	-@$(OZONE) destroy demo >/dev/null 2>&1
	-@$(OZONE) undefine demo --remove-storage

bench: guest
	@$(PY) scripts/bench-lifecycle.py
	@$(PY) scripts/bench-exec
	@$(PY) scripts/bench-run

# fault scenarios (kills QEMU, restarts libvirtd): a table of what each left behind
chaos: guest
	@$(PY) scripts/chaos
