"""`asyndgan`: data, experiment and tool commands. Parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import pathlib

import click

from asyndgan.common.cli_support import friendly_errors, log_level_option, stop_on_sigterm, version_option
from asyndgan.common.logging_setup import setup_logging
from asyndgan.common.pki_cli import certs


@click.group()
@version_option
def main() -> None:
    """asyndgan: train one generator across hospitals without moving their images."""


@main.group()
def data() -> None:
    """Generate stand-in data sets for demos and tests (input for sites, not the trained generator's output)."""


@data.command()
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Folder to write site folders into.")
@click.option("--sites", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--per-site", default="120,60,30", show_default=True, help="Samples per site, comma-separated.")
@click.option("--size", default=64, show_default=True, type=click.IntRange(16, 1024))
@click.option("--seed", default=0, show_default=True)
@log_level_option
@friendly_errors
def toy(out, sites, per_site, size, seed, log_level):
    """Small brain-like toy images with tumour label maps (arrays layout), one folder per site."""
    from asyndgan.common.errors import ConfigError
    from asyndgan.demo_data.toy import write_toy_sites

    setup_logging(log_level)
    try:
        counts = [int(c) for c in per_site.split(",")]
    except ValueError:
        raise ConfigError(f"--per-site {per_site!r} must be comma-separated integers") from None
    counts = (counts + [counts[-1]] * sites)[:sites]
    for folder in write_toy_sites(out, sites, counts, size, seed):
        click.echo(str(folder))


@data.command()
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Folder to write into.")
@click.option("--preset", type=click.Choice(["default", "heterogeneous", "public"]), default="default",
              show_default=True, help="default: 3 uneven sites, gliomas only (the layout of every earlier report); "
              "heterogeneous: 4 sites of 10, each with its own lesion type, population and scanner, 40 test cases "
              "from all of them; public: one folder of 30 glioma cases from one scanner family.")
@click.option("--config", "config_file", type=click.Path(path_type=pathlib.Path),
              help="A TOML or JSON file with the layout's fields (sites, cases_per_site, profiles, ...; "
              "`preset = NAME` to start from a preset). Options given here override it.")
@click.option("--sites", type=click.IntRange(1, 64), help="Number of sites [default preset: 3].")
@click.option("--cases-per-site", help="Comma-separated case counts, one per site (default: uneven, FeTS-like).")
@click.option("--train-cases", type=click.IntRange(1),
              help="Total training cases, split unevenly, when --cases-per-site is not given [default preset: 60].")
@click.option("--test-cases", type=click.IntRange(0), help="Pooled test cases [default preset: 12].")
@click.option("--seed", type=click.IntRange(0), help="[default: 0]")
@click.option("--shape", help="Volume shape X,Y,Z over the BraTS field of view [default: 240,240,155]; e.g. "
              "160,160,100 for faster experiments.")
@click.option("--missing", help="Modalities a site's cases are written without, e.g. site1=t2,site2=flair,site3=t1ce "
              "(several for one site: site1=t2+flair). Test cases keep all four.")
@log_level_option
@friendly_errors
def phantom(out, preset, config_file, sites, cases_per_site, train_cases, test_cases, seed, shape, missing,
            log_level):
    """A multi-site brain-tumour phantom in BraTS layout, built on the MNI152 template."""
    from pydantic import ValidationError

    from asyndgan.common.config import describe_validation_error
    from asyndgan.common.errors import ConfigError
    from asyndgan.demo_data.phantom import write_phantom
    from asyndgan.demo_data.phantom.config import parse_missing
    from asyndgan.demo_data.phantom.presets import phantom_config, read_layout_file

    setup_logging(log_level)
    try:
        counts = [int(c) for c in cases_per_site.split(",")] if cases_per_site else None
        dims = tuple(int(c) for c in shape.split(",")) if shape else None
        cfg = phantom_config(preset, read_layout_file(config_file) if config_file else None, sites=sites,
                             cases_per_site=counts, train_cases=train_cases, test_cases=test_cases, seed=seed,
                             shape=dims, missing=parse_missing(missing) if missing else None)
    except ValidationError as exc:
        raise ConfigError(f"invalid phantom settings: {describe_validation_error(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid phantom settings: {exc}") from None
    summary = write_phantom(out, cfg)
    for site, n in summary.cases_per_site.items():
        lacks = f" (without {', '.join(cfg.missing[site])})" if cfg.missing.get(site) else ""
        click.echo(f"{site}: {n} cases in {out / site}{lacks}")
    if summary.test_cases:
        click.echo(f"test: {summary.test_cases} cases in {out / 'test'}")
    click.echo(f"partition: {out / 'partition.csv'}")
    click.echo(f"lesions: {', '.join(f'{k} {v}' for k, v in sorted(summary.lesions.items()))}")
    previews = "preview.png" + (", preview_lesions.png" if (out / "preview_lesions.png").exists() else "")
    click.echo(f"previews: {previews} in {out}  ({summary.seconds_per_case:.1f} s per case)")


@main.command()
@click.option("--out", type=click.Path(path_type=pathlib.Path), default="runs/demo", show_default=True)
@click.option("--data", type=click.Path(path_type=pathlib.Path), default="data/phantom", show_default=True,
              help="Folder with one sub-folder per site (the phantom is generated here if missing).")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(1))
@click.option("--sites", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the server and the sites compute (auto: cuda when a GPU is visible).")
@click.option("--private", is_flag=True, help="Sites keep their differential privacy on (the deployment default); "
              "without it the demo runs the papers' algorithm on the public phantom.")
@log_level_option
@friendly_errors
def demo(out, data, steps, sites, device, private, log_level):
    """The main job: a server and one process per site train image2d on this machine, then a summary."""
    from asyndgan.experiments.demo import DemoConfig, run

    setup_logging(log_level)
    stop_on_sigterm()  # unwinds through run(), which stops the child processes on the way out
    summary = run(DemoConfig(out=out, data=data, steps=steps, sites=sites, device=device, private=private))
    click.echo(f"trained {summary['steps']} steps with {len(summary['sites'])} sites on {summary['device']} in "
               f"{summary['seconds']} s")
    click.echo(f"  latest sample grid: {summary['latest_samples']}")
    click.echo(f"  all sample grids:   {summary['samples_folder']}")
    click.echo(f"  training curves:    .venv/bin/tensorboard --logdir {summary['tensorboard']}  (then open "
               "http://localhost:6006)")
    click.echo(f"  checkpoint:         {summary['checkpoint']}")
    click.echo(f"  logs:               {summary['server_log']}, {', '.join(summary['site_logs'])}")
    click.echo(f"  privacy per site:   {'; '.join(f'{k} {v}' for k, v in summary['privacy'].items())}")
    click.echo(f"  summary:            {out / 'summary.json'}")
    if summary.get("generate_command"):
        click.echo(f"  synthetic data:     {summary['generate_command']}")
        click.echo(f"  publish generator:  {summary['export_command']}")


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=pathlib.Path),
              help="A server checkpoint (step_NNNNNNNN.pt), or a run folder: its newest checkpoint.")
