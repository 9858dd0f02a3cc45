"""`asyndgan complete`: a site's BraTS cases with the modalities they lack filled in by a trained generator.

Run at the site, on the site's own files; nothing is sent anywhere. For every case of `--data`:
- the modalities the case holds are copied byte for byte, and so is its segmentation;
- each modality the generator emits and the case lacks is written as a 3-D NIfTI volume in the case's own
  geometry (shape, affine and header of one of its images), under the BraTS name of the case's naming scheme;
- `completion.json` in the case folder names which files are synthetic, the method and the generator.
Two methods:
- `labels` (the papers'): G draws the missing modality from the case's label maps (tumour + brain outline): the
  patient's tumour on generic anatomy;
- `translate` (default): the site uses G to make synthetic slices with every modality from its own label maps,
  learns held -> missing from them (synthesis/translation.py) and applies that to its real slices, so the
  completion follows the patient's own anatomy. One translator per pattern of held/missing modalities, saved in
  OUT/.translators/ and reused when the command runs again.
Cases are written whole or not at all (writers.CaseFolder); OUT/completion.json records the settings, and running
again with the same ones resumes (finished cases are kept); other settings in the same OUT are refused.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from asyndgan.common.atomic import atomic_write_text
from asyndgan.common.devices import resolve_device
from asyndgan.common.errors import ConfigError, DataError
from asyndgan.formats import brats
from asyndgan.synthesis import label_sources as sources
from asyndgan.synthesis import writers
from asyndgan.synthesis.generate import brain_inside, volume_images, write_error
from asyndgan.formats.generator_file import LoadedGenerator, load_exported, load_from_checkpoint
from asyndgan.synthesis.translation import (
    TranslateConfig, apply_translator, from_slices, load_translator, save_translator, to_slices, train_translator,
)

log = logging.getLogger(__name__)
Method = Literal["labels", "translate"]
SIDECAR = "completion.json"


class CompleteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: pathlib.Path | None = Field(None, description="server checkpoint, or a run folder (newest one)")
    generator: pathlib.Path | None = Field(None, description="a published generator (.safetensors)")
    data: pathlib.Path = Field(description="the site's BraTS tree")
    out: pathlib.Path
    method: Method = "translate"
    translate: TranslateConfig = Field(default_factory=TranslateConfig)
    clip_percentiles: tuple[float, float] = Field((0.5, 99.5), description="how held images are normalised (the "
                                                  "site's recipe, as in training)")
    device: str = "auto"
    batch_size: int = Field(32, ge=1, le=4096)
    progress: bool = True

    @model_validator(mode="after")
    def _one_generator(self) -> "CompleteConfig":
        if (self.checkpoint is None) == (self.generator is None):
            raise ValueError("give exactly one of --checkpoint and --generator")
        return self


def _load(cfg: CompleteConfig) -> LoadedGenerator:
    return load_from_checkpoint(cfg.checkpoint) if cfg.checkpoint is not None else load_exported(cfg.generator)


def _header(cfg: CompleteConfig, loaded: LoadedGenerator) -> dict:
    return {"kind": "asyndgan-completion", "method": cfg.method, "generator": loaded.provenance(),
            "data": str(cfg.data.resolve()),
            "translate": json.loads(cfg.translate.model_dump_json()) if cfg.method == "translate" else None,
            "clip_percentiles": list(cfg.clip_percentiles)}


def _start(out: pathlib.Path, header: dict) -> None:
    record = out / SIDECAR
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        strip = (lambda h: {**h, "generator": {k: v for k, v in (h.get("generator") or {}).items() if k != "file"}})
        if strip(previous) != strip(header):
            raise ConfigError(f"{out} holds a completion with another generator, data or settings ({record}); "
                              "choose a new --out")
        log.info("%s holds part of this completion already; finished cases are kept", out)
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not empty and holds no asyndgan completion; choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(header, indent=2))


def plan(cases: list[brats.Case], modalities: list[str]) -> list[tuple[brats.Case, list[str], list[str]]]:
    """(case, held, missing) per case: held = the generator's modalities the case has, missing = the rest."""
    out = []
    for case in cases:
        present = brats.case_image_files(case)
        if not present:
            raise DataError(f"case {case.name} has a segmentation but no image; nothing to complete from")
        held = [m for m in modalities if m in present]
        out.append((case, held, [m for m in modalities if m not in present]))
    return out


