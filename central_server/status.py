"""The server's status as a StatusReply (for `asyndgan-server status`) and as text for a person."""

from __future__ import annotations

import time

from asyndgan.common import serde
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.central_server.registry import SiteRegistry
from asyndgan.central_server.trainer import Trainer


def build_status(trainer: Trainer, registry: SiteRegistry) -> pb.StatusReply:
    sent, received = registry.bytes_moved()
    reply = pb.StatusReply(
        step=trainer.step, total_steps=trainer.cfg.site.schedule.steps, family=trainer.model_cfg.family,
        state=trainer.state.value, bytes_sent=sent, bytes_received=received,
        images_per_second=trainer.images_per_second, run_id=trainer.run_id,
        modalities=trainer.family.modalities(trainer.model_cfg),
    )
    now = time.monotonic()
    for s in registry.sessions() + registry.departed():
        reply.sites.append(pb.SiteStatus(
            site_id=s.site_id, num_samples=s.num_samples, ready=s.ready,
            steps_answered=s.stats.steps_answered, steps_missed=s.stats.steps_missed,
            bytes_sent=s.stats.bytes_sent, bytes_received=s.stats.bytes_received,
            losses=s.stats.losses, connected_seconds=now - s.stats.joined_at,
            late_replies=s.stats.late_replies, bad_messages=s.stats.bad_messages,
            privacy=serde.privacy_to_proto(s.privacy), left=s.left or "", modalities=list(s.modalities),
            gradients_rejected=s.stats.gradients_rejected, rows_clipped=s.stats.rows_clipped,
            late_applied=s.stats.late_applied,
        ))
    return reply


def format_status(reply: pb.StatusReply) -> str:
    lines = [
        f"run {reply.run_id}  {reply.family}  {reply.state}  step {reply.step}/{reply.total_steps}  "
        f"{reply.images_per_second:.1f} img/s",
        f"bytes: {reply.bytes_sent / 1e6:.1f} MB sent to sites, {reply.bytes_received / 1e6:.1f} MB received",
        f"sites connected: {sum(1 for s in reply.sites if not s.left)}",
    ]
    held = {m for s in reply.sites if not s.left for m in s.modalities}
    orphans = [m for m in reply.modalities if m not in held]
    if reply.sites and orphans:  # nothing teaches the generator these channels until a site holding them joins
        lines.append(f"modalities no connected site holds (not learnt): {', '.join(orphans)}")
    for s in reply.sites:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(s.losses.items()) if k != "epsilon") or "-"
        state = "left" if s.left else "ready" if s.ready else "joining"
        holds = f"holds {'+'.join(s.modalities)}  " if s.modalities else ""
        lines.append(
            f"  {s.site_id:<16} n={s.num_samples:<7} {state:<8} {holds}"
            f"answered {s.steps_answered}  missed {s.steps_missed}  late {s.late_replies}"
            f"{f' (applied {s.late_applied})' if s.late_applied else ''}  "
            f"{f'rejected {s.gradients_rejected}  clipped rows {s.rows_clipped}  ' if s.gradients_rejected or s.rows_clipped else ''}"
            f"{(s.bytes_sent + s.bytes_received) / 1e6:.1f} MB  losses: {losses}"
        )
        lines.append(f"  {'':<16} privacy {serde.privacy_from_proto(s.privacy).describe()}"
                     + (f"; left the run: {s.left}" if s.left else ""))
    return "\n".join(lines)
