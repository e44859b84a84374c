# One command runner for people, CI and the README.
PYTHON ?= .venv/bin/python
LINTED := src services tests scripts deploy bench

.PHONY: venv proto proto-check lint typecheck test test-unit test-integration demo bench bench-partitions chaos clean \
	docker-engine docker-images image-test compose-test test-containers test-containers-all docker-stop docker-clean
BENCH_ARGS ?= --wait-quiet 300 --record

venv: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -e '.[dev]'
	touch $@

proto: venv
	$(PYTHON) scripts/protogen.py

proto-check: venv
	$(PYTHON) scripts/protogen.py --check

lint: venv
	$(PYTHON) -m ruff check $(LINTED)
	$(PYTHON) -m ruff format --check $(LINTED)

typecheck: venv
	$(PYTHON) -m mypy

test: venv lint typecheck
	$(PYTHON) -m pytest -q

test-unit: venv
	$(PYTHON) -m pytest tests/unit

test-integration: venv
	$(PYTHON) -m pytest tests/integration

# With no broker answering at RABBITMQ_URL, a throw-away one is started (and removed) for the demo.
demo: venv
	$(PYTHON) scripts/demo.py $(DEMO_ARGS)

chaos: venv docker-images
	$(PYTHON) scripts/chaos.py

# Real containers (scripts/containers.py: a Docker engine and base images from Debian, no registry
# needed). Each target removes what it created; the base images are kept for the next run.
CONTAINER_TESTS := SLUICEGATE_CONTAINER_TESTS=1 $(PYTHON) -m pytest -p no:cacheprovider -q -s

docker-engine:
	python3 scripts/containers.py engine

docker-images: venv
	$(PYTHON) scripts/containers.py images

# The image built from the Dockerfile and every role run from it, then the compose stack.
image-test: docker-images
	$(CONTAINER_TESTS) tests/containers

compose-test: docker-images
	$(CONTAINER_TESTS) tests/containers/test_compose.py

# The integration tests against containers that testcontainers starts from these images (the
# official ones work too where a registry is reachable: make test-containers TEST_RABBITMQ_IMAGE=...).
# Ryuk, testcontainers' reaper, is an image from a registry; the fixtures stop their containers.
TEST_RABBITMQ_IMAGE ?= sluicegate-local/rabbitmq:3.10
TEST_POSTGRES_IMAGE ?= sluicegate-local/postgres:15

# CI runs a subset that reaches every module (dispatch, lanes, retries, deadlines, cancellation,
# the store and recorder, tracing, failover, the edge, operator commands); test-containers-all runs
# every integration test that way.
CONTAINER_SUBSET ?= $(addprefix tests/integration/,test_dispatch.py test_lanes_later.py test_retries_and_expiry.py \
	test_cancel_and_deadlines.py test_task_store.py test_task_records.py test_observability.py test_failover.py \
	test_bad_input.py test_health_endpoints.py test_operator_commands.py)
ON_CONTAINERS := env -u RABBITMQ_URL -u SLUICEGATE_RABBITMQ_URL TESTCONTAINERS_RYUK_DISABLED=true \
	SLUICEGATE_TEST_RABBITMQ_IMAGE=$(TEST_RABBITMQ_IMAGE) SLUICEGATE_TEST_POSTGRES_IMAGE=$(TEST_POSTGRES_IMAGE) \
	$(PYTHON) -m pytest -p no:cacheprovider -q

test-containers: docker-images
	$(ON_CONTAINERS) $(CONTAINER_SUBSET)

test-containers-all: docker-images
	$(ON_CONTAINERS) tests/integration

docker-stop:
	python3 scripts/containers.py stop-engine

docker-clean:
	python3 scripts/containers.py clean

bench: venv .venv/.bench-installed
	$(PYTHON) -m bench $(BENCH_ARGS)

# Scheduling throughput with P = 1, 2, 4 scheduler partitions, the scheduler made the bottleneck by a
# fixed synthetic cost per placement (BENCHMARKS.md, "Scheduler partitions").
BENCH_PARTITIONS_ARGS ?= --partitions 1,2,4 --tasks 3000 --cost 2ms --mode cpu --repeat 3
bench-partitions: venv
	$(PYTHON) scripts/partition_bench.py $(BENCH_PARTITIONS_ARGS)

.venv/.bench-installed: pyproject.toml
	.venv/bin/pip install --quiet -e '.[bench]'
	touch $@

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build dist