@click.option("--generator", "generator_file", type=click.Path(path_type=pathlib.Path),
              help="A published generator (.safetensors from `asyndgan-server export`).")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Folder to write (new or empty; the same command again resumes an interrupted run).")
@click.option("--label-maps", type=click.Path(path_type=pathlib.Path),
              help="A BraTS tree (case folders with _seg/-seg and at least one image) or 2-D mask files "
                   "[the run's own bank, with --checkpoint].")
@click.option("--count", type=click.IntRange(1), help="Cases (BraTS) or images (2-D) to write [all].")
@click.option("--format", "fmt", type=click.Choice(["nifti", "png", "arrays"]),
              help="nifti: BraTS cases; png: image/mask files (1 or 3 channels); arrays: images.npy + labels.npy "
                   "[nifti from a BraTS tree, else png when it fits, else arrays].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Slices through the generator at once.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Draws from the bank.")
@log_level_option
@friendly_errors
def generate(checkpoint, generator_file, out, label_maps, count, fmt, device, batch_size, seed, log_level):
    """Synthesise a labelled data set from a trained generator and label maps.

    From a BraTS tree, every case is written whole in BraTS layout: every axial slice generated (tumour-free
    ones too), at the volume's in-plane size, with the source's affine and header and its seg copied. The label
    maps are made as the sites made them: tumour labels plus the brain outline, the brain being wherever any of
    the case's images is above 0; so a case needs at least one image beside its seg (a seg-only case is
    refused: its brain's extent is unknown). The images are 0 outside that brain. Every output has a
    provenance JSON (run id, step, configuration digest, "synthetic": true).
    """
    from pydantic import ValidationError

    from asyndgan.common.config import describe_validation_error
    from asyndgan.common.errors import ConfigError
    from asyndgan.synthesis.generate import GenerateConfig, run

    setup_logging(log_level)
    stop_on_sigterm()  # unwinds, so the case being written is removed rather than left half-done
    try:
        cfg = GenerateConfig(checkpoint=checkpoint, generator=generator_file, out=out, label_maps=label_maps,
                             count=count, format=fmt, device=device, batch_size=batch_size, seed=seed)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc).removeprefix("config: Value error, ")) from None
    summary = run(cfg)
    unit = "cases" if summary["format"] == "nifti" else "images"
    kept = f" ({summary['kept']} already there)" if summary["kept"] else ""
    click.echo(f"wrote {summary['written']} synthetic {unit}{kept} to {summary['out']} ({summary['format']}) in "
               f"{summary['seconds']} s")


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=pathlib.Path),
              help="A server checkpoint (step_NNNNNNNN.pt), or a run folder: its newest checkpoint.")
