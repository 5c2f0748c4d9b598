#!/usr/bin/env bash
# The image build tools from Debian's packages (no Docker engine needed): buildah builds and runs
# OCI images, mmdebstrap makes a Debian base from the Debian archive. Idempotent.
set -euo pipefail
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else
  echo "install-image-tools: need root (or sudo) for: apt-get install ${missing[*]}" >&2; exit 3
fi
echo "install-image-tools: installing ${missing[*]} (Debian packages)"
$SUDO apt-get update -qq || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
