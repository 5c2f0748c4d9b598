# Two commands do all the set-up on a fresh Debian machine:
#   make pilot   run the local federation (Fashion-MNIST, 8 sites, 4 methods side by side)
#   make test    run the test suite
# Both bootstrap the .venv and the data set first (idempotent).

VENV ?= .venv
BIN := $(VENV)/bin
PILOT_ARGS ?=
PYTEST_ARGS ?=

.PHONY: bootstrap pilot pilot-scarce pilot-quick test check lint typecheck bench clean deploy-manifests images

bootstrap:
	@scripts/bootstrap.sh

# Both pilots are manifests under examples/, the same SiteTasks and FederationRound a cluster
# takes (`kubectl apply -f`); pilot your own federation with `mfed pilot -f DIR`.
pilot: bootstrap
	$(BIN)/mfed pilot -f examples/pilot-default/ $(PILOT_ARGS)

# Where cross-task sharing should pay: label-scarce sites beside data-rich ones (docs/strategies.md)
pilot-scarce: bootstrap
	$(BIN)/mfed pilot -f examples/pilot-scarce/ --methods local,auto --out runs/pilot-scarce $(PILOT_ARGS)

# A smoke run of the pilot's machinery on the built-in sites (2 rounds, 1 site per task, seconds)
pilot-quick: bootstrap
	$(BIN)/mfed pilot --quick $(PILOT_ARGS)

test: bootstrap
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The house rules CI enforces before the tests (fast, first): lint, format, layering, types.
check: lint typecheck

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: bootstrap
	$(BIN)/mypy

# Both images, built and run without a Docker engine (buildah, a Debian base from mmdebstrap, a
# wheelhouse of the pinned versions): what CI tests in tests/images. docs/install.md, "Images".
images: bootstrap
	scripts/install-image-tools.sh
	scripts/build-images.sh ci

bench: bootstrap
	$(BIN)/python bench/aggregation_memory.py

# Regenerate deploy/ (plain manifests for kubectl apply -k) and the chart's copy of crds/ from
# their sources; tests/chart/test_deploy.py fails when they are stale.
deploy-manifests: bootstrap
	$(BIN)/python scripts/render_deploy.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
