# cvmfs-publisher: the two commands are `make demo` and `make test`.
# Everything is installed on first use: Debian packages for the local stack, then the project venv (.venv).
SHELL := /bin/bash
ROOT := $(abspath .)
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
# ansible-rulebook (Event-Driven Ansible) lives in a venv of its own: its rule engine and async stack are not the
# daemon's dependencies. The rulebook's playbooks still run with the project venv's ansible-playbook.
EDA_VENV := $(ROOT)/.venv-eda
# openjdk-17-jre-headless: ansible-rulebook's rule engine (Drools); chromium: the status page's browser test;
# prometheus: promtool, which checks docs/monitoring/alerts.yml in `make lint`.
APT_PACKAGES := ceph-mon ceph-osd radosgw ceph-common rabbitmq-server rclone openjdk-17-jre-headless chromium prometheus
COLLECTION_LINK := $(ROOT)/.build/collections/ansible_collections/infn_cloud/cvmfs_publisher
# The test stack lives apart from the demo stack, so both can run side by side.
TEST_STACK_DIR ?= $(ROOT)/.devstack/test
TEST_STACK_PORT_BASE ?= 19000
# A second test stack serving everything over TLS (`devstack/stack up --tls`), for the tests marked `tls`; its ports
# stay clear of the RabbitMQ cluster's (devstack/rabbitcluster.py: base+100..base+140).
TEST_TLS_STACK_DIR ?= $(ROOT)/.devstack/test-tls
TEST_TLS_STACK_PORT_BASE ?= $(shell echo $$(( $(TEST_STACK_PORT_BASE) + 200 )))
DEMO_STACK_DIR ?= $(ROOT)/.devstack/demo
DEMO_STACK_PORT_BASE ?= 18000
PYTEST_ARGS ?=

export ANSIBLE_CONFIG := $(ROOT)/ansible.cfg

.PHONY: all install apt venv eda-venv collection dist demo demo-down test test-unit test-faults test-cluster test-integration stack-up stack-down lint clean distclean

all: install

install: apt venv collection

apt: .build/apt.stamp
.build/apt.stamp: Makefile
	@mkdir -p .build
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements.txt requirements-dev.txt consumer/requirements.txt consumer/pyproject.toml consumer/setup.py galaxy.yml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e consumer
	@touch $@

