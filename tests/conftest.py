import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

# One compute thread in the test process: its in-process trainers work on tiny tensors, and with two cores shared
# with the server, site and container processes the suite starts, more threads only wait on each other (the
# poisoning test: 33 s with torch's default against 10 s with one thread, measured under load). The processes it
# starts keep their own settings (experiments' --threads), which their larger work needs.
import torch  # noqa: E402

torch.set_num_threads(1)

DEPLOY_TEST = "test_deploy.py"


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect have chosen the items
def pytest_collection_modifyitems(session, config, items):
    """The container test waits for a long background job: run it last, and start that job now (if it will run)."""
    deploy = [i for i in items if i.fspath.basename == DEPLOY_TEST]
    if not deploy:
        return
    items[:] = [i for i in items if i.fspath.basename != DEPLOY_TEST] + deploy
    import deploy_stack

    if os.environ.get(deploy_stack.STARTED_ENV) and not config.option.collectonly:
        # scripts/test.sh started the job before the first tier, so that it overlaps the whole suite
        work = pathlib.Path(os.environ[deploy_stack.STARTED_ENV])
        config._asyndgan_deploy = (deploy_stack.StartedJob(work), work / "outcome.json", work / "deploy.log")
    elif deploy_stack.missing() is None and not config.option.collectonly:
        work = pathlib.Path(tempfile.mkdtemp(prefix="asyndgan-deploy-test-"))
        out, logfile = work / "outcome.json", work / "deploy.log"
        # nice 19: dockerd, the build and the containers inherit it, so the rest of the suite keeps the CPUs
        proc = subprocess.Popen(["nice", "-n", "19", sys.executable, str(pathlib.Path(__file__).parent / "deploy_stack.py"),
                                 "--json", str(out)], stdout=logfile.open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        config._asyndgan_deploy = (proc, out, logfile)


def pytest_sessionfinish(session, exitstatus):
    job = getattr(session.config, "_asyndgan_deploy", None)
    # (a job scripts/test.sh started outlives this session: the script tears it down)
    if job is not None and getattr(job[0], "owned", True) and job[0].poll() is None:  # the session ended early: let the job tear everything down
        job[0].terminate()
        try:
            job[0].wait(180)
        except subprocess.TimeoutExpired:
            job[0].kill()


@pytest.fixture
def deploy_job(request):
    job = getattr(request.config, "_asyndgan_deploy", None)
    if job is None:
        import deploy_stack

        pytest.skip(deploy_stack.missing() or "the deployment job was not started")
    return job


TOY_PATIENTS, TOY_SLICES = 20, 3


@pytest.fixture
def toy_patient_site(tmp_path):
    """A toy image2d site of TOY_PATIENTS patients with TOY_SLICES slices each, the grouping in its meta.json."""
    import json

    from asyndgan.demo_data.toy import write_toy_sites

    (folder,) = write_toy_sites(tmp_path / "data", sites=1, per_site=[TOY_PATIENTS * TOY_SLICES], size=20, seed=1)
    meta = json.loads((folder / "meta.json").read_text())
    meta["patients"] = [f"p{i // TOY_SLICES:02d}" for i in range(TOY_PATIENTS * TOY_SLICES)]
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(autouse=True)
def _one_thread():
    """Experiments called in-process set their own thread count; every test starts from one again."""
    torch.set_num_threads(1)
