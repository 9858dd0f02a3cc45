"""A hospital's dry run (`asyndgan-site check`): everything `join` needs, checked in order, without training.

Data folder found, layout recognised, cases usable (or skipped, each with its reason), the kit present and its
certificate valid, this site's and not close to expiry, the server reachable (TCP, then the TLS handshake), and
the server accepting this identity. The last is asked the only way that proves it: open a Train stream, say
Hello, and see Welcome or a refusal; the stream is then closed at once, before any label map is uploaded, which
the server treats as a site leaving. With the Welcome's settings the data set is opened exactly as `join` would
open it, which also builds the prepared-slice cache; without a server, at default settings.

Nothing here sends more than a Hello (site id, family, modality names), which `join` sends too.
"""

from __future__ import annotations

import datetime as dt
import logging
import pathlib
import queue
import socket
from dataclasses import dataclass
from typing import Literal

import grpc

from asyndgan.common import serde, tls
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.config import ModelConfig, SiteConfig, SiteFacingConfig
from asyndgan.common.errors import AsynDGANError
from asyndgan.formats.datasets import DataSummary, SiteDataset, describe_dataset, open_dataset

log = logging.getLogger(__name__)

EXPIRY_WARNING_DAYS = 30
Level = Literal["ok", "warning", "problem"]


@dataclass(frozen=True)
class CheckResult:
    check: str  # what was checked, e.g. "data folder", "certificate"
    level: Level
    detail: str  # one line

    def line(self) -> str:
        return f"{self.level:<8} {self.check}: {self.detail}"


def first_problem(results: list[CheckResult]) -> CheckResult | None:
    return next((r for r in results if r.level == "problem"), None)