eda-venv: $(EDA_VENV)/.stamp
$(EDA_VENV)/.stamp: requirements-eda.txt | .build/apt.stamp
	@test -x $(EDA_VENV)/bin/python || python3 -m venv $(EDA_VENV)
	$(EDA_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-eda.txt
	@touch $@

collection: $(COLLECTION_LINK)
$(COLLECTION_LINK):
	@mkdir -p $(dir $@)
	@ln -sfn $(ROOT) $@

# The two release artifacts, one version (galaxy.yml's): the collection tarball and the consumer daemon's wheel
# (and sdist), built from a clean copy (tracked and new files, nothing git ignores) into dist/.
dist: install
	@set -euo pipefail; export PATH="$(VENV)/bin:$$PATH"; \
	src=$(ROOT)/.build/dist-src/ansible_collections/infn_cloud/cvmfs_publisher; rm -rf $(ROOT)/.build/dist-src; \
	mkdir -p $$src dist; \
	git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C $$src; \
	ansible-galaxy collection build --force --output-path dist $$src; \
	out=$$($(PY) -m build --no-isolation --outdir dist $$src/consumer 2>&1) || { echo "$$out" >&2; exit 1; }; \
	ls -1 dist/*$$(sed -n 's/^version: *//p' galaxy.yml)*

demo: install
	@DEVSTACK_DIR=$(DEMO_STACK_DIR) DEVSTACK_PORT_BASE=$(DEMO_STACK_PORT_BASE) $(PY) devstack/demo.py

demo-down:
	@DEVSTACK_DIR=$(DEMO_STACK_DIR) DEVSTACK_PORT_BASE=$(DEMO_STACK_PORT_BASE) devstack/stack down

stack-up: install
	@DEVSTACK_DIR=$(TEST_STACK_DIR) DEVSTACK_PORT_BASE=$(TEST_STACK_PORT_BASE) devstack/stack up

stack-down:
	@DEVSTACK_DIR=$(TEST_STACK_DIR) DEVSTACK_PORT_BASE=$(TEST_STACK_PORT_BASE) devstack/stack down

# Every test: the quality gates (make lint), then unit, the stand-in's own tests, integration and end-to-end tests
# and the molecule scenario against a fresh local stack, then the tests marked `tls` against a fresh `--tls` stack
# (make test-tls). Every part runs; the exit status says whether any failed.
STACK_ENV = DEVSTACK_DIR=$(TEST_STACK_DIR) DEVSTACK_PORT_BASE=$(TEST_STACK_PORT_BASE)
TLS_STACK_ENV = DEVSTACK_DIR=$(TEST_TLS_STACK_DIR) DEVSTACK_PORT_BASE=$(TEST_TLS_STACK_PORT_BASE)
test: install lint-install eda-venv
	@failed=""; \
	$(MAKE) --no-print-directory lint || failed="$$failed lint"; \
	$(STACK_ENV) devstack/stack down >/dev/null 2>&1 || true; \
	if $(STACK_ENV) devstack/stack up; then \
	  $(STACK_ENV) $(PY) -m pytest --ignore=tests/faults $(PYTEST_ARGS) || failed="$$failed pytest"; \
	  PATH=$(VENV)/bin:$$PATH $(STACK_ENV) $(VENV)/bin/molecule test -s default || failed="$$failed molecule"; \
	else failed="$$failed stack-up"; fi; \
	[ -z "$$failed" ] || $(call show_stack,$(TEST_STACK_DIR),test); \
	$(STACK_ENV) devstack/stack down || true; \
	$(MAKE) --no-print-directory test-faults || failed="$$failed faults"; \
	$(MAKE) --no-print-directory test-tls || failed="$$failed tls"; \
	if [ -n "$$failed" ]; then echo "make test FAILED:$$failed" >&2; exit 1; fi; \
	echo "make test: every part passed"

# $(call on_fresh_stack,<stack env>,<stack up options>,<pytest arguments>): bring a fresh stack up, run pytest on
# it, take it down; the exit status is pytest's (or 1 when the stack did not come up).
on_fresh_stack = $(1) devstack/stack down >/dev/null 2>&1 || true; status=0; \
	if $(1) devstack/stack up $(2); then $(1) $(PY) -m pytest $(3) $(PYTEST_ARGS) || status=1; else status=1; fi; \
	[ $$status = 0 ] || $(call show_stack,$$($(1) sh -c 'echo $$DEVSTACK_DIR'),$@); \
	$(1) devstack/stack down || true; exit $$status

# $(call show_stack,<stack dir>,<name>): after a failure, before the stack is removed: which services are up, the
# end of each service's log, and a copy of the logs in .build/stack-logs/<name> (CI prints only the output).
show_stack = { echo "--- stack $(2) after the failure:"; DEVSTACK_DIR=$(1) devstack/stack status || true; \
	for log in $(1)/logs/*.out $(1)/ceph/log/client.rgw.*.log; do [ -f "$$log" ] && { echo "--- $$log (end)"; \
	tail -n 15 "$$log"; }; done; rm -rf .build/stack-logs/$(2); mkdir -p .build/stack-logs/$(2); \
	cp -r $(1)/logs $(1)/ceph/log .build/stack-logs/$(2)/ 2>/dev/null; true; } >&2

# The tests marked `tls` (provisioning, sync, the daemon end to end, wrong CA / wrong host name refusals) against a
# stack that serves RGW, RabbitMQ and OpenBao over TLS only, with a CA of its own.
test-tls: install
	@$(call on_fresh_stack,$(TLS_STACK_ENV),--tls,-m tls)

# The fault suite (tests/faults) against a fresh stack of its own (it stops and starts services; nothing it leaves
# can touch the other tests). Part of `make test`; prints the table "fault | tried | lost | ...".
test-faults: install
	@$(call on_fresh_stack,$(STACK_ENV),,tests/faults)

# The several-hosts tests alone (tests/integration/test_scaleout.py: three daemons as hosts, a RabbitMQ cluster); `make
# test` runs them with the other integration tests.
test-cluster: install
	@$(call on_fresh_stack,$(STACK_ENV),,tests/integration/test_scaleout.py)

test-unit: install
	$(PY) -m pytest tests/unit devstack/tests consumer/tests $(PYTEST_ARGS)

# Quality gates (also run by `make test`): ruff and ansible-lint (production profile) on the checkout; then build the
# collection tarball from a clean copy (tracked and new files, nothing git ignores); lint the changelog fragments and
# check CHANGELOG.md is what changelogs/changelog.yaml renders; run ansible-test sanity on the
# tarball's content (what operators and Galaxy get), install it into a scratch path and render every module's and
# role's documentation with ansible-doc from there; antsibull-docs lints the installed collection's documentation
# (markup, references between options, modules and roles). Packaging: the consumer wheel builds with galaxy.yml's
# version; ansible-builder sees the collection's Python and system dependencies (meta/execution-environment.yml) and
# writes the build context of docs/examples/execution-environment.yml (no container engine).
lint: install lint-install
	@set -euo pipefail; export PATH="$(VENV)/bin:$$PATH"; failed=""; \
	lint_dir=$(ROOT)/.build/lint; collection=ansible_collections/infn_cloud/cvmfs_publisher; \
	echo "== ruff"; ruff check . || failed="$$failed ruff"; \
	echo "== ansible-lint"; ansible-lint -q || failed="$$failed ansible-lint"; \
	echo "== promtool"; (cd docs/monitoring && promtool check rules alerts.yml && promtool test rules alerts.test.yml) \
	  || failed="$$failed promtool"; \
	echo "== build"; rm -rf $$lint_dir; mkdir -p $$lint_dir/src/$$collection $$lint_dir/sanity/$$collection; \
	git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null \
	  | tar -xf - -C $$lint_dir/src/$$collection; \
	ansible-galaxy collection build --output-path $$lint_dir/dist $$lint_dir/src/$$collection; \
	echo "== consumer wheel"; version=$$(sed -n 's/^version: *//p' galaxy.yml); \
	(out=$$(python -m build --no-isolation --wheel --outdir $$lint_dir/wheel $$lint_dir/src/$$collection/consumer 2>&1) \
	  || { echo "$$out" >&2; false; }; test -f $$lint_dir/wheel/cvmfs_publisher_consumer-$$version-py3-none-any.whl) \
	  || failed="$$failed consumer-wheel"; \
	echo "== changelog"; \
	(antsibull-changelog lint && antsibull-changelog lint-changelog-yaml changelogs/changelog.yaml \
	  && (cd $$lint_dir/src/$$collection && antsibull-changelog generate) \
	  && { cmp -s CHANGELOG.md $$lint_dir/src/$$collection/CHANGELOG.md \
	       || { echo "CHANGELOG.md differs from what changelogs/changelog.yaml renders: run antsibull-changelog generate" >&2; false; }; }) \
	  || failed="$$failed changelog"; \
	echo "== ansible-test sanity"; \
	tar -xzf $$lint_dir/dist/*.tar.gz -C $$lint_dir/sanity/$$collection; \
	git -C $$lint_dir/sanity/$$collection init -q; git -C $$lint_dir/sanity/$$collection add -A; \
	git -C $$lint_dir/sanity/$$collection -c user.name=lint -c user.email=lint@localhost commit -qm "lint snapshot"; \
	pip_version=$$($(PY) -c 'import re, ansible_test, pathlib; src = pathlib.Path(ansible_test.__file__).parent / "_internal/python_requirements.py"; print(re.search(r"pip=.([0-9.]+).", src.read_text()).group(1))'); \
	mkdir -p $$HOME/.ansible/test/cache; \
	install -m 0644 tests/sanity/get_pip_offline.py $$HOME/.ansible/test/cache/get_pip_$${pip_version//./_}.py; \
	(cd $$lint_dir/sanity/$$collection && ansible-test sanity --python 3.11 --requirements --color no 2>&1 \
	  | sed '/is ignored: it is neither a file/d') || failed="$$failed ansible-test-sanity"; \
	echo "== install, ansible-doc"; \
	export ANSIBLE_COLLECTIONS_PATH=$$lint_dir/installed; \
	ansible-galaxy collection install --offline -p $$lint_dir/installed $$lint_dir/dist/*.tar.gz >/dev/null; \
	modules=$$(cd $$lint_dir/sanity/$$collection/plugins/modules && ls *.py | grep -v '^__init__' | sed 's/\.py$$//'); \
	for module in $$modules; do \
	  ansible-doc -t module infn_cloud.cvmfs_publisher.$$module >/dev/null || failed="$$failed ansible-doc:$$module"; \
	done; \
	for role in $$(ls $$lint_dir/sanity/$$collection/roles); do \
	  ansible-doc -t role infn_cloud.cvmfs_publisher.$$role >/dev/null || failed="$$failed ansible-doc:$$role"; \
	done; \
	echo "== execution environment"; \
	ee_deps=$$(ansible-builder introspect --sanitize $$lint_dir/installed) || failed="$$failed ee-introspect"; \
	for dep in hvac boto3 botocore tar; do \
	  grep -q "^- '$$dep[^a-z0-9_-].*from collection infn_cloud.cvmfs_publisher" <<<"$$ee_deps" \
	    || { echo "ansible-builder does not see $$dep in the collection's dependencies" >&2; failed="$$failed ee-deps:$$dep"; }; \
	done; \
	ansible-builder create --file docs/examples/execution-environment.yml --context $$lint_dir/ee >/dev/null \
	  || failed="$$failed ansible-builder-create"; \
	echo "== antsibull-docs lint-collection-docs"; \
	antsibull-docs lint-collection-docs --plugin-docs $$lint_dir/installed/$$collection \
	  || failed="$$failed antsibull-docs"; \
	if [ -n "$$failed" ]; then echo "lint FAILED:$$failed" >&2; exit 1; fi; \
	echo "lint: clean ($$(echo $$modules | wc -w) modules and $$(ls $$lint_dir/sanity/$$collection/roles | wc -l) roles documented)"

lint-install: $(VENV)/.lint.stamp
$(VENV)/.lint.stamp: requirements-lint.txt $(VENV)/.stamp
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-lint.txt
	@touch $@

clean:
	rm -rf .build tests/output .pytest_cache dist consumer/build

distclean: clean
	-DEVSTACK_DIR=$(TEST_STACK_DIR) devstack/cluster down
	-DEVSTACK_DIR=$(TEST_STACK_DIR) devstack/stack down
	-DEVSTACK_DIR=$(DEMO_STACK_DIR) devstack/stack down
	-DEVSTACK_DIR=$(TEST_TLS_STACK_DIR) devstack/stack down
	rm -rf .venv .venv-eda .devstack
