"""Print the requirements of pyproject.toml's core dependencies plus the named optional extras, one per line.

    python deploy/requirements.py pyproject.toml all        # core + every extra
    python deploy/requirements.py pyproject.toml ""         # core only (a hospital's site)
    python deploy/requirements.py pyproject.toml server     # core + the server's extra

An extra may name others of this package ("asyndgan[server,research]"); they are followed.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    project = tomllib.load(open(pyproject, "rb"))["project"]
    optional, name = project.get("optional-dependencies", {}), project["name"]
    out, seen, todo = list(project["dependencies"]), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"error: pyproject.toml has no extra {extra!r} (it has {', '.join(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.replace(" ", ""))
            if own:
                todo += own.group(1).split(",")
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    wanted = [e for e in sys.argv[2].split(",") if e.strip()] if len(sys.argv) > 2 else []
    print("\n".join(requirements(sys.argv[1], [e.strip() for e in wanted])))