@click.option("--generator", "generator_file", type=click.Path(path_type=pathlib.Path),
              help="A published generator (.safetensors from `asyndgan-server export`).")
@click.option("--data", type=click.Path(path_type=pathlib.Path), required=True,
              help="The site's BraTS tree (cases may lack modalities).")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True,
              help="Folder to write (new or empty; the same command again resumes).")
@click.option("--method", type=click.Choice(["translate", "labels"]), default="translate", show_default=True,
              help="translate: learn held -> missing from the generator's synthetic cases, apply it to the case's "
                   "own images (follows the patient's anatomy); labels: the generator from the label maps alone.")
@click.option("--steps", type=click.IntRange(1), help="Translator training steps [1500].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Translator training.")
@log_level_option
@friendly_errors
def complete(checkpoint, generator_file, data, out, method, steps, device, threads, seed, log_level):
    """Fill in the modalities a site's cases lack, at the site: real files copied byte for byte, missing ones
    written as NIfTI in each case's geometry, completion.json naming the synthetic files."""
    import torch
    from pydantic import ValidationError

    from asyndgan.common.config import describe_validation_error
    from asyndgan.common.errors import ConfigError
    from asyndgan.synthesis.complete import CompleteConfig, run
    from asyndgan.synthesis.translation import TranslateConfig

    setup_logging(log_level)
    stop_on_sigterm()
    if threads:
        torch.set_num_threads(threads)
    try:
        translate = TranslateConfig(seed=seed, **({"steps": steps} if steps else {}))
        cfg = CompleteConfig(checkpoint=checkpoint, generator=generator_file, data=data, out=out, method=method,
                             translate=translate, device=device)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc).removeprefix("config: Value error, ")) from None
    summary = run(cfg)
    kept = f" ({summary['kept']} already there)" if summary["kept"] else ""
    click.echo(f"completed {summary['written']} cases{kept} into {summary['out']} ({summary['method']}): "
               f"{summary['volumes_filled']} synthetic volumes in {summary['seconds']} s")
    for name, info in summary["translators"].items():
        click.echo(f"  translator {name}: " + (f"kept {info['kept']}" if "kept" in info else
                                               f"L1 {info['first_l1']:.3f} -> {info['final_l1']:.3f} in "
                                               f"{info['seconds']} s from {info['label_maps']} label maps"))
    click.echo("  which files are synthetic: <case>/completion.json")


