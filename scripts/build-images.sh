#!/usr/bin/env bash
# Build the operator and trainer images from a wheelhouse, with no network access at build time.
#
#   scripts/build-images.sh wheelhouse [--torch cpu|cu128]   # needs PyPI (and, for cu128, the
#                                                            # PyTorch CUDA index): a connected machine
#   scripts/build-images.sh images [--torch cpu|cu128]       # needs only the wheelhouse: air-gapped OK
#   scripts/build-images.sh ci                               # what CI runs: a local Debian base
#                                                            # (mmdebstrap), the CPU wheelhouse, both images
#   scripts/build-images.sh clean                            # remove the images and containers this made
#                                                            # (the cache of base and wheels stays)
#
# Every Python package comes from requirements/constraints.txt at its pinned version; torch is the
# CPU wheel for `cpu` and the CUDA 12.8 build of the same release for `cu128` (GPU image). The
# wheelhouse and the demo data set are staged under build/images/ (the only build context the
# Dockerfiles see, see .dockerignore). Air-gapped: run `wheelhouse` on a connected machine, copy
# the checkout (with build/images/) over, run `images` there with BASE= a base you mirrored.
#
# Settings (environment):
#   BUILDER   buildah (default), podman or docker
#   BASE      base image of both Dockerfiles (default: their public python image; `ci` makes and
#             uses localhost/mfed-base:bookworm)
#   TAG       image tag (default: the project version); images are localhost/mfed-{operator,trainer}:TAG
#   CACHE     where the Debian base tarball and the dependency wheels are kept between runs
#             (default /var/cache/mfed-images, else ~/.cache/mfed-images)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
command=$1; shift
TORCH=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) TORCH=${2:?--torch needs cpu or cu128}; shift 2 ;;
    *) echo "build-images: unknown argument $1" >&2; usage ;;
  esac
done
case "$TORCH" in cpu|cu128) ;; *) echo "build-images: --torch is cpu or cu128, not $TORCH" >&2; exit 2 ;; esac

