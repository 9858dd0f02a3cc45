"""The container deployment on a real Docker engine (tests/deploy_stack.py: image built offline, the compose stack,
a site killed, a site cut off, the server restarted, compose v1 and v2, everything torn down).

The stack runs as a separate process at low CPU priority, started before the first tier by scripts/test.sh (the
whole suite) or when this session starts (tests/conftest.py), so that its image build and training overlap the
other tests; this test waits for its outcome. Skipped, with the reason, where no Docker engine can be started (not
root, or dockerd/docker-compose/debootstrap missing, or too little disk)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest


pytestmark = [pytest.mark.integration, pytest.mark.serial]  # measures time or holds the machine: alone
log = logging.getLogger(__name__)


def test_compose_stack_trains_through_site_and_server_faults(deploy_job):
    proc, out, logfile = deploy_job
    try:
        proc.wait(timeout=1800)
    except Exception:
        proc.terminate()
        proc.wait(120)
        raise
    assert out.is_file(), f"the deployment run wrote no outcome; its log: {logfile.read_text()[-3000:]}"
    outcome = json.loads(out.read_text())
    if outcome.get("skipped"):
        pytest.skip(outcome["skipped"])
    log.info("deployment timings: %s", outcome["timings"])
    assert outcome["ok"], f"{outcome['error']}\n--- log ---\n{logfile.read_text()[-4000:]}"
    t = outcome["timings"]
    assert t["image size MB"] > 0 and "server restarted and resumed" in t
    shutil.rmtree(out.parent, ignore_errors=True)  # the job's log and outcome; kept when it failed
