"""The research groups of `asyndgan` (added to it in cli/main.py): `experiment` (the papers' experiments and
ours), `bench` (bandwidth, poisoning) and `audit` (privacy attacks, memorization). Parsing only."""

from __future__ import annotations

import pathlib

import click

from asyndgan.common.cli_support import friendly_errors, log_level_option, stop_on_sigterm
from asyndgan.common.logging_setup import setup_logging


@click.group()
def experiment() -> None:
    """Reproduce the paper's experiments."""


@experiment.command()
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Output folder.")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", type=int, help="Generator steps per GAN (default: the tuned setting).")
@log_level_option
@friendly_errors
def gaussian1d(out, seed, steps, log_level):
    """Syn-All, Syn-Subset-1..3 and AsynDGAN (3 site processes over gRPC) on the 1-D Gaussian mixture."""
    from asyndgan.experiments.gaussian1d import Gaussian1DConfig, run

    setup_logging(log_level, out / "experiment.log")
    cfg = Gaussian1DConfig(out=out, seed=seed, **({"steps": steps} if steps else {}))
    results = run(cfg)
    click.echo(f"{'method':<14} W1 to the true mixture")
    for name, value in results.items():
        click.echo(f"{name:<14} {value:.4f}")
    click.echo(f"results: {out / 'results.json'}  histograms: {out / 'histograms.png'}")


@experiment.command("asynchrony")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Run folder (resumes).")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Comma-separated seeds (at least 2).")
@click.option("--steps", default=1500, show_default=True, type=click.IntRange(2), help="Generator steps per run.")
@click.option("--lag", default=2, show_default=True, type=click.IntRange(1, 8), help="Steps the slow site is late.")
@log_level_option
@friendly_errors
def asynchrony(out, seeds, steps, lag, log_level):
    """What pipelined steps and late answers cost in quality: the 1-D experiment lock-step, pipelined, with a slow
    site's answers taken late and dropped; W1 per seed, paired against lock-step."""
    from asyndgan.common.errors import ConfigError
    from asyndgan.experiments.asynchrony import AsynchronyConfig, run

    setup_logging(log_level, out / "experiment.log")
    try:
        cfg = AsynchronyConfig(out=out, seeds=[int(x) for x in seeds.split(",") if x.strip()], steps=steps, lag=lag)
    except ValueError as exc:
        raise ConfigError(f"--seeds {seeds!r}: {exc}") from None
    result = run(cfg)
    for row, s in result["against_exact"].items():
        click.echo(f"{row:<10} W1 {s['mean_w1']:.4f}  minus exact {s['mean']:+.4f} ({s['low']:+.4f} .. {s['high']:+.4f})")
    click.echo(f"report: {out / 'report.md'}")


@experiment.command("compare-samples")
@click.option("--generator", "generators", multiple=True, required=True, metavar="NAME=CHECKPOINT",
              help="A generator to show: a name and its checkpoint, run folder or published generator file "
                   "(repeat; shown in this order).")
@click.option("--cases", type=click.Path(path_type=pathlib.Path), required=True,
              help="A BraTS folder whose cases give the label maps (and the real slices beside them).")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="The PNG to write.")
@click.option("--count", default=4, show_default=True, type=click.IntRange(1, 32), help="Cases (rows).")
@click.option("--modality", default="flair", show_default=True)
@log_level_option
@friendly_errors
def compare_samples(generators, cases, out, count, modality, log_level):
    """Generators side by side on the same label maps (e.g. the old recipe against the new): for the first COUNT
    cases, the middle tumour slice's label map, the real image and each generator's image."""
    from asyndgan.experiments.compare_samples import compare

    setup_logging(log_level)
    named = {}
    for item in generators:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r} must look like NAME=CHECKPOINT", param_hint="--generator")
        named[name] = pathlib.Path(path)
    click.echo(compare(named, cases, out, count, modality))


@experiment.command("asynchrony-images")
@click.option("--preset", type=click.Choice(["smoke", "cpu"]), required=True,
              help="smoke: the plumbing in about a minute; cpu: the synthetic-learning cpu data with a smaller "
                   "generator (about an hour on one core).")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Run folder (resumes).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="Torch threads.")
