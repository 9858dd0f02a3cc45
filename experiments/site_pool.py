"""Many real sites in one process, for the scale benchmark: each site a SiteAgent in its own thread, with its own
gRPC channel and its own TLS identity (certificate kit), exactly as `asyndgan-site join` runs one. Sharing a
process lets 64 sites fit in one machine's memory; the server cannot tell them from 64 separate processes.

    python -m asyndgan.experiments.site_pool --server HOST:PORT --kits DIR --data DIR --sites a,b,c \\
        --state DIR [--set KEY=VALUE ...]

Site `a` reads DIR/a (each site its own data, as hospitals have). Exit status 0 when every site
finished the run, 1 (naming the site) when one failed.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import threading

import torch

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from asyndgan.common.config import SiteConfig, load_config, parse_override
    from asyndgan.formats.datasets import describe_dataset
    from asyndgan.site_agent.agent import run_site

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--kits", type=pathlib.Path, required=True, help="folder of per-site kits (<site id>/)")
    parser.add_argument("--data", type=pathlib.Path, required=True, help="folder of per-site data (<site id>/)")
    parser.add_argument("--sites", required=True, help="comma-separated site ids")
    parser.add_argument("--state", type=pathlib.Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    sites = [s for s in args.sites.split(",") if s]
    extra = dict(parse_override(o) for o in args.overrides)
    configs = [load_config(SiteConfig, None, {"data": str(args.data / site), "server": args.server, "site_id": site,
                                              "certs": str(args.kits / site), "state_dir": str(args.state / site),
                                              **extra})
               for site in sites]
    for cfg in configs:
        describe_dataset(cfg.data, cfg.prep)  # a bad path fails here, before any thread
    failures: dict[str, BaseException] = {}

    def one(cfg) -> None:
        try:
            run_site(cfg)
        except BaseException as exc:  # reported by name below
            failures[cfg.site_id] = exc

    threads = [threading.Thread(target=one, args=(c,), name=c.site_id, daemon=True) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for site, exc in failures.items():
        print(f"site {site} failed: {exc}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
