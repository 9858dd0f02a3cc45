"""The bandwidth benchmark's baselines: FedAvg, cyclical and single weight transfer of the segmentation U-Net on
Flower's deployment mode (each SuperNode behind a counting relay), and ensembling of locally trained models."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time

import numpy as np
import torch

from asyndgan.experiments.relay import DOWN, UP

from asyndgan.segmentation import (
    SegmentationRecipe, build_network, evaluate_model,
    load_training_slices, train_model,
)

log = logging.getLogger(__name__)

from asyndgan.experiments.bandwidth_config import BandwidthConfig, quantiles
from asyndgan.experiments.bandwidth_links import LinkSet
from asyndgan.experiments.pieces import write_json


# ---- Flower baselines -----------------------------------------------------------------------------------------
def flower_data(cfg: BandwidthConfig, sites: list[pathlib.Path], recipe: SegmentationRecipe | None = None,
                name: str = "flower") -> tuple[pathlib.Path, int]:
    """OUT/<name>/data: site_<i>.npz (the recipe's training slices of each site), recipe.json, init.safetensors;
    (folder, P). recipe: cfg.segmentation unless given."""
    from safetensors.torch import save_file

    folder = cfg.out / name / "data"
    recipe = recipe or cfg.segmentation
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={"seed": cfg.seed})})
    torch.manual_seed(cfg.seed)
    net = build_network(recipe)
    params = sum(v.numel() for v in net.state_dict().values())
    if (folder / "init.safetensors").is_file():
        return folder, params
    folder.mkdir(parents=True, exist_ok=True)
    for i, site in enumerate(sites):
        s = load_training_slices([site], recipe, progress=False)
        np.savez(folder / f"site_{i}.npz", images=s.images.numpy(), masks=s.masks.numpy())
    (folder / "recipe.json").write_text(recipe.model_dump_json(indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "init.safetensors"))
    return folder, params


def flower_methods(cfg: BandwidthConfig) -> dict[str, dict]:
    n = len(cfg.phantom.cases_per_site)
    f = cfg.flower
    every = {
        "fedavg": {"method": "fedavg", "rounds": f.fedavg_rounds, "local-steps": f.local_steps},
        "cwt": {"method": "cwt", "rounds": f.cwt_cycles * n, "local-steps": f.cwt_local_steps,
                "proportional": f.proportional},
        "swt": {"method": "cwt", "rounds": n, "local-steps": f.swt_local_steps, "proportional": f.proportional},
    }
    return {m: every[m] for m in f.methods}


def flower_runs(cfg: BandwidthConfig, data: pathlib.Path, methods: list[str], name: str = "flower",
                link: "LinkSet | None" = None, rounds: int | None = None) -> dict[str, dict]:
    """Each method as one `flwr run` on one federation (SuperLink + a SuperNode per site, each behind a relay);
    per method the relay traffic and the rounds' log."""
    from asyndgan.experiments.flower_runner import Federation

    out = cfg.out / name
    results = {m: json.loads((out / m / "traffic.json").read_text()) for m in methods
               if (out / m / "traffic.json").is_file()}
    todo = [m for m in methods if m not in results]
    if not todo:
        return results
    n = len(cfg.phantom.cases_per_site)
    specs = flower_methods(cfg)
    fed = Federation(out / "federation", n, delay_s=link.delay_s if link else 0.0,
                     netns=[link.namespaces[i] for i in range(n)] if link else None)
    try:
        fed.start(link.host_addresses if link else None)
        for m in todo:
            shutil.rmtree(out / m, ignore_errors=True)
            before = [r.traffic() for r in fed.relays]
            started_wall, relay_t0 = time.time(), fed.relays[0].now()
            spec = dict(specs[m], **({"rounds": rounds} if rounds else {}))
            run_config = {"data-dir": str(data.resolve()), "out-dir": str((out / m).resolve()), "sites": n,
                          "threads": 1,
                          "save-every": cfg.flower.save_every if not link else 10**6, **spec}
            outcome = fed.run(run_config, cfg.flower.timeout_s)
            after = [r.traffic() for r in fed.relays]
            rounds_log = [json.loads(line) for line in (out / m / "rounds.jsonl").read_text().splitlines()]
            for r in rounds_log:  # cumulative bytes (all sites) at the end of each round, this run only
                t = relay_t0 + (r["time"] - started_wall)
                r["bytes"] = sum(a.total_at(t) - b.cumulative[-1] if b.cumulative else a.total_at(t)
                                 for a, b in zip(after, before))
            bursts = {d: sorted(x for a, b in zip(after, before) for x in a.bursts[d][len(b.bursts[d]):])
                      for d in (UP, DOWN)}
            up = sum(a.up - b.up for a, b in zip(after, before))
            down = sum(a.down - b.down for a, b in zip(after, before))
            total_rounds = spec["rounds"]
            result = {"method": m, "tls": fed.tls, "rounds": total_rounds, "local_steps": spec["local-steps"], "up": up,
                      "down": down, "seconds": outcome.seconds, "rounds_log": rounds_log,
                      "largest_message": {d: max(b, default=0) for d, b in bursts.items()},
                      "message_sizes": {d: quantiles(b) for d, b in bursts.items()},
                      "per_round": (up + down) / total_rounds,
                      "compute_s": sum(r.get("compute_s", 0.0) for r in rounds_log),
                      "round_seconds": [r["seconds"] for r in rounds_log if r["round"] > 0]}
            write_json(out / m / "traffic.json", result)
            results[m] = result
            log.info("Flower %s: %d rounds, %.1f MB up, %.1f MB down, %.0f s", m, total_rounds, up / 1e6,
                     down / 1e6, outcome.seconds)
    finally:
        fed.stop()
    return results


def score_rounds(cfg: BandwidthConfig, method: str, test, name: str = "flower",
                 recipe: SegmentationRecipe | None = None) -> list[dict]:
    """Dice of every kept global model of a Flower run (OUT/<name>/<method>), on the real test cases."""
    from safetensors.torch import load_file

    folder = cfg.out / name / method
    path = folder / "dice.json"
    if path.is_file():
        return json.loads(path.read_text())
    recipe = recipe or cfg.segmentation
    rows = []
    for f in sorted(folder.glob("round_*.safetensors")):
        net = build_network(recipe)
        net.load_state_dict(load_file(str(f)))
        result = evaluate_model((net, recipe), test, cfg.device, progress=False)
        rows.append({"round": int(f.stem.split("_")[1]), "dice": result.summary["dice"]["mean"]})
    write_json(path, rows)
    return rows


# ---- ensembling ---------------------------------------------------------------------------------------------
class Ensemble(torch.nn.Module):
    """Mean of the members' class probabilities, as logits (log of the mean)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(0).clamp_min(1e-8).log()


def ensemble(cfg: BandwidthConfig, sites: list[pathlib.Path], test) -> dict:
    from asyndgan.segmentation import load_model

    path = cfg.out / "ensemble" / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    recipe = cfg.segmentation.model_copy(update={"training": cfg.segmentation.training.model_copy(
        update={"steps": cfg.ensemble_steps, "seed": cfg.seed})})
    members = []
    for i, site in enumerate(sites):
        folder = cfg.out / "ensemble" / f"site{i + 1}"
        if not (folder / "training.json").is_file():
            train_model(load_training_slices([site], recipe, progress=False), recipe, folder, cfg.device,
                        progress=False)
        members.append(load_model(folder)[0])
    net = Ensemble(members).eval()
    result = evaluate_model((net, recipe), test, cfg.device, progress=False)
    out = {"dice": result.summary["dice"]["mean"], "members": len(members)}
    write_json(path, out)
    return out