@log_level_option
@friendly_errors
def asynchrony_images(preset, out, seed, threads, log_level):
    """What pipelined steps and a slow site's late answers cost the synthetic data: GANs trained lock-step,
    pipelined, with the largest site late (answers taken late or dropped), each scored by a segmentation model
    trained on its synthetic cases; Dice paired against lock-step on the same real test patients."""
    from asyndgan.experiments.asynchrony_images import preset_config, run

    setup_logging(log_level, out / "experiment.log")
    cfg = preset_config(preset, out, seed).model_copy(update={"threads": threads})
    rows = run(cfg)
    for row, r in rows.items():
        d = r.get("minus_exact")
        diff = f"  minus exact {d['mean']:+.3f} ({d['low']:+.3f} .. {d['high']:+.3f})" if d else ""
        click.echo(f"{row:<10} Dice {r['dice']:.3f}{diff}")
    click.echo(f"report: {out / 'report.md'}")


@experiment.command("synthetic-learning")
@click.option("--preset", type=click.Choice(["smoke", "cpu", "gpu"]), required=True,
              help="smoke: the plumbing in under 2 minutes; cpu: meaningful numbers on 2 cores in about 3.5 hours; "
                   "gpu: the papers' settings (256 px, ResNet-9 generator).")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Output folder (the same command again resumes: finished pieces are kept).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--phantom", "phantom_preset", type=click.Choice(["default", "heterogeneous"]), default="default",
              show_default=True, help="The phantom layout: default (3 uneven sites, gliomas; the committed reports) "
              "or heterogeneous (4 sites, each its own lesion type, population and scanner).")
@log_level_option
@friendly_errors
def synthetic_learning(preset, out, seed, phantom_preset, log_level):
    """Real-All, Real-Subset-n, Syn-All, AsynDGAN and AsynDGAN + the smallest site: segmentation Dice on the same
    real test cases, and FID/KID/SSIM/PSNR per GAN. Long presets: run with nohup ... & and re-run to resume."""
    from asyndgan.experiments.synthetic_learning import preset_config, run

    setup_logging(log_level, out / "experiment.log")
    stop_on_sigterm()  # unwinds through run(), which stops the server and site processes on the way out
    results = run(preset_config(preset, out, seed, phantom_preset))
    click.echo(f"{'method':<18} Dice (mean +- SD over {len(results['segmentation_seeds'])} seeds)")
    for name, row in results["rows"].items():
        click.echo(f"{name:<18} {row['dice']['mean']:.4f} +- {row['dice']['sd']:.4f}")
    click.echo(f"report: {out / 'report.md'}  results: {out / 'results.json'}  figures: {out / 'figures'}")


@experiment.command("missing-modality")
@click.option("--preset", type=click.Choice(["smoke", "cpu", "gpu"]), required=True,
              help="smoke: the plumbing in about a minute; cpu: meaningful numbers on 2 cores in about an hour; "
                   "gpu: the papers' sizes.")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Output folder (the same command again resumes: finished pieces are kept).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--phantom", "phantom_preset", type=click.Choice(["default", "heterogeneous"]), default="default",
              show_default=True, help="The phantom layout: default (3 uneven sites, gliomas; the committed reports) "
              "or heterogeneous (4 sites, each its own lesion type, population and scanner).")
@log_level_option
@friendly_errors
def missing_modality(preset, out, seed, phantom_preset, log_level):
    """Sites with different MRI modalities (DSL Table 4): Real-All, Hetero-Real, Hetero-/Homo-AsynDGAN and the
    sites' real cases completed by `asyndgan complete` (labels, translate); Dice on the same real test cases and
    completion fidelity (PSNR/SSIM/MAE) against the dropped files."""
    from asyndgan.experiments.missing_modality import preset_config, run

    setup_logging(log_level, out / "experiment.log")
    stop_on_sigterm()
    results = run(preset_config(preset, out, seed, phantom_preset))
    click.echo(f"{'row':<20} Dice (mean +- SD over {len(results['segmentation_seeds'])} seeds)")
    for name, row in results["rows"].items():
        click.echo(f"{name:<20} {row['dice']['mean']:.4f} +- {row['dice']['sd']:.4f}")
    for method, mods in results["fidelity"].items():
        click.echo(f"{method:<10} " + "; ".join(f"{m} PSNR {v['psnr']['mean']:.2f} dB SSIM {v['ssim']['mean']:.3f}"
                                                for m, v in mods.items()))
    click.echo(f"report: {out / 'report.md'}  results: {out / 'results.json'}  figures: {out / 'figures'}")