main.add_command(certs)


@main.group()
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


@experiment.command("synthetic-learning")
@click.option("--preset", type=click.Choice(["smoke", "cpu", "gpu"]), required=True,
              help="smoke: the plumbing in under 2 minutes; cpu: meaningful numbers on 2 cores in ~90 minutes; "
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
@log_level_option
@friendly_errors
def privacy_utility(preset, out, seed, threads, log_level):
    """Patient-level DP from a public warm start: Dice against epsilon, with the public-only floor, the
    non-private ceiling, canary audits and membership tests."""
    from asyndgan.experiments.privacy_utility import preset_config, run

    setup_logging(log_level, out / "experiment.log")
    cfg = preset_config(preset, out, seed)
    if threads:
        cfg = cfg.model_copy(update={"threads": threads})
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


@main.group()
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


@bench.command("poisoning")
@click.option("--out", type=click.Path(path_type=pathlib.Path), required=True, help="Run folder (overwritten).")
@click.option("--steps", default=150, show_default=True, type=click.IntRange(1))
@click.option("--attack", "attacks", multiple=True, type=click.Choice(["targeted", "targeted_quiet", "flipped",
              "huge", "huge30"]), help="Attacks to run (repeatable) [all].")
@click.option("--guard", "guards", multiple=True, type=click.Choice(["on", "off", "median"]),
              help="Guard modes to compare (repeatable) [on, off]; median: on plus the coordinate-wise median of the "
                   "sites' parameter gradients.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--threads", type=click.IntRange(1, 256), help="Torch CPU threads of this process [2].")
@log_level_option
@friendly_errors
def poisoning(out, steps, attacks, guards, seed, threads, log_level):
    """One site of three answers with gradients of its choosing (a painted square, sign-flipped, huge); how far
    the generator moves from an honest run, with the server's guard and without. About a minute per attack on
    2 cores."""
    import torch

    from asyndgan.experiments.poisoning import ATTACKS, PoisoningConfig, run

    setup_logging(log_level, out / "experiment.log")
    torch.set_num_threads(threads or 2)
    result = run(PoisoningConfig(out=out, steps=steps, seed=seed, attacks=list(attacks or ATTACKS),
                                 guards=list(guards or ["on", "off"])))
    for r in result["rows"]:
        click.echo(f"{r['attack']:<15} guard {r['guard']:<6}  moved {r['distance']:.3f} of the "
                   f"range  rejected {r['rejected']}  clipped rows {r['rows_clipped']}"
                   + ("  removed" if r["removed"] else ""))
    click.echo(f"two honest seeds differ by {result['seed_spread']:.3f}; report: {out / 'report.md'}")


@main.group()
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


@main.group()
def segment() -> None:
    """Downstream segmentation (MONAI 2-D U-Net) trained on any BraTS tree, scored per patient in 3-D."""


@segment.command("train")
@click.option("--data", "data_dirs", multiple=True, type=click.Path(path_type=pathlib.Path),
              help="BraTS tree(s) to pool, real or synthetic: --data A B C (or --data A --data B).")
@click.argument("more_data", nargs=-1, type=click.Path(path_type=pathlib.Path), metavar="")
@click.option("--out", type=click.Path(path_type=pathlib.Path), help="Model folder to write.")
@click.option("--region", type=click.Choice(["whole", "core", "enhancing"]), help="Tumour region [whole].")
@click.option("--size", type=int, help="In-plane side slices are resized to [64].")
@click.option("--steps", type=int, help="Optimiser steps [2000].")
@click.option("--batch-size", type=int, help="Slices per step [16].")
@click.option("--seed", type=int, help="Seed of the weights, slice choice and batch order [0].")
@click.option("--device", help="auto, cpu, cuda, cuda:1 [auto].")
@click.option("--threads", type=int, help="Torch CPU threads.")
@click.option("--workers", type=int, help="Processes reading cases in parallel [1].")
@click.option("--config", "config_file", type=click.Path(path_type=pathlib.Path), help="TOML or JSON settings.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any setting, e.g. --set recipe.training.lr=0.01 (repeatable).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@log_level_option
@friendly_errors
def segment_train(data_dirs, more_data, out, region, size, steps, batch_size, seed, device, threads, workers,
                  config_file, overrides, progress, log_level):
    """Train a segmentation model on BraTS tree(s); writes weights, recipe, training.json and TensorBoard logs."""
    from asyndgan.common.config import load_config, parse_override
    from asyndgan.segmentation import TrainRunConfig, train
    from asyndgan.segmentation.train import check_run

    dirs = [str(d) for d in (*data_dirs, *more_data)]
    values = {"data": dirs or None, "out": out and str(out), "device": device, "threads": threads,
              "workers": workers, "progress": progress, "recipe.region": region,
              "recipe.preprocessing.image_size": size, "recipe.training.steps": steps,
              "recipe.training.batch_size": batch_size, "recipe.training.seed": seed}
    values.update(dict(parse_override(o) for o in overrides))
    cfg = load_config(TrainRunConfig, config_file, values)
    check_run(cfg)  # a bad folder or device fails before the log file creates the model folder
    setup_logging(log_level, cfg.out / "train.log")
    result = train(cfg)
    click.echo(f"trained {result.steps} steps on {result.slices} slices from {result.cases} cases in "
               f"{result.seconds:.0f} s (final loss {result.final_loss:.4f}; Dice on its own training slices "
               f"{result.training_dice:.3f}{': COLLAPSED, see the warning above' if result.collapsed else ''})")
    click.echo(f"  model:            {cfg.out}")
    click.echo(f"  training curves:  .venv/bin/tensorboard --logdir {cfg.out / 'tensorboard'}")
    click.echo(f"  evaluate:         asyndgan segment eval --model {cfg.out} --data TEST_DIR")


@segment.command("eval")
@click.option("--model", type=click.Path(path_type=pathlib.Path), required=True, help="Model folder from training.")
@click.option("--data", type=click.Path(path_type=pathlib.Path), required=True, help="BraTS tree of test cases.")
@click.option("--out", type=click.Path(path_type=pathlib.Path), help="Results folder [MODEL/eval-<data name>].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--threads", type=int, help="Torch CPU threads.")
@click.option("--workers", default=1, show_default=True, type=int, help="Processes reading cases in parallel.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@log_level_option
@friendly_errors
def segment_eval(model, data, out, device, threads, workers, progress, log_level):
    """Per-patient 3-D Dice and HD95 of a model on a BraTS tree: per_patient.csv and summary.json."""
    from asyndgan.common.config import load_config
    from asyndgan.segmentation import EvalRunConfig, evaluate

    setup_logging(log_level)
    cfg = load_config(EvalRunConfig, None, {"model": str(model), "data": str(data), "out": out and str(out),
                                            "device": device, "threads": threads, "workers": workers,
                                            "progress": progress})
    result, folder = evaluate(cfg)
    s = result.summary
    click.echo(f"{s['region_name']}, {s['patients']} patients: Dice {s['dice']['mean']:.4f} +- {s['dice']['sd']:.4f}, "
               f"HD95 {s['hd95_mm']['mean']:.2f} +- {s['hd95_mm']['sd']:.2f} mm (mean +- SD)")
    click.echo(f"  per patient: {folder / 'per_patient.csv'}")
    click.echo(f"  summary:     {folder / 'summary.json'}")


if __name__ == "__main__":
    main()
