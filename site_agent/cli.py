"""`asyndgan-site`: run a hospital's site agent. Parsing only."""

from __future__ import annotations

import pathlib

import click

from asyndgan.common.cli_support import (exit_hard, friendly_errors, log_level_option, site_set_option, stop_on_sigterm,
                                          version_option)
from asyndgan.common.config import SiteConfig, load_config, parse_override
from asyndgan.common.logging_setup import setup_logging


@click.group()
@version_option
def main() -> None:
    """asyndgan site agent: trains a local discriminator; images never leave the site."""


@main.command()
@click.option("--data", type=click.Path(path_type=pathlib.Path), help="The site's data folder.")
@click.option("--server", help="HOST:PORT of the central server [localhost:50051].")
@click.option("--site-id", help="This site's name (unique in the consortium).")
@click.option("--config", "config_file", type=click.Path(path_type=pathlib.Path), help="TOML or JSON config file.")
@click.option("--threads", type=int, help="Torch CPU threads.")
@click.option("--device", help="Torch device for the discriminators (cpu, cuda).")
@click.option("--certs", type=click.Path(path_type=pathlib.Path),
              help="This site's TLS kit: ca.crt, site.crt, site.key [certs/sites/SITE_ID].")
@click.option("--insecure", is_flag=True, default=None, help="Plain text without identities (local tests only).")
@site_set_option
@log_level_option
@exit_hard
@friendly_errors
def join(data, server, site_id, config_file, device, threads, certs, insecure, overrides, log_level):
    """Join a training run and answer the server's batches until it ends."""
    from asyndgan.site_agent.agent import run_site

    values = {"data": data and str(data), "server": server, "site_id": site_id, "device": device, "threads": threads,
              "certs": certs and str(certs), "insecure": insecure}
    values.update(dict(parse_override(o) for o in overrides))
    cfg = load_config(SiteConfig, config_file, values)
    setup_logging(log_level)
    stop_on_sigterm()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    run_site(cfg)


@main.command()
@click.option("--data", type=click.Path(path_type=pathlib.Path), help="The site's data folder.")
@click.option("--server", help="HOST:PORT of the central server [localhost:50051].")
@click.option("--site-id", help="This site's name [the name in the kit's certificate].")
@click.option("--config", "config_file", type=click.Path(path_type=pathlib.Path), help="TOML or JSON config file.")
@click.option("--certs", type=click.Path(path_type=pathlib.Path),
              help="This site's TLS kit: ca.crt, site.crt, site.key [certs/sites/SITE_ID].")
@click.option("--insecure", is_flag=True, default=None, help="Plain text, no kit checks (local tests only).")
@site_set_option
@click.option("--log-level", default="ERROR", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Log lines besides the check lines (their findings are printed anyway).")
@exit_hard
@friendly_errors
def check(data, server, site_id, config_file, certs, insecure, overrides, log_level):
    """Dry run: data, cases, kit, server and identity checked as `join` would, without training.

    Prints one line per check (ok / warning / problem); exits 0 when the site can join, else 2 with the
    first problem."""
    from asyndgan.common.errors import AsynDGANError
    from asyndgan.site_agent.check import first_problem, run_checks

    if site_id is None and not insecure and certs is not None and (certs / "site.crt").is_file():
        from asyndgan.common.tls import common_name, load_cert

        site_id = common_name(load_cert(certs / "site.crt"))  # the kit says whose it is
    values = {"data": data and str(data), "server": server, "site_id": site_id, "certs": certs and str(certs),
              "insecure": insecure}
    values.update(dict(parse_override(o) for o in overrides))
    cfg = load_config(SiteConfig, config_file, values)
    setup_logging(log_level)
    results = run_checks(cfg)
    for r in results:
        click.echo(r.line())
    problem = first_problem(results)
    if problem is not None:
        raise AsynDGANError(problem.detail)


if __name__ == "__main__":
    main()
