#!/usr/bin/env bash
# The whole test suite, as CI runs it, in three runs: the unit tier on both cores (pytest-xdist); the integration
# tests on both cores (they start servers and sites; their deadlines are generous); then the `serial` ones one at a
# time (they measure time, or hold the machine: network namespaces, containers). Each test module runs in one
# worker, in its order (--dist loadscope), so a module's fixtures are built once. Arguments go to every run (e.g.
# -k NAME, -x); a run they leave empty is fine. ASYNDGAN_TEST_WORKERS=1 runs everything one test at a time.
#
# Without arguments (the whole suite) the container test's job (tests/deploy_stack.py: image build, compose stack,
# faults) starts first, at the lowest CPU priority, so that it overlaps all three runs; the test waits for it at
# the end. Whatever ends this script, the job is stopped and tears its containers down.
set -euo pipefail
cd "$(dirname "$0")/.."
tier() {
  local rc=0
  .venv/bin/python -m pytest "$@" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]  # 5: nothing selected in this tier
}
if [ "$#" -eq 0 ] && [ -z "${ASYNDGAN_DEPLOY_JOB:-}" ]; then
  ASYNDGAN_DEPLOY_JOB=$(mktemp -d /tmp/asyndgan-deploy-test-XXXXXX)
  export ASYNDGAN_DEPLOY_JOB
  PYTHONUNBUFFERED=1 nice -n 19 .venv/bin/python tests/deploy_stack.py --json "$ASYNDGAN_DEPLOY_JOB/outcome.json" \
    > "$ASYNDGAN_DEPLOY_JOB/deploy.log" 2>&1 &
  deploy_pid=$!
  echo "$deploy_pid" > "$ASYNDGAN_DEPLOY_JOB/pid"
  stop_deploy() {
    if kill -0 "$deploy_pid" 2>/dev/null; then
      kill -TERM "$deploy_pid" 2>/dev/null || true
      wait "$deploy_pid" 2>/dev/null || true
    fi
    local outcome="$ASYNDGAN_DEPLOY_JOB/outcome.json"
    if [ -f "$outcome" ] && grep -q '"ok": false' "$outcome" && ! grep -q '"skipped"' "$outcome"; then
      echo "the container test's job failed; its log: $ASYNDGAN_DEPLOY_JOB/deploy.log" >&2  # kept: it says why
    else
      rm -rf "$ASYNDGAN_DEPLOY_JOB"
    fi
  }
  trap stop_deploy EXIT
fi
workers=${ASYNDGAN_TEST_WORKERS:-2}
tier -m "not integration" -n "$workers" --dist loadscope "$@"
tier -m "integration and not serial" -n "$workers" --dist loadscope "$@"
tier -m "integration and serial" "$@"
