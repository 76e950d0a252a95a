# The two commands of the README: `make demo` and `make test`. Each sets up what it needs:
# a virtualenv with the package installed editable, and the consul / redis-server binaries.
PYTHON ?= python3
VENV := .venv
VENV_PYCONSUL := .venv-py-consul
SERVERS := .servers/env
PYTEST_ARGS ?=
# Two test processes, each taking whole files (a file's topology and fixed loopback
# addresses stay in one process); PARALLEL= runs the suite in one process.
PARALLEL ?= -n 2 --dist loadfile

.PHONY: demo demo-cron test test-python-consul2 test-py-consul lint bench servers venv clean

# make demo EXAMPLE=flask (default: django); DEMO_ARGS="--seconds 30" and the like.
EXAMPLE ?= django
DEMO_ARGS ?=
demo: $(VENV)/.installed $(SERVERS)
	$(VENV)/bin/python -m example_project.demo --example $(EXAMPLE) $(DEMO_ARGS)

# `celery-consul-lock run` on three "nodes" for a few slots, one late, one killed mid-run.
demo-cron: $(VENV)/.installed $(SERVERS)
	$(VENV)/bin/python -m example_project.demo_cron $(DEMO_ARGS)

test: lint test-python-consul2 test-py-consul

# The whole suite, with python-consul2 (the declared dependency).
test-python-consul2: $(VENV)/.installed $(SERVERS)
	$(VENV)/bin/python -m pytest $(PARALLEL) $(PYTEST_ARGS)

# The adapter and lock tests again with the maintained fork py-consul instead.
test-py-consul: $(VENV_PYCONSUL)/.installed $(SERVERS)
	$(VENV_PYCONSUL)/bin/python -m pytest -m client $(PARALLEL) $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check celery_consul_lock tests bench example_project
	$(VENV)/bin/ruff format --check celery_consul_lock
	$(VENV)/bin/mypy

bench: $(VENV)/.installed $(SERVERS)
	$(VENV)/bin/python bench/lock_cost.py

servers: $(SERVERS)
venv: $(VENV)/.installed

$(SERVERS): scripts/provision.sh
	bash scripts/provision.sh

$(VENV)/.installed: pyproject.toml scripts/venv.sh
	bash scripts/venv.sh $(PYTHON) $(VENV) python-consul2
	touch $@

$(VENV_PYCONSUL)/.installed: pyproject.toml scripts/venv.sh
	bash scripts/venv.sh $(PYTHON) $(VENV_PYCONSUL) py-consul
	touch $@

clean:
	rm -rf $(VENV) $(VENV_PYCONSUL) .servers .demo
