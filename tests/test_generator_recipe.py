"""The generator-recipe experiment's plumbing: every lever trains, generates and is scored against the baseline
with an interval, resumes without redoing anything, and a lever name it does not know is one line."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from asyndgan.cli.main import main
from asyndgan.experiments.generator_recipe import LEVERS, lever_settings, preset_config


def test_each_lever_changes_one_thing(tmp_path):
    cfg = preset_config("cpu", tmp_path)
    base, base_prep, base_samples = lever_settings(cfg, "baseline", 0, tmp_path / "b")
    changed = {}
    for lever in LEVERS[1:]:
        scfg, prep, samples = lever_settings(cfg, lever, 0, tmp_path / lever)
        diff = {k for k, v in json.loads(scfg.model_dump_json()).items() if v != json.loads(base.model_dump_json())[k]}
        changed[lever] = (diff, prep.healthy_ratio != base_prep.healthy_ratio, samples != base_samples)
    assert changed["ema"] == ({"train", "run_dir"}, False, False)
    assert changed["spade"] == ({"site", "run_dir"}, False, False) and changed["diffaug"][0] == {"site", "run_dir"}
    assert changed["healthy"] == ({"run_dir"}, True, False) and changed["samples3"] == ({"run_dir"}, False, True)
    assert changed["longer"][0] == {"site", "checkpoint_every", "run_dir"}
    no_l1 = lever_settings(cfg, "no_l1", 0, tmp_path / "n")[0]
    assert changed["no_l1"][0] == {"site", "run_dir"} and (base.site.loss.lambda_l1, no_l1.site.loss.lambda_l1) == (100, 0)
    assert lever_settings(cfg, "baseline", 1, tmp_path / "b").__getitem__(0).train.seed == 1  # a GAN seed is its own


def test_levers_pulled_together_change_each_of_their_things(tmp_path):
    from asyndgan.experiments.recipe import lever_parts, synthesis_lever, training_lever

    cfg = preset_config("cpu", tmp_path)
    both, prep, samples = lever_settings(cfg, "spade+no_l1+longer+healthy", 0, tmp_path / "x")
    assert (both.site.model.image2d.generator, both.site.loss.lambda_l1) == ("spade", 0)
    assert both.site.schedule.steps == 2 * cfg.gan.steps and prep.healthy_ratio == 0.5 and samples == 1
    assert training_lever("appearance+no_l1") == "no_l1" and training_lever("samples3+appearance") == "baseline"
    assert synthesis_lever("appearance+samples3+spade") == "spade+samples3"
    assert training_lever("no_l1+spade") == "spade+no_l1"  # one name, whatever the order
    cfg = type(cfg).model_validate({**cfg.model_dump(), "levers": ["baseline", "no_l1+spade"]})
    assert cfg.levers == ["baseline", "spade+no_l1"]
    for bad, why in (("spade+zoom", "unknown lever 'zoom'"), ("no_l1+no_l1", "twice"), ("baseline+ema", "baseline")):
        try:
            lever_parts(bad)
        except ValueError as exc:
            assert why in str(exc)
        else:
            raise AssertionError(bad)


def test_smoke_runs_the_levers_against_the_baseline_and_resumes(tmp_path):
    out = tmp_path / "gr"
    args = ["experiment", "generator-recipe", "--preset", "smoke", "--out", str(out), "--levers",
            "spade,samples3,appearance,appearance+spade",
            "--threads", "1", "--log-level", "WARNING"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (r.output, r.exception)
    results = json.loads((out / "results.json").read_text())
    assert list(results["levers"]) == ["baseline", "spade", "samples3", "appearance", "spade+appearance"]
    # samples3 trains as the baseline does: its GANs are the baseline's, only the synthesis differs
    for g in (0, 1):
        shared = json.loads((out / "gan" / "samples3" / f"seed{g}" / "gan.json").read_text())
        base = json.loads((out / "gan" / "baseline" / f"seed{g}" / "gan.json").read_text())
        assert shared["checkpoint"] == base["checkpoint"] and shared["shared_with"] == "baseline"
        assert shared["samples"] == 3 and not (out / "gan" / "samples3" / f"seed{g}" / "checkpoints").exists()
    # appearance changes the segmentation recipe only: the baseline's very synthetic data, segmented with it
    assert not (out / "synthetic" / "appearance_g0").exists()
    recipe = json.loads((out / "segmentation" / "appearance_g0" / "seed0" / "model" / "recipe.json").read_text())
    base = json.loads((out / "segmentation" / "baseline_g0" / "seed0" / "model" / "recipe.json").read_text())
    assert recipe["training"]["appearance"] and not base["training"]["appearance"]
    # levers pulled together: spade's GAN and synthetic data, segmented with appearance, and compared with each part
    combined = json.loads((out / "gan" / "spade+appearance" / "seed0" / "gan.json").read_text())
    assert combined["shared_with"] == "spade" and not (out / "synthetic" / "spade+appearance_g0").exists()
    recipe = json.loads((out / "segmentation" / "spade+appearance_g0" / "seed0" / "model" / "recipe.json").read_text())
    assert recipe["training"]["appearance"]
    against = results["levers"]["spade+appearance"]["minus_parts"]
    assert set(against) == {"spade", "appearance"} and against["spade"]["validation"]["patients"] == 3
    assert results["levers"]["spade"]["minus_parts"] == {}
    assert "private_default" not in results["levers"]["spade+appearance"]  # only a row with no_l1 in it decides that
    cases = [p for p in (out / "synthetic" / "samples3_g0").iterdir() if p.is_dir()]
    assert len(cases) == 3 * len([p for p in (out / "synthetic" / "baseline_g0").iterdir() if p.is_dir()])
    for lever in ("spade",):
        row = results["levers"][lever]
        assert len(row["dice_per_gan"]) == 2 and 0 <= row["dice"] <= 1
        gap = row["minus_baseline"]
        assert gap["patients"] == 3 and gap["low"] <= gap["mean"] <= gap["high"]
    # the levers are chosen on validation patients, a cohort of their own: the test patients choose nothing
    spade = results["levers"]["spade"]
    validation = sorted(p.name for p in (out / "validation" / "test").iterdir() if p.is_dir())
    test = sorted(p.name for p in (out / "phantom" / "test").iterdir() if p.is_dir())
    assert len(validation) == 3 and not set(validation) & set(test)
    assert sorted(spade["validation_patients"]) == validation and sorted(spade["patients"]) == test
    gap = spade["validation_minus_baseline"]
    assert spade["adopted"] == (gap["low"] > 0) and gap["patients"] == 3
    report = (out / "report.md").read_text()
    assert "| spade |" in report and "Adopted by the rule" in report
    assert "| spade+appearance | spade |" in report and "SPADE generator (the label map in every block) + " in report
    assert "Not measured in this run (`--levers` chose the others): ema, multiscale," in report
    assert (out / "levers.png").stat().st_size > 5_000 and (out / "samples.png").stat().st_size > 1_000
    timings = json.loads((out / "timings.json").read_text())
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and json.loads((out / "results.json").read_text())["levers"] == results["levers"]
    assert json.loads((out / "timings.json").read_text())["gan_spade_g1"] < timings["gan_spade_g1"] + 1
    # the piece records and the settings they were made with, copied into a new OUT (another machine), are kept:
    # nothing is trained again
    moved = tmp_path / "moved"
    shutil.copytree(out / "pieces", moved / "pieces")
    shutil.copy(out / "settings.json", moved / "settings.json")
    shutil.rmtree(out / "gan")  # the generators are not there: the sample grid leaves them out
    elsewhere = CliRunner().invoke(main, [*args[:5], str(moved), *args[6:]])
    assert elsewhere.exit_code == 0, (elsewhere.output, elsewhere.exception)
    assert json.loads((moved / "results.json").read_text())["levers"] == results["levers"]
    assert not (moved / "gan").exists() and not (moved / "segmentation").exists()
    bad = CliRunner().invoke(main, [*args[:6], "--levers", "zoom", "--log-level", "WARNING"])
    assert bad.exit_code == 2 and "zoom" in bad.output
    bad = CliRunner().invoke(main, [*args[:6], "--levers", "spade+spade", "--log-level", "WARNING"])
    assert bad.exit_code == 2 and "'spade+spade' names a lever twice" in bad.output


def test_a_recipe_is_the_systems_own_settings(tmp_path):
    """Every lever of a recipe lands in the setting the system itself reads: the server's configuration, the sites'
    data preparation (in process and as `asyndgan-site join --set`), generate's samples."""
    from asyndgan.common.config import SiteConfig, load_config, parse_override
    from asyndgan.experiments import synthetic_learning as sl
    from asyndgan.experiments.recipe import PAPERS, GANRecipe

    recipe = GANRecipe(generator="spade", d_scales=2, ema_decay=0.999, diff_augment=["translation"],
                       healthy_ratio=0.5, samples=2)
    cfg = sl.preset_config("cpu", tmp_path)
    cfg = cfg.model_copy(update={"gan": cfg.gan.model_copy(update={"recipe": recipe})})
    scfg = sl.server_config(cfg, tmp_path / "run", 3, 4)
    assert (scfg.site.model.image2d.generator, scfg.site.model.image2d.d_scales) == ("spade", 2)
    assert scfg.train.ema_decay == 0.999 and scfg.site.diff_augment == ["translation"]
    assert recipe.prep(tmp_path).healthy_ratio == 0.5
    options = recipe.site_options()  # read as `asyndgan-site join` reads its --set options
    sets = dict(parse_override(o) for flag, o in zip(options[::2], options[1::2]) if flag == "--set")
    site = load_config(SiteConfig, None, {"site_id": "s", "data": str(tmp_path), **sets})
    assert site.prep.healthy_ratio == 0.5
    papers = sl.server_config(sl.preset_config("cpu", tmp_path), tmp_path / "run", 3, 4)
    assert (papers.site.model.image2d.generator, papers.train.ema_decay, papers.site.diff_augment) == ("resnet", None, [])
    assert PAPERS.site_options() == ["--set", "prep.healthy_ratio=0"]  # explicit: a site's default never decides
    assert PAPERS.with_lever("samples3").samples == 3
    assert PAPERS.with_lever("longer") == PAPERS == PAPERS.with_lever("baseline")


def test_the_shipped_recipe_is_what_a_user_gets_by_default():
    """SHIPPED names the recipe the system runs without settings: the server's defaults, the sites' data
    preparation, `asyndgan generate`'s samples. A change of SHIPPED without the defaults (or back) fails here."""
    from asyndgan.cli.main import main as cli
    from asyndgan.common.config import DataPrepConfig, ServerConfig
    from asyndgan.experiments.recipe import SHIPPED
    from asyndgan.synthesis.generate import GenerateConfig

    server = ServerConfig()
    image2d = server.site.model.image2d
    assert (image2d.generator, image2d.d_scales) == (SHIPPED.generator, SHIPPED.d_scales)
    assert (server.train.ema_decay, server.train.ema_warmup) == (SHIPPED.ema_decay, SHIPPED.ema_warmup)
    assert server.site.diff_augment == SHIPPED.diff_augment
    assert DataPrepConfig().healthy_ratio == SHIPPED.healthy_ratio
    assert GenerateConfig.model_fields["samples"].default == SHIPPED.samples
    generate = next(p for p in cli.commands["generate"].params if p.name == "samples")
    assert generate.default == SHIPPED.samples
