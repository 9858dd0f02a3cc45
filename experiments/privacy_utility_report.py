"""results.json, report.md and the Dice-against-epsilon figure of the privacy-utility experiment."""

from __future__ import annotations

import json
import pathlib

import numpy as np


from asyndgan.experiments.statistics import paired
from asyndgan.experiments.pieces import write_json

ORDER_NOTE = {
    "real_all": "private sites' real cases pooled (ceiling)",
    "real_public": "public cohort's real cases",
    "public_only": "generator pretrained on the public cohort only (floor)",
    "nonprivate": "AsynDGAN from the public start, privacy off, with the L1 term",
    "nonprivate_adv": "the same without the L1 term (the private rows' recipe, privacy off)",
    "slice_default": "earlier default: slice-level DP (rate 0.01, noise 1), from scratch",
    "public_frozen": "public start, public discriminators frozen, no release (no private data beyond label maps)",
    "public_anchored": "public_frozen with the anchor to the public generator (no private data beyond label maps)",
}
PRIVATE = ("dp_", "stats_only", "anchored_", "stats_anchored", "steered_")  # rows whose sites hold a DP budget


def describe(row: str) -> str:
    if row in ORDER_NOTE:
        return ORDER_NOTE[row]
    if row.startswith("dp_scratch_eps"):
        return f"patient-level DP at epsilon {row[len('dp_scratch_eps'):]}, from scratch"
    if row.startswith("stats_only_eps"):
        return (f"public discriminators frozen, the whole epsilon {row[len('stats_only_eps'):]} on the statistics "
                "release")
    if row.startswith("dp_anchored_eps"):
        return (f"the defaults from a public start: patient-level DP at epsilon {row[len('dp_anchored_eps'):]} + "
                "the server's anchor to the public generator, no release")
    if row.startswith("anchored_eps"):
        return (f"patient-level DP at epsilon {row[len('anchored_eps'):]} + statistics release + the server's "
                "anchor to the public generator")
    if row.startswith("steered_eps"):
        return (f"the release alone at epsilon {row[len('steered_eps'):]}: no site gradients, the public generator "
                "pulled to the released statistics and anchored")
    if row.startswith("stats_anchored_eps"):
        return (f"frozen public discriminators, epsilon {row[len('stats_anchored_eps'):]} on the release, + the "
                "anchor")
    if row.startswith("dp_eps") and row.endswith("_stats"):
        return f"the same at epsilon {row[len('dp_eps'):-len('_stats')]}, with the DP statistics release"
    if row.startswith("dp_eps"):
        return f"patient-level DP at epsilon {row[len('dp_eps'):]}, from the public start"
    return row


def targets(cfg, rows: dict, gaps: dict, members: dict, canaries: dict) -> list[dict]:
    out = []
    shift = gaps.get("real_all - real_public")
    if shift:
        out.append({"name": "shift shown: Real-All - Real-Public", "value": shift["mean"], "needed": ">= 0.10",
                    "met": shift["mean"] >= 0.10})
    spread = max((rows[r]["dice_sd"] for r in ("public_only",) if r in rows), default=0.0)
    candidates = [(e, f"dp_eps{e:g}") for e in cfg.epsilons] + \
        [(e, f"dp_eps{e:g}_stats") for e in cfg.statistics_epsilons] + \
        [(e, f"stats_only_eps{e:g}") for e in cfg.stats_only_epsilons] + \
        [(e, f"dp_anchored_eps{e:g}") for e in getattr(cfg, "shipped_epsilons", [])] + \
        [(e, f"anchored_eps{e:g}") for e in getattr(cfg, "anchor_epsilons", [])] + \
        [(e, f"stats_anchored_eps{e:g}") for e in getattr(cfg, "anchor_epsilons", [])[:1]] + \
        [(e, f"steered_eps{e:g}") for e in getattr(cfg, "steer_epsilons", [])]
    for eps, row in candidates:
        if row not in rows or eps > 10:
            continue
        for reference in ("nonprivate", "nonprivate_adv"):
            vs_np = gaps.get(f"{reference} - {row}")
            if vs_np:
                out.append({"name": f"{row}: within 0.05 of {reference}", "value": vs_np["mean"],
                            "needed": "<= 0.05", "met": vs_np["mean"] <= 0.05})
        above = gaps.get(f"{row} - public_only")
        if above:
            need = 2 * max(spread, rows[row]["dice_sd"])
            out.append({"name": f"{row}: above public-only by > 2 x seed spread", "value": above["mean"],
                        "needed": f"> {need:.3f}", "met": above["mean"] > need})
    for row, m in members.items():
        if row in rows and (row.startswith(PRIVATE) or row == "slice_default"):
            out.append({"name": f"{row}: membership AUC", "value": m["auc"], "needed": "<= 0.6",
                        "met": m["auc"] <= 0.6})
    for row, c in canaries.items():
        out.append({"name": f"{row}: canary bound <= ledger", "value": c["epsilon_lower_bound"],
                    "needed": f"<= {c['epsilon_ledger']:.2f}", "met": c["epsilon_lower_bound"] <= c["epsilon_ledger"]})
    return out


