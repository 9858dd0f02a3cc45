"""`asyndgan generate` and `asyndgan-server export`: the export gives the checkpoint's images bit for bit,
generated BraTS cases load in our loader, nibabel and MONAI with the source's grid, every output carries
provenance, and a foreign generator, labels it was not trained for or a full disk give one line and leave no
half-written case. Runs are built in process (Trainer + save_checkpoint) with tiny models."""

from __future__ import annotations

import errno
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from asyndgan.central_server import cli as server_cli
from asyndgan.formats.label_map_bank import LabelMapBank
from asyndgan.central_server.registry import SiteRegistry
from asyndgan.central_server.trainer import Trainer
from asyndgan.common.config import DataPrepConfig, ServerConfig, load_config
from asyndgan.cli import main as asyndgan_cli
from asyndgan.formats import brats
from asyndgan.formats.datasets import open_dataset
from asyndgan.synthesis import label_sources, writers
from procs import TINY_IMAGE2D
from volumes import brain_with_tumour

SHAPE = (40, 36, 12)  # X != Y, so a transposed or squashed slice cannot pass
AFFINE = np.array([[-1.2, 0, 0, 30.0], [0, -1.1, 0, 25.0], [0, 0, 2.5, -12.0], [0, 0, 0, 1]])


def write_tree(root: pathlib.Path, cases: int, seg_only: bool = False, bad_labels_in: int | None = None):
    rng = np.random.default_rng(0)
    for c in range(cases):
        name = f"CASE_{c:03d}"
        (root / name).mkdir(parents=True)
        images, seg = brain_with_tumour(SHAPE, rng, tumour_z_scale=2.0)  # tumour only in the middle slices
        if c == bad_labels_in:
            seg[seg == 2] = 3  # not a BraTS 2018-2021 label
        files = [("seg", seg)] if seg_only else [*images.items(), ("seg", seg)]
        for key, arr in files:
            img = nib.Nifti1Image(arr, AFFINE)
            img.header.set_xyzt_units("mm", "sec")
            nib.save(img, str(root / name / f"{name}_{key}.nii.gz"))
    return root


def make_run(run_dir: pathlib.Path, overrides: dict, maps: torch.Tensor | None, samples: int = 0) -> pathlib.Path:
    """A run folder with one checkpoint (step 7) and, for image2d, a bank holding `maps` for one site."""
    cfg = load_config(ServerConfig, None, {**overrides, "run_dir": str(run_dir)})
    bank = LabelMapBank(run_dir / "bank")
    bank.put("site1", samples if maps is None else len(maps), maps)
    trainer = Trainer(cfg, SiteRegistry(cfg, bank), bank, run_dir)
    with torch.no_grad():  # weights unlike a fresh initialisation, so that a mix-up of files would show
        for p in trainer.generator.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trainer.step = 7
    return trainer.save_checkpoint()