PYTHON=${PYTHON:-.venv/bin/python}
BUILDER=${BUILDER:-buildah}
TAG=${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
STAGE=build/images
WHEELHOUSE=$STAGE/wheelhouse-$TORCH
if [ -z "${CACHE:-}" ]; then
  if mkdir -p /var/cache/mfed-images 2>/dev/null && [ -w /var/cache/mfed-images ]; then CACHE=/var/cache/mfed-images
  else CACHE=$HOME/.cache/mfed-images; fi
fi
mkdir -p "$CACHE" "$STAGE"
# The torch release both variants install: the constraints' pin.
TORCH_VERSION=$(sed -n 's/^torch==\(.*\)$/\1/p' requirements/constraints.txt)
[ -n "$TORCH_VERSION" ] || { echo "build-images: no torch==... pin in requirements/constraints.txt" >&2; exit 2; }
CUDA_INDEX=https://download.pytorch.org/whl/cu128

need() {  # need TOOL HINT: fail with the install hint, never skip
  command -v "$1" >/dev/null 2>&1 || { echo "build-images: $1 is missing; install it: $2" >&2; exit 3; }
}

constraints_key() { sha256sum requirements/constraints.txt pyproject.toml | sha256sum | cut -c1-16; }

wheelhouse() {
  need "$PYTHON" "scripts/bootstrap.sh (it makes .venv)"
  local deps="$CACHE/wheels-$TORCH-$(constraints_key)"
  if [ ! -f "$deps/.complete" ]; then
    echo "build-images: downloading the pinned wheels into $deps (once per constraints file)"
    rm -rf "$deps" && mkdir -p "$deps"
    if [ "$TORCH" = cu128 ]; then
      # The CUDA build of the constraints' torch release, and its nvidia-* wheels, from PyTorch's index.
      grep -v '^torch==' requirements/constraints.txt > "$deps/constraints-without-torch.txt"
      "$PYTHON" -m pip download --disable-pip-version-check --only-binary=:all: --dest "$deps" \
        --index-url "$CUDA_INDEX" "torch==$TORCH_VERSION+cu128"
      "$PYTHON" -m pip wheel --disable-pip-version-check --wheel-dir "$deps" \
        -c "$deps/constraints-without-torch.txt" --find-links "$deps" ".[trainer,operator]" "torch==$TORCH_VERSION+cu128"
      rm "$deps/constraints-without-torch.txt"
    else
      "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$deps" -c requirements/constraints.txt ".[trainer,operator]"
    fi
    rm -f "$deps"/mfed-*.whl  # the project itself is built fresh below, every time
    touch "$deps/.complete"
  fi
  rm -rf "$WHEELHOUSE" && mkdir -p "$WHEELHOUSE"
  cp "$deps"/*.whl "$WHEELHOUSE"/
  "$PYTHON" -m pip wheel --disable-pip-version-check --no-deps --wheel-dir "$WHEELHOUSE" . >/dev/null 2>&1 \
    || { echo "build-images: could not build the mfed wheel" >&2; exit 1; }
  echo "build-images: wheelhouse $WHEELHOUSE: $(ls "$WHEELHOUSE" | wc -l) wheels, torch $(ls "$WHEELHOUSE" | sed -n 's/^torch-\([^-]*\)-.*/\1/p')"
}

demo_data() {
  local src=${MFED_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
  [ -f "$src/train-images-idx3-ubyte.gz" ] \
    || { echo "build-images: Fashion-MNIST is not at $src; apt-get install dataset-fashion-mnist (or set MFED_FASHION_MNIST_DIR)" >&2; exit 3; }
  mkdir -p "$STAGE/fashion-mnist"
  cp "$src"/*-ubyte.gz "$STAGE/fashion-mnist/"
}

local_base() {  # a Debian 12 base image from the Debian archive, as localhost/mfed-base:bookworm
  need mmdebstrap "apt-get install mmdebstrap (scripts/install-image-tools.sh)"
  local packages=python3,python3-venv,ca-certificates,passwd
  local tarball="$CACHE/debian-bookworm-$(echo "$packages" | sha256sum | cut -c1-12).tar"
  if [ ! -f "$tarball" ]; then
    echo "build-images: making a Debian bookworm base with mmdebstrap (once)"
    # No docs, man pages or locales: they only make the images larger.
    mmdebstrap --quiet --format=tar --variant=minbase --include="$packages" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$tarball.partial"
    mv "$tarball.partial" "$tarball"
  fi
  if ! $BUILDER inspect --type image localhost/mfed-base:bookworm >/dev/null 2>&1; then
    local c; c=$($BUILDER from scratch)
    $BUILDER add --quiet "$c" "$tarball" / >/dev/null
    $BUILDER config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
    $BUILDER commit --quiet "$c" localhost/mfed-base:bookworm >/dev/null
    $BUILDER rm "$c" >/dev/null
  fi
  BASE=localhost/mfed-base:bookworm
}

build() {  # build NAME DOCKERFILE
  local args=(--build-arg "WHEELHOUSE=$WHEELHOUSE" -t "localhost/mfed-$1:$TAG" -f "$2")
  [ -n "${BASE:-}" ] && args+=(--build-arg "BASE=$BASE")
  echo "build-images: building localhost/mfed-$1:$TAG${BASE:+ from $BASE}"
  case "$BUILDER" in
    buildah) buildah bud --quiet --layers=false --isolation "${BUILDAH_ISOLATION:-chroot}" \
               ${BASE:+--pull-never} "${args[@]}" . ;;
    podman) podman build --quiet ${BASE:+--pull=never} "${args[@]}" . ;;
    docker) docker build --quiet "${args[@]}" . ;;
    *) echo "build-images: BUILDER is buildah, podman or docker, not $BUILDER" >&2; exit 2 ;;
  esac
}

images() {
  need "$BUILDER" "apt-get install buildah (scripts/install-image-tools.sh), or set BUILDER=docker|podman"
  [ -d "$WHEELHOUSE" ] && [ -n "$(ls "$WHEELHOUSE"/torch-*.whl 2>/dev/null)" ] \
    || { echo "build-images: no wheelhouse at $WHEELHOUSE; run scripts/build-images.sh wheelhouse --torch $TORCH first" >&2; exit 3; }
  demo_data
  [ "$TORCH" = cpu ] && build operator operator/Dockerfile
  build trainer trainer_image/Dockerfile
  [ "$TORCH" = cu128 ] && $BUILDER tag "localhost/mfed-trainer:$TAG" "localhost/mfed-trainer:$TAG-cuda12.8"
  return 0
}

export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}  # buildah without a Docker engine or fuse-overlayfs
case "$command" in
  wheelhouse) wheelhouse ;;
  images) images ;;
  ci) need buildah "apt-get install buildah (scripts/install-image-tools.sh)"; local_base; wheelhouse; images ;;
  clean)
    if command -v buildah >/dev/null 2>&1; then
      buildah rm --all >/dev/null
      for image in localhost/mfed-operator:$TAG localhost/mfed-trainer:$TAG localhost/mfed-trainer:$TAG-cuda12.8 localhost/mfed-base:bookworm; do
        buildah rmi "$image" >/dev/null 2>&1 || true
      done
      buildah rmi --prune >/dev/null 2>&1 || true
    fi ;;
  *) usage ;;
esac