def write_all(cfg, rows: dict, gans: dict, canaries: dict, members: dict, timings: dict) -> dict:
    gaps = {}
    if "real_public" in rows:
        gaps["real_all - real_public"] = paired(rows["real_all"]["patients"], rows["real_public"]["patients"])
    for row in rows:
        if row.startswith(PRIVATE) or row == "slice_default":
            for reference in ("nonprivate", "nonprivate_adv"):
                if reference in rows:
                    gaps[f"{reference} - {row}"] = paired(rows[reference]["patients"], rows[row]["patients"])
        if row not in ("real_all", "real_public", "public_only") and "public_only" in rows:
            gaps[f"{row} - public_only"] = paired(rows[row]["patients"], rows["public_only"]["patients"])
    checks = targets(cfg, rows, gaps, members, canaries)
    results = {"settings": json.loads(cfg.model_dump_json()), "rows": rows, "gans": gans, "canaries": canaries,
               "membership": members, "paired": gaps, "targets": checks, "timings_s": timings}
    write_json(cfg.out / "results.json", results)
    plot(cfg.out / "dice_vs_epsilon.png", cfg, rows)
    (cfg.out / "report.md").write_text(markdown(cfg, rows, gans, canaries, members, gaps, checks, timings))
    return results


def plot(path: pathlib.Path, cfg, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for epsilons, name, marker, label in _series(cfg):
        eps = [e for e in epsilons if name.format(e=e) in rows]
        if eps:
            ys = [rows[name.format(e=e)] for e in eps]
            ax.errorbar(eps, [r["dice"] for r in ys], yerr=[r["dice_sd"] for r in ys], marker=marker, capsize=3,
                        markersize=9 if marker == "*" else 6, label=label)
    scratch = f"dp_scratch_eps{cfg.scratch_epsilon:g}"
    if scratch in rows:
        ax.errorbar([cfg.scratch_epsilon], [rows[scratch]["dice"]], yerr=[rows[scratch]["dice_sd"]], marker="s",
                    capsize=3, linestyle="none", label="patient-level DP, from scratch")
    styles = {"nonprivate": ("tab:green", "non-private, public start, L1"),
              "nonprivate_adv": ("tab:olive", "non-private, public start, no L1"),
              "public_frozen": ("tab:purple", "public start + frozen public D, no private data"),
              "public_anchored": ("tab:pink", "the same + anchor, no private data"), "public_only": ("tab:red", "public-only "
              "generator"), "real_all": ("black", "Real-All"), "real_public": ("tab:grey", "Real-Public")}
    for row, (colour, label) in styles.items():
        if row in rows:
            ax.axhline(rows[row]["dice"], color=colour, linestyle="--", linewidth=1, label=label)
    ax.set_xscale("log")
    ticks = sorted({e for epsilons, *_ in _series(cfg) for e in epsilons} | {cfg.scratch_epsilon})
    ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
    ax.minorticks_off()
    ax.set_xlabel("epsilon per site (patient level, delta %g)" % cfg.dp.delta)
    ax.set_ylabel("whole-tumour Dice (mean over seeds)")
    ax.set_title("Synthetic-only segmentation against privacy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, never over a point
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(cfg) -> list[tuple[list[float], str, str, str]]:
    """The figure's lines against epsilon: (epsilons, row name pattern, marker, label)."""
    return [
        (getattr(cfg, "shipped_epsilons", []), "dp_anchored_eps{e:g}", "o", "the defaults: patient-level DP + anchor"),
        (getattr(cfg, "anchor_epsilons", []), "anchored_eps{e:g}", "*", "DP + release + anchor to the public generator"),
        (cfg.epsilons, "dp_eps{e:g}", "v", "patient-level DP, public start, no anchor"),
        (cfg.statistics_epsilons, "dp_eps{e:g}_stats", "^", "the same + DP statistics release"),
        (cfg.stats_only_epsilons, "stats_only_eps{e:g}", "D", "frozen public discriminators + DP statistics release"),
        (getattr(cfg, "steer_epsilons", []), "steered_eps{e:g}", "P", "DP statistics release only, steered + anchored"),
    ]


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def markdown(cfg, rows, gans, canaries, members, gaps, checks, timings) -> str:
    return "\n".join([f"# Privacy and utility: patient-level DP from a public warm start ({cfg.preset} preset)", "",
                      *_protocol(cfg, timings), *_results(rows, gans, canaries, members),
                      *_gaps_and_targets(gaps, checks), *_membership(members)])


def _protocol(cfg, timings) -> list[str]:
    return ["Command: `asyndgan experiment privacy-utility --preset %s --out OUT` (two processes of it on one "
            "OUT, `--threads 1` each, share the pieces); %.0f min of pieces in all (a piece one process waited "
            "for counts in both)." % (cfg.preset, sum(timings.values()) / 60), "",
            "## Protocol", "",
            "- Rows: the measurement (public-only, non-private, the defaults from a public start `dp_anchored_*` "
            "at each epsilon, the slice-level default, DP from scratch) and, where run with `--diagnostics`, the "
            "rows that take the private recipe apart; every row finished in OUT is reported.",
            f"- Public cohort: {cfg.public_cases} cases (large high-grade gliomas, one 3 T scanner family). Private "
            f"sites: {', '.join(map(str, cfg.site_cases))} cases (heterogeneous-phantom profiles "
            f"{cfg.site_profiles}); {cfg.test_cases} test patients from the private sites' scanners and "
            f"populations in turn. Volumes {cfg.shape}.",
            f"- GAN: {cfg.gan.image_size} px, ResNet-{cfg.gan.n_blocks} generator ({cfg.gan.ngf} filters), "
            f"PatchGAN ({cfg.gan.ndf} filters, {cfg.gan.d_layers} layers) per modality, {cfg.gan.batch_per_site} "
            f"images per site per step; public pretraining {cfg.gan.pretrain_steps} steps (L1 weight "
            f"{cfg.gan.pretrain_lambda_l1:g}, public data); with the sites {cfg.gan.finetune_steps} steps from the "
            f"public start or {cfg.gan.scratch_steps} from scratch, no L1 term except in the nonprivate row "
            f"(weight {cfg.gan.nonprivate_lambda_l1:g}); sites in one process."
            + (" The cpu preset's steps from scratch were cut from 1000 to 300 (the fine-tune's count: the same "
               "private steps with and without the public start) before either row from scratch had finished, so "
               "that the preset fits its time (DP-SGD on every discriminator parameter took 15-24 s per step here)."
               if cfg.preset == "cpu" and cfg.gan.scratch_steps == 300 else ""),
            f"- DP (every private row): unit patient, delta {cfg.dp.delta:g}, rate {cfg.dp.sample_rate:g}, "
            f"{cfg.dp.slices_per_patient} slices per drawn patient x {cfg.dp.augmentations} views, clip "
            f"{cfg.dp.max_grad_norm:g}, trainable `{cfg.dp.trainable}`, a DP step every {cfg.dp.update_every} "
            "batch(es); each site computes its noise from its budget and the planned steps. These settings were "
            "chosen before any run, not tuned on test patients.",
            f"- Statistics release (rows `*_stats`: {cfg.statistics_share:g} of epsilon; rows `stats_only_*`: all of "
            "it, with the public discriminators frozen): per modality, mean and std of the brain and of the tumour, "
            "clipped per patient at 2, pulled towards with weight 1 and floor 0.05 (the configuration defaults, "
            "set before any run). The `stats_only_*` and `public_frozen` rows were added after `dp_eps10` was "
            "measured: its generator had turned into checkerboard patterns within 75 steps (its sample grids); "
            "these rows keep the public discriminators (no DP-SGD, no noise on them) and spend the budget on the "
            "release alone. Nothing in them was tuned on test patients.",
            f"- Anchored rows (`dp_anchored_*`, `anchored_*`, `stats_anchored_*`, `public_anchored`): the server adds "
            f"{getattr(cfg, 'anchor_weight', 0):g} x mean |G(x) - G_public(x)| inside the brain (no site data, no "
            "budget); the weight was chosen on a differently seeded stand-in cohort (`asyndgan experiment "
            "anchor-tuning`, its report beside this one), not on these sites or test patients.",
            f"- Segmentation: the shared recipe ({cfg.segmentation.preprocessing.image_size} px, "
            f"{cfg.segmentation.training.steps} steps), {cfg.seeds} seeds per row, one GAN seed ({cfg.seed}); "
            "Dice and HD95 of the whole tumour in 3-D per test patient. Paired differences: per patient, Dice "
            "averaged over seeds first, 95% t-interval.",
            "- Canary audit: a separate one-run audit of the smallest site's mechanism at each DP row's settings "
            f"({cfg.canaries} gradient canaries, each included with probability 1/2; beta 0.05). Membership: the "
            "sites' training patients against the test patients (same scanners), score = brain MSE of G(label "
            "map) against the patient's own slices.", ""]


def _results(rows, gans, canaries, members) -> list[str]:
    lines = ["## Results", "",
             "| row | what | Dice (mean ± sd over seeds) | HD95 mm | epsilon per site | canary bound | "
             "membership AUC |", "|---|---|---|---|---|---|---|"]
    for row, r in rows.items():
        sites = (gans.get(row) or {}).get("sites") or {}
        eps = ", ".join(_f(v["epsilon"], 2) for v in sites.values() if v.get("epsilon") is not None) or "-"
        if ((gans.get(row) or {}).get("privacy") or {}).get("unit") == "slice" and eps != "-":
            eps += " per slice (a patient's bound is k times that for k slices)"
        canary = canaries.get(row)
        member = members.get(row)
        lines.append(f"| {row} | {describe(row)} | {_f(r['dice'])} ± {_f(r['dice_sd'])} | {_f(r['hd95'], 1)} | "
                     f"{eps} | {_f(canary['epsilon_lower_bound'], 2) if canary else '-'} | "
                     f"{_f(member['auc']) if member else '-'} |")
    return [*lines, "", "Noise multipliers the sites computed: " + "; ".join(
        f"{row}: " + ", ".join(_f(v.get("noise_multiplier"), 2) for v in (g.get("sites") or {}).values())
        for row, g in gans.items() if g.get("privacy")), ""]


def _gaps_and_targets(gaps, checks) -> list[str]:
    lines = ["## Paired differences (Dice)", "", "| comparison | mean | 95% interval | patients |", "|---|---|---|---|"]
    for name, g in gaps.items():
        lines.append(f"| {name} | {_f(g['mean'])} | {_f(g['low'])} .. {_f(g['high'])} | {g['patients']} |")
    lines += ["", "## Targets", "", "| target | value | needed | met |", "|---|---|---|---|"]
    for t in checks:
        lines.append(f"| {t['name']} | {_f(t['value'])} | {t['needed']} | {'yes' if t['met'] else '**no**'} |")
    return lines


def _membership(members) -> list[str]:
    lines = ["", "## Membership and nearest neighbours", "",
             "| generator | AUC | TPR at FPR 0.1 | brain MSE members / held out | NN synthetic->train / "
             "held-out->train | audit method |", "|---|---|---|---|---|---|"]
    for row, m in members.items():
        lines.append(f"| {row} | {_f(m['auc'])} | {_f(m['tpr_at_fpr_0_1'])} | {_f(m['member_error'], 4)} / "
                     f"{_f(m['nonmember_error'], 4)} | {_f(m['nn_synthetic_to_train'], 4)} / "
                     f"{_f(m['nn_heldout_to_train'], 4)} | {m.get('method', 1)} |")
    lines += ["", "Audit method 2 compares inside each label map's brain region only (the background outside it, as on "
              "the wire); method 1 (the first rows of a run begun before it) measured the error on the outline and "
              "tumour pixels and the distances over the whole image, untrained background included: its NN "
              "distances are not comparable. A finished run re-audits every row with method 2.", "",
              "Figure: `dice_vs_epsilon.png`.", ""]
    return lines
