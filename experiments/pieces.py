"""The experiments' shared machinery: resumable pieces kept in OUT, shared between processes of one command, and
the settings a run was made with.

    check_settings      OUT/settings.json: a re-run with other settings is refused; settings added later resume
    piece_timer         seconds per piece, summed over resumed runs and merged between processes
    write_json          whole or not at all
    written_once        a folder (a phantom) written by one process while the others wait
    claim_file          a piece claimed by a file holding the claimant's PID (taken over when it died)
    shared_pieces       name -> work(name) for every piece, the pieces divided between processes
    claim_folder, wait_for_eval
                        a segmentation model's folder as a piece, claimed and waited for (scoring.py trains and
                        reads them)
    kept_or_reset, require_checkpoint, finished_checkpoint
                        a GAN run as a piece (its last checkpoint kept, or what a cut run left cleared)
    ExperimentConfig    what every preset experiment's settings start with (preset, OUT, seed)
"""

from __future__ import annotations

import json
import logging
import shutil
import os
import pathlib
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from asyndgan.formats import checkpoint as ckpt
from asyndgan.common.errors import AsynDGANError, ConfigError

log = logging.getLogger(__name__)
Preset = Literal["smoke", "cpu", "gpu"]


class ExperimentConfig(BaseModel):
    """The header of every preset experiment's settings: smoke (the plumbing), cpu (the measurement on 2 cores) or
    gpu; OUT, where every piece is kept (check_settings refuses other settings there); the seed of the data, the
    GANs and the first segmentation seed."""

    model_config = ConfigDict(extra="forbid")
    preset: Preset
    out: pathlib.Path
    seed: int = Field(0, ge=0, description="data, GANs and the first segmentation seed")


