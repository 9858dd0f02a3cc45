import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

DEPLOY_TEST = "test_deploy.py"


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect have chosen the items
def pytest_collection_modifyitems(session, config, items):
    """The container test waits for a long background job: run it last, and start that job now (if it will run)."""
    deploy = [i for i in items if i.fspath.basename == DEPLOY_TEST]
    if not deploy:
        return
    items[:] = [i for i in items if i.fspath.basename != DEPLOY_TEST] + deploy
    import deploy_stack

    if deploy_stack.missing() is None and not config.option.collectonly:
        work = pathlib.Path(tempfile.mkdtemp(prefix="asyndgan-deploy-test-"))
        out, logfile = work / "outcome.json", work / "deploy.log"
        # nice 19: dockerd, the build and the containers inherit it, so the rest of the suite keeps the CPUs
        proc = subprocess.Popen(["nice", "-n", "19", sys.executable, str(pathlib.Path(__file__).parent / "deploy_stack.py"),
                                 "--json", str(out)], stdout=logfile.open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        config._asyndgan_deploy = (proc, out, logfile)


def pytest_sessionfinish(session, exitstatus):
    job = getattr(session.config, "_asyndgan_deploy", None)
    if job is not None and job[0].poll() is None:  # the session ended early: let the job tear everything down
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