@experiment.command("phantom-calibration")
@click.option("--preset", type=click.Choice(["smoke", "cpu"]), required=True,
              help="smoke: the plumbing in about a minute; cpu: the calibration on 2 cores (about an hour).")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Output folder (the same command again resumes: finished pieces are kept).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads [2]. Two processes of this command "
              "on one --out share the pieces: with --threads 1 each, they use two cores better than one process.")
@log_level_option
@friendly_errors
def phantom_calibration(preset, out, seed, threads, log_level):
    """Does the heterogeneous phantom make sites that differ? Real-All, each site alone and the public cohort,
    scored per lesion type and site profile on the same test patients, with the segmentation recipe before and
    after its fix for small and low-grade lesions."""
    from asyndgan.experiments.phantom_calibration import preset_config, run

    setup_logging(log_level, out / "experiment.log")
    cfg = preset_config(preset, out, seed)
    results = run(cfg.model_copy(update={"threads": threads}) if threads else cfg)
    click.echo(f"{'training data':<16} Dice (current recipe, mean +- SD over seeds)")
    for row in results["rows"]:
        if row["recipe"] == "after":
            click.echo(f"{row['row']:<16} {row['mean']:.4f} +- {row['sd']:.4f}")
    for t in results["targets"]:
        click.echo(f"{'met   ' if t['met'] else 'MISSED'} {t['name']}: {t['value']:.3f} (needed {t['needed']})")
    click.echo(f"report: {out / 'report.md'}  results: {out / 'results.json'}  figures: {out / 'figures'}")


@experiment.command("privacy-utility")
@click.option("--preset", type=click.Choice(["smoke", "cpu", "gpu"]), default="smoke", show_default=True,
              help="smoke: the plumbing in minutes; cpu: the measurement on 2 cores (about 2.5 h); gpu: larger.")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Output folder (resumable: finished pieces are kept).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads [2]. Two processes of this command "
              "on one OUT share the segmentation models.")
@click.option("--diagnostics/--no-diagnostics", default=None,
              help="Also the rows that take the private recipe apart (DP-SGD alone, the release alone, the anchor "
                   "alone, steering, frozen discriminators) [smoke: on; cpu, gpu: off]. Rows already finished in OUT "
                   "are reported either way.")
@click.option("--report-only", is_flag=True, help="Write report.md, results.json and the figure from the pieces "
              "finished in OUT so far, training nothing (a run still going, or cut short).")
@log_level_option
@friendly_errors
def privacy_utility(preset, out, seed, threads, diagnostics, report_only, log_level):
    """Patient-level DP from a public warm start: Dice against epsilon, with the public-only floor, the
    non-private ceiling, canary audits and membership tests."""
    from asyndgan.experiments.privacy_utility import preset_config, report_so_far, run

    if report_only:
        setup_logging(log_level)
        results = report_so_far(preset_config(preset, out, seed))
        click.echo(f"{len(results['rows'])} rows so far; report: {out / 'report.md'}  figure: "
                   f"{out / 'dice_vs_epsilon.png'}")
        return
    setup_logging(log_level, out / "experiment.log")
    cfg = preset_config(preset, out, seed)
    if threads:
        cfg = cfg.model_copy(update={"threads": threads})
    if diagnostics is not None:
        cfg = cfg.model_copy(update={"diagnostics": diagnostics})
    results = run(cfg)
    for t in results["targets"]:
        click.echo(f"{'met ' if t['met'] else 'MISS'}  {t['name']}: {t['value']:.3f} (needed {t['needed']})")
    click.echo(f"report: {out / 'report.md'}  figure: {out / 'dice_vs_epsilon.png'}")


@experiment.command("anchor-tuning")
@click.option("--preset", type=click.Choice(["smoke", "cpu", "gpu"]), default="smoke", show_default=True,
              help="The privacy-utility preset the weight is chosen for.")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Output folder (resumable: finished pieces are kept).")
