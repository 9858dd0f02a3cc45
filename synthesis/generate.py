"""`asyndgan generate`: a trained generator + label maps -> a labelled synthetic data set, with provenance.

    generator   --checkpoint (a server checkpoint or run folder) or --generator (a published .safetensors)
    label maps  --label-maps SRC (a BraTS tree, or 2-D mask files), or the run's own bank (label_sources.py)
    output      nifti: whole cases in BraTS layout, every axial slice generated (tumour-free ones too, so that a
                downstream model sees healthy anatomy), put back at the volume's in-plane size with the source's
                affine and header, seg copied; png: image/mask files for the image-folder loader (generators
                with one grey or three RGB channels); arrays: the arrays layout (any channels)
The generator runs at the run's stored size (the size the sites' label maps were made at); its layers are
convolutional, so a load_size larger than image_size works too. Every case or sample is written whole or not
at all (writers.py). OUT/provenance.json records the generator, the source and the settings; running again
with the same generator and settings resumes (finished cases are kept), anything else is refused.
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib
import shutil
import time
import zlib
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi
from tqdm import tqdm

from asyndgan.common.atomic import atomic_write_text
from asyndgan.common.errors import AsynDGANError, ConfigError, DataError
from asyndgan.common.families import get_family
from asyndgan.common.devices import resolve_device
from asyndgan.synthesis import label_sources as sources
from asyndgan.synthesis import writers
from asyndgan.formats.generator_file import LoadedGenerator, load_exported, load_from_checkpoint

log = logging.getLogger(__name__)
Format = Literal["nifti", "png", "arrays"]


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: pathlib.Path | None = Field(None, description="server checkpoint, or a run folder (newest one)")
    generator: pathlib.Path | None = Field(None, description="a published generator (.safetensors)")
    out: pathlib.Path
    label_maps: pathlib.Path | None = Field(None, description="BraTS tree or 2-D mask files; None: the run's bank")
    count: int | None = Field(None, ge=1, description="source cases (BraTS; each gives `samples` cases) or samples "
                              "(2-D) to write; None: all")
    format: Format | None = Field(None, description="None: nifti for BraTS, png for 1 or 3 channels, else arrays")
    device: str = "auto"
    batch_size: int = Field(16, ge=1, le=4096, description="slices through the generator at once")
    seed: int = Field(0, ge=0, description="draws from the bank and of the label-map changes (samples)")
    samples: int = Field(1, ge=1, le=16, description="synthetic cases per BraTS source case: the first from its "
                         "label maps as they are, each further one (<case>_s<k>) from its segmentation and brain "
                         "moved in plane by a random rotation (up to 10 degrees), scale (0.9-1.1) and left-right "
                         "flip, the same for every slice; its seg is the moved one")

    @model_validator(mode="after")
    def _one_generator(self) -> "GenerateConfig":
        if (self.checkpoint is None) == (self.generator is None):
            raise ValueError("give exactly one of --checkpoint and --generator")
        return self

    def sample_names(self, case: str) -> list[str]:
        return [case, *(f"{case}_s{k}" for k in range(1, self.samples))]


def load_generator(cfg: GenerateConfig) -> LoadedGenerator:
    return load_from_checkpoint(cfg.checkpoint) if cfg.checkpoint is not None else load_exported(cfg.generator)


@torch.no_grad()
def synthesise(loaded: LoadedGenerator, maps: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    """float32 [n, C, S, S] in [-1, 1]: G's images for label maps uint8 [n, S, S], `batch_size` at a time."""
    family = get_family(loaded.model.family)
    out = []
    for i in range(0, len(maps), batch_size):
        part = torch.from_numpy(np.ascontiguousarray(maps[i:i + batch_size]))
        x = family.condition(loaded.model, part, len(part))  # one-hot [b, K, S, S], as in training
        out.append(loaded.generator(x.to(device)).float().cpu())
    if not out:
        return np.zeros((0, len(loaded.model.image2d.modalities), *maps.shape[1:]), np.float32)
    return torch.cat(out).numpy()


