# Outpost developer commands. `make test` is what CI runs (via .ci/run).
#   make venv           create .venv (python3.11) and install the project with its dev extras
#   make test           venv + Node peers + lint + every test tier; services start and stop by themselves
#   make services       start Kafka, Mosquitto and Toxiproxy for manual work; prints export lines
#                       (CLUSTER=1: a three-broker Kafka cluster instead of one node)
#   make services-down  stop them
#   make lint           ruff + import-linter
#   make demo           run the demo gateway
#   make dist           release tarballs (aarch64, armv7l, x86_64) with a wheelhouse, for offline installs
#   make test-deploy    (root) install the tarballs offline in emulated Bookworm roots; separate from `test`
#   make lock           re-pin deploy/requirements.lock (with hashes) from pyproject.toml
#   make man            build/man/outpost.1, the man page generated from the CLI's parser
#   make completion     build/completion/outpost, the bash completion generated from the parser

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=
TEST_PATHS := tests/unit tests/component tests/integration tests/e2e

.PHONY: venv test lint services services-down services-env tools node-deps demo clean-services dist test-deploy lock \
	man completion

venv: $(VENV)/.installed

# Reinstall when the dependency list changes; an editable install keeps code changes live.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# Test peers in Node (modbus-serial, sparkplug-payload): `npm ci` from the committed lock file.
node-deps: venv
	$(PY) -c "from tests.harness.tools import ensure_node_peers; ensure_node_peers()"

# Fetch Kafka from Maven Central and build Toxiproxy once (cached in ~/.cache/outpost), and
# HiveMQ CE for the Sparkplug TCK (../shared/tck; cached in ~/.cache/sparkplug-tck), so the
# first test that needs them does not spend its timeout on downloads.
tools: venv node-deps
	$(PY) -m tests.harness install
	$(PY) -m tests.tck prepare

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Lint failures fail the run but do not hide the test results: every step runs, then the
# worst status is returned. The fixtures start the services lazily and stop them at exit.
test: venv node-deps tools
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/lint-imports || status=1; \
	$(VENV)/bin/pytest $(TEST_PATHS) --durations=15 $(PYTEST_ARGS) || status=$$?; \
	exit $$status

# CLUSTER=1: three Kafka brokers (RF 3, min.insync.replicas 2, one proxy each) instead of one.
services: venv tools
	@$(PY) -m tests.harness up $(if $(CLUSTER),--cluster)

services-env: venv
	@$(PY) -m tests.harness env

services-down: venv
	@$(PY) -m tests.harness down

demo: venv
	$(PY) -m gateway.cli.demo

clean-services: services-down
	rm -rf .services

# Release build. A separate venv with a pinned setuptools (>= 77 for the SPDX license field)
# builds the Outpost wheel and, for armv7l, a pure-Python aiokafka wheel; downloads are cached.
BUILD_VENV := $(HOME)/.cache/outpost/build-venv
BUILD_PY   := $(BUILD_VENV)/bin/python
BUILD_REQS := setuptools==80.9.0 pip-tools==7.6.2

$(BUILD_VENV)/.installed-$(word 1,$(BUILD_REQS)):
	@test -x $(BUILD_PY) || $(PYTHON) -m venv $(BUILD_VENV)
	PIP_FIND_LINKS= $(BUILD_PY) -m pip install --quiet --disable-pip-version-check $(BUILD_REQS)
	@touch $@

# The man page and the bash completion are generated from the parser at build time (the
# release build makes its own copies, with the project venv's Python: --docs-python).
man: venv
	$(PY) -m gateway.cli.docgen man -o build/man/outpost.1

completion: venv
	$(PY) -m gateway.cli.docgen completion -o build/completion/outpost

dist: venv $(BUILD_VENV)/.installed-$(word 1,$(BUILD_REQS))
	$(BUILD_PY) deploy/build_dist.py --out dist --docs-python $(PY)

lock: $(BUILD_VENV)/.installed-$(word 1,$(BUILD_REQS))
	PIP_FIND_LINKS= $(BUILD_VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --output-file deploy/requirements.lock pyproject.toml

# Needs root (debootstrap, chroot, loop devices) and the Debian packages .ci/run installs.
test-deploy: venv $(BUILD_VENV)/.installed-$(word 1,$(BUILD_REQS))
	OUTPOST_BUILD_PYTHON=$(BUILD_PY) $(PY) -m tests.deploy --json dist/test-deploy.json