@click.option("--pretraining", type=click.Path(path_type=pathlib.Path), required=True,
              help="The privacy-utility run's public pretraining folder (OUT/gan/public_pretrain).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads [2].")
@log_level_option
@friendly_errors
def anchor_tuning(preset, out, pretraining, seed, threads, log_level):
    """Choose the anchor weight of the private fine-tunes on public data only (a differently seeded stand-in
    cohort): Dice on its test patients per candidate weight."""
    from asyndgan.experiments.anchor_tuning import run, summary_line, tuning_config

    setup_logging(log_level, out / "experiment.log")
    cfg = tuning_config(preset, out, pretraining, seed)
    if threads:
        cfg.experiment.threads = threads
    click.echo(summary_line(run(cfg)))
    click.echo(f"report: {out / 'report.md'}")


@experiment.command("generator-recipe")
@click.option("--preset", type=click.Choice(["smoke", "cpu", "gpu"]), default="smoke", show_default=True,
              help="smoke: the plumbing in minutes; cpu: the synthetic-learning cpu data and GAN (about 40 min "
                   "per lever and GAN seed on one core, so about 7 h for every lever with two processes; "
                   "resumable); gpu: its gpu settings.")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Output folder (resumable: finished pieces are kept).")
@click.option("--levers", help="Comma-separated levers to measure [all: baseline, ema, spade, multiscale, diffaug, "
                               "healthy, samples3, longer, ema_warmup, appearance, no_l1]; several joined by + are "
                               "pulled together (spade+no_l1: spade as private sites must train it) and compared "
                               "with each measured lever they contain as well; the baseline is always measured.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads [2]. Two processes of this command "
              "on one OUT share the GANs.")
@log_level_option
@friendly_errors
def generator_recipe(preset, out, levers, seed, threads, log_level):
    """Each generator-recipe lever against the papers' recipe: synthetic-only Dice on the same real test patients,
    2 GAN seeds x 3 segmentation seeds, paired per-patient differences with 95% intervals."""
    from pydantic import ValidationError

    from asyndgan.common.config import describe_validation_error
    from asyndgan.common.errors import ConfigError
    from asyndgan.experiments.generator_recipe import preset_config, run
    from asyndgan.experiments.recipe import lever_parts

    setup_logging(log_level, out / "experiment.log")
    cfg = preset_config(preset, out, seed)
    update: dict = {"threads": threads} if threads else {}
    if levers:
        chosen = ["baseline", *(x.strip() for x in levers.split(",") if x.strip() and x.strip() != "baseline")]
        for lever in chosen:
            try:
                lever_parts(lever)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        update["levers"] = chosen
    try:
        cfg = type(cfg).model_validate({**cfg.model_dump(), **update})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    results = run(cfg)
    width = max(map(len, results["levers"]))
    for lever, r in results["levers"].items():
        gap, checked = r.get("minus_baseline"), r.get("validation_minus_baseline")
        click.echo(f"{lever:{width}s} Dice {r['dice']:.3f}" + ("" if gap is None else
                   f"  minus baseline {gap['mean']:+.3f} ({gap['low']:+.3f} to {gap['high']:+.3f}); on the "
                   f"validation patients {checked['mean']:+.3f} ({checked['low']:+.3f} to {checked['high']:+.3f}): "
                   f"{'adopted' if r['adopted'] else 'not adopted'}"))
    click.echo(f"report: {out / 'report.md'}")


@experiment.command("privacy-tradeoff")
@click.option("--run", "run_folder", type=click.Path(path_type=pathlib.Path), required=True,
              help="A synthetic-learning run folder: its phantom, settings, test cases and rows are reused.")
@click.option("--settings", default=",".join(("l1-off", "dp-1.0", "dp-0.6")), show_default=True,
              help="Comma-separated: l1-off (lambda_L1 0, no DP) and dp-<noise multiplier>.")