def _version() -> str:
    try:
        return version("asyndgan")
    except PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _default_format(kind: str, modalities: list[str]) -> str:
    if kind == "brats":
        return "nifti"
    return "png" if modalities in (["gray"], ["r", "g", "b"]) else "arrays"


def _check_format(fmt: str, kind: str, modalities: list[str]) -> None:
    if fmt == "nifti" and kind != "brats":
        raise ConfigError("--format nifti writes whole 3-D cases and needs a BraTS tree as --label-maps; these label "
                          "maps are 2-D (use png or arrays)")
    if fmt != "nifti" and kind == "brats":
        raise ConfigError(f"--format {fmt} takes 2-D label maps; from a BraTS tree the output is whole cases "
                          "(--format nifti)")
    if fmt == "nifti":
        from asyndgan.common.config import BRATS_MODALITIES

        odd = [m for m in modalities if m not in BRATS_MODALITIES]
        if odd:
            raise ConfigError(f"the generator emits {modalities}; BraTS cases need t1, t1ce, t2 or flair channels")
    if fmt == "png" and modalities not in (["gray"], ["r", "g", "b"]):
        raise ConfigError(f"--format png holds one grey or three RGB channels; the generator emits {modalities} "
                          "(use --format arrays)")


def _start_output(out: pathlib.Path, header: dict, whole: bool) -> bool:
    """Make `out` ready; True when it already holds this very output, complete (arrays) or partly (resume).
    A folder with other content is refused rather than mixed with."""
    record = out / "provenance.json"
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        keys = ("generator", "label_maps", "format", "count", "seed", "samples")
        ours = {k: header.get(k) for k in keys}
        theirs = {k: previous.get(k) for k in keys}
        if _comparable(ours) != _comparable(theirs):
            raise ConfigError(f"{out} holds synthetic data from another generator, source or settings "
                              f"({record}); choose a new --out")
        log.info("%s holds part of this output already; finished cases are kept", out)
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not empty and holds no asyndgan synthetic output; choose a new or empty --out")
    if not whole:  # a whole-set output (arrays) appears at the end, by rename
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(header, indent=2))
    return False


def _comparable(h: dict) -> str:
    g = dict(h.get("generator") or {})
    g.pop("file", None)  # the same generator may be read from a checkpoint or from its export
    if isinstance(g.get("model"), dict):  # a field added since with its default is the same model
        from asyndgan.common.config import ModelConfig

        try:
            g["model"] = ModelConfig.model_validate(g["model"]).model_dump(mode="json")
        except ValueError:
            pass  # not a model this version reads: compared as written, so it differs
    return json.dumps({**h, "generator": g}, sort_keys=True)


def run(cfg: GenerateConfig) -> dict:
    started = time.monotonic()
    device = resolve_device(cfg.device)
    loaded = load_generator(cfg)
    loaded.generator.to(device)
    model = loaded.model
    i2d = model.image2d
    size = i2d.stored_size
    if size % 4 or (i2d.generator == "unet" and size % 2 ** i2d.unet_depth):
        raise ConfigError(f"the run's stored size {size} does not suit its {i2d.generator} generator")
    kind = sources.describe(cfg.label_maps) if cfg.label_maps is not None else "bank"
    modalities = list(i2d.modalities)
    fmt = cfg.format or _default_format(kind, modalities)
    _check_format(fmt, kind, modalities)
    header = {
        "synthetic": True,
        "generator": loaded.provenance(),
        "label_maps": "bank" if kind == "bank" else str(cfg.label_maps.resolve()),
        "format": fmt, "count": cfg.count, "seed": cfg.seed, "asyndgan_version": _version(), "created": _now(),
        **({"samples": cfg.samples} if cfg.samples > 1 else {}),  # outputs made before it compare as before
    }
    resumed = _start_output(cfg.out, header, whole=fmt == "arrays")
    if fmt != "arrays":
        for p in writers.remove_stale(cfg.out):
            log.warning("removed %s, left by an interrupted run", p)
    elif resumed:
        return {"out": str(cfg.out), "format": fmt, "written": 0, "kept": "all", "seconds": 0.0}
    if kind == "brats":
        written, kept = _brats(cfg, loaded, device, header)
    else:
        written, kept = _two_d(cfg, loaded, device, header, kind, fmt)
    summary = {"out": str(cfg.out), "format": fmt, "written": written, "kept": kept,
               "seconds": round(time.monotonic() - started, 1), "run_id": loaded.run_id, "step": loaded.step}
    log.info("generated %d %s into %s in %.1f s", written, "cases" if fmt == "nifti" else "samples", cfg.out,
             summary["seconds"])
    return summary


