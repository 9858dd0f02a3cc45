"""`asyndgan-site check`, a hospital's dry run, against a real server under mutual TLS: a good site passes and can
still join afterwards; a wrong data path, another site's kit, an identity the server does not accept (unknown,
revoked) and an unreachable server each fail with one line naming the problem; a kit close to expiry warns."""

from __future__ import annotations

import pytest

from asyndgan.common import pki
from asyndgan.demo_data.toy import write_toy_sites
from procs import TINY_IMAGE2D, Server, run_cli, start_site

pytestmark = pytest.mark.integration
CHECK = ["asyndgan.site_agent.cli", "check"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check")
    certs = tmp / "certs"
    pki.init_ca(certs)
    pki.issue_server(certs, ["localhost", "127.0.0.1"])
    for site in ("a", "b", "c", "operator"):
        pki.issue_site(certs, site)
    pki.issue_site(certs, "soon", days=10)
    pki.revoke_site(certs, "b")
    data = write_toy_sites(tmp / "data", sites=1, per_site=[4], size=16)[0]
    over = {**TINY_IMAGE2D, "site.schedule.steps": 2, "train.min_sites": 1,
            "allowed_sites": ["a", "b", "soon", "operator"]}
    server = Server(tmp / "run", over, certs=certs)
    try:
        yield {"tmp": tmp, "certs": certs, "data": data, "server": server}
    finally:
        server.kill()


def _check(world, site: str, *extra: str, data=None):
    return run_cli(CHECK + ["--data", str(data or world["data"]), "--server", world["server"].address,
                            "--certs", str(world["certs"] / "sites" / site), *extra])


def _error_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_good_site_passes_and_can_join_afterwards(world):
    r = _check(world, "a")  # the site id comes from the kit's certificate
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout.splitlines()
    assert not [line for line in out if line.startswith("problem")], r.stdout
    for needle in ("ok       data folder", "ok       layout: arrays (image2d family)", "ok       identity: ",
                   "ok       server: " + world["server"].address + " reachable, TLS handshake done",
                   "ok       identity accepted: the server welcomed a",
                   "ok       cases: 4 samples of 4 patients (one sample = one patient) usable at the server's settings"):
        assert any(line.startswith(needle) for line in out), (needle, r.stdout)
    # The dry run left at once: the same identity joins for real and the run completes.
    tmp = world["tmp"]
    site = start_site(world["data"], world["server"].address, "a", tmp / "a.log", certs=world["certs"] / "sites" / "a")
    assert world["server"].wait(120) == 0, world["server"].output()
    assert site.wait(30) == 0, (tmp / "a.log").read_text()


@pytest.fixture
def live(world, tmp_path):
    """A fresh server (the module's one may have finished its run) sharing the consortium."""
    over = {**TINY_IMAGE2D, "site.schedule.steps": 10**6, "train.min_sites": 1,
            "allowed_sites": ["a", "b", "soon", "operator"]}
    server = Server(tmp_path / "run", over, certs=world["certs"])
    try:
        yield {**world, "server": server}
    finally:
        server.kill()


def test_a_statistics_release_is_counted_in_the_planned_noise(live, tmp_path):
    def privacy_line(*extra):
        r = _check(live, "a", "--set", f"state_dir={tmp_path}", "--set", "privacy.delta=0.001", *extra)
        assert r.returncode == 0, (r.stdout, r.stderr)
        (line,) = [x for x in r.stdout.splitlines() if " privacy: " in x]
        return line, float(line.split("adds noise ")[1].split()[0])

    plain, sigma = privacy_line()
    release, more = privacy_line("--set", "privacy.statistics_share=0.3")
    assert "statistics release at join costs 0.3 of epsilon" in release and "statistics" not in plain
    assert more > sigma  # DP-SGD plans for what the release leaves


def test_a_wrong_data_path_is_named(live):
    r = _check(live, "a", data=live["tmp"] / "nowhere")
    line = _error_line(r)
    assert str(live["tmp"] / "nowhere") in line and "does not exist" in line
    assert r.stdout.startswith("problem  data folder"), r.stdout


def test_identities_the_server_refuses_are_named(live):
    line = _error_line(_check(live, "b"))  # revoked: the TLS handshake passes, the server says no
    assert "the server refused site b" in line and "revoked" in line and "PERMISSION_DENIED" in line
    line = _error_line(_check(live, "c"))  # issued by the CA but not one of the allowed sites
    assert "the server refused site c" in line and "not one of this consortium's allowed sites" in line
    line = _error_line(_check(live, "a", "--site-id", "b"))  # another site's kit: found before dialling
    assert "certificate of 'a', not of 'b'" in line


def test_a_kit_close_to_expiry_warns_but_passes(live):
    r = _check(live, "soon")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert any(line.startswith("warning  certificate: expires on") and "in 9 days" in line
               for line in r.stdout.splitlines()), r.stdout


def test_offline_the_cases_are_still_checked_and_skipped_ones_named(world, tmp_path):
    from asyndgan.demo_data.phantom import PhantomConfig, write_phantom

    write_phantom(tmp_path / "data", PhantomConfig(sites=1, cases_per_site=[2], test_cases=0, shape=(48, 48, 32)),
                  progress=False)
    broken = sorted((tmp_path / "data" / "site1").iterdir())[0]
    t1 = next(broken.glob("*_t1.nii.gz"))
    t1.write_bytes(b"not a volume")
    r = run_cli(CHECK + ["--data", str(tmp_path / "data" / "site1"), "--server", "127.0.0.1:9", "--certs",
                         str(world["certs"] / "sites" / "a"), "--set", f"prep.cache_dir={tmp_path / 'cache'}"])
    line = _error_line(r)
    assert "cannot reach the server at 127.0.0.1:9" in line
    out = r.stdout.splitlines()
    assert any(x.startswith("warning  cases: skipping a case") and str(t1) in x for x in out), r.stdout
    assert any(x.startswith("ok       cases: ") and "usable at default settings" in x for x in out), r.stdout
    assert list((tmp_path / "cache").rglob("*")), "the check builds the cache"
