# The two commands of the README: `make demo` and `make test`. Each sets up what it needs:
# a virtualenv with the package installed editable, and the consul / redis-server binaries.
PYTHON ?= python3
VENV := .venv
# The benchmark environment of bench/peers.py: the package, the peers it is compared with and
# matplotlib (never dependencies of the package).
VENV_BENCH := .venv-bench
SERVERS := .servers/env
PYTEST_ARGS ?=
# Two test processes, each taking whole files (a file's topology and fixed loopback
# addresses stay in one process); PARALLEL= runs the suite in one process.
PARALLEL ?= -n 2 --dist loadfile

.PHONY: demo demo-cron test test-suite test-matrix lint docs bench bench-peers bench-capacity servers venv clean

# make demo EXAMPLE=flask (default: django); DEMO_ARGS="--seconds 30" and the like.
EXAMPLE ?= django
DEMO_ARGS ?=
demo: $(VENV)/.installed $(SERVERS)
	$(VENV)/bin/python -m example_project.demo --example $(EXAMPLE) $(DEMO_ARGS)

# `celery-consul-lock run` on three "nodes" for a few slots, one late, one killed mid-run.
demo-cron: $(VENV)/.installed $(SERVERS)
	$(VENV)/bin/python -m example_project.demo_cron $(DEMO_ARGS)

test: lint docs test-suite

# The whole suite, once.
test-suite: $(VENV)/.installed $(SERVERS)
	$(VENV)/bin/python -m pytest $(PARALLEL) $(PYTEST_ARGS)

# The task and beat tests against the oldest and newest Celery / django-celery-beat we claim,
# one virtualenv per cell (scripts/matrix.sh). Not part of `make test`.
test-matrix: $(SERVERS)
	bash scripts/matrix.sh $(PYTHON) $(PYTEST_ARGS)

# ruff, mypy, then the release check: build the sdist and wheel into dist/ as an upload would,
# `twine check` them (metadata, the description renders) and check what they carry.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check celery_consul_lock tests bench example_project scripts
	$(VENV)/bin/ruff format --check celery_consul_lock
	$(VENV)/bin/mypy
	rm -rf dist
	$(VENV)/bin/python -m build -q --outdir dist . >/dev/null
	$(VENV)/bin/twine check --strict dist/*
	$(VENV)/bin/python scripts/check_dist.py dist

# The documentation site (mkdocs.yml, docs/*.md, the API reference from the docstrings) into
# site/, strictly: a broken link or anchor, a page left out of the nav or a docstring cross-reference
# it cannot resolve fails.
# NO_MKDOCS_2_WARNING: Material's banner about its successor, printed on every build.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(VENV)/.installed $(SERVERS)
	$(VENV)/bin/python bench/lock_cost.py

# Side by side with redbeat, single-beat, celery-once, celery-singleton and the curl script
# (README "Compared with the peers"); PEERS_ARGS="--quick" for the short run (under 8 minutes).
PEERS_ARGS ?=
bench-peers: $(VENV_BENCH)/.installed $(SERVERS)
	$(VENV_BENCH)/bin/python bench/peers.py --json docs/bench/peers.json --plots docs/bench $(PEERS_ARGS)

# Locked cycles per second on a three-server cluster with a client agent, beside the raw-write
# floor, what limits each point, held locks, keys in KV, session churn and locked tasks through
# a worker (docs: Capacity and sizing); CAPACITY_ARGS="--quick" for the short run (~4 minutes).
CAPACITY_ARGS ?=
bench-capacity: $(VENV_BENCH)/.installed $(SERVERS)
	$(VENV_BENCH)/bin/python bench/capacity.py --churn --celery --json docs/bench/capacity.json --plots docs/bench $(CAPACITY_ARGS)

servers: $(SERVERS)
venv: $(VENV)/.installed

$(SERVERS): scripts/provision.sh
	bash scripts/provision.sh

$(VENV)/.installed: pyproject.toml scripts/venv.sh
	bash scripts/venv.sh $(PYTHON) $(VENV)
	touch $@

$(VENV_BENCH)/.installed: pyproject.toml scripts/venv.sh scripts/bench-venv.sh
	bash scripts/bench-venv.sh $(PYTHON) $(VENV_BENCH)
	touch $@

clean:
	rm -rf $(VENV) $(VENV_BENCH) .venv-matrix-* .servers .demo dist site
