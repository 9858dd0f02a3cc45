"""The container image's size with every extra (the default image: server, research tools) and without any (a
hospital's site: `--build-arg EXTRAS=`), built offline on a Docker engine of our own.

    sudo .venv/bin/python benchmarks/image_size.py        # root: it starts dockerd under a scratch folder

Prints each image's size and checks that the site image runs `asyndgan-site` and lacks the research packages.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = "/usr/bin/docker" if pathlib.Path("/usr/bin/docker").exists() else "docker"


def main() -> int:
    work = pathlib.Path(tempfile.mkdtemp(prefix="asyndgan-img-", dir="/tmp"))
    env = {**os.environ, "DOCKER_HOST": f"unix://{work / 'docker.sock'}", "DOCKER_BUILDKIT": "0", "DOCKER": DOCKER}
    log = (work / "dockerd.log").open("wb")
    engine = subprocess.Popen(["dockerd", "--data-root", str(work / "root"), "--exec-root", str(work / "exec"),
                               "--pidfile", str(work / "docker.pid"), "--host", f"unix://{work / 'docker.sock'}",
                               "--storage-driver", "overlay2", "--iptables=false", "--ip6tables=false",
                               "--bridge", "none"], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            if subprocess.run([DOCKER, "info"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        sizes, seconds = {}, {}
        for tag, extras in (("asyndgan:all", "all"), ("asyndgan:site", "")):
            started = time.monotonic()
            subprocess.run([str(ROOT / "deploy" / "build-image.sh"), "--offline", "--make-base",
                            "asyndgan-base:bookworm", "--tag", tag, "--", "--build-arg", f"EXTRAS={extras}"],
                           env=env, check=True, cwd=ROOT)
            seconds[tag] = round(time.monotonic() - started, 1)
            out = subprocess.run([DOCKER, "image", "inspect", "-f", "{{.Size}}", tag], env=env, check=True,
                                 capture_output=True, text=True).stdout
            sizes[tag] = int(out.strip())
        probe = ("import importlib.util as u; print(','.join(m for m in ('monai', 'matplotlib', 'tensorboard', "
                 "'torchmetrics', 'nilearn') if u.find_spec(m)))")
        found = subprocess.run([DOCKER, "run", "--rm", "--network", "none", "asyndgan:site", "python3", "-c", probe],
                               env=env, check=True, capture_output=True, text=True).stdout.strip()
        version = subprocess.run([DOCKER, "run", "--rm", "--network", "none", "asyndgan:site", "asyndgan-site",
                                  "--version"], env=env, check=True, capture_output=True, text=True).stdout.strip()
        result = {"bytes": sizes, "GB": {k: round(v / 1e9, 2) for k, v in sizes.items()}, "build_seconds": seconds,
                  "site_image_optional_packages": found or "none", "site_image_runs": version}
        print(json.dumps(result, indent=2))
        return 0 if not found else 1
    finally:
        engine.terminate()
        engine.wait(60)
        subprocess.run(["umount", str(work / "exec" / "netns" / "default")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
