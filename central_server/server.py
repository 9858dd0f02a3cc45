"""Server lifecycle: build the pieces, serve, train, stop gracefully.

`create_server(servicer, address)` binds (port 0 picks a free one, for tests) and adds the standard health
service. `run_server(cfg)` is what `asyndgan-server start` calls: SIGTERM or Ctrl-C stops training after the
step in flight, writes a checkpoint, tells the sites, and stops the server with a grace period.
"""

from __future__ import annotations

import logging
import pathlib
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError

from asyndgan.common import serde, tls
from asyndgan.formats import public_start
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.atomic import atomic_write_text
from asyndgan.common.config import ModelConfig, ServerConfig, describe_validation_error
from asyndgan.common.errors import AsynDGANError, ConfigError
from asyndgan.common.grpc_options import OPTIONS
from asyndgan.formats import checkpoint as ckpt
from asyndgan.central_server.identity import Authorizer
from asyndgan.formats.label_map_bank import LabelMapBank
from asyndgan.central_server.registry import SiteRegistry
from asyndgan.central_server.servicer import AsynDGANServicer
from asyndgan.central_server.status import build_status
from asyndgan.central_server.trainer import RunState, Trainer

log = logging.getLogger(__name__)
SERVICE_NAME = "asyndgan.v1.AsynDGAN"
GRACE_S = 5.0  # in-flight calls get this long to finish at shutdown
# grpc-python can leave a call that failed to deserialize without its final status, and then the stop never
# completes: past this, the server goes on with its shutdown (everything worth keeping is already written).
STOP_WAIT_S = GRACE_S + 5.0
REAP_EVERY_S = 1.0


