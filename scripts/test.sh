#!/usr/bin/env bash
# The whole test suite, as CI runs it, in three runs: the unit tier on both cores (pytest-xdist); the integration
# tests on both cores (they start servers and sites; their deadlines are generous); then the `serial` ones one at a
# time (they measure time, or hold the machine: network namespaces, containers). Arguments go to every run (e.g.
# -k NAME, -x); a run they leave empty is fine. ASYNDGAN_TEST_WORKERS=1 runs everything one test at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
tier() {
  local rc=0
  .venv/bin/python -m pytest "$@" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]  # 5: nothing selected in this tier
}
workers=${ASYNDGAN_TEST_WORKERS:-2}
tier -m "not integration" -n "$workers" "$@"
tier -m "integration and not serial" -n "$workers" "$@"
tier -m "integration and serial" "$@"