def run(cfg: CompleteConfig) -> dict:
    started = time.monotonic()
    if not cfg.data.is_dir():
        raise DataError(f"data folder {cfg.data} does not exist or is not a folder")
    if not brats.is_brats_tree(cfg.data):
        raise DataError(f"{cfg.data} holds no BraTS case (a folder <case>/ with <case>_seg.nii[.gz])")
    device = resolve_device(cfg.device)
    loaded = _load(cfg)
    loaded.generator.to(device)
    i2d = loaded.model.image2d
    odd = [m for m in i2d.modalities if m not in brats.SCHEMES[0].files]
    if odd:
        raise ConfigError(f"the generator emits {i2d.modalities}; completion needs BraTS modalities")
    todo = plan(sources.brats_cases(cfg.data), list(i2d.modalities))
    if cfg.method == "translate" and any(m and not h for _, h, m in todo):
        raise DataError("a case holds none of the generator's modalities; --method translate needs at least one "
                        "(use --method labels)")
    header = _header(cfg, loaded)
    _start(cfg.out, header)
    for p in writers.remove_stale(cfg.out):
        log.warning("removed %s, left by an interrupted run", p)

    translators: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.nn.Module] = {}
    training: dict[str, dict] = {}
    if cfg.method == "translate":
        for held, missing in sorted({(tuple(h), tuple(m)) for _, h, m in todo if m}):
            group = [c for c, h, m in todo if tuple(h) == held and tuple(m) == missing]
            translators[(held, missing)], training[f"{'+'.join(held)}->{'+'.join(missing)}"] = _translator(
                cfg, loaded, group, list(held), list(missing), device)

    written = kept = filled = 0
    note = f"asyndgan completion ({cfg.method}) run {loaded.run_id} step {loaded.step}"
    for case, held, missing in tqdm(todo, desc=f"complete ({cfg.method})", unit="case", disable=not cfg.progress,
                                    dynamic_ncols=True):
        if (cfg.out / case.name).exists():
            kept += 1
            continue
        vol = sources.read_volume(case, i2d.stored_size, i2d.num_classes)
        inside = brain_inside(vol)
        fills: dict[str, np.ndarray] = {}
        if missing and cfg.method == "labels":
            fake = volume_images(loaded, vol, device, cfg.batch_size)  # [C, X, Y, Z]
            fills = {m: fake[list(i2d.modalities).index(m)] for m in missing}
        elif missing:
            fills = _translate_case(cfg, translators[(tuple(held), tuple(missing))], vol, held, missing, device)
        _write_case(cfg.out, case, vol, inside, fills, header, note)
        written += 1
        filled += len(fills)
    summary = {"out": str(cfg.out), "method": cfg.method, "written": written, "kept": kept,
               "volumes_filled": filled, "translators": training, "seconds": round(time.monotonic() - started, 1)}
    log.info("completed %d cases (%d kept) into %s in %.1f s", written, kept, cfg.out, summary["seconds"])
    return summary


def _brain_maps(loaded: LoadedGenerator, cases: list[brats.Case]) -> np.ndarray:
    """uint8 [n, S, S]: the label map of every axial slice with brain, over `cases` (the site's own)."""
    i2d = loaded.model.image2d
    parts = []
    for case in cases:
        maps = sources.read_volume(case, i2d.stored_size, i2d.num_classes).maps
        parts.append(maps[maps.reshape(len(maps), -1).any(axis=1)])
    return np.concatenate(parts) if parts else np.zeros((0, i2d.stored_size, i2d.stored_size), np.uint8)


def _translator(cfg: CompleteConfig, loaded: LoadedGenerator, group: list[brats.Case], held: list[str],
                missing: list[str], device: torch.device) -> tuple[torch.nn.Module, dict]:
    name = f"{'+'.join(held)}-to-{'+'.join(missing)}"
    path = cfg.out / ".translators" / f"{name}.safetensors"  # hidden: not a case folder
    expected = {"held": held, "missing": missing, "generator_weights": loaded.weights_digest,
                "translate": json.loads(cfg.translate.model_dump_json()), "cases": sorted(c.name for c in group)}
    net = load_translator(path, cfg.translate, held, missing, expected)
    if net is not None:
        log.info("translator %s: kept %s", name, path)
        return net.to(device), {"kept": str(path)}
    maps = _brain_maps(loaded, group)
    log.info("translator %s: learning from synthetic slices of %d label maps of %d cases", name, len(maps), len(group))
    t0 = time.monotonic()
    net, info = train_translator(loaded, maps, held, missing, cfg.translate, device, progress=cfg.progress)
    info["seconds"] = round(time.monotonic() - t0, 1)
    info["label_maps"] = len(maps)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_translator(path, net, expected)
    except OSError as exc:
        raise write_error(f"translator {name}", cfg.out, exc) from None
    log.info("translator %s: L1 %.4f -> %.4f in %.0f s", name, info["first_l1"], info["final_l1"], info["seconds"])
    return net, info


def _translate_case(cfg: CompleteConfig, net: torch.nn.Module, vol: sources.Volume, held: list[str],
                    missing: list[str], device: torch.device) -> dict[str, np.ndarray]:
    """Missing modalities [X, Y, Z] in [-1, 1] from the case's own held images."""
    size = vol.maps.shape[-1]
    volumes = [brats.normalise(np.asarray(vol.images[m].dataobj, dtype=np.float32), *cfg.clip_percentiles)
               for m in held]
    idx = np.flatnonzero(vol.maps.reshape(vol.maps.shape[0], -1).any(axis=1))
    pred = apply_translator(net, to_slices(volumes, idx, size), device, cfg.batch_size)
    out = from_slices(pred, vol.seg.shape, idx)
    return {m: out[i] for i, m in enumerate(missing)}


def _write_case(out: pathlib.Path, case: brats.Case, vol: sources.Volume, inside: np.ndarray,
                fills: dict[str, np.ndarray], header: dict, note: str) -> None:
    present = brats.case_image_files(case)
    reference = next(iter(vol.images.values()))
    record = {"synthetic": sorted(f"{case.name}{case.scheme.sep}{case.scheme.files[m]}.nii.gz" for m in fills),
              "real": sorted([p.name for p in present.values()] + [case.files["seg"].name]),
              "synthetic_modalities": sorted(fills), "method": header["method"], "generator": header["generator"],
              "case": case.name}
    try:
        with writers.CaseFolder(out, case.name) as tmp:
            for path in [*present.values(), case.files["seg"]]:
                shutil.copyfile(path, tmp / path.name)  # the site's own files, byte for byte
            for m, image in fills.items():
                name = f"{case.name}{case.scheme.sep}{case.scheme.files[m]}.nii.gz"
                writers.save_nifti(tmp / name, writers.to_intensity(image, inside), reference, note)
            writers.write_json(tmp / SIDECAR, record)
    except OSError as exc:
        raise write_error(f"case {case.name}", out, exc) from None