@click.option("--audit", "audit_folder", type=click.Path(path_type=pathlib.Path),
              help="An `asyndgan audit privacy` output folder to cite beside the Dice table.")
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads [the run's].")
@log_level_option
@friendly_errors
def privacy_tradeoff(run_folder, settings, audit_folder, threads, log_level):
    """Segmentation Dice and epsilon for the AsynDGAN row under privacy settings (writes RUN/privacy/)."""
    from asyndgan.experiments.privacy_tradeoff import run

    setup_logging(log_level, run_folder / "privacy" / "experiment.log")
    stop_on_sigterm()
    results = run(run_folder, [s.strip() for s in settings.split(",") if s.strip()], audit_folder, threads)
    click.echo(f"{'row':<22} Dice (mean +- SD)   epsilon (max over sites)")
    for name, row in results["rows"].items():
        gan = results["gans"].get(name.removeprefix("privacy_"), {})
        eps = [v["epsilon"] for v in gan.get("sites", {}).values() if v["epsilon"] is not None]
        click.echo(f"{name:<22} {row['dice']['mean']:.4f} +- {row['dice']['sd']:.4f}   "
                   f"{max(eps):.2f}" if eps else f"{name:<22} {row['dice']['mean']:.4f} +- {row['dice']['sd']:.4f}")
    click.echo(f"report: {run_folder / 'privacy' / 'report.md'}")


@click.group()
def bench() -> None:
    """Benchmarks users run to decide: bandwidth against FedAvg and weight transfer (on Flower); what one hostile
    site can do to the generator (poisoning)."""


@bench.command("bandwidth")
@click.option("--preset", type=click.Choice(["smoke", "cpu", "gpu"]), required=True,
              help="smoke: the plumbing, Flower included, in about 2 minutes; cpu: meaningful numbers on 2 cores; "
                   "gpu: the papers' sizes.")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Run folder (resumable: finished pieces are kept).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads of this process [2].")
@click.option("--phantom", "phantom_preset", type=click.Choice(["default", "heterogeneous"]), default="default",
              show_default=True, help="The phantom layout: default (3 uneven sites, gliomas; the committed reports) "
              "or heterogeneous (4 sites, each its own lesion type, population and scanner).")
@log_level_option
@friendly_errors
def bandwidth(preset, out, seed, threads, phantom_preset, log_level):
    """AsynDGAN (per wire encoding) against FedAvg, cyclical and single weight transfer (Flower deployment mode)
    and ensembling: bytes on real sockets (one-time and per step/round, message sizes), Dice on the same real test
    cases, and wall time to a target Dice on emulated hospital links. Needs Flower: ./scripts/setup-flower.sh."""
    from asyndgan.experiments.bandwidth import preset_config, run

    setup_logging(log_level, out / "experiment.log")
    stop_on_sigterm()
    cfg = preset_config(preset, out, seed, phantom_preset)
    if threads:
        cfg = cfg.model_copy(update={"threads": threads})
    results = run(cfg)
    click.echo(f"target Dice {results['target_dice']:.3f} ({results['target_fraction']:g} x Real-All "
               f"{results['real_all_dice']:.3f})")
    for e, row in results["asyndgan"].items():
        click.echo(f"AsynDGAN {e:<14} {row['per_sample_step']:>10.0f} B/sample-step "
                   f"({row['fewer_bytes_than_float32']:.1f}x fewer than fp32)  Dice "
                   f"{'not trained' if row['dice'] is None else format(row['dice'], '.3f')}  "
                   f"total {row['total'] / 2**20:.1f} MiB")
    for m, row in results["flower"].items():
        dice = "not scored" if row["dice"] is None else format(row["dice"], ".3f")
        click.echo(f"{m + ' (Flower)':<23} {row['per_round'] / 2**20:>8.2f} MiB/round  Dice {dice}  "
                   f"total {(row['up'] + row['down']) / 2**20:.1f} MiB")
    click.echo(f"report: {out / 'report.md'}  results: {out / 'results.json'}")


@bench.command("scale")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Run folder (overwritten).")
@click.option("--sites", default="1,4,16,64", show_default=True, help="Comma-separated numbers of sites.")
@click.option("--steps", default=40, show_default=True, type=click.IntRange(3), help="Generator steps per N.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(1), help="Steps left out first.")
@click.option("--plain", is_flag=True, help="Plain text instead of mutual TLS (loopback only).")
@log_level_option
@friendly_errors
def scale(out, sites, steps, warmup, plain, log_level):
    """How the server's CPU, memory, bytes and wall time per step grow with the number of sites: a real server
    and N real sites (sharing processes, each with its own channel and certificate)."""
    from pydantic import ValidationError

    from asyndgan.common.config import describe_validation_error
    from asyndgan.common.errors import ConfigError
    from asyndgan.experiments.scale import ScaleConfig, run

    setup_logging(log_level, out / "bench.log")
    try:
        counts = [int(x) for x in sites.split(",") if x.strip()]
        cfg = ScaleConfig(out=out, sites=counts, steps=steps, warmup=warmup, tls=not plain)
    except ValueError as exc:  # a ValidationError is a ValueError too
        text = describe_validation_error(exc) if isinstance(exc, ValidationError) else f"--sites {sites!r}: {exc}"
        raise ConfigError(text) from None
    for r in run(cfg)["rows"]:
        click.echo(f"{r['sites']:>4} sites: server CPU {r['server_cpu_ms_per_step']:.1f} ms per step "
                   f"({r['server_cpu_ms_per_site_step']:.2f} per site), wall {r['wall_ms_per_step']:.0f} ms, "
                   f"{r['server_rss_mb']:.0f} MB ({r['server_rss_mb_per_site']:.2f} per site)")
    click.echo(f"report: {out / 'report.md'}")


@bench.command("links")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Run folder (overwritten).")
@click.option("--rtts", default="0,40,80", show_default=True, help="Comma-separated round trips in ms.")
@click.option("--modes", default="exact,pipelined,late", show_default=True, help="Comma-separated server modes.")
@click.option("--sites", default=3, show_default=True, type=click.IntRange(2), help="Sites (one process each).")
@click.option("--steps", default=60, show_default=True, type=click.IntRange(3), help="Generator steps per run.")
@click.option("--slow-factor", default=3.0, show_default=True, type=click.FloatRange(1), help="How many times as "
              "long the slow site's answers take.")
@click.option("--straggler-wait", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="The late mode's train.straggler_wait.")
@click.option("--plain", is_flag=True, help="Plain text instead of mutual TLS (loopback only).")
@log_level_option
@friendly_errors
def links(out, rtts, modes, sites, steps, slow_factor, straggler_wait, plain, log_level):
    """Steps per second over delayed links and with one slow site: lock-step against pipelined steps and late
    answers (train.pipeline, train.late_steps), with real server and site processes behind delaying relays."""
    from pydantic import ValidationError

    from asyndgan.common.config import describe_validation_error
    from asyndgan.common.errors import ConfigError
    from asyndgan.experiments.links import LinksConfig, run

    setup_logging(log_level, out / "bench.log")
    try:
        cfg = LinksConfig(out=out, rtts_ms=[float(x) for x in rtts.split(",") if x.strip()],
                          modes=[m.strip() for m in modes.split(",") if m.strip()], sites=sites, steps=steps,
                          warmup=min(10, steps // 3), slow_factor=slow_factor, straggler_wait=straggler_wait,
                          tls=not plain,
                          slow_rtt_ms=float([x for x in rtts.split(",") if x.strip()][min(1, rtts.count(","))]))
    except ValueError as exc:
        text = describe_validation_error(exc) if isinstance(exc, ValidationError) else f"--rtts {rtts!r}: {exc}"
        raise ConfigError(text) from None
    for r in run(cfg)["rows"]:
        click.echo(f"{r['name']:<24} {r['steps_per_second']:6.2f} steps/s")
    click.echo(f"report: {out / 'report.md'}")


@bench.command("poisoning")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Run folder (overwritten).")
@click.option("--steps", default=150, show_default=True, type=click.IntRange(1))
@click.option("--attack", "attacks", multiple=True, type=click.Choice(["targeted", "targeted_quiet", "flipped",
              "huge", "huge30"]), help="Attacks to run (repeatable) [all].")
@click.option("--guard", "guards", multiple=True, type=click.Choice(["on", "off", "median"]),
              help="Guard modes to compare (repeatable) [on, off]; median: on plus the coordinate-wise median of the "
                   "sites' parameter gradients.")
@click.option("--honest-only", is_flag=True, help="No attack: only the honest runs, to measure what each guard "
              "costs an honest consortium.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads of this process [2].")
@log_level_option
@friendly_errors
def poisoning(out, steps, attacks, guards, honest_only, seed, threads, log_level):
    """One site of three answers with gradients of its choosing (a painted square, sign-flipped, huge); how far
    the generator moves from an honest run, with the server's guard and without. About a minute per attack on
    2 cores."""
    import torch

    from asyndgan.experiments.poisoning import ATTACKS, PoisoningConfig, run

    setup_logging(log_level, out / "experiment.log")
    torch.set_num_threads(threads or 2)
    result = run(PoisoningConfig(out=out, steps=steps, seed=seed,
                                 attacks=[] if honest_only else list(attacks or ATTACKS),
                                 guards=list(guards or ["on", "off"])))
    for r in result["rows"]:
        click.echo(f"{r['attack']:<15} guard {r['guard']:<6}  moved {r['distance']:.3f} of the "
                   f"range  rejected {r['rejected']}  clipped rows {r['rows_clipped']}"
                   + ("  removed" if r["removed"] else ""))
    for guard, d in next(v for k, v in result["honest_cost"].items() if k.startswith("image_distance_to_")).items():
        click.echo(f"honest run, guard {guard:<6}  images {d:.3f} of the range from the first guard's")
    images = result["honest_cost"]["seed_spread_image_distance"]
    click.echo(f"two honest seeds differ by {result['seed_spread']:.3f} (square), {images:.3f} (images); "
               f"report: {out / 'report.md'}")


@click.group()
def audit() -> None:
    """Measure what a server can learn of a site's images (attacks on the real site code)."""


@audit.command("privacy")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Output folder.")
@click.option("--preset", type=click.Choice(["smoke", "cpu"]), default="smoke", show_default=True,
              help="smoke: 32 px, under a minute; cpu: 64 px, more queries, a second DP noise level (minutes).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@log_level_option
@friendly_errors
def audit_privacy(out, preset, seed, log_level):
    """Bisection, honest-but-curious and oracle-descent attacks against a site with privacy off, the L1 term off
    and differential privacy on: reconstruction PSNR/SSIM per query count against the mean-image baseline."""
    from asyndgan.experiments.privacy_audit import preset_config, run, summary_lines

    setup_logging(log_level, out / "audit.log")
    results = run(preset_config(preset, out, seed))
    for line in summary_lines(results):
        click.echo(line)
    click.echo(f"report: {out / 'report.md'}  results: {out / 'results.json'}  figure: {out / 'figure.png'}")


@audit.command("memorization")
@click.option("--checkpoint", type=click.Path(path_type=pathlib.Path), required=True,
              help="The released generator: a server checkpoint or run folder.")
@click.option("--members", type=click.Path(path_type=pathlib.Path), multiple=True, required=True,
              help="A data folder of training patients (repeat for several sites).")
@click.option("--nonmembers", type=click.Path(path_type=pathlib.Path), multiple=True, required=True,
              help="A data folder of held-out patients of the same sites (repeat).")
@click.option("--cache-dir", type=click.Path(path_type=pathlib.Path), help="Prepared slices [OUT/cache].")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Output folder (results.json).")
@log_level_option
@friendly_errors
def audit_memorization(checkpoint, members, nonmembers, cache_dir, out, log_level):
    """Membership inference by someone holding a patient's scan and the generator (AUC, TPR at FPR 0.1) and
    nearest-neighbour distances of synthetic slices to the training slices."""
    import json

    from asyndgan.experiments.memorization import audit as run_audit

    setup_logging(log_level, out / "memorization.log")
    result = run_audit(checkpoint, list(members), list(nonmembers), cache_dir or out / "cache")
    (out / "results.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    click.echo(f"membership: AUC {result.auc:.3f}, TPR {result.tpr_at_fpr_0_1:.3f} at FPR 0.1 ({result.members} "
               f"members, {result.nonmembers} held out; brain MSE {result.member_error:.4f} vs "
               f"{result.nonmember_error:.4f})")
    click.echo(f"nearest training slice: synthetic {result.nn_synthetic_to_train:.4f}, held-out real "
               f"{result.nn_heldout_to_train:.4f} (RMS per pixel, medians)")
    click.echo(f"results: {out / 'results.json'}")
