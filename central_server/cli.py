"""`asyndgan-server`: start the central server, or ask a running one for its status. Parsing only."""

from __future__ import annotations

import json
import pathlib
import sys

import click
import grpc

from asyndgan.common.cli_support import exit_hard, friendly_errors, log_level_option, set_option, version_option
from asyndgan.common.config import ServerConfig, load_config, parse_override
from asyndgan.common.errors import AsynDGANError
from asyndgan.common.logging_setup import setup_logging


@click.group()
@version_option
def main() -> None:
    """asyndgan central server: owns the generator and drives training."""


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=pathlib.Path), help="TOML or JSON config file.")
@click.option("--host", help="Address to listen on [0.0.0.0].")
@click.option("--port", type=int, help="Port to listen on (0: any free port) [50051].")
@click.option("--run-dir", type=click.Path(path_type=pathlib.Path), help="Checkpoints, samples, logs [runs/server].")
@click.option("--family", type=click.Choice(["image2d", "mlp1d"]), help="Model family [image2d].")
@click.option("--steps", type=int, help="Generator steps to train.")
@click.option("--batch-size", type=int, help="Samples per site per step.")
@click.option("--min-sites", type=int, help="Sites that must answer for a step to count.")
@click.option("--wire-dtype", type=click.Choice(["float32", "float16", "bfloat16", "q8"]),
              help="Images and gradients on the wire: q8 (8 bits with a per-channel scale) [q8], or a float dtype.")
@click.option("--wire-region", type=click.Choice(["full", "brain", "auto"]),
              help="'brain': send only the pixels inside each label map's brain (image2d); 'auto' [default]: brain "
                   "for BraTS modalities, else full.")
@click.option("--threads", type=int, help="Torch CPU threads.")
@click.option("--device", help="Torch device for the generator (cpu, cuda, cuda:1).")
@click.option("--resume", "resume", flag_value="always", default=None,
              help="Continue from the newest usable checkpoint in the run folder (an error when there is none).")
@click.option("--resume-if-possible", "resume", flag_value="auto",
              help="Continue from the newest usable checkpoint when there is one, else start a new run (for "
                   "containers that restart).")
@click.option("--health-port", type=int, help="Also serve the gRPC health service alone, plain text, on "
              "127.0.0.1:PORT (for `asyndgan-server health` in the server's container).")
@click.option("--certs", type=click.Path(path_type=pathlib.Path), help="TLS folder: ca.crt, server.crt, server.key [certs].")
@click.option("--insecure", is_flag=True, default=None, help="Plain text without identities (local tests only).")
@click.option("--port-file", type=click.Path(path_type=pathlib.Path), help="Write the bound port here (for scripts).")
@click.option("--init", type=click.Path(path_type=pathlib.Path), help="Start from a public pretraining folder "
              "(`asyndgan-server pretrain`): the generator from its weights, the sites' discriminators from its "
              "reference discriminator (sent to them, checked by SHA-256).")
@set_option
@log_level_option
@exit_hard  # a gRPC call that never completed must not hold the process after the last checkpoint is written
@friendly_errors
def start(config_file, host, port, run_dir, family, steps, batch_size, min_sites, wire_dtype, wire_region, threads, device,
          resume, health_port, certs, insecure, port_file, init, overrides, log_level):
    """Start the server and train until the schedule ends."""
    from asyndgan.central_server.server import run_server

    values = {
        "host": host, "port": port, "run_dir": run_dir and str(run_dir), "site.model.family": family,
        "site.schedule.steps": steps, "train.batch_size": batch_size, "train.min_sites": min_sites,
        "train.wire_dtype": wire_dtype, "train.wire_region": wire_region, "device": device, "threads": threads, "insecure": insecure,
        "certs": certs and str(certs), "resume": resume, "health_port": health_port, "init": init and str(init),
    }
    values.update(dict(parse_override(o) for o in overrides))
    folder = run_dir or pathlib.Path(ServerConfig.model_fields["run_dir"].default)
    if resume and config_file is None and (resume == "always" or _has_checkpoint(folder)):
        # Resume with the settings the run was started with (saved in its folder), unless told otherwise.
        saved = folder / "config.json"
        config_file = saved if saved.is_file() else None
    cfg = load_config(ServerConfig, config_file, values)
    log_file = cfg.run_dir / "server.log"
    setup_logging(log_level, log_file)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    run_server(cfg, port_file=port_file)


@main.command()
@click.option("--data", required=True, type=click.Path(path_type=pathlib.Path),
              help="Public training data (BraTS tree, image folder or arrays), e.g. a public BraTS release.")
