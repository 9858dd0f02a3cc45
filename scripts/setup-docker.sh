#!/usr/bin/env bash
# What the container test (tests/test_deploy.py) needs: dockerd, docker-compose (v1, Debian's) and debootstrap;
# and compose v2 (`docker compose`), which bookworm does not package: its static binary is taken from Debian
# trixie's docker-compose package (fetched from this machine's own Debian mirror into a scratch apt state, the
# system's apt sources untouched) and placed as a docker CLI plugin.
# Acts only when something is missing, this runs as root and apt-get exists (CI machines); otherwise it says why
# and the test is skipped (or runs v1 only) with that reason. Never fails the set-up.
set -uo pipefail

compose_v2() {
  docker compose version >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 0
  local mirror scratch
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || { echo "setup-docker: no Debian mirror in the apt sources: compose v2 not installed"; return 0; }
  scratch=$(mktemp -d)
  mkdir -p "$scratch/lists/partial"
  echo "deb $mirror trixie main" > "$scratch/sources.list"
  local opts=(-q -o "Dir::Etc::sourcelist=$scratch/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$scratch/lists")
  if (cd "$scratch" && apt-get "${opts[@]}" update >/dev/null 2>&1 && apt-get "${opts[@]}" download docker-compose >/dev/null 2>&1 \
      && dpkg-deb -x docker-compose_*.deb x); then
    mkdir -p /usr/local/lib/docker/cli-plugins
    install -m 0755 "$scratch/x/usr/libexec/docker/cli-plugins/docker-compose" /usr/local/lib/docker/cli-plugins/docker-compose
    echo "setup-docker: compose v2 $(docker compose version --short 2>/dev/null) installed as a docker CLI plugin"
  else
    echo "setup-docker: could not fetch compose v2 from Debian trixie: the container test runs with v1 only"
  fi
  rm -rf "$scratch"
}

missing=()
for tool in dockerd docker-compose debootstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
[ ${#missing[@]} -eq 0 ] && { compose_v2; exit 0; }
if [ "${ASYNDGAN_NO_DOCKER:-0}" = 1 ]; then echo "setup-docker: ASYNDGAN_NO_DOCKER=1, not installing ${missing[*]}"; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-docker: ${missing[*]} missing and not root on Debian: the container test will be skipped"
  exit 0
fi
echo "setup-docker: installing docker.io docker-compose debootstrap (Debian packages) for the container test"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap >/tmp/asyndgan-setup-docker.log 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap \
       >/tmp/asyndgan-setup-docker.log 2>&1; } \
  || { echo "setup-docker: the install failed (see /tmp/asyndgan-setup-docker.log): the container test will be skipped"; exit 0; }
compose_v2
exit 0
