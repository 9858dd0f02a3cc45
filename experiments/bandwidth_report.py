"""report.md, results.json and the figures of the bandwidth benchmark (experiments/bandwidth.py).

Measured: bytes (relays on real sockets), message sizes, Dice, seconds per step / round on loopback and, where
links could be emulated, on each link. Modelled (and labelled so): wall time on a link that was not measured,
time to target for the methods not run on the links, and the crossover beyond the measured data-set size.
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

import numpy as np

from asyndgan.common.atomic import atomic_write_text
from asyndgan.experiments.pieces import write_json
from asyndgan.experiments.scoring import SeedScore


MIB = 1 << 20
# Parameter counts for the crossover's other model sizes: MONAI's UNet(32..512) for 4 -> 2 channels, and the
# 2-D U-Net of the DSL paper's downstream recipe.
OTHER_MODELS = {"MONAI UNet(32..512), 6.5 M": 6.5e6, "DSL U-Net, 31 M": 31.0e6}


def _mean(evals: list[SeedScore]) -> float:
    return float(np.mean([e.dice for e in evals]))


def _fmt_bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1024)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def _num(x: float | None, fmt: str) -> str:
    return "not trained" if x is None else format(x, fmt)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "not reached"
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _asyndgan_rows(cfg, wire: dict, gans: dict, syn: dict, target: float) -> dict:
    rows = {}
    batch, sites = cfg.gan.batch_per_site, len(cfg.phantom.cases_per_site)
    for e, w in wire.items():
        key = f"asyndgan_{e.replace('/', '-')}"
        dice = _mean(syn[key]) if key in syn else None
        per_sample_step = w["per_step"] / (sites * batch)
        total = w["one_time"] + w["per_step"] * cfg.gan.steps
        rows[e] = {"dice": dice, "one_time": w["one_time"], "per_step": w["per_step"],
                   "up_per_step": w["up_per_step"], "down_per_step": w["down_per_step"],
                   "per_sample_step": per_sample_step, "total": total, "steps": cfg.gan.steps,
                   "largest_message": w["largest_message"], "message_sizes": w["message_sizes"],
                   "seconds_per_step_loopback": w.get("seconds_per_step"),
                   "gan_seconds_in_process": gans[e]["seconds"] if e in gans else None,
                   "payload_in_process": {"up": gans[e]["payload_up"], "down": gans[e]["payload_down"]}
                   if e in gans else None,
                   "reaches_target": dice is not None and dice >= target,
                   "slices": next(iter(gans.values()))["slices"]}
    base = rows.get("float32/full")
    for r in rows.values():
        r["fewer_bytes_than_float32"] = base["per_sample_step"] / r["per_sample_step"] if base else None
        both = base is not None and base["dice"] is not None and r["dice"] is not None
        r["dice_cost_vs_float32"] = base["dice"] - r["dice"] if both else None
    return rows


def _flower_rows(flower: dict, curves: dict, target: float) -> dict:
    rows = {}
    for m, f in flower.items():
        by_round = {r["round"]: r for r in f["rounds_log"]}
        curve = [{"round": c["round"], "dice": c["dice"], "bytes": by_round.get(c["round"], {}).get("bytes", 0),
                  "time": sum(r["seconds"] for r in f["rounds_log"] if 0 < r["round"] <= c["round"])}
                 for c in curves[m]]
        hit = next((c for c in curve if c["dice"] >= target), None)
        rounds = max(f["rounds"], 1)
        compute = f["compute_s"]
        rows[m] = {"rounds": f["rounds"], "local_steps": f["local_steps"], "up": f["up"], "down": f["down"],
                   "per_round": f["per_round"], "largest_message": f["largest_message"],
                   "message_sizes": f["message_sizes"], "dice": curve[-1]["dice"] if curve else None,
                   "curve": curve, "rounds_to_target": hit["round"] if hit else None,
                   "bytes_to_target": hit["bytes"] if hit else None, "seconds": f["seconds"],
                   "seconds_per_round_loopback": float(np.mean(f["round_seconds"])) if f["round_seconds"] else None,
                   "compute_s": compute, "waiting_s": max(0.0, sum(f["round_seconds"]) - compute),
                   "per_round_up": f["up"] / rounds, "per_round_down": f["down"] / rounds}
    return rows


def _model_time(kind: str, row: dict, profile, sites: int, units: int | None) -> float | None:
    """Seconds for `units` steps (AsynDGAN) or rounds (Flower) on a link: the loopback time per unit, plus each
    site's bytes at the link's rates (sites in parallel on their own links), plus one round trip per exchange."""
    if units is None:
        return None
    up_rate, down_rate = profile.up_mbit * 1e6 / 8, profile.down_mbit * 1e6 / 8
    rtt = profile.rtt_ms / 1000
    if kind == "asyndgan":
        per = (row["seconds_per_step_loopback"] or 0) + row["up_per_step"] / sites / up_rate \
            + row["down_per_step"] / sites / down_rate + rtt
        return per * units
    per_round_sites = sites if row.get("all_sites", True) else 1
    per = (row["seconds_per_round_loopback"] or 0) + row["per_round_up"] / per_round_sites / up_rate \
        + row["per_round_down"] / per_round_sites / down_rate + 2 * rtt
    return per * units


def _links(cfg, asyn: dict, fl: dict, links: dict, sites: int) -> dict:
    """Per profile and method: wall time to the target, measured where the link was emulated, else modelled."""
    default = asyn[cfg.link_encoding]
    out = {}
    for p in cfg.profiles:
        measured = links.get("profiles", {}).get(p.name) if links.get("measured") else None
        entry = {}
        for e, row in asyn.items():
            steps = row["steps"] if row["reaches_target"] else None
            modelled = _model_time("asyndgan", row, p, sites, steps)
            entry[f"AsynDGAN {e}"] = {"seconds": modelled, "how": "modelled", "units": steps}
        for m, row in fl.items():
            row = dict(row, all_sites=(m == "fedavg"))
            entry[m] = {"seconds": _model_time("flower", row, p, sites, row["rounds_to_target"]), "how": "modelled",
                        "units": row["rounds_to_target"]}
        if measured:
            w, f = measured["asyndgan"], measured["fedavg"]
            if w.get("seconds_per_step"):
                key = f"AsynDGAN {cfg.link_encoding}"
                loop = default["seconds_per_step_loopback"] or 0.0
                reached = default["reaches_target"]
                entry[key].update(seconds=w["seconds_per_step"] * default["steps"] if reached else None,
                                  how="measured per step",
                                  seconds_per_step=w["seconds_per_step"],
                                  beyond_loopback_s=w["seconds_per_step"] - loop,
                                  modelled_seconds=entry[key]["seconds"])
            rounds = fl["fedavg"]["rounds_to_target"]
            per_round = float(np.mean(f["round_seconds"])) if f and f["round_seconds"] else None
            if per_round is not None:
                loop = fl["fedavg"]["seconds_per_round_loopback"] or 0.0
                entry["fedavg"].update(seconds_per_round=per_round, beyond_loopback_s=per_round - loop,
                                       modelled_seconds=entry["fedavg"]["seconds"],
                                       seconds=per_round * rounds if rounds else None, how="measured per round")
        out[p.name] = entry
    return out


def _crossover(cfg, asyn: dict, fl: dict, params: int) -> dict:
    """Total bytes against slices per site: AsynDGAN (per encoding) grows with the data, FedAvg with the model."""
    sites = len(cfg.phantom.cases_per_site)
    any_row = next(iter(asyn.values()))
    slices = list(any_row["slices"].values())
    n_max, n_mean = max(slices), float(np.mean(slices))
    # 'balance': every site sends b per step and an epoch is N_max / b steps, so the bytes follow the largest site
    epochs = cfg.gan.steps * cfg.gan.batch_per_site / n_max
    lines = {}
    for e, r in asyn.items():
        one_time_per_slice = r["one_time"] / sum(slices)
        lines[f"AsynDGAN {e}"] = {"per_slice_one_time": one_time_per_slice,
                                  "per_sample_step_per_site": r["per_sample_step"], "epochs": epochs}
    fed = fl.get("fedavg")
    rounds = (fed["rounds_to_target"] or fed["rounds"]) if fed else 0
    per_param_round = fed["per_round"] / params if fed else 0
    fedavg_lines = {"our U-Net": per_param_round * params * rounds}
    fedavg_lines.update({k: per_param_round * v * rounds for k, v in OTHER_MODELS.items()})
    crossing = {}
    for name, ln in lines.items():
        per_slice = ln["per_slice_one_time"] + ln["per_sample_step_per_site"] * epochs
        crossing[name] = {m: total / (sites * per_slice) for m, total in fedavg_lines.items()}
    return {"epochs": epochs, "rounds": rounds, "n_max": n_max, "n_mean": n_mean, "asyndgan": lines,
            "fedavg_totals": fedavg_lines, "crossing_slices_per_site": crossing,
            "measured": {"slices_per_site": n_max, "asyndgan_total": {e: r["total"] for e, r in asyn.items()},
                         "fedavg_total": (fed["bytes_to_target"] or fed["up"] + fed["down"]) if fed else None}}


def _figures(out: pathlib.Path, cfg, target: float, asyn: dict, fl: dict, ens: dict, times: dict, cross: dict,
             sites: int) -> list[str]:
    """The benchmark's pictures in OUT; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, ax, name: str, title: str, legend_size: int = 7) -> None:
        ax.set_title(title)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _dice_against_bytes(ax, target, asyn, fl, ens)
    save(fig, ax, "dice_vs_bytes.png", f"Dice against bytes ({cfg.preset} preset)")
    for p in cfg.profiles:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _dice_against_time(ax, target, asyn, fl, times[p.name])
        save(fig, ax, f"time_{p.name}.png", f"{p.name}: {p.up_mbit:g} Mbit/s up, {p.down_mbit:g} down, "
             f"{p.rtt_ms:g} ms RTT")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _bytes_against_data(ax, cross, sites)
    save(fig, ax, "crossover.png", "Where each method is cheaper on the wire", legend_size=6)
    return made