@click.option("--out", required=True, type=click.Path(path_type=pathlib.Path),
              help="Pretraining folder to write (checkpoints, samples, public_start.json, the discriminator).")
@click.option("--config", "config_file", type=click.Path(path_type=pathlib.Path),
              help="TOML or JSON server config: the model and schedule (the same model the run will use).")
@click.option("--steps", type=int, help="Generator steps.")
@click.option("--batch-size", type=int, help="Samples per step.")
@click.option("--cache-dir", type=click.Path(path_type=pathlib.Path), help="Where prepared slices are cached.")
@click.option("--threads", type=int, help="Torch CPU threads.")
@click.option("--device", help="Torch device (cpu, cuda).")
@set_option
@log_level_option
@friendly_errors
def pretrain(data, out, config_file, steps, batch_size, cache_dir, threads, device, overrides, log_level):
    """Train the generator and a reference discriminator on public data, for runs to start from (--init)."""
    from asyndgan.simulation.pretrain import pretrain as run_pretrain
    from asyndgan.common.config import DataPrepConfig

    values = {"run_dir": str(out), "site.schedule.steps": steps, "train.batch_size": batch_size,
              "device": device, "threads": threads}
    values.update(dict(parse_override(o) for o in overrides))
    cfg = load_config(ServerConfig, config_file, values)
    setup_logging(log_level, out / "pretrain.log")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    prep = DataPrepConfig(**({"cache_dir": cache_dir} if cache_dir else {}))
    folder = run_pretrain(cfg, data, prep)
    click.echo(f"pretraining in {folder}; start a run from it with: asyndgan-server start --init {folder}")


def _has_checkpoint(run_dir: pathlib.Path) -> bool:
    from asyndgan.formats.checkpoint import list_checkpoints

    return bool(list_checkpoints(run_dir / "checkpoints"))


@main.command()
@click.option("--server", default="localhost:50051", show_default=True, help="HOST:PORT of the server.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for an answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option("--certs", type=click.Path(path_type=pathlib.Path), default="certs/sites/operator", show_default=True,
              help="A client kit (ca.crt, site.crt, site.key) from the consortium CA.")
@click.option("--insecure", is_flag=True, help="The server runs without TLS.")
@friendly_errors
def status(server, timeout, as_json, certs, insecure):
    """Print connected sites, step, bytes moved and latest losses of a running server."""
    from google.protobuf.json_format import MessageToDict

    from asyndgan.common._generated import asyndgan_pb2 as pb
    from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
    from asyndgan.common.tls import open_channel
    from asyndgan.central_server.status import format_status

    with open_channel(server, None if insecure else certs) as channel:
        try:
            reply = pb_grpc.AsynDGANStub(channel).Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise AsynDGANError(f"no status from {server}: {exc.details()} ({exc.code().name})") from None
    if as_json:
        click.echo(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    else:
        click.echo(format_status(reply))


@main.command()
@click.option("--address", default="127.0.0.1:50052", show_default=True,
              help="HOST:PORT: the server's --health-port (plain text), or its main port with --certs.")
@click.option("--certs", type=click.Path(path_type=pathlib.Path),
              help="A client kit, when asking on the main (mutual TLS) port.")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for an answer.")
def health(address, certs, timeout):
    """Exit 0 when the server answers SERVING on the standard gRPC health service, 1 otherwise (a container
    HEALTHCHECK; no other binary needed)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from asyndgan.common.tls import open_channel

    try:
        with open_channel(address, certs) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="asyndgan.v1.AsynDGAN"), timeout=timeout)
    except (grpc.RpcError, AsynDGANError, OSError) as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
        click.echo(f"not healthy: no answer from {address}: {detail}", err=True)
        sys.exit(1)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    click.echo(f"{address}: {name}")
    sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)


@main.command()
@click.option("--run-dir", type=click.Path(path_type=pathlib.Path), required=True,
              help="The run folder: its newest usable checkpoint is exported.")
@click.option("--checkpoint", type=click.Path(path_type=pathlib.Path),
              help="Export this checkpoint instead of the newest one.")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="FILE.safetensors to write.")
@log_level_option
@friendly_errors
def export(run_dir, checkpoint, out, log_level):
    """Write the generator's weights and model settings (no optimiser, no label maps) as safetensors: what a
    consortium publishes. `asyndgan generate --generator FILE` reads it."""
    from asyndgan.formats.generator_file import export_generator

    setup_logging(log_level)
    loaded = export_generator(checkpoint or run_dir, out)
    click.echo(f"exported the generator of run {loaded.run_id} at step {loaded.step} ({loaded.source}) to {out}")


if __name__ == "__main__":
    main()
