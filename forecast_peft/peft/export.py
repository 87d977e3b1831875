"""Adapter-only checkpoints: the weights a PEFT run trained (prompts, adapters, norms, biases,
heads) as safetensors, plus a JSON config naming the frozen base checkpoint they apply to."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from forecast_peft.errors import UserError

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter.json"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_adapter(
    model: nn.Module, out_dir: str | Path, base_checkpoint: str | Path, model_cfg: dict
) -> tuple[Path, int]:
    """Write the trainable tensors of a PEFT model; returns the weights file and its size in bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out_dir / WEIGHTS))
    meta = {
        "mode": "peft",
        "model": model_cfg,
        "base_checkpoint": str(Path(base_checkpoint).resolve()),
        "base_sha256": file_sha256(base_checkpoint),
        "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
    }
    (out_dir / CONFIG).write_text(json.dumps(meta, indent=1))
    return out_dir / WEIGHTS, (out_dir / WEIGHTS).stat().st_size


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The ``adapter.json`` of an adapter export, checked for the keys it must hold."""
    path = Path(adapter_dir) / CONFIG
    if not path.exists():
        raise UserError(f"{adapter_dir}: no {CONFIG}; not an adapter export")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None
    missing = [k for k in ("model", "base_checkpoint", "base_sha256") if k not in meta]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; not an fpeft adapter export")
    return meta


def find_base(adapter_dir: str | Path, candidates: Sequence[str | Path] = ()) -> Path:
    """The base checkpoint of an adapter export: the one its ``adapter.json`` records, or else
    the first of ``candidates`` (checkpoints, or folders such as a run directory to look in for
    ``*.ckpt``) with its content (sha256), for an export copied to another machine or a base
    checkpoint that moved."""
    meta = read_adapter_config(adapter_dir)
    recorded = Path(meta["base_checkpoint"])
    files = [f for c in map(Path, candidates) for f in (sorted(c.rglob("*.ckpt")) if c.is_dir() else [c])]
    for path in (recorded, *files):
        if path.is_file() and file_sha256(path) == meta["base_sha256"]:
            return path
    if candidates:
        hint = f"none given with --base has its content (sha256): {', '.join(map(str, candidates))}"
    else:
        hint = "pass the base checkpoint with --base CKPT"
    if not recorded.is_file():
        raise UserError(f"{Path(adapter_dir) / CONFIG}: its base checkpoint {recorded} does not exist; {hint}")
    raise UserError(f"{recorded}: not the base checkpoint the adapters of {adapter_dir} were trained on; {hint}")


def apply_adapter(
    adapter_dir: str | Path, model: nn.Module | None = None, bases: Sequence[str | Path] = ()
) -> nn.Module:
    """Rebuild the tuned PEFT model: the frozen base checkpoint plus the adapter-only weights.
    ``model``: a PEFT model (``configure_peft`` applied) of the export's configuration to fill in
    place instead of building one; ``bases``: where to look for the base checkpoint if it is not
    where the export recorded it (``find_base``)."""
    from forecast_peft.checkpoints import load_checkpoint, load_pretrained
    from forecast_peft.models.config import ModelConfig
    from forecast_peft.models.forecaster import build_forecaster
    from forecast_peft.peft.freeze import configure_peft

    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    base = find_base(adapter_dir, bases)
    if model is None:
        model = build_forecaster(ModelConfig.from_dict(meta["model"]), "peft")
        configure_peft(model)
    load_pretrained(load_checkpoint(base), model, "peft")
    try:
        tensors = load_file(str(adapter_dir / WEIGHTS))
    except Exception as err:  # missing, truncated or not safetensors: safetensors raises its own types
        message = f"{type(err).__name__}: {err}"
        raise UserError(f"{adapter_dir / WEIGHTS}: not readable adapter weights ({message})") from None
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name not in params or params[name].shape != value.shape:
            raise UserError(f"{adapter_dir / WEIGHTS}: tensor '{name}' does not fit the model")
        with torch.no_grad():
            params[name].copy_(value)
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise UserError(f"{adapter_dir / WEIGHTS}: holds {len(tensors)} tensors, the model trains {len(expected)}")
    return model.eval()
