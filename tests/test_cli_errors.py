"""Bad input at the command line gets one clear line naming the problem and a non-zero exit, no traceback."""

from __future__ import annotations

import time

import pytest

from asyndgan.demo_data.toy import write_toy_sites
from procs import TINY_IMAGE2D, Server, one_line_error, run_cli

pytestmark = pytest.mark.integration
SITE = ["asyndgan.site_agent.cli", "join", "--insecure"]
SERVER = ["asyndgan.central_server.cli"]


def test_site_with_a_missing_data_folder(tmp_path):
    r = run_cli(SITE + ["--data", str(tmp_path / "nowhere"), "--server", "127.0.0.1:1", "--site-id", "a"])
    one_line_error(r, "nowhere", "does not exist")


def test_site_with_a_folder_that_holds_no_dataset(tmp_path):
    r = run_cli(SITE + ["--data", str(tmp_path), "--server", "127.0.0.1:1", "--site-id", "a"])
    one_line_error(r, "meta.json")


def test_site_that_cannot_reach_the_server(tmp_path):
    data = write_toy_sites(tmp_path, sites=1, per_site=[2], size=16)[0]
    r = run_cli(SITE + ["--data", str(data), "--server", "127.0.0.1:9", "--site-id", "a",
                        "--set", "connect_timeout_s=1"])
    one_line_error(r, "cannot reach the server at 127.0.0.1:9")


def test_site_id_must_be_given_and_well_formed(tmp_path):
    r = run_cli(SITE + ["--data", str(tmp_path), "--server", "127.0.0.1:1", "--site-id", "bad id!"])
    one_line_error(r, "site_id")


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "train.batch_size"),
    (["--set", "site.model.image2d.image_size=30"], "image_size"),
    (["--config", "/nonexistent/server.toml"], "does not exist"),
    (["--port", "70000"], "port"),
])
def test_server_config_out_of_range(tmp_path, args, needle):
    r = run_cli(SERVER + ["start", "--insecure", "--run-dir", str(tmp_path)] + args)
    one_line_error(r, needle)


def test_status_of_a_server_that_is_not_there():
    r = run_cli(SERVER + ["status", "--insecure", "--server", "127.0.0.1:9", "--timeout", "1"])
    one_line_error(r, "no status from 127.0.0.1:9")


def test_a_second_site_with_the_same_id_is_refused_and_the_wrong_family_too(tmp_path):
    data = write_toy_sites(tmp_path / "d", sites=1, per_site=[3], size=16)[0]
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "train.min_sites": 5, "site.schedule.steps": 1})
    try:
        from procs import start_site

        first = start_site(data, server.address, "hospital-a", tmp_path / "a.log")
        end = time.monotonic() + 30
        while "hospital-a is ready" not in server.output():
            assert time.monotonic() < end and first.poll() is None, server.output()
            time.sleep(0.2)
        r = run_cli(SITE + ["--data", str(data), "--server", server.address, "--site-id", "hospital-a"])
        one_line_error(r, "hospital-a", "already connected")
        from asyndgan.demo_data.toy import write_gaussian_sites

        g = write_gaussian_sites(tmp_path / "g", per_site=100)[0]
        r = run_cli(SITE + ["--data", str(g), "--server", server.address, "--site-id", "hospital-b"])
        one_line_error(r, "mlp1d", "image2d")
        assert first.poll() is None, "the refusals must not disturb the connected site"
    finally:
        server.kill()
        first.kill()


@pytest.mark.parametrize("module", ["asyndgan.cli.main", "asyndgan.central_server.cli",
                                    "asyndgan.site_agent.cli"])
def test_every_command_tells_its_version(module):
    from importlib.metadata import version

    r = run_cli([module, "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(version("asyndgan")), r.stdout


def test_site_help_suggests_site_settings_not_server_ones():
    r = run_cli(SITE[:2] + ["--help"])
    assert r.returncode == 0, r.stderr
    assert "prep.workers=2" in r.stdout
    assert "train." not in r.stdout and "batch_size" not in r.stdout


def test_demo_refuses_an_unknown_device():
    r = run_cli(["asyndgan.cli.main", "demo", "--device", "tpu"])
    assert r.returncode == 2 and "tpu" in r.stderr


def test_demo_on_cuda_without_a_gpu_is_one_line_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_cli(["asyndgan.cli.main", "demo", "--device", "cuda", "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run")])
    one_line_error(r, "--device cuda", "no CUDA GPU")
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_phantom_lives_under_data(tmp_path):
    r = run_cli(["asyndgan.cli.main", "data", "phantom", "--out", str(tmp_path), "--cases-per-site", "1,x"])
    one_line_error(r, "invalid phantom settings")
    r = run_cli(["asyndgan.cli.main", "phantom", "--out", str(tmp_path)])
    assert r.returncode == 2 and "No such command 'phantom'" in r.stderr
