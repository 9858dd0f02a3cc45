"""`asyndgan`: the product's command: data for demos, the demo, synthetic data sets from a trained generator,
completing a site's modalities, certificates, downstream segmentation; and the research groups
(`experiment`, `bench`, `audit`, from asyndgan.experiments.cli). Parsing only; the work lives in the modules
it calls."""

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
@click.option("--count", type=click.IntRange(1),
              help="Source cases (BraTS; each gives --samples cases) or images (2-D) to write [all].")
@click.option("--format", "fmt", type=click.Choice(["nifti", "png", "arrays"]),
              help="nifti: BraTS cases; png: image/mask files (1 or 3 channels); arrays: images.npy + labels.npy "
                   "[nifti from a BraTS tree, else png when it fits, else arrays].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Slices through the generator at once.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Draws from the bank and of the label-map changes (--samples).")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Synthetic cases per BraTS source case: the first from its label maps as they are, each further "
                   "one (<case>_s<k>) from its segmentation and brain moved in plane (rotation up to 10 degrees, "
                   "scale 0.9-1.1, left-right flip), with the moved seg.")
@log_level_option
@friendly_errors
def generate(checkpoint, generator_file, out, label_maps, count, fmt, device, batch_size, seed, samples, log_level):
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
                             count=count, format=fmt, device=device, batch_size=batch_size, seed=seed,
                             samples=samples)
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


from asyndgan.experiments.cli import audit, bench, experiment  # noqa: E402  (the research groups)

for _group in (experiment, bench, audit):
    main.add_command(_group)


if __name__ == "__main__":
    main()