def _dice_against_bytes(ax, target: float, asyn: dict, fl: dict, ens: dict) -> None:
    for m, r in fl.items():
        xs = [max(c["bytes"], 1) for c in r["curve"]]
        ax.plot(xs, [c["dice"] for c in r["curve"]], marker=".", label=f"{m} (Flower)")
    for e, r in asyn.items():
        if r["dice"] is not None:
            ax.scatter([r["total"]], [r["dice"]], marker="*", s=120, label=f"AsynDGAN {e}", zorder=3)
    ax.scatter([ens["bytes"]], [ens["dice"]], marker="s", label="ensembling (bytes modelled)")
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes, all sites, both directions (log)")
    ax.set_ylabel("Dice on real test patients")


def _dice_against_time(ax, target: float, asyn: dict, fl: dict, t: dict) -> None:
    """One link profile: `t` holds each method's time to the target on it."""
    for m, r in fl.items():
        per = t[m].get("seconds_per_round") or (t[m]["seconds"] / t[m]["units"] if t[m]["seconds"] else None)
        if per:
            ax.plot([per * c["round"] / 3600 for c in r["curve"]], [c["dice"] for c in r["curve"]], marker=".",
                    label=f"{m} ({t[m]['how']})")
    for e, r in asyn.items():
        s = t[f"AsynDGAN {e}"]["seconds"]
        if s and r["dice"] is not None:
            ax.scatter([s / 3600], [r["dice"]], marker="*", s=120, zorder=3,
                       label=f"AsynDGAN {e} ({t[f'AsynDGAN {e}']['how']})")
    ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel("wall time (h)")
    ax.set_ylabel("Dice on real test patients")


