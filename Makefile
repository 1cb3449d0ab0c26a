# One file a newcomer reads in a minute. Everything runs from the virtualenv in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: run test test-quick lint typecheck deploy-check pytest pytest-sqlite browser bench-api bench-queue bench-tenants bench-engine bench-billing bench-capacity race soak mutation install clean

## Set up and run the platform on the embedded default (SQLite, a private Redis it starts): http://127.0.0.1:$(PORT)
run: install
	PLATFORM_EMBEDDED=1 $(BIN)/python manage.py runplatform --port $(PORT)

## Set up and run lint, type checks, the deployment's validation and the whole test suite
test: install lint typecheck deploy-check pytest

## The inner loop: pytest without lint, slow (real processes), browser and end-to-end tests
test-quick: install
	$(BIN)/python -m pytest -m "not slow and not browser" --ignore=tests/e2e --ignore=tests/browser

install: $(BIN)/.installed

# torch is pinned to 2.13.0: pip takes the CPU wheel on disk instead of gigabytes of CUDA packages.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

## Debian's chromium for the browser tests (tests/browser): Playwright drives it and never downloads one
browser:
	@test -x /usr/bin/chromium || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	PLATFORM_EMBEDDED=1 PLATFORM_DATA_DIR=$(CURDIR)/var $(BIN)/mypy

## The deployment, without a cluster: yamllint, every Kubernetes overlay rendered and validated strictly against
## Kubernetes' schemas and KEDA's API (npm's @kubernetes-models/keda with TypeScript: needs Node.js 20 and npm), the
## Dockerfile's rules and its RUN commands (deploy/k8s/README.md, deploy/keda/README.md)
deploy-check: install
	$(BIN)/yamllint --strict -c deploy/.yamllint.yaml deploy
	$(BIN)/python -m pytest -q tests/deploy/test_manifests.py tests/deploy/test_image.py

pytest: install browser
	$(BIN)/python -m pytest

## The suite again on SQLite with no services, whatever DATABASE_URL/REDIS_URL say
pytest-sqlite: install browser
	env -u DATABASE_URL -u REDIS_URL $(BIN)/python -m pytest

## Request rate of an authenticated GET /v1/me against /healthz, on a real server (ARGS="--server gunicorn --workers 2")
bench-api: install
	$(BIN)/python -m tests.bench.api_rate $(ARGS)

## Submit latency, queue overhead and sustained submits/s, against a bare Celery round trip; the web process as
## deploy/ starts it (ARGS="--servers uvicorn,gunicorn:1,gunicorn:2 --web-cpus 0" compares server configurations)
bench-queue: install
	$(BIN)/python -m tests.bench.queue_overhead $(ARGS)

## One organization's submits and finishes per second against N organizations', and why (DATABASE_URL=postgres://...; ARGS="--processes 4 --seconds 15")
bench-tenants: install
	$(BIN)/python -m tests.bench.hot_tenant $(ARGS)

## Stock diffusers against the engine: same weights, seeds and parameters (ARGS=--gpu on CUDA, ARGS=--quick)
bench-engine: install
	$(BIN)/python -m tests.bench.engine $(ARGS)

## Usage records written per second through metering, and the usage page at 1M records: rollups against raw
bench-billing: install
	$(BIN)/python -m tests.bench.billing $(ARGS)

## CPU per request and per job of each process type and of PostgreSQL, the figures of deploy/CAPACITY.md (DATABASE_URL=postgres://...)
bench-capacity: install
	$(BIN)/python -m tests.bench.capacity $(ARGS)

## Mutation testing of the money modules against their fast tests, like a benchmark, never in CI (ARGS="--jobs 2")
mutation: install
	$(BIN)/python -m tests.bench.mutation $(ARGS)

## Lifecycle and ledger races on PostgreSQL, 100 rounds each: deadlocks, lost cancels, drift (DATABASE_URL=postgres://...)
race: install
	$(BIN)/python -m tests.concurrency.run --repetitions 100 $(ARGS)

## The embedded run (`make run`) under mixed traffic and idle spells; fails if a process dies (ARGS="--minutes 30")
soak: install
	$(BIN)/python -m tests.bench.soak $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