def write_json(path: pathlib.Path, data) -> None:
    """Whole or not at all (another process of an experiment may be reading it), its folder made if needed."""
    from asyndgan.common.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def piece_timer(path: pathlib.Path):
    """(timings, timed) for an experiment made of resumable pieces: `timed(name, fn, *args)` runs fn and adds its
    seconds to timings[name], saved in `path` (JSON) after every piece, so a resumed run adds what it redid to
    what was done before. Two processes sharing the pieces merge into the one file (under a lock)."""
    import fcntl

    timings: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def timed(name: str, fn, *args):
        t0 = time.monotonic()
        value = fn(*args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = json.loads(path.read_text()) if path.is_file() else {}
            current[name] = round(current.get(name, 0.0) + time.monotonic() - t0, 1)
            write_json(path, current)
        timings.clear()
        timings.update(current)
        return value

    return timings, timed


def written_once(root: pathlib.Path, write) -> pathlib.Path:
    """`write(root)` run once for the folder `root`: a marker (<root>.done) says it is complete, and a lock next
    to it makes a second process of the command wait while the first writes (a half-written folder from an
    interrupted run is removed and written again). Returns root."""
    import fcntl

    done = root.with_name(f"{root.name}.done")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(f".{root.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            log.info("writing %s", root)
            write(root)
            done.write_text("complete\n")
    return root


def claim_file(path: pathlib.Path) -> bool:
    """Claim a piece of work shared between processes: True when `path` now holds this process's PID (created
    now, ours already, or taken over from a claimant that died); False while another live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as f:
            f.write(str(os.getpid()))
        return True
    except FileExistsError:
        try:
            pid = int(path.read_text() or 0)
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError):
            path.write_text(str(os.getpid()))  # its claimant died: ours now
            return True
        except PermissionError:
            return False


def check_settings(cfg, added: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> None:
    """OUT/settings.json holds the settings of the run in OUT; resuming with other settings is refused.

    added: settings this experiment gained after runs were made; a run that lacks them (and matches otherwise)
    resumes, and the pieces they add run now. exclude: fields that choose what runs, not how (OUT, threads, ...)."""
    path = cfg.out / "settings.json"
    skip = {"out", "threads", *exclude}
    ours = json.loads(cfg.model_dump_json(exclude=skip))
    if path.is_file():
        theirs = _with_defaults(cfg, json.loads(path.read_text()), skip)
        new = [k for k in added if k in ours and k not in theirs]
        if theirs != {k: v for k, v in ours.items() if k not in new}:
            raise ConfigError(f"{cfg.out} holds a run with other settings ({path}); choose a new --out")
        if new:
            log.info("the run in %s predates the settings %s: their pieces run now", cfg.out, ", ".join(new))
            write_json(path, ours)
        log.info("resuming the run in %s: finished pieces are kept", cfg.out)
        return
    if cfg.out.exists() and any(p.name != "experiment.log" for p in cfg.out.iterdir()):
        raise ConfigError(f"{cfg.out} is not empty and holds no {cfg.preset} run of this experiment; choose a new --out")
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(path, ours)


def _with_defaults(cfg, stored: dict, skip: set[str]) -> dict:
    """Settings a run wrote, with every field added since (anywhere inside them) at its default, as this version
    would write them; as written where they no longer validate (then they differ, and the run is refused)."""
    from pydantic import ValidationError

    try:
        filled = type(cfg).model_validate({**stored, **{k: getattr(cfg, k) for k in skip if hasattr(cfg, k)}})
    except ValidationError:
        return stored
    dumped = json.loads(filled.model_dump_json(exclude=skip))
    return {k: v for k, v in dumped.items() if k in stored}  # a top-level field added since stays missing (`added`)


def kept_or_reset(run_dir: pathlib.Path, steps: int) -> pathlib.Path | None:
    """The finished GAN's last checkpoint if this piece was done before; else clear what a cut run left."""
    done = finished_checkpoint(run_dir, steps)
    if done:
        log.info("%s: kept %s", run_dir.name, done)
        return done
    shutil.rmtree(run_dir, ignore_errors=True)
    return None


def require_checkpoint(run_dir: pathlib.Path, steps: int) -> pathlib.Path:
    path = finished_checkpoint(run_dir, steps)
    if path is None:
        raise AsynDGANError(f"the GAN in {run_dir} did not reach step {steps}; see its logs there")
    return path


def finished_checkpoint(run_dir: pathlib.Path, steps: int) -> pathlib.Path | None:
    path = ckpt.checkpoint_path(run_dir / "checkpoints", steps)
    return path if path.is_file() else None


CLAIM = ".claimed-by"


def claim_folder(folder: pathlib.Path) -> bool:
    return claim_file(folder / CLAIM)


def wait_for_eval(folder: pathlib.Path) -> None:
    while not (folder / "eval" / "summary.json").is_file():
        if not (folder / CLAIM).is_file():
            raise ConfigError(f"{folder} was claimed by another process that stopped before finishing it; run the "
                              "command again")
        try:
            os.kill(int((folder / CLAIM).read_text() or 0), 0)
        except (ValueError, ProcessLookupError):
            raise ConfigError(f"the process working on {folder} has gone; run the command again") from None
        time.sleep(5)


def shared_pieces(cfg, kind: str, names: list[str], work, done) -> dict:
    """name -> work(name) for every piece, with any other process of this command on the same OUT taking some:
    a piece is claimed by a file (OUT/claims/<kind>-<name>) holding the claimant's PID; a piece claimed by a
    live process is waited for (done(name) returns its result once it is finished, else None), one whose
    claimant died is taken over. Two single-threaded processes use 2 cores better than one with two threads."""
    results: dict = {}
    waiting = []
    for name in names:
        if (value := done(name)) is not None:
            results[name] = value
        elif _claim_piece(cfg, kind, name):
            results[name] = work(name)
            _release(cfg, kind, name)
        else:
            waiting.append(name)
    for name in waiting:
        while (value := done(name)) is None:
            if _claim_piece(cfg, kind, name):  # its claimant is gone
                value = work(name)
                _release(cfg, kind, name)
                break
            time.sleep(5)
        results[name] = value
    return {name: results[name] for name in names}


def _claim_path(cfg, kind: str, name: str) -> pathlib.Path:
    return cfg.out / "claims" / f"{kind}-{name}"


def _claim_piece(cfg, kind: str, name: str) -> bool:
    return claim_file(_claim_path(cfg, kind, name))


def _release(cfg, kind: str, name: str) -> None:
    _claim_path(cfg, kind, name).unlink(missing_ok=True)


def json_if_file(path: pathlib.Path):
    return json.loads(path.read_text()) if path.is_file() else None
