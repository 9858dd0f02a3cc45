"""Emulated hospital links for the bandwidth benchmark: every site in its own network namespace behind `tc tbf`
rate limits and a delaying relay (needs root; otherwise the link times are modelled and the report says so)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess


from asyndgan.common.errors import ConfigError

log = logging.getLogger(__name__)

from asyndgan.experiments.bandwidth_config import LinkProfile


# ---- emulated links -----------------------------------------------------------------------------------------
class LinkSet:
    """One network namespace per site, joined to the host by a veth pair: `tc tbf` on the host side limits the
    server -> site rate, on the site side the site -> server rate; a relay on the host side of each pair adds half
    the round trip each way. Needs root and iproute2; traffic stays inside the namespaces made here."""

    def __init__(self, profile: LinkProfile, sites: int, tag: int):
        self.profile, self.sites = profile, sites
        self.namespaces = [f"abw{tag}s{i}" for i in range(sites)]
        self.host_ifs = [f"abw{tag}h{i}" for i in range(sites)]
        self.host_addresses = [f"10.232.{(tag * 8 + i) % 250}.1" for i in range(sites)]
        self.delay_s = profile.rtt_ms / 2000.0

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    @staticmethod
    def available() -> str | None:
        """None when links can be emulated here, else why not."""
        if os.geteuid() != 0:
            return "emulating links needs root (network namespaces and tc)"
        if shutil.which("ip") is None or shutil.which("tc") is None:
            return "emulating links needs iproute2 (ip, tc)"
        return None

    def __enter__(self) -> "LinkSet":
        self.__exit__()  # what a killed run may have left under the same names
        try:
            for i, (ns, hif, addr) in enumerate(zip(self.namespaces, self.host_ifs, self.host_addresses)):
                nif, site_addr = f"{hif}n", addr[:-1] + "2"
                _ip("netns", "add", ns)
                _ip("link", "add", hif, "type", "veth", "peer", "name", nif)
                _ip("link", "set", nif, "netns", ns)
                _ip("addr", "add", f"{addr}/30", "dev", hif)
                _ip("link", "set", hif, "up")
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{site_addr}/30", "dev", nif)
                _ip("netns", "exec", ns, "ip", "link", "set", nif, "up")
                _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
                _tbf([], hif, self.profile.down_mbit)
                _tbf(["ip", "netns", "exec", ns], nif, self.profile.up_mbit)
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns, hif in zip(self.namespaces, self.host_ifs):
            subprocess.run(["ip", "link", "del", hif], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _tbf(prefix: list[str], dev: str, mbit: float) -> None:
    # burst: at least one MTU and ~4 ms of traffic at the rate; queue of 100 ms at the rate
    rate_bytes = mbit * 1e6 / 8
    burst = max(16_000, int(rate_bytes * 0.004))
    r = subprocess.run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst",
                        str(burst), "latency", "100ms"], capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"tc tbf on {dev}: {r.stderr.strip()}")
