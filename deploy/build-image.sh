#!/usr/bin/env bash
# Build the asyndgan image from deploy/Dockerfile (run from anywhere; the context is the repository root).
#
#   deploy/build-image.sh                              # online: python:3.11-slim base, CPU torch from PyTorch's index
#   deploy/build-image.sh --offline --make-base asyndgan-base:bookworm
#                                                      # no registry, no network in the build (CI, air-gapped hosts)
#
# --tag T          image name [asyndgan:latest]
# --base IMAGE     base image with python3 >= 3.10 and venv [python:3.11-slim]
# --make-base NAME make the base here with debootstrap (Debian bookworm, minbase + python3, python3-venv) from the
#                  mirror in this machine's apt sources, import it as NAME (kept: made once) and build on it
# --offline        download every wheel on this host into deploy/wheelhouse first (the host's pip settings and
#                  its torch build), then build with --network none
# Extra arguments after -- go to `docker build` (e.g. -- --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=asyndgan:latest BASE=python:3.11-slim OFFLINE=0 MAKE_BASE=""
DOCKER=${DOCKER:-docker}
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --make-base) MAKE_BASE=$2; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    --) shift; break ;;
    *) echo "build-image.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

if [ -n "$MAKE_BASE" ]; then
  if ! $DOCKER image inspect "$MAKE_BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "build-image.sh: --make-base needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || { echo "build-image.sh: no Debian mirror in this machine's apt sources" >&2; exit 2; }
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    echo "making base image $MAKE_BASE (debootstrap bookworm minbase + python3)"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$scratch/rootfs" "$mirror" >"$scratch/debootstrap.log" 2>&1 \
      || { tail -20 "$scratch/debootstrap.log" >&2; exit 1; }
    rm -rf "$scratch/rootfs/var/cache/apt/archives/"*.deb "$scratch/rootfs/var/lib/apt/lists/"*
    tar -C "$scratch/rootfs" -c . | $DOCKER import - "$MAKE_BASE" >/dev/null
  fi
  BASE=$MAKE_BASE
fi

network=()
if [ "$OFFLINE" = 1 ]; then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  torch=$($PY -c "import torch; print('torch==' + torch.__version__.split('+')[0])" 2>/dev/null || echo torch)
  $PY deploy/requirements.py pyproject.toml all > deploy/wheelhouse/requirements.txt  # every extra: any image
  echo "downloading wheels into deploy/wheelhouse ($torch and pyproject.toml's dependencies with every extra)"
  $PY -m pip download --disable-pip-version-check -q -d deploy/wheelhouse "$torch" -r deploy/wheelhouse/requirements.txt \
    "setuptools>=69" wheel
  network=(--network none)
fi

echo "building $TAG on $BASE$([ "$OFFLINE" = 1 ] && echo ' (offline)')"
$DOCKER build -f deploy/Dockerfile -t "$TAG" --build-arg BASE="$BASE" --build-arg OFFLINE="$OFFLINE" "${network[@]}" "$@" .
$DOCKER image inspect "$TAG" --format "$TAG: {{.Size}} bytes"
