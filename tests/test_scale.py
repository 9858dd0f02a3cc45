"""The scale benchmark's plumbing: a real server and real sites sharing processes (each its own certificate),
measured per number of sites; bad arguments are one line."""

from __future__ import annotations

import json

from click.testing import CliRunner

from asyndgan.cli.main import main


def test_the_server_is_measured_with_one_and_with_three_sites(tmp_path):
    out = tmp_path / "scale"
    r = CliRunner().invoke(main, ["bench", "scale", "--out", str(out), "--sites", "1,3", "--steps", "6",
                                  "--warmup", "2", "--log-level", "WARNING"])
    assert r.exit_code == 0, (r.output, r.exception)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [x["sites"] for x in rows] == [1, 3]
    for x in rows:
        assert x["server_cpu_ms_per_step"] > 0 and x["wall_ms_per_step"] > 0 and x["bytes_per_step"] > 0
        assert x["server_rss_mb"] > x["server_rss_mb_alone"] > 50 and x["bank_mb"] > 0
        assert set(x["stages_ms"]) == {"plan", "dispatch", "wait", "guard", "update"}  # the server's own account
    assert rows[1]["bytes_per_step"] > 2 * rows[0]["bytes_per_step"]  # three sites' batches cross the wire
    assert rows[1]["bank_mb"] > 2 * rows[0]["bank_mb"]  # each site uploads its own label maps
    # every site joined with its own identity, over TLS
    assert len(list((out / "n3" / "certs" / "sites").iterdir())) >= 3
    assert "| 3 |" in (out / "report.md").read_text() and (out / "scale.png").stat().st_size > 5_000


def test_bad_site_counts_are_one_line():
    r = CliRunner().invoke(main, ["bench", "scale", "--out", "/tmp/never", "--sites", "1,x"])
    assert r.exit_code == 2 and "--sites '1,x'" in r.output
    r = CliRunner().invoke(main, ["bench", "scale", "--out", "/tmp/never", "--steps", "5", "--warmup", "5"])
    assert r.exit_code == 2 and "warmup" in r.output


def test_a_slow_sites_late_answers_are_measured_behind_delaying_relays(tmp_path):
    """The links benchmark, short: lock-step on loopback (the slow site's reference), then lock-step and late
    answers with one site whose relay makes its answers three times as slow."""
    out = tmp_path / "links"
    r = CliRunner().invoke(main, ["bench", "links", "--out", str(out), "--rtts", "0", "--modes", "late",
                                  "--sites", "2", "--steps", "6", "--plain", "--log-level", "WARNING"])
    assert r.exit_code == 0, (r.output, r.exception)
    rows = {x["name"]: x for x in json.loads((out / "results.json").read_text())["rows"]}
    # the lock-step run is measured too: the slow site's delay comes from its step time
    assert set(rows) == {"rtt0-late", "rtt0-exact", "rtt0-late-slow"}
    assert rows["rtt0-late-slow"]["delays_ms"][1] > rows["rtt0-late-slow"]["delays_ms"][0] == 0
    assert rows["rtt0-exact"]["share_applied"]["site2"] == 1.0  # lock-step: every step carries every site
    assert 0 < rows["rtt0-late-slow"]["share_applied"]["site2"] <= 1.0  # late answers: a part, never more
    assert all(x["steps_per_second"] > 0 for x in rows.values())
    assert "| 0 | yes | late |" in (out / "report.md").read_text()


def test_unknown_modes_are_one_line():
    r = CliRunner().invoke(main, ["bench", "links", "--out", "/tmp/never", "--modes", "exact,fast"])
    assert r.exit_code == 2 and "unknown modes" in r.output