def _sample_record(header: dict, origin: dict) -> dict:
    return {"synthetic": True, "generator": header["generator"], "label_map": origin,
            "asyndgan_version": header["asyndgan_version"], "created": _now()}


def write_error(what: str, out: pathlib.Path, exc: OSError) -> AsynDGANError:
    return AsynDGANError(f"cannot write {what} in {out}: {exc.strerror or exc}; nothing of it was kept (what was "
                         "written before it is complete; run the same command again to go on)")


# ---- 3-D: whole BraTS cases -----------------------------------------------------------------------------------
def _brats(cfg: GenerateConfig, loaded: LoadedGenerator, device: torch.device, header: dict) -> tuple[int, int]:
    i2d = loaded.model.image2d
    if cfg.samples > 1 and cfg.format not in (None, "nifti"):
        raise ConfigError("--samples makes whole BraTS cases (--format nifti)")
    cases = sources.brats_cases(cfg.label_maps)[: cfg.count]
    todo = [(c, k, name) for c in cases for k, name in enumerate(cfg.sample_names(c.name))
            if not (cfg.out / name).exists()]
    note = f"asyndgan synthetic run {loaded.run_id} step {loaded.step}"
    source: sources.Volume | None = None
    for case, k, name in tqdm(todo, desc="generate", unit="case", dynamic_ncols=True):
        if source is None or source.case is not case:
            source = sources.read_volume(case, i2d.stored_size, i2d.num_classes)
        draws = np.random.default_rng([cfg.seed, zlib.crc32(case.name.encode()), k])  # the same move every run
        move = None if k == 0 else sources.draw_move(draws)
        vol = source if move is None else sources.moved_volume(source, move, i2d.stored_size, i2d.num_classes)
        fake = volume_images(loaded, vol, device, cfg.batch_size)  # [C, X, Y, Z] in [-1, 1]
        inside = brain_inside(vol)
        record = _sample_record(header, {"case": case.name, "seg": str(case.files["seg"].resolve()),
                                         **({} if move is None else {"moved": move.as_dict()})})
        first = next(iter(vol.images.values()))
        try:
            with writers.CaseFolder(cfg.out, name) as tmp:
                for c, m in enumerate(i2d.modalities):
                    file = f"{name}{case.scheme.sep}{case.scheme.files[m]}.nii.gz"
                    writers.save_nifti(tmp / file, writers.to_intensity(fake[c], inside), vol.images.get(m, first),
                                       note)
                seg = case.files["seg"]
                if move is None:
                    shutil.copyfile(seg, tmp / seg.name)
                else:  # the moved segmentation, in the source's own label values and header
                    writers.save_nifti(tmp / f"{name}{case.scheme.sep}{case.scheme.files['seg']}.nii.gz",
                                       sources.moved_seg_file(case, move), nib.load(str(seg)), note, np.uint8)
                writers.write_json(tmp / "provenance.json", record)
        except OSError as exc:
            raise write_error(f"case {name}", cfg.out, exc) from None
    return len(todo), len(cases) * cfg.samples - len(todo)


