"""`asyndgan certs`: the consortium's certificate administration (CA, server certificate, site kits,
revocation). Parsing only; the work is in common/pki.py. Added to the `asyndgan` command group."""

from __future__ import annotations

import pathlib

import click

from asyndgan.common.cli_support import friendly_errors

_certs_dir = click.option("--dir", "folder", type=click.Path(path_type=pathlib.Path), default="certs",
                          show_default=True, help="Certificate folder (keep ca.key offline).")


@click.group()
def certs() -> None:
    """Consortium identities for mutual TLS: a CA, the server's certificate, one kit per site."""


@certs.command("init")
@_certs_dir
@click.option("--name", default="asyndgan consortium CA", show_default=True)
@friendly_errors
def certs_init(folder, name):
    """Create the consortium CA (ca.crt, ca.key)."""
    from asyndgan.common import pki

    click.echo(f"CA certificate: {pki.init_ca(folder, name)} (key {folder / 'ca.key'}, owner-only)")


@certs.command("issue")
@_certs_dir
@click.option("--server", "hosts", multiple=True, help="Issue the server certificate for this host name or IP "
              "address (repeat for each name the sites may dial).")
@click.option("--site", "sites", multiple=True, help="Issue a site kit for this site id (repeatable); ids are "
              "1 to 64 letters, digits, '.', '_' or '-'.")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650))
@friendly_errors
def certs_issue(folder, hosts, sites, days):
    """Issue the server's certificate and/or site kits signed by the CA."""
    from asyndgan.common import pki
    from asyndgan.common.errors import ConfigError
    from asyndgan.common.identifiers import check_site_id

    if not hosts and not sites:
        raise ConfigError("say what to issue: --server HOST ... and/or --site NAME ...")
    for site in sites:  # every id first, so that a bad one leaves nothing half-issued
        check_site_id(site)
    if hosts:
        click.echo(f"server certificate for {', '.join(hosts)}: {pki.issue_server(folder, list(hosts), days)}")
    for site in sites:
        click.echo(f"site kit for {site}: {pki.issue_site(folder, site, days)} (give this folder to the site)")


@certs.command("revoke")
@_certs_dir
@click.option("--site", required=True, help="The site whose certificate is revoked.")
@friendly_errors
def certs_revoke(folder, site):
    """Revoke a site's certificate (the server refuses it from its next connection on)."""
    from asyndgan.common import pki

    serial = pki.revoke_site(folder, site)
    click.echo(f"revoked {site} (serial {serial:x}) in {folder / 'revoked.txt'}")