def _bytes_against_data(ax, cross: dict, sites: int) -> None:
    ns = np.logspace(1, 6, 60)
    for name, ln in cross["asyndgan"].items():
        per_slice = ln["per_slice_one_time"] + ln["per_sample_step_per_site"] * cross["epochs"]
        ax.plot(ns, sites * per_slice * ns, label=name)
    for name, total in cross["fedavg_totals"].items():
        ax.axhline(total, ls="--", lw=1, color="k" if name == "our U-Net" else None,
                   label=f"FedAvg, {name}, {cross['rounds']} rounds")
    m = cross["measured"]
    for e, total in m["asyndgan_total"].items():
        ax.scatter([m["slices_per_site"]], [total], marker="*", s=80, zorder=3)
    if m["fedavg_total"]:
        ax.scatter([m["slices_per_site"]], [m["fedavg_total"]], marker="o", color="k", zorder=3,
                   label="measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"training slices at the largest site (AsynDGAN: {cross['epochs']:.1f} epochs)")
    ax.set_ylabel("total bytes, all sites")


def _larger_rows(cfg, asyn: dict, larger: dict | None) -> dict | None:
    """The model-size regime: the larger network's target, AsynDGAN's synthetic data against it (bytes: the
    generator's, already paid) and FedAvg's bytes to it."""
    if larger is None:
        return None
    real = _mean(larger["real_all"])
    target = cfg.target_fraction * real
    syn = _mean(larger["asyndgan"])
    fed = _flower_rows({"fedavg": larger["flower"]["fedavg"]}, {"fedavg": larger["curve"]}, target)["fedavg"]
    a = asyn[larger["encoding"]]
    reaches = syn >= target
    fed_bytes = fed["bytes_to_target"]
    spent = fed["up"] + fed["down"]
    # Only every few rounds are scored: FedAvg may have crossed the target as early as the round after the last
    # scored miss; the verdict counts that round's bytes, the least it could have spent.
    lower = None
    if fed["rounds_to_target"] is not None:
        misses = [c["round"] for c in fed["curve"] if c["round"] < fed["rounds_to_target"]]
        earliest = (max(misses) + 1) if misses else fed["rounds_to_target"]
        log_bytes = {r["round"]: r.get("bytes", 0) for r in larger["flower"]["fedavg"]["rounds_log"]}
        lower = log_bytes.get(earliest, fed_bytes)
    wins = reaches and (a["total"] < spent if fed_bytes is None else a["total"] < lower)
    return {"channels": larger["channels"], "parameters": larger["parameters"], "real_all_dice": real,
            "target_dice": target, "encoding": larger["encoding"], "asyndgan_dice": syn,
            "asyndgan_reaches_target": reaches, "asyndgan_bytes": a["total"], "fedavg": fed,
            "fedavg_bytes_spent": spent, "fedavg_bytes_to_target_at_least": lower, "asyndgan_wins": wins}


@dataclass
class Measured:
    """What the benchmark's pieces measured, as the report reads it (every field: the piece's own JSON record)."""

    real: dict[str, list[SeedScore]]  # row -> one score per seed: real_all (and the sites' own rows)
    wire: dict  # encoding -> bytes on real sockets (wire_run)
    gans: dict  # encoding -> the GAN trained with it (train_gan)
    syn: dict[str, list[SeedScore]]  # synthetic row -> one score per seed
    flower: dict  # method -> Flower run (bytes, rounds, tls)
    curves: dict  # method -> [{round, dice}]
    ens: dict  # the ensemble's {dice}
    links: dict  # {measured, why, profiles}
    params: int  # the segmentation model's parameter count
    timings: dict  # piece -> seconds
    larger: dict | None = None  # the model-size regime (larger_network_runs), when run


def write_all(cfg, measured: Measured) -> dict:
    m = measured
    real, wire, gans, syn, flower, curves, ens, links, params, timings, larger = (
        m.real, m.wire, m.gans, m.syn, m.flower, m.curves, m.ens, m.links, m.params, m.timings, m.larger)
    out = cfg.out
    sites = len(cfg.phantom.cases_per_site)
    real_dice = _mean(real["real_all"])
    target = cfg.target_fraction * real_dice
    asyn = _asyndgan_rows(cfg, wire, gans, syn, target)
    fl = _flower_rows(flower, curves, target)
    fed = fl.get("fedavg")
    per_model = fed["per_round_down"] / sites if fed else params * 4  # one model to one site, as measured
    ensemble = {"dice": ens["dice"], "bytes": per_model * sites, "how": "modelled: one model per site, at the "
                "measured size of one model message", "reaches_target": ens["dice"] >= target}
    times = _links(cfg, asyn, fl, links, sites)
    cross = _crossover(cfg, asyn, fl, params)
    figures = _figures(out, cfg, target, asyn, fl, ensemble, times, cross, sites)
    results = {"preset": cfg.preset, "seed": cfg.seed, "sites": sites, "real_all_dice": real_dice,
               "target_dice": target, "target_fraction": cfg.target_fraction, "model_parameters": params,
               "asyndgan": asyn, "flower": fl, "ensemble": ensemble, "links": links.get("measured", False),
               "flower_tls": bool(flower) and all(f.get("tls", False) for f in flower.values()),
               "links_note": links.get("why"), "time_to_target": times, "crossover": cross,
               "timings_s": timings, "figures": figures, "larger_network": _larger_rows(cfg, asyn, larger)}
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", _markdown(cfg, results))
    return results


def _markdown(cfg, r: dict) -> str:
    lines = [*_overview(cfg, r), *_encodings(cfg, r["asyndgan"]), *_baselines(cfg, r), *_wall_times(cfg, r),
             "", "## Targets", "", *_targets(r), *_crossover_markdown(r["crossover"]),
             *_larger_markdown(r.get("larger_network")),
             "", "## Figures", "", *(f"![{x}]({x})" for x in r["figures"]),
             "", "## Time spent", "", "| piece | seconds |", "|---|---|",
             *(f"| {k} | {v:.0f} |" for k, v in r["timings_s"].items())]
    return "\n".join(lines) + "\n"


def _overview(cfg, r: dict) -> list[str]:
    return [f"# Bandwidth benchmark ({cfg.preset} preset, seed {cfg.seed})", "",
            f"{r['sites']} phantom sites ({', '.join(str(c) for c in cfg.phantom.cases_per_site)} cases), "
             f"{cfg.phantom.test_cases} real test patients; segmentation recipe: "
             f"{cfg.segmentation.preprocessing.image_size} px, U-Net of {r['model_parameters'] / 1e6:.2f} M "
             "parameters. "
             f"Real-All Dice {r['real_all_dice']:.3f}; target Dice = {cfg.target_fraction:g} x that = "
             f"**{r['target_dice']:.3f}**.", "",
             "Bytes are what crossed the sockets (a counting relay between every site and its server: TLS, HTTP/2 "
             "or HTTP/1.1 framing and headers included). AsynDGAN runs with mutual TLS; Flower 1.42.0 runs "
             + ("with TLS (the SuperLink's certificate from the run's own CA; SuperNodes are not authenticated)"
                if r.get("flower_tls") else "insecure (plain HTTP) on loopback")
             + ". Largest message = the largest burst one side sent "
             "before the other answered.", ""]


def _encodings(cfg, a: dict) -> list[str]:
    lines = ["## AsynDGAN per wire encoding", "",
             "| encoding | bytes / sample-step | fewer than fp32 | one-time | per step (up / down) | largest message "
             "(down / up) | Dice | Dice cost | total for the run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e, x in a.items():
        lines.append(f"| {e} | {_fmt_bytes(x['per_sample_step'])} | {x['fewer_bytes_than_float32']:.2f}x | "
                     f"{_fmt_bytes(x['one_time'])} | {_fmt_bytes(x['up_per_step'])} / "
                     f"{_fmt_bytes(x['down_per_step'])} | {_fmt_bytes(x['largest_message']['down'])} / "
                     f"{_fmt_bytes(x['largest_message']['up'])} | {_num(x['dice'], '.3f')} | "
                     f"{_num(x['dice_cost_vs_float32'], '+.3f')} | {_fmt_bytes(x['total'])} |")
    lines += ["", f"{cfg.gan.steps} generator steps, {cfg.gan.batch_per_site} images per site per step. Bytes per "
              f"step measured over {cfg.wire_steps}-step runs of real processes; Dice from the same "
              "encode/decode code in one process, trained to the end (one segmentation seed per row).", ""]
    return lines


def _baselines(cfg, r: dict) -> list[str]:
    f = r["flower"]
    lines = ["## Baselines", "",
              "| method | rounds | local steps | bytes up / down | per round | largest message (down / up) | Dice "
              "(last) | rounds to target | bytes to target | compute / waiting (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m, x in f.items():
        lines.append(f"| {m} (Flower) | {x['rounds']} | {x['local_steps']} | {_fmt_bytes(x['up'])} / "
                     f"{_fmt_bytes(x['down'])} | {_fmt_bytes(x['per_round'])} | "
                     f"{_fmt_bytes(x['largest_message']['down'])} / {_fmt_bytes(x['largest_message']['up'])} | "
                     f"{'not scored' if x['dice'] is None else format(x['dice'], '.3f')} | "
                     f"{x['rounds_to_target'] or 'not reached'} | "
                     f"{_fmt_bytes(x['bytes_to_target'])} | {x['compute_s']:.0f} / {x['waiting_s']:.0f} |")
    e = r["ensemble"]
    lines.append(f"| ensembling | 1 | {cfg.ensemble_steps} | {_fmt_bytes(e['bytes'])} (modelled) | - | - | "
                 f"{e['dice']:.3f} | {'1' if e['reaches_target'] else 'not reached'} | "
                 f"{_fmt_bytes(e['bytes']) if e['reaches_target'] else '-'} | - |")
    lines += ["", "Flower's waiting time is its fixed polling (about 3 s on each side per message) and a new "
              "ClientApp process per message: not bandwidth.", ""]
    return lines


def _wall_times(cfg, r: dict) -> list[str]:
    lines = ["## Wall time to the target Dice", ""]
    if not r["links"]:
        lines.append(f"Links were not emulated here ({r['links_note']}): every time below is modelled from "
                     "loopback seconds, measured bytes and the link's rates and round trip.")
    for p in cfg.profiles:
        t = r["time_to_target"][p.name]
        lines += ["", f"**{p.name}**: {p.up_mbit:g} Mbit/s up, {p.down_mbit:g} Mbit/s down, {p.rtt_ms:g} ms RTT "
                  "(AsynDGAN's Dice is measured only at the end of its run: its time is for the whole run, an "
                  "upper bound)", "",
                  "| method | time to target | how |", "|---|---|---|"]
        for m, x in t.items():
            extra = f" (model said {_fmt_s(x['modelled_seconds'])})" if "modelled_seconds" in x else ""
            if "beyond_loopback_s" in x:
                unit = "step" if "seconds_per_step" in x else "round"
                per = x.get("seconds_per_step") or x.get("seconds_per_round")
                extra += (f"; {per:.2f} s per {unit} on the link, {x['beyond_loopback_s']:+.2f} s against loopback "
                          "(transfer and latency)")
            lines.append(f"| {m} | {_fmt_s(x['seconds'])} | {x['how']}{extra} |")
    return lines


def _crossover_markdown(c: dict) -> list[str]:
    lines = ["", "## Where AsynDGAN wins on bandwidth, and where it does not", "",
              f"AsynDGAN's bytes grow with the data (here {c['epochs']:.1f} epochs over the largest site), FedAvg's "
              f"with the model and the rounds ({c['rounds']} to the target here). Under 'balance' sampling every "
              "site sends a batch each step and an epoch is set by the largest site, so: slices at the largest site "
              "below which AsynDGAN moves fewer bytes than FedAvg to the target (other model sizes: this U-Net's "
              "measured bytes per parameter per round, scaled):", "",
              "| AsynDGAN encoding | " + " | ".join(f"vs FedAvg, {m}" for m in c["fedavg_totals"]) + " |",
              "|---|" + "---|" * len(c["fedavg_totals"])]
    for name, row in c["crossing_slices_per_site"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in row.values()) + " |")
    lines += ["", f"Measured here: {c['measured']['slices_per_site']:.0f} slices at the largest site "
              f"({c['n_mean']:.0f} per site on average)."]
    return lines


def _larger_markdown(g: dict | None) -> list[str]:
    if not g:
        return []
    fed = g["fedavg"]
    reached = (f"round {fed['rounds_to_target']}, {_fmt_bytes(fed['bytes_to_target'])} (at least "
               f"{_fmt_bytes(g['fedavg_bytes_to_target_at_least'])}: rounds scored every few)"
               if fed["rounds_to_target"]
               else f"not reached in {fed['rounds']} rounds ({_fmt_bytes(g['fedavg_bytes_spent'])} spent)")
    verdict = ("AsynDGAN moves fewer bytes to this target than FedAvg" if g["asyndgan_wins"] else
               "AsynDGAN does not move fewer bytes to this target than FedAvg")
    return ["", f"### Measured: a larger network (MONAI U-Net, channels {g['channels']}, "
            f"{g['parameters'] / 1e6:.2f} M parameters)", "",
            f"The same task and recipe with a larger network. Real-All Dice {g['real_all_dice']:.3f}; target "
            f"{g['target_dice']:.3f}. AsynDGAN's bytes are its generator's ({g['encoding']}, already trained above: "
            "a new network costs it no traffic); FedAvg trains this network on Flower from scratch.", "",
            "| method | Dice | bytes | to the target |", "|---|---|---|---|",
            f"| AsynDGAN {g['encoding']} (synthetic data) | {g['asyndgan_dice']:.3f} | {_fmt_bytes(g['asyndgan_bytes'])} "
            f"| {'reached' if g['asyndgan_reaches_target'] else 'not reached'} |",
            f"| FedAvg on Flower ({fed['rounds']} rounds x {fed['local_steps']} local steps) | "
            f"{_num(fed['dice'], '.3f')} | {_fmt_bytes(fed['per_round'])} per round | {reached} |", "",
            f"Verdict: {verdict}."]


def _targets(r: dict) -> list[str]:
    """The issue's targets, met or missed, from the measured rows."""
    a = r["asyndgan"]
    cheap = [(e, x) for e, x in a.items()
             if x["dice_cost_vs_float32"] is not None and x["dice_cost_vs_float32"] <= 0.01]
    best = max(cheap, key=lambda ex: ex[1]["fewer_bytes_than_float32"], default=None)
    out = []
    if best and best[1]["fewer_bytes_than_float32"] >= 8:
        out.append(f"- Met: {best[0]} moves {best[1]['fewer_bytes_than_float32']:.1f}x fewer bytes per sample-step "
                   f"than float32 at a Dice cost of {best[1]['dice_cost_vs_float32']:+.3f} (target: 8x at <= 0.01).")
    else:
        got = f"{best[0]}, {best[1]['fewer_bytes_than_float32']:.1f}x" if best else "none"
        out.append(f"- Missed: no encoding reaches 8x fewer bytes per sample-step at a Dice cost <= 0.01; the most "
                   f"that stays within the cost is {got}.")
        for e, x in a.items():
            if x["dice_cost_vs_float32"] is not None and x["dice_cost_vs_float32"] > 0.01:
                out.append(f"  {e} reaches {x['fewer_bytes_than_float32']:.1f}x but costs "
                           f"{x['dice_cost_vs_float32']:.3f} Dice.")
    fed = r["flower"].get("fedavg")
    if fed:
        wins = [e for e, x in a.items() if x["reaches_target"] and fed["bytes_to_target"]
                and x["total"] < fed["bytes_to_target"]]
        reached = fed["rounds_to_target"]
        out.append(f"- FedAvg reached the target Dice after {reached} rounds ({_fmt_bytes(fed['bytes_to_target'])})."
                   if reached else "- FedAvg did not reach the target Dice in its rounds.")
        if wins:
            out.append(f"- Measured regime where AsynDGAN's total bytes to the target are below FedAvg's: "
                       f"{', '.join(wins)} at this data-set size.")
        else:
            out.append("- At this data-set size no AsynDGAN encoding that reaches the target moves fewer bytes "
                       "than FedAvg to the target; the crossover below says at which size it would.")
    g = r.get("larger_network")
    if g:
        fed_b = g["fedavg"]["bytes_to_target"]
        fed_txt = (f"{_fmt_bytes(fed_b)} (at least {_fmt_bytes(g['fedavg_bytes_to_target_at_least'])})"
                   if fed_b is not None else f"not reached with {_fmt_bytes(g['fedavg_bytes_spent'])}")
        out.append(f"- {'Met' if g['asyndgan_wins'] else 'Missed'} (measured, model size): with the "
                   f"{g['parameters'] / 1e6:.1f} M-parameter network AsynDGAN {g['encoding']} "
                   f"({_fmt_bytes(g['asyndgan_bytes'])}, Dice {g['asyndgan_dice']:.3f} against a target of "
                   f"{g['target_dice']:.3f}) vs FedAvg to the target: {fed_txt}.")
    return out