def create_server(servicer: AsynDGANServicer, address: str, credentials: grpc.ServerCredentials | None,
                  max_workers: int = 72) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Bind `address` (TLS with `credentials`, plain text with None); port 0 picks a free port.

    max_workers: one thread per open training stream plus some for Status and health calls. Calls beyond it are
    refused with RESOURCE_EXHAUSTED instead of queueing behind streams that may never end."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         options=OPTIONS, maximum_concurrent_rpcs=max_workers)
    pb_grpc.add_AsynDGANServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise AsynDGANError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise AsynDGANError(f"cannot listen on {address} (port in use or address not available)")
    for name in (SERVICE_NAME, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def create_health_server(health_servicer: health.HealthServicer, address: str) -> grpc.Server:
    """A second, plain-text listener that serves only the health service (the same servicer, so it reports
    what the main port reports): for probes inside the server's own container, which hold no certificate."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                         options=OPTIONS, maximum_concurrent_rpcs=4)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise AsynDGANError(f"cannot listen on {address} for health checks: {exc}") from None
    if port == 0:
        raise AsynDGANError(f"cannot listen on {address} for health checks (port in use?)")
    server.start()
    log.info("health checks (plain text, this machine only) on %s", address)
    return server


def build(cfg: ServerConfig) -> tuple[Trainer, SiteRegistry, AsynDGANServicer]:
    """The trainer, registry and servicer of a run; cfg.resume says whether it continues from a checkpoint."""
    public_weights, start = None, None
    if cfg.init is not None:
        record, public_weights = public_start.read_folder(cfg.init)
        start = _check_init(cfg, record)
        cfg.site.public_start = record["discriminator_sha256"]
    bank = LabelMapBank(cfg.run_dir / "bank")
    registry = SiteRegistry(cfg, bank)
    trainer = Trainer(cfg, registry, bank, cfg.run_dir)
    if (cfg.train.anchor_weight or 0) > 0 and start is None:
        raise ConfigError(f"train.anchor_weight = {cfg.train.anchor_weight:g} anchors the generator to a public "
                          "start: give one with --init (or leave train.anchor_weight unset)")
    public_generator = None if start is None else ckpt.published_generator(ckpt.load_checkpoint(start))
    anchor = cfg.train.anchor_for(public_start=start is not None)
    if public_generator is not None and anchor > 0:
        trainer.anchor_to(public_generator, anchor)  # on a resumed run too: the anchor is the public start
        log.info("the generator is anchored to the public start's output (train.anchor_weight %g; no site data)",
                 anchor)
    found = ckpt.load_latest(cfg.run_dir / "checkpoints") if cfg.resume != "never" else None
    if found is None and start is not None and public_generator is not None:
        trainer.generator.load_state_dict(public_generator)
        log.info("generator starts from the public pretraining in %s (%s); sites start from its discriminator "
                 "(SHA-256 %s...)", cfg.init, start.name, (cfg.site.public_start or "")[:16])
    if found is None and cfg.resume == "always":
        raise ConfigError(f"--resume: no usable checkpoint in {cfg.run_dir / 'checkpoints'} (--resume-if-possible "
                          "starts a new run in that case)")
    if found is None and cfg.resume == "auto":
        log.info("no usable checkpoint in %s: starting a new run", cfg.run_dir / "checkpoints")
    if found is not None:
        path, state = found
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"checkpoint {path} does not fit this configuration (was the model changed?): "
                              f"{str(exc).splitlines()[0]}") from None
        for problem in bank.restore(state["bank"]):
            log.warning("%s; that site will upload them again", problem)
        log.info("resumed from %s at step %d (label maps of %d site(s) restored)", path, trainer.step,
                 len(bank.sites()))

    def welcome(have_maps: bool) -> serde.Welcome:
        return serde.Welcome(step=trainer.step, wire_dtype=cfg.train.wire_dtype, run_id=trainer.run_id,
                             site_config=cfg.site, have_maps=have_maps, wire_region=cfg.train.region_for(cfg.site.model))

    authorizer = Authorizer(None if cfg.insecure else cfg.certs, cfg.allowed_sites, cfg.operators)
    servicer = AsynDGANServicer(registry, welcome, lambda: build_status(trainer, registry), authorizer, cfg.limits,
                                public_weights=public_weights)
    return trainer, registry, servicer


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_init(cfg: ServerConfig, record: dict) -> pathlib.Path:
    """The pretraining's last checkpoint, after checking that its model is this run's; ConfigError otherwise."""
    try:
        theirs = _flat(ModelConfig.model_validate(record.get("model")).model_dump(mode="json"))
    except ValidationError as exc:
        raise ConfigError(f"the pretraining in {cfg.init} records a model this version cannot read: "
                          f"{describe_validation_error(exc)}") from None
    ours = _flat(cfg.site.model.model_dump(mode="json"))
    differ = [f"{k}: {theirs.get(k)} there, {ours.get(k)} here" for k in sorted(set(theirs) | set(ours))
              if theirs.get(k) != ours.get(k) and (k == "family" or k.startswith(f"{ours['family']}."))]
    if differ:
        raise ConfigError(f"the pretraining in {cfg.init} trained another model than this run's (site.model "
                          f"{'; '.join(differ)}); start with the same model settings, or pretrain again")
    path = cfg.init / record.get("checkpoint", "")
    if not path.is_file():
        raise ConfigError(f"the pretraining in {cfg.init} names checkpoint {path}, which is missing")
    return path


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    if cfg.insecure:
        log.warning("running WITHOUT TLS (--insecure): anyone who can reach this port can join as any site; "
                    "use this for local tests only")
        return None
    missing = [n for n in ("ca.crt", "server.crt", "server.key") if not (cfg.certs / n).is_file()]
    if missing:
        raise ConfigError(f"no TLS identity in {cfg.certs} (missing {', '.join(missing)}): create it with "
                          f"`asyndgan certs init --dir {cfg.certs}` and `asyndgan certs issue --dir {cfg.certs} "
                          "--server HOST`, or pass --insecure for a local test")
    return tls.server_credentials(cfg.certs)


def run_server(cfg: ServerConfig, port_file=None) -> Trainer:
    credentials = server_credentials(cfg)  # before anything is written: a missing certificate fails fast
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    trainer, registry, servicer = build(cfg)
    atomic_write_text(cfg.run_dir / "config.json", cfg.model_dump_json(indent=2))
    server, port, health_servicer = create_server(servicer, f"{cfg.host}:{cfg.port}", credentials,
                                                  cfg.limits.max_sessions + cfg.limits.status_threads)
    probe = None
    if cfg.health_port is not None:
        probe = create_health_server(health_servicer, f"127.0.0.1:{cfg.health_port}")
    server.start()
    log.info("serving on %s:%d with %s (run %s, %s, %d steps; run folder %s)", cfg.host, port,
             "plain text" if credentials is None else "mutual TLS", trainer.run_id, cfg.site.model.family,
             cfg.site.schedule.steps, cfg.run_dir)
    if port_file is not None:
        port_file.write_text(str(port))
    stop = threading.Event()
    reaper_done = threading.Event()
    threading.Thread(target=_reap, args=(registry, cfg.limits.upload_idle_s, reaper_done), daemon=True,
                     name="reaper").start()

    def on_signal(signum, _frame):
        log.warning("received %s: stopping after the step in flight", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        trainer.run(stop)
        if not cfg.exit_when_done and not stop.is_set():
            log.info("training finished; still serving status until stopped (Ctrl-C)")
            stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reaper_done.set()
        health_servicer.enter_graceful_shutdown()
        if probe is not None:
            probe.stop(0)
        finished = trainer.state is RunState.FINISHED
        registry.shutdown_all("training finished" if finished else "server stopping", final=finished)
        if not server.stop(GRACE_S).wait(STOP_WAIT_S):
            log.warning("gRPC did not finish stopping within %g s (a call that failed to decode may never "
                        "complete); exiting anyway", STOP_WAIT_S)
        log.info("server stopped at step %d", trainer.step)
    return trainer


def _reap(registry: SiteRegistry, idle_s: float, done: threading.Event) -> None:
    """End joining sessions that went silent, so that they give their threads back."""
    while not done.wait(REAP_EVERY_S):
        for site in registry.end_stalled_uploads(idle_s):
            log.warning("site %s sent nothing for %g s while joining; closed its stream", site, idle_s)
