"""A trained generator, from a server checkpoint or from a published export, and the export itself.

An export (`asyndgan-server export`) is what a consortium publishes: a `.safetensors` file with the generator's
weights and, in its metadata, the model settings (the ModelConfig section that every site was told, as JSON),
the run id, the step and the digest of the run's configuration. No optimiser, no label maps, no pickle: the
format holds raw tensors with dtype and shape, so reading one never runs code. Checkpoints are read with
torch.load(weights_only=True) through formats/checkpoint.py.

Both loaders check, in order: the file is readable, it is one of ours, it holds an image2d generator (the only
family generated from label maps), and the weights fit the model settings it names. Each failure is one line
naming the file. `LoadedGenerator.provenance()` is what every synthetic output records about its generator;
a checkpoint and its export give the same provenance (the weights digest included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from dataclasses import dataclass

import torch
from torch import nn

from asyndgan.formats import checkpoint as ckpt
from asyndgan.common.atomic import atomic_write
from asyndgan.common.config import ModelConfig, ServerConfig, validate_json
from asyndgan.common.errors import AsynDGANError
from asyndgan.common.families import get_family

log = logging.getLogger(__name__)

FORMAT = "asyndgan-generator"
FORMAT_VERSION = "1"
_CHECKPOINT_KEYS = ("generator", "config_json", "run_id", "step")


class GeneratorFileError(AsynDGANError):
    """A checkpoint or export that cannot be used for generation (unreadable, foreign, wrong family)."""


@dataclass
class LoadedGenerator:
    model: ModelConfig
    generator: nn.Module  # on the CPU, in eval mode
    run_id: str
    step: int
    config_digest: str
    weights_digest: str
    source: pathlib.Path
    bank_state: str | None = None  # checkpoints only: per site its label-map count and digest (JSON)
    bank_dir: pathlib.Path | None = None  # checkpoints only: RUN_DIR/bank, where those maps are stored

    def provenance(self) -> dict:
        return {"run_id": self.run_id, "step": self.step, "config_digest": self.config_digest,
                "weights_digest": self.weights_digest, "file": str(self.source),
                "model": json.loads(self.model.model_dump_json())}


def config_digest(config_json: str) -> str:
    """sha256 of the run's resolved configuration, canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(json.loads(config_json), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the weights by name (name, dtype, shape, raw bytes): the same for a checkpoint and its export."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _build(model: ModelConfig, weights: dict, where: pathlib.Path) -> nn.Module:
    if model.family != "image2d":
        raise GeneratorFileError(f"{where} holds a {model.family} generator; generation makes images from label "
                                 "maps and needs an image2d one")
    generator = get_family(model.family).build_generator(model)
    try:
        generator.load_state_dict(weights, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise GeneratorFileError(f"{where}: the weights do not fit the model settings it names "
                                 f"({_one_line(exc)})") from None
    return generator.eval()


def resolve_checkpoint(path: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """A checkpoint file, or a run folder (or its checkpoints/ folder): its newest usable checkpoint."""
    if not path.exists():
        raise GeneratorFileError(f"checkpoint {path} does not exist")
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = ckpt.load_latest(folder)
        if found is None:
            raise GeneratorFileError(f"{folder} holds no usable checkpoint (step_NNNNNNNN.pt)")
        return found
    try:
        return path, ckpt.load_checkpoint(path)
    except Exception as exc:  # torch raises many kinds for a foreign or damaged file; all mean "not usable"
        raise GeneratorFileError(f"{path} is not a readable asyndgan checkpoint ({_one_line(exc)})") from None


def load_from_checkpoint(path: pathlib.Path) -> LoadedGenerator:
    path, state = resolve_checkpoint(path)
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        raise GeneratorFileError(f"{path} is not an asyndgan server checkpoint (it lacks "
                                 f"{', '.join(k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state)})")
    try:
        cfg = validate_json(ServerConfig, state["config_json"])
    except AsynDGANError as exc:
        raise GeneratorFileError(f"{path}: its configuration does not load ({exc})") from None
    generator = _build(cfg.site.model, ckpt.published_generator(state), path)
    bank_dir = path.parent.parent / "bank" if path.parent.name == "checkpoints" else None
    return LoadedGenerator(cfg.site.model, generator, str(state["run_id"]), int(state["step"]),
                           config_digest(state["config_json"]), weights_digest(generator.state_dict()), path,
                           bank_state=state.get("bank"), bank_dir=bank_dir)


def export_generator(checkpoint: pathlib.Path, out: pathlib.Path) -> LoadedGenerator:
    """Write the generator of `checkpoint` (a file or a run folder) to `out` as safetensors, atomically."""
    from safetensors.torch import save

    loaded = load_from_checkpoint(checkpoint)
    tensors = {k: v.detach().cpu().contiguous() for k, v in loaded.generator.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": loaded.model.model_dump_json(),
                "run_id": loaded.run_id, "step": str(loaded.step), "config_digest": loaded.config_digest,
                "weights_digest": loaded.weights_digest}
    data = save(tensors, metadata=metadata)
    try:
        atomic_write(out, lambda f: f.write(data))
    except OSError as exc:
        raise AsynDGANError(f"cannot write {out}: {exc.strerror or exc}") from None
    log.info("exported the generator of %s (run %s, step %d) to %s", loaded.source, loaded.run_id, loaded.step, out)
    return loaded


def load_exported(path: pathlib.Path) -> LoadedGenerator:
    """A generator published by `export_generator`."""
    from safetensors import safe_open

    if not path.is_file():
        raise GeneratorFileError(f"generator file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for any malformed file
        raise GeneratorFileError(f"{path} is not a readable safetensors file ({_one_line(exc)})") from None
    if metadata.get("format") != FORMAT:
        raise GeneratorFileError(f"{path} is not an asyndgan generator export (its metadata says format "
                                 f"{metadata.get('format', 'nothing')!r}; expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise GeneratorFileError(f"{path} is export format version {metadata.get('format_version')!r}; this "
                                 f"asyndgan reads version {FORMAT_VERSION}")
    try:
        model = validate_json(ModelConfig, metadata["model"])
        run_id, step, digest = metadata["run_id"], int(metadata["step"]), metadata["config_digest"]
    except (KeyError, ValueError, AsynDGANError) as exc:
        raise GeneratorFileError(f"{path}: its model settings do not load ({_one_line(exc)})") from None
    generator = _build(model, tensors, path)
    return LoadedGenerator(model, generator, run_id, step, digest, weights_digest(generator.state_dict()), path)