class _Warnings(logging.Handler):
    """Collects the warnings the loaders log (a skipped case, with its reason) while the data set opens."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_checks(cfg: SiteConfig, now: dt.datetime | None = None) -> list[CheckResult]:
    """Every check, in order; later checks that depend on a failed one are left out (the first problem is the
    one to fix)."""
    out: list[CheckResult] = []
    summary = _check_data(cfg, out)
    kit, kit_ok = None, True
    if cfg.insecure:
        out.append(CheckResult("TLS kit", "warning", "skipped: --insecure (plain text, for local tests only)"))
    else:
        kit = cfg.certs or pathlib.Path("certs") / "sites" / cfg.site_id
        kit_ok = _check_kit(kit, cfg.site_id, now or tls.now_utc(), out)
    site_config = None
    if kit_ok and _check_reachable(cfg, kit, out) and summary is not None:
        site_config = _check_accepted(cfg, kit, summary, out)
    if summary is not None:
        dataset = _check_cases(cfg, summary, site_config, out)
        if dataset is not None and len(dataset):
            _check_privacy(cfg, site_config, dataset, out)
    return out


def _check_data(cfg: SiteConfig, out: list[CheckResult]) -> DataSummary | None:
    if not cfg.data.is_dir():
        what = "is not a folder" if cfg.data.exists() else "does not exist"
        out.append(CheckResult("data folder", "problem", f"data folder {cfg.data} {what}"))
        return None
    out.append(CheckResult("data folder", "ok", str(cfg.data)))
    try:
        summary = describe_dataset(cfg.data, cfg.prep)
    except AsynDGANError as exc:
        out.append(CheckResult("layout", "problem", str(exc)))
        return None
    out.append(CheckResult("layout", "ok", f"{summary.layout} ({summary.family} family), modalities: "
                                           f"{', '.join(summary.modalities) or '-'}"))
    return summary


def _check_kit(kit: pathlib.Path, site_id: str, now: dt.datetime, out: list[CheckResult]) -> bool:
    missing = [n for n in ("ca.crt", "site.crt", "site.key") if not (kit / n).is_file()]
    if missing:
        out.append(CheckResult("TLS kit", "problem", f"no TLS kit in {kit} (missing {', '.join(missing)}): ask "
                               "the consortium for one, or pass --insecure for a local test"))
        return False
    out.append(CheckResult("TLS kit", "ok", str(kit)))
    try:
        cert = tls.check_own_certificate(kit / "site.crt", kit / "site.key", kit / "ca.crt")
    except AsynDGANError as exc:
        out.append(CheckResult("certificate", "problem", str(exc)))
        return False
    name = tls.common_name(cert)
    if name != site_id:
        out.append(CheckResult("identity", "problem", f"{kit / 'site.crt'} is the certificate of {name!r}, not "
                               f"of {site_id!r}"))
        return False
    out.append(CheckResult("identity", "ok", f"the certificate names {site_id!r}"))
    expires = cert.not_valid_after_utc
    left = expires - now
    if left < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        out.append(CheckResult("certificate", "warning", f"expires on {expires:%Y-%m-%d %H:%M} UTC, in "
                               f"{max(left.days, 0)} days: ask the consortium for a new one"))
    else:
        out.append(CheckResult("certificate", "ok", f"issued by the consortium CA, valid until "
                               f"{expires:%Y-%m-%d}"))
    return True


def _check_reachable(cfg: SiteConfig, kit: pathlib.Path | None, out: list[CheckResult]) -> bool:
    host, _, port = cfg.server.rpartition(":")
    timeout = min(cfg.connect_timeout_s, 10.0)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        out.append(CheckResult("server", "problem", f"cannot reach the server at {cfg.server}: {exc}"))
        return False
    with tls.open_channel(cfg.server, kit, cfg.site_id) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            why = ("does not answer gRPC in plain text (does it require TLS?)" if kit is None else
                   "refused the TLS handshake: its certificate must come from this site's consortium CA and name "
                   "the address dialled, and it must accept this site's certificate")
            out.append(CheckResult("server", "problem", f"{cfg.server} {why}"))
            return False
    out.append(CheckResult("server", "ok", f"{cfg.server} reachable" + ("" if kit is None else
                                                                        ", TLS handshake done")))
    return True


def _check_accepted(cfg: SiteConfig, kit: pathlib.Path | None, summary: DataSummary,
                    out: list[CheckResult]) -> SiteFacingConfig | None:
    """Hello -> Welcome or a refusal; the stream is cancelled right after the first answer."""
    requests: queue.Queue = queue.Queue()
    requests.put(serde.hello_to_proto(serde.Hello(site_id=cfg.site_id, family=summary.family,
                                                  modalities=summary.modalities)))
    with tls.open_channel(cfg.server, kit, cfg.site_id) as channel:
        call = pb_grpc.AsynDGANStub(channel).Train(iter(requests.get, None), timeout=min(cfg.connect_timeout_s, 30))
        try:
            first = next(call, None)
        except grpc.RpcError as exc:
            out.append(CheckResult("identity accepted", "problem", f"the server refused site {cfg.site_id}: "
                                   f"{exc.details()} ({exc.code().name})"))
            return None
        finally:
            requests.put(None)
            call.cancel()  # leave before Ready: nothing is uploaded, the server sees a site that left
    if first is None or first.WhichOneof("kind") != "welcome":
        kind = "nothing" if first is None else first.WhichOneof("kind")
        out.append(CheckResult("identity accepted", "problem", f"the server answered Hello with {kind}, not "
                               "Welcome"))
        return None
    try:
        welcome = serde.welcome_from_proto(first.welcome)
    except AsynDGANError as exc:
        out.append(CheckResult("identity accepted", "problem", str(exc)))
        return None
    out.append(CheckResult("identity accepted", "ok", f"the server welcomed {cfg.site_id} (run {welcome.run_id}, "
                                                      f"step {welcome.step})"))
    return welcome.site_config


def _check_cases(cfg: SiteConfig, summary: DataSummary, site_config: SiteFacingConfig | None,
                 out: list[CheckResult]) -> SiteDataset | None:
    """The opened dataset, or None when the data cannot be opened."""
    where = "at the server's settings"
    if site_config is None:
        # No server to ask: the defaults of this data's family, so that data problems still show offline.
        site_config = SiteFacingConfig(model=ModelConfig(family=summary.family))
        where = "at default settings (the server's may differ)"
    collector = _Warnings()
    loaders = logging.getLogger("asyndgan.formats")  # the readers (formats/brats.py, image_folders.py)
    saved = loaders.level, loaders.propagate
    if loaders.getEffectiveLevel() > logging.WARNING:
        # Quiet logging was asked for: the loaders' warnings are still needed, but only as check lines.
        loaders.setLevel(logging.WARNING)
        loaders.propagate = False
    loaders.addHandler(collector)
    try:
        dataset = open_dataset(cfg.data, site_config, cfg.prep)
    except AsynDGANError as exc:
        out.append(CheckResult("cases", "problem", str(exc)))
        return None
    finally:
        loaders.removeHandler(collector)
        loaders.setLevel(saved[0])
        loaders.propagate = saved[1]
    for message in collector.messages:
        out.append(CheckResult("cases", "warning", message))
    cached = f"; prepared slices cached in {cfg.prep.cache_dir}" if summary.layout in ("brats", "images") else ""
    patients = dataset.patients()
    out.append(CheckResult("cases", "ok", f"{len(dataset)} samples of {patients.count} patients "
                           f"({patients.source}) usable {where}{cached}"))
    return dataset


def _check_privacy(cfg: SiteConfig, site_config: SiteFacingConfig | None, dataset: SiteDataset,
                   out: list[CheckResult]) -> None:
    """This site's own guarantee: its ledger, its budget against the server's run, settings it would refuse."""
    from asyndgan.site_agent import privacy

    p = cfg.privacy
    if not p.enabled:
        out.append(CheckResult("privacy", "warning", "OFF (privacy.enabled=false): the gradients this site returns "
                               "are not protected and let the server reconstruct its images"))
        return
    try:
        ledger = privacy.PrivacyLedger(privacy.ledger_path(cfg.state_dir, cfg.site_id), cfg.site_id, p)
    except AsynDGANError as exc:
        out.append(CheckResult("privacy", "problem", str(exc)))
        return
    units = dataset.patients().count if p.unit == "patient" else len(dataset)
    bound = 1 / (10 * units) if p.unit == "patient" else 1 / units
    if p.delta > bound:
        out.append(CheckResult("privacy", "problem", f"privacy.delta {p.delta:g} is above "
                               f"{'1/(10 x patients)' if p.unit == 'patient' else '1/samples'} ({bound:.3g})"))
        return
    if site_config is not None and site_config.loss.lambda_l1 > 0:
        out.append(CheckResult("privacy", "problem", f"the server asks for an L1 term (loss.lambda_l1 = "
                               f"{site_config.loss.lambda_l1:g}), which this private site refuses"))
        return
    rate = p.sample_rate
    unit = privacy.UNIT_NAMES[p.unit]
    head = (f"on, per {unit}: epsilon {ledger.epsilon_spent:.2f} of {p.epsilon:g} spent (delta {p.delta:g}); "
            f"sampling rate {rate:.4g} ({rate * units:.1f} of {units} {unit}s per step expected)")
    spent = list(ledger.history)
    if p.statistics_share > 0:
        from asyndgan.site_agent.site_statistics import statistics_path

        if statistics_path(cfg.state_dir, cfg.site_id).is_file():
            head += "; its statistics, released earlier, are re-sent at no cost"
        else:
            release = privacy.noise_for_budget(p.epsilon * p.statistics_share, p.delta, 1.0, 1)
            spent.append((release, 1.0, 1))
            head += (f"; the statistics release at join costs {p.statistics_share:g} of epsilon (noise "
                     f"{release:.3g})")
    if p.trainable == "none":
        public = site_config is not None and site_config.public_start is not None
        level: Level = "ok" if public or site_config is None else "problem"
        out.append(CheckResult("privacy", level, f"{head}; the discriminators stay the public ones "
                               "(trainable=none): answers cost no privacy" + ("" if level == "ok" else
                               "; but the server's run has no public start to take them from")))
        return
    if p.noise_multiplier is None:
        if site_config is None:
            out.append(CheckResult("privacy", "ok", f"{head}; the noise is computed at join from the server's "
                                   "planned steps"))
            return
        planned = privacy.planned_dp_steps(site_config, p, 0)
        try:
            sigma = privacy.noise_for_budget(p.epsilon, p.delta, rate, planned, spent)
        except AsynDGANError as exc:
            out.append(CheckResult("privacy", "problem", str(exc)))
            return
        level = "warning" if sigma / max(rate * units, 1e-9) > 0.5 else "ok"  # type: ignore[assignment]
        detail = (f"{head}; the server's run plans {planned} DP steps, for which this site adds noise {sigma:.3g} "
                  f"({sigma / max(rate * units, 1e-9):.2f} per expected {unit}"
                  f"{'; above 0.5 the noise drowns the signal' if level == 'warning' else ''})")
        out.append(CheckResult("privacy", level, detail))
        return
    left = privacy.affordable_steps(p, rate, spent)
    detail = f"{head}; at noise {p.noise_multiplier:g}, about {left} more discriminator steps fit"
    needed = None if site_config is None else site_config.schedule.steps * site_config.d_steps
    if needed is not None and left < needed:
        out.append(CheckResult("privacy", "warning", f"{detail}; the server's run asks for {needed}, so this site "
                               f"will stop answering after about {left}"))
    else:
        out.append(CheckResult("privacy", "ok", detail))