def generate(args):
    return CliRunner().invoke(asyndgan_cli.main, ["generate", "--device", "cpu", "--log-level", "WARNING", *args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    # Besides the progress bar (tqdm's own lines on stderr), one line: no traceback, no second message.
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def no_leftovers(out: pathlib.Path) -> None:
    assert not [p for p in out.parent.rglob(f"*{writers.TMP_MARK}*")], "a temporary file or folder was left"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("src") / "brats", 2)


@pytest.fixture(scope="module")
def brats_run(tree, tmp_path_factory):
    """A 4-modality image2d run whose bank holds the tree's label maps, as its site uploaded them."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(ServerConfig, None, TINY_IMAGE2D)
    ds = open_dataset(tree, cfg.site, DataPrepConfig(cache_dir=root / "cache", min_tumour_pixels=1))
    path = make_run(root / "run", TINY_IMAGE2D, ds.label_maps().clone())
    return {"checkpoint": path, "run_dir": root / "run", "site_maps": ds.label_maps().numpy().copy()}


def _volumes(case_dir: pathlib.Path) -> dict[str, np.ndarray]:
    return {p.name.split("_")[-1].split(".")[0]: np.asarray(nib.load(str(p)).dataobj)
            for p in sorted(case_dir.glob("*.nii.gz"))}


def test_export_gives_the_checkpoints_images_bit_for_bit_and_only_the_generator(brats_run, tree, tmp_path):
    exported = tmp_path / "g.safetensors"
    r = CliRunner().invoke(server_cli.main, ["export", "--run-dir", str(brats_run["run_dir"]), "--out", str(exported),
                                             "--log-level", "WARNING"])
    assert r.exit_code == 0, r.output
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    state = torch.load(brats_run["checkpoint"], weights_only=True)
    assert keys == set(state["generator"])  # the generator only: no optimiser, no label maps
    assert json.loads(meta["model"])["image2d"]["ngf"] == 4 and meta["step"] == "7"
    assert meta["run_id"] == state["run_id"] and len(meta["config_digest"]) == 64

    a, b = tmp_path / "from_ckpt", tmp_path / "from_export"
    assert generate(["--checkpoint", str(brats_run["checkpoint"]), "--label-maps", str(tree), "--out", str(a)]).exit_code == 0
    assert generate(["--generator", str(exported), "--label-maps", str(tree), "--out", str(b)]).exit_code == 0
    for case in ("CASE_000", "CASE_001"):
        va, vb = _volumes(a / case), _volumes(b / case)
        assert set(va) == {"t1", "t1ce", "t2", "flair", "seg"}
        for m in va:
            assert np.array_equal(va[m], vb[m]), m
    pa, pb = (json.loads((d / "CASE_000" / "provenance.json").read_text())["generator"] for d in (a, b))
    assert pa.pop("file") != pb.pop("file") and pa == pb  # same run, step, config and weights digests


def test_a_generated_case_loads_in_our_loader_nibabel_and_monai_with_the_sources_grid(brats_run, tree, tmp_path):
    out = tmp_path / "syn"
    r = generate(["--checkpoint", str(brats_run["run_dir"]), "--label-maps", str(tree), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote 2 synthetic cases" in r.output
    src, syn = tree / "CASE_001", out / "CASE_001"
    assert (syn / "CASE_001_seg.nii.gz").read_bytes() == (src / "CASE_001_seg.nii.gz").read_bytes()
    seg = np.asarray(nib.load(str(src / "CASE_001_seg.nii.gz")).dataobj)
    src_t1 = nib.load(str(src / "CASE_001_t1.nii.gz"))
    for m in ("t1", "t1ce", "t2", "flair"):
        img = nib.load(str(syn / f"CASE_001_{m}.nii.gz"))
        data = np.asarray(img.dataobj)
        assert data.shape == SHAPE and np.allclose(img.affine, AFFINE) and img.header.get_zooms() == src_t1.header.get_zooms()
        assert b"synthetic" in img.header["descrip"].tobytes()
        # Every axial slice is generated, tumour-free ones too; 0 outside the source's brain, positive inside.
        brain = np.asarray(src_t1.dataobj) > 0
        assert (data[~brain] == 0).all() and (data[brain] > 0).all()
        tumour_free = [z for z in range(SHAPE[2]) if not seg[..., z].any()]
        assert tumour_free and all(data[..., z].std() > 0 for z in tumour_free)
    record = json.loads((syn / "provenance.json").read_text())
    state = torch.load(brats_run["checkpoint"], weights_only=True)
    assert record["synthetic"] is True and record["generator"]["run_id"] == state["run_id"]
    assert record["generator"]["step"] == 7 and len(record["generator"]["config_digest"]) == 64
    assert record["label_map"]["case"] == "CASE_001"
    assert json.loads((out / "provenance.json").read_text())["synthetic"] is True

    # Our loader: the synthetic tree gives a site the same label maps as the real one (same seg, same brain).
    cfg = load_config(ServerConfig, None, TINY_IMAGE2D).site
    ds = open_dataset(out, cfg, DataPrepConfig(cache_dir=tmp_path / "cache", min_tumour_pixels=1))
    assert np.array_equal(ds.label_maps().numpy(), brats_run["site_maps"])
    assert ds.real(torch.arange(len(ds))).shape == (len(ds), 4, 16, 16)

    monai = pytest.importorskip("monai")
    loaded = monai.transforms.LoadImage(image_only=True)(str(syn / "CASE_001_flair.nii.gz"))
    assert tuple(loaded.shape) == SHAPE and np.allclose(np.asarray(loaded.affine), AFFINE)


def test_generation_builds_the_label_maps_the_site_uploaded(brats_run, tree):
    """The generator is fed maps made by the site's own recipe: the tumour slices equal the bank's maps."""
    cases = label_sources.brats_cases(tree)
    made = []
    for case in cases:
        vol = label_sources.read_volume(case, 16, 5)
        made.append(vol.maps[brats.tumour_slices(vol.seg, 1)])
    assert np.array_equal(np.concatenate(made), brats_run["site_maps"])


@pytest.mark.parametrize("kind", ["mlp1d checkpoint", "random file", "random safetensors", "foreign safetensors",
                                  "weights unlike its settings", "cuda without a GPU"])
def test_a_foreign_generator_is_one_line_and_writes_nothing(kind, brats_run, tree, tmp_path):
    out = tmp_path / "out"
    if kind == "weights unlike its settings":
        state = torch.load(brats_run["checkpoint"], weights_only=True)
        state["config_json"] = state["config_json"].replace('"ngf":4', '"ngf":8')
        path = tmp_path / "step_00000007.pt"
        torch.save(state, path)
        args, needle = ["--checkpoint", str(path)], "the weights do not fit the model settings it names"
    elif kind == "cuda without a GPU":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        args, needle = ["--checkpoint", str(brats_run["checkpoint"]), "--device", "cuda"], "no CUDA GPU"
    elif kind == "mlp1d checkpoint":
        path = make_run(tmp_path / "run1d", {"site.model.family": "mlp1d"}, None, samples=100)
        args, needle = ["--checkpoint", str(path)], "holds a mlp1d generator"
    elif kind == "random file":
        path = tmp_path / "step_00000001.pt"
        path.write_bytes(np.random.default_rng(0).bytes(5000))
        args, needle = ["--checkpoint", str(path)], "is not a readable asyndgan checkpoint"
    elif kind == "random safetensors":
        path = tmp_path / "g.safetensors"
        path.write_bytes(np.random.default_rng(0).bytes(5000))
        args, needle = ["--generator", str(path)], "is not a readable safetensors file"
    else:
        from safetensors.torch import save_file

        path = tmp_path / "g.safetensors"
        save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
        args, needle = ["--generator", str(path)], "is not an asyndgan generator export"
    line = one_error_line(generate([*args, "--label-maps", str(tree), "--out", str(out)]))
    assert needle in line and (kind == "cuda without a GPU" or str(path) in line)
    assert not out.exists()


def test_labels_the_generator_was_not_trained_for_stop_before_that_case_is_written(brats_run, tmp_path):
    src = write_tree(tmp_path / "bad", 3, bad_labels_in=1)
    out = tmp_path / "out"
    line = one_error_line(generate(["--checkpoint", str(brats_run["checkpoint"]), "--label-maps", str(src),
                                    "--out", str(out)]))
    assert "CASE_001_seg.nii.gz has unexpected labels [3.0]" in line
    assert sorted(p.name for p in out.iterdir()) == ["CASE_000", "provenance.json"]  # the case before is whole
    no_leftovers(out)

    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(masks / "m0.png")
    line = one_error_line(generate(["--checkpoint", str(brats_run["checkpoint"]), "--label-maps", str(masks),
                                    "--out", str(tmp_path / "out2d")]))
    assert "has label 7; the generator was trained for labels 0..4" in line


def test_a_seg_only_case_is_refused_with_one_line(brats_run, tmp_path):
    src = write_tree(tmp_path / "segonly", 1, seg_only=True)
    line = one_error_line(generate(["--checkpoint", str(brats_run["checkpoint"]), "--label-maps", str(src),
                                    "--out", str(tmp_path / "out")]))
    assert "CASE_000 has a segmentation but no image" in line


def test_a_full_disk_leaves_no_half_written_case_and_the_same_command_resumes(brats_run, tree, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "out"
    args = ["--checkpoint", str(brats_run["checkpoint"]), "--label-maps", str(tree), "--out", str(out)]
    real_save, calls = nib.save, []

    def filling_disk(img, path):
        calls.append(path)
        if len(calls) == 6:  # the second case's second image
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(img, path)

    monkeypatch.setattr(writers.nib, "save", filling_disk)
    line = one_error_line(generate(args))
    assert "cannot write case CASE_001" in line and "No space left on device" in line
    assert sorted(p.name for p in out.iterdir()) == ["CASE_000", "provenance.json"]
    assert len(list((out / "CASE_000").iterdir())) == 6  # 4 images, seg, provenance
    no_leftovers(out)

    monkeypatch.setattr(writers.nib, "save", real_save)
    r = generate(args)
    assert r.exit_code == 0 and "wrote 1 synthetic cases (1 already there)" in r.output, r.output
    assert (out / "CASE_001" / "CASE_001_flair.nii.gz").is_file()
    # Another generator into the same folder would mix two data sets: refused.
    other = make_run(tmp_path / "other", TINY_IMAGE2D, torch.zeros(1, 16, 16, dtype=torch.uint8))
    line = one_error_line(generate(["--checkpoint", str(other), "--label-maps", str(tree), "--out", str(out)]))
    assert "holds synthetic data from another generator" in line


def _gray_run(tmp_path) -> tuple[pathlib.Path, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    maps = (torch.rand(6, 16, 16, generator=gen) > 0.6).to(torch.uint8)
    overrides = {**TINY_IMAGE2D, "site.model.image2d.modalities": ["gray"], "site.model.image2d.num_classes": 2}
    return make_run(tmp_path / "gray", overrides, maps), maps


def test_two_d_output_from_the_bank_and_from_mask_files_reads_in_the_image_folder_loader(tmp_path):
    ckpt, maps = _gray_run(tmp_path)
    out = tmp_path / "png"
    r = generate(["--checkpoint", str(ckpt), "--out", str(out), "--count", "4", "--seed", "3"])
    assert r.exit_code == 0 and "wrote 4 synthetic images" in r.output, r.output
    cfg = load_config(ServerConfig, None, {**TINY_IMAGE2D, "site.model.image2d.modalities": ["gray"],
                                           "site.model.image2d.num_classes": 2}).site
    ds = open_dataset(out, cfg, DataPrepConfig(cache_dir=tmp_path / "cache"))
    assert len(ds) == 4 and ds.modalities == ["gray"]
    drawn = []
    for i in range(4):
        record = json.loads((out / "images" / f"bank{i:07d}.json").read_text())
        assert record["synthetic"] is True and record["generator"]["step"] == 7
        drawn.append(maps[record["label_map"]["bank_key"]])
        assert json.loads(Image.open(out / "images" / f"bank{i:07d}.png").text["asyndgan"])["synthetic"] is True
    assert len({int(json.loads((out / "images" / f"bank{i:07d}.json").read_text())["label_map"]["bank_key"])
                for i in range(4)}) == 4  # drawn without replacement
    assert torch.equal(ds.label_maps(), torch.stack(drawn))

    masks = tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((20, 24), np.uint8)
    mask[5:12, 6:15] = 255
    Image.fromarray(mask).save(masks / "lesion_mask.png")
    out2 = tmp_path / "png2"
    assert generate(["--checkpoint", str(ckpt), "--label-maps", str(masks), "--out", str(out2)]).exit_code == 0
    assert Image.open(out2 / "images" / "lesion.png").size == (24, 20)  # put back at the mask's size
    assert (out2 / "masks" / "lesion.png").read_bytes() == (masks / "lesion_mask.png").read_bytes()
    assert len(open_dataset(out2, cfg, DataPrepConfig(cache_dir=tmp_path / "cache"))) == 1
    no_leftovers(out2)


def test_four_channel_bank_maps_become_an_arrays_data_set(brats_run, tmp_path):
    out = tmp_path / "arrays"
    r = generate(["--checkpoint", str(brats_run["checkpoint"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = load_config(ServerConfig, None, TINY_IMAGE2D).site
    ds = open_dataset(out, cfg)
    assert len(ds) == len(brats_run["site_maps"]) and ds.modalities == ["t1", "t1ce", "t2", "flair"]
    assert np.array_equal(ds.label_maps().numpy(), brats_run["site_maps"])  # every map once, in order
    assert json.loads((out / "provenance.json").read_text())["synthetic"] is True
    line = one_error_line(generate(["--checkpoint", str(brats_run["checkpoint"]), "--out", str(tmp_path / "p"),
                                    "--format", "png"]))
    assert "--format png holds one grey or three RGB channels" in line


def test_generate_needs_exactly_one_generator(tmp_path):
    assert "exactly one of --checkpoint and --generator" in one_error_line(generate(["--out", str(tmp_path / "o")]))


def test_the_demos_summary_commands_run_as_printed(brats_run, tree, tmp_path):
    import shlex
    import shutil

    from asyndgan.experiments.demo import DemoConfig, after_training_commands

    data = tmp_path / "data"
    shutil.copytree(tree, data / "test")
    out = brats_run["run_dir"]
    cfg = DemoConfig(out=out, data=data)
    commands = after_training_commands(cfg, str(brats_run["checkpoint"]))
    generate_args = shlex.split(commands["generate_command"])
    assert generate_args[:2] == ["asyndgan", "generate"] and str(data / "test") in generate_args
    r = CliRunner().invoke(asyndgan_cli.main, [*generate_args[1:], "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (out / "synthetic" / "CASE_000" / "CASE_000_t1.nii.gz").is_file()
    export_args = shlex.split(commands["export_command"])
    assert export_args[:2] == ["asyndgan-server", "export"]
    r = CliRunner().invoke(server_cli.main, export_args[1:])
    assert r.exit_code == 0 and (out / "generator.safetensors").is_file(), r.output
    # Without a BraTS test folder the command draws from the run's own bank.
    bank_cmd = after_training_commands(DemoConfig(out=out, data=tmp_path / "nothing"), str(brats_run["checkpoint"]))
    assert "--label-maps" not in bank_cmd["generate_command"]


def test_a_full_disk_while_reserving_the_arrays_leaves_nothing(brats_run, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.os, "posix_fallocate", full)
    out = tmp_path / "arrays"
    line = one_error_line(generate(["--checkpoint", str(brats_run["checkpoint"]), "--out", str(out)]))
    assert "cannot write the arrays" in line and "No space left on device" in line
    assert not out.exists()
    no_leftovers(out)


def test_output_written_before_a_model_field_was_added_still_resumes():
    """A resumed run must not refuse its own half-written output because this version's model config gained a field
    (at its default) since: only a different generator, source or setting is another output."""
    from asyndgan.synthesis.generate import _comparable

    model = {"family": "image2d", "image2d": {"image_size": 64, "modalities": ["t1"], "num_classes": 5}}
    before = {"generator": {"run_id": "r", "step": 3, "model": model}, "seed": 0}
    now = {"generator": {"run_id": "r", "step": 3, "model": {**model, "image2d": {**model["image2d"], "init": "pytorch"}}},
           "seed": 0}
    assert _comparable(before) == _comparable(now)
    other = {"generator": {"run_id": "r", "step": 3, "model": {**model, "image2d": {**model["image2d"], "init": "normal"}}},
             "seed": 0}
    assert _comparable(before) != _comparable(other)


def test_several_samples_per_case_move_the_label_maps_and_their_seg_together(brats_run, tree, tmp_path):
    """--samples 3: the case as it is and two more, each from its segmentation and brain moved in plane (rotation,
    scale, flip) with the moved seg written beside; the images lie inside the moved brain; the command resumes."""
    from asyndgan.formats import brats as brats_format

    out = tmp_path / "out"
    args = ["--checkpoint", str(brats_run["checkpoint"]), "--label-maps", str(tree), "--out", str(out), "--samples", "3"]
    r = generate(args)
    assert r.exit_code == 0 and "wrote 6 synthetic cases" in r.output, r.output
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["CASE_000", "CASE_000_s1", "CASE_000_s2", "CASE_001", "CASE_001_s1", "CASE_001_s2"]
    source = np.asarray(nib.load(str(tree / "CASE_000" / "CASE_000_seg.nii.gz")).dataobj)
    for k in (1, 2):
        case = out / f"CASE_000_s{k}"
        moved = np.asarray(nib.load(str(case / f"CASE_000_s{k}_seg.nii.gz")).dataobj)
        assert moved.shape == source.shape and not np.array_equal(moved, source)
        assert set(np.unique(moved)) <= set(np.unique(source))  # the file's own label values, nothing new
        assert 0.6 < (moved > 0).sum() / (source > 0).sum() < 1.5  # rotation and a scale of at most 10%
        record = json.loads((case / "provenance.json").read_text())
        assert abs(record["label_map"]["moved"]["angle_deg"]) <= 10
        flair = np.asarray(nib.load(str(case / f"CASE_000_s{k}_flair.nii.gz")).dataobj)
        assert flair[moved > 0].min() > 0  # the tumour is inside the generated brain
    # the moved cases read back as BraTS cases, seg included
    found, problems = brats_format.find_cases(out, ["t1", "t1ce", "t2", "flair"])
    assert len(found) == 6 and not problems
    again = generate(args)
    assert again.exit_code == 0 and "wrote 0 synthetic cases (6 already there)" in again.output


def test_compare_samples_puts_generators_side_by_side_on_the_same_maps(brats_run, tree, tmp_path):
    """`asyndgan experiment compare-samples`: one row per case, the label map, the real slice and each generator's
    image of it; a malformed --generator or a folder without cases is one line."""
    from click.testing import CliRunner

    from asyndgan.cli.main import main

    out = tmp_path / "grid.png"
    args = ["experiment", "compare-samples", "--generator", f"a={brats_run['checkpoint']}",
            "--generator", f"b={brats_run['checkpoint']}", "--cases", str(tree), "--out", str(out), "--count", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (r.output, r.exception)
    assert out.stat().st_size > 5_000 and str(out) in r.output
    r = CliRunner().invoke(main, [*args[:2], "--generator", "no-equals-sign", *args[6:]])
    assert r.exit_code == 2 and "NAME=CHECKPOINT" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, [*args[:6], "--cases", str(empty), "--out", str(out)])
    assert r.exit_code != 0 and "no BraTS case" in r.output and "Traceback" not in r.output