def volume_images(loaded: LoadedGenerator, vol: sources.Volume, device: torch.device, batch_size: int) -> np.ndarray:
    """float32 [C, X, Y, Z]: every axial slice with anything in its label map generated, put back at X x Y;
    slices whose map is empty (no brain) stay -1 (background)."""
    X, Y, Z = vol.seg.shape
    C = len(loaded.model.image2d.modalities)
    out = np.full((C, X, Y, Z), -1.0, np.float32)
    idx = np.flatnonzero(vol.maps.reshape(Z, -1).any(axis=1))
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        fake = torch.from_numpy(synthesise(loaded, vol.maps[part], device, batch_size))  # [k, C, S, S]: rows Y
        S = fake.shape[-1]
        fake = F.interpolate(fake, size=(Y, X), mode="bilinear", align_corners=False, antialias=S > min(X, Y))
        out[..., part] = fake.clamp_(-1, 1).numpy().transpose(1, 3, 2, 0)  # [C, X, Y, k]
    return out


def brain_inside(vol: sources.Volume) -> np.ndarray:
    """bool [X, Y, Z]: the source's brain (images above 0, holes filled per axial slice) and its tumour."""
    inside = vol.brain | (vol.seg > 0)
    for z in range(inside.shape[2]):
        if inside[..., z].any():
            inside[..., z] = ndi.binary_fill_holes(inside[..., z])
    return inside


# ---- 2-D: image/mask files or arrays --------------------------------------------------------------------------
def _two_d(cfg: GenerateConfig, loaded: LoadedGenerator, device: torch.device, header: dict, kind: str,
           fmt: str) -> tuple[int, int]:
    i2d = loaded.model.image2d
    size, k = i2d.stored_size, i2d.num_classes
    if kind == "bank":
        bank = sources.BankSource(loaded.bank_dir, loaded.bank_state, k)
        picks = bank.draw(cfg.count, cfg.seed)
        log.info("drawing %d label maps from the run's bank (%d maps of %d sites)", len(picks), bank.total,
                 len(bank.sites))

        def read(lo: int, hi: int) -> list[sources.Map2D]:
            return bank.read(picks[lo:hi], lo)
        total = len(picks)
    else:
        files = sources.mask_files(cfg.label_maps)[: cfg.count]

        def read(lo: int, hi: int) -> list[sources.Map2D]:
            return [sources.read_mask_map(n, p, size, k) for n, p in files[lo:hi]]
        total = len(files)
    if total == 0:
        raise DataError("no label maps to generate from")
    try:
        arrays = writers.ArraysWriter(cfg.out, total, len(i2d.modalities), size) if fmt == "arrays" else None
    except OSError as exc:
        raise write_error("the arrays", cfg.out, exc) from None
    written = kept = 0
    origins: list[dict] = []
    try:
        with tqdm(total=total, desc="generate", unit="image", dynamic_ncols=True) as bar:
            for lo in range(0, total, cfg.batch_size):
                items = read(lo, min(lo + cfg.batch_size, total))
                in_batch = len(items)
                if arrays is None:
                    fresh = [m for m in items if not (cfg.out / "images" / f"{m.name}.png").exists()]
                    kept += len(items) - len(fresh)
                    items = fresh
                fake = synthesise(loaded, np.stack([m.label_map for m in items]), device, cfg.batch_size) \
                    if items else None
                for j, item in enumerate(items):
                    if arrays is not None:
                        arrays.images[lo + j] = fake[j]
                        arrays.labels[lo + j] = item.label_map
                        origins.append(item.origin)
                    else:
                        image = fake[j]
                        if item.shape is not None and item.shape != image.shape[1:]:
                            t = torch.from_numpy(image)[None]
                            image = F.interpolate(t, size=item.shape, mode="bilinear", align_corners=False,
                                                  antialias=True)[0].clamp_(-1, 1).numpy()
                        try:
                            writers.write_png_pair(cfg.out, item.name, image, item.label_map, item.mask_file,
                                                   _sample_record(header, item.origin))
                        except OSError as exc:
                            raise write_error(f"sample {item.name}", cfg.out, exc) from None
                    written += 1
                bar.update(in_batch)
        if arrays is not None:
            try:
                arrays.commit(list(i2d.modalities), {**header, "label_maps_per_row": origins})
            except OSError as exc:
                raise write_error("the arrays", cfg.out, exc) from None
    except BaseException:
        if arrays is not None:
            arrays.discard()
        raise
    return written, kept
