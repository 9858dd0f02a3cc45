#!/usr/bin/env bash
# The whole test suite, as CI runs it: the unit tier on both cores (pytest-xdist), then the integration tier one
# test at a time (its tests start servers, sites, network namespaces and containers, and some measure time: they
# must not compete with other tests). Arguments go to both runs (e.g. -k NAME, -x); a tier they leave empty is fine.
set -euo pipefail
cd "$(dirname "$0")/.."
tier() {
  local rc=0
  .venv/bin/python -m pytest "$@" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]  # 5: nothing selected in this tier
}
tier -m "not integration" -n "${ASYNDGAN_TEST_WORKERS:-2}" "$@"
tier -m integration "$@"
