"""Checkpoints: reading them with clear errors, and moving weights between stages by explicit
key maps that fail loudly on anything missing, left over or of the wrong size."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from forecast_peft.errors import UserError, first_sentence, require_checkpoint
from forecast_peft.models.config import ModelConfig, backbone_diff, shipped_model
from forecast_peft.peft.freeze import peft_parameters

# Which parts of a pre-trained (MAE) model each tuning mode receives: (source prefix, target prefix).
PRETRAINED_KEY_MAP = {
    "peft": (("encoder.", "encoder."), ("decoder.", "decoder.")),
    "ft": (("encoder.", "encoder."), ("decoder.", "decoder.")),
    "baseline": (("encoder.", "encoder."),),
}
# From the target-parameter pre-training model (an MAE with prompts and adapters) into PEFT: the
# whole encoder and decoder (backbone and adapters) and the mode prompts.
TPP_KEY_MAP = (("encoder.", "encoder."), ("decoder.", "decoder."), ("mode_prompts.", "mode_prompts."))


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch could not load ``path``: a file cut short (torch's zip format without the
    directory at its end: a copy or a save that did not finish) says so, where torch's own words
    for it are an OSError or a zip reader's message; so does a file in neither of torch.save's
    formats (a zip archive, a pickle of the legacy format), for which torch tried to read a
    number from its first bytes ("invalid literal for int() with base 10"), and a `fpeft deploy`
    file under another name (torch.export's archive, with its ``archive_format`` member)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        zipped = head == b"PK\x03\x04"
        size = path.stat().st_size
        if size == 0:
            return "an empty file: a copy or a save that did not finish?"
        if zipped and not zipfile.is_zipfile(path):
            return f"cut short at {size:,} bytes: a copy or a save that did not finish?"
        if zipped:
            with zipfile.ZipFile(path) as archive:
                if any(name.endswith("/archive_format") for name in archive.namelist()):
                    return "torch's .pt2 archive, which `fpeft deploy` writes: -c takes a program by its .pt2 name"
        if not zipped and not head.startswith(b"\x80"):  # a pickle from protocol 2 on opens with 0x80
            return "not in either of torch.save's formats (a zip archive or a pickle): not a checkpoint"
    except (OSError, zipfile.BadZipFile):  # unreadable (permissions), an odd zip: torch's own words say why
        pass
    return f"{type(err).__name__}: {first_sentence(err, 120)}"


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.exists():
                path = candidate
                break
        else:
            runs = sorted(ckpt.parents[1].name for ckpt in path.glob("*/checkpoints/last.ckpt"))
            if runs:  # a sweep's folder, say
                some = ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "")
                raise UserError(f"{path} is a folder of {len(runs)} runs ({some}), not a run: give one of them")
            raise UserError(f"{path}: no checkpoints/last.ckpt in this run directory")
    require_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"{path}: not a readable checkpoint ({_unreadable(path, err)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "fpeft_stage" not in ckpt:
        raise UserError(f"{path}: not an fpeft checkpoint (no stage recorded)")
    ckpt["path"] = str(path)
    return ckpt


def stage_of(ckpt: dict) -> str:
    return ckpt["fpeft_stage"]


def require_stage(ckpt: dict, stages: tuple[str, ...], what: str, hint: str = "") -> None:
    """``hint``: what to do instead (default: the stages whose checkpoints do)."""
    if stage_of(ckpt) not in stages:
        hint = hint or f"expected one from {' or '.join(repr(s) for s in stages)}"
        raise UserError(f"{ckpt['path']}: a '{stage_of(ckpt)}' checkpoint cannot be used {what}; {hint}")


def model_config(ckpt: dict) -> ModelConfig:
    return ModelConfig.from_dict(ckpt["hyper_parameters"]["model_cfg"])


def check_compatible(ckpt: dict, cfg: ModelConfig) -> None:
    """The model about to receive the pre-trained checkpoint's weights must have its backbone sizes."""
    diff = backbone_diff(model_config(ckpt).to_dict(), cfg.to_dict())
    if diff:
        group = shipped_model_of(ckpt)
        hint = f"add model={group}" if group else "set the checkpoint's sizes with model.<key>=... overrides"
        raise UserError(f"{ckpt['path']}: incompatible sizes (checkpoint vs config: {'; '.join(diff)}); {hint}")


def shipped_model_of(ckpt: dict) -> str | None:
    """The conf/model/<name>.yaml whose backbone sizes the checkpoint has, if any."""
    return shipped_model(model_config(ckpt).to_dict())


def model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The inner network's state dict (the LightningModule stores it under ``model.``)."""
    return {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def transfer(source: dict[str, torch.Tensor], target: nn.Module, key_map, optional: set[str] = frozenset()) -> int:
    """Copy tensors from ``source`` into ``target`` through ``key_map`` prefixes.

    Every target tensor under a mapped prefix must come from the source with the same shape,
    unless it is in ``optional`` (parameters PEFT adds, absent from a plain MAE); every source
    tensor under a mapped prefix must have a place in the target. Returns the count copied.

    Raises:
        UserError: naming the first tensor that is missing, left over or of another shape.
    """
    dst = target.state_dict()
    loaded = {}
    for src_prefix, dst_prefix in key_map:
        for dk, value in dst.items():
            if not dk.startswith(dst_prefix):
                continue
            sk = src_prefix + dk[len(dst_prefix) :]
            if sk not in source:
                if dk in optional:
                    continue
                raise UserError(f"checkpoint lacks '{sk}' needed for '{dk}'")
            if source[sk].shape != value.shape:
                raise UserError(
                    f"incompatible sizes for '{dk}': checkpoint {tuple(source[sk].shape)}, model {tuple(value.shape)}"
                )
            loaded[dk] = source[sk]
        for sk in source:
            if sk.startswith(src_prefix) and dst_prefix + sk[len(src_prefix) :] not in dst:
                raise UserError(f"checkpoint tensor '{sk}' has no place in the target model")
    missing, unexpected = target.load_state_dict(loaded, strict=False)
    assert not unexpected, unexpected  # every key came from the target's own state dict
    return len(loaded)


def peft_added_names(model: nn.Module) -> set[str]:
    """State-dict names of the prompt and adapter parameters of ``model``."""
    ids = {id(p) for p in peft_parameters(model)}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def load_pretrained(ckpt: dict, target: nn.Module, mode: str) -> int:
    """Pre-trained MAE (or TPP) weights into a tuning model of ``mode``."""
    require_stage(ckpt, ("pretrain",), "as --pretrained")
    return transfer(model_state(ckpt), target, PRETRAINED_KEY_MAP[mode], optional=peft_added_names(target))
