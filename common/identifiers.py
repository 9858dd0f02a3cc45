"""The one rule for site ids, shared by the site command, the server's join check and `asyndgan certs issue`.

A site id names a hospital in certificates, logs, status output and file names on both ends, so it must be safe
in all of them: 1 to 64 characters, ASCII letters, digits, '.', '_' and '-', starting with a letter or digit
(no path separators, no '..' on its own, no spaces, newlines or control characters that could forge log lines).
Nothing that writes a file may build its name from an id alone: the bank names files by content digest.
"""

from __future__ import annotations

import re

from asyndgan.common.errors import ConfigError

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_SITE_ID = re.compile(SITE_ID_PATTERN)


def site_id_problem(site_id: str) -> str | None:
    """None when `site_id` is acceptable, else a one-line reason (with the id shown escaped)."""
    if not isinstance(site_id, str) or not _SITE_ID.fullmatch(site_id):
        shown = ascii(site_id)[:80]
        return (f"site id {shown} is not allowed: use 1 to 64 ASCII letters, digits, '.', '_' or '-', "
                "starting with a letter or digit")
    return None


def check_site_id(site_id: str) -> str:
    """Return `site_id` unchanged, or raise ConfigError naming the problem."""
    problem = site_id_problem(site_id)
    if problem:
        raise ConfigError(problem)
    return site_id
