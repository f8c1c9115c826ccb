"""Checkpoints: our format, the original HND / GHND files, fingerprints and head-only exports.

Formats read by :func:`load_checkpoint`:

* ours: ``{"format": "hnd-checkpoint", "version": 1, "model": state_dict, "fingerprint": str,
  "model_info": {...}, ...training state}``;
* a head-only export: ``{"format": "hnd-head", "model": head state_dict (full-model key
  names), "fingerprint": fingerprint of the full model it came from, "model_info": {...}}``;
* the original repository's ``save_ckpt``: ``{"model", "optimizer", "best_value",
  "lr_scheduler", "config", "args"}`` with torchvision 0.4.2 key names;
* a bare state dict (e.g. torchvision's released COCO weights);
* a neural-filter file (the original's ext checkpoint, or ours with ``format: "hnd-filter"``):
  read here, loaded with ``hnd.common.checkpoint.load_filter``.

Everything is read with ``torch.load(weights_only=True)`` and an explicit allowlist of
the few non-tensor types the original files hold; anything else is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hnd.common.entropic import EntropyBottleneck, match_prior_layout
from hnd.common.entropy_coder import EntropyCodingError
from hnd.common.errors import HndError
from hnd.common.files import atomic_write
from hnd.common.models import bottleneck_channels_of, bottleneck_type_of, model_kind
from hnd.common.neural_filter import (
    FILTER_FORMAT,
    FILTER_FORMAT_VERSION,
    FILTER_PREFIX,
    Ext4ResNet,
    filter_state_dict_from,
    is_filter_state_dict,
)
from hnd.common.split import head_prefixes, head_state_dict, is_head_key, prior_tables_of

CHECKPOINT_FORMAT = "hnd-checkpoint"
HEAD_FORMAT = "hnd-head"
FORMAT_VERSION = 1


class CheckpointError(HndError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _numpy_globals() -> list[Any]:
    # Pickles of numpy scalars (the original's best_value) name numpy.core (numpy 1.x) or
    # numpy._core (numpy 2.x) for the same functions.
    from numpy._core import multiarray

    pairs: list[Any] = [
        np.dtype,
        np.ndarray,
        type(np.dtype("float64")),
        type(np.dtype("float32")),
        type(np.dtype("int64")),
    ]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        pairs.append((multiarray.scalar, f"{module}.scalar"))
        pairs.append((multiarray._reconstruct, f"{module}._reconstruct"))
    return pairs


# What the original repository's checkpoints contain besides tensors and plain containers.
SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_globals()]


def read_file(path: str | os.PathLike) -> Any:
    """torch.load a file safely (weights_only + allowlist), turning every failure into CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc):
            # Only a blocked GLOBAL means "holds objects outside the allowlist"; anything else (e.g.
            # "Unsupported operand 84" for a text file) means the bytes are not a pickle we can read.
            blocked = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
            if blocked:
                names = _unsafe_names(path)
                raise CheckpointError(
                    f"{path}: refused, it holds objects outside the checkpoint allowlist "
                    f"({', '.join(blocked) if names == 'unlisted' else names})"
                ) from None
            detail = re.search(r"Unsupported operand \S+", str(exc))
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint ({detail.group(0) if detail else 'unreadable pickle'})"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({first})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({text})") from None
    except Exception as exc:  # the weights-only unpickler raises IndexError, KeyError, struct.error ... on garbage
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def _unsafe_names(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the file is broken beyond listing; the caller's message stands
        return "unlisted"
    allowed = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in SAFE_GLOBALS}
    return ", ".join(n for n in names if n not in allowed) or "unlisted"


# ---------------------------------------------------------------------------------------------
# State-dict keys of older code.

_EB_OLD_NAMES = {"matrices": "_matrix", "biases": "_bias", "factors": "_factor"}
_LEGACY_RENAMES = [
    # torchvision < 0.13 names (the original ran 0.4.2); newer torchvision remaps these only
    # through _load_from_state_dict when the version metadata is missing, so do it explicitly.
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
    (re.compile(r"^(roi_heads\.mask_head)\.mask_fcn(\d+)\.(weight|bias)$"), None),  # index shifts by one
    # torchdistill / kdkit ports flatten the bottleneck encoder one level.
    (re.compile(r"^(backbone\.body\.layer1\.encoder)\.(\d+\..+)$"), r"\1.encoder.\2"),
    # Entropic Student (sc2bench) files written with CompressAI >= 1.2.7: matrices.0 -> _matrix0, ...
    (
        re.compile(r"^(backbone\.body\.bottleneck_layer\.entropy_bottleneck)\.(matrices|biases|factors)\.(\d+)$"),
        lambda m: f"{m.group(1)}.{_EB_OLD_NAMES[m.group(2)]}{m.group(3)}",
    ),
]
# Entropy-bottleneck buffers whose shapes come from training (empty until update()): any shape loads.
_TABLE_KEY = re.compile(r"^backbone\.body\.bottleneck_layer\.entropy_bottleneck\._(offset|quantized_cdf|cdf_length)$")


def upgrade_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename torchvision-0.4.2-era and port-specific keys to the names our models use.

    Also strips a DataParallel ``module.`` prefix. Keys that are already current pass through.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        for pattern, replacement in _LEGACY_RENAMES:
            match = pattern.match(key)
            if match is None:
                continue
            if replacement is None:  # mask_fcn{i} -> {i-1}.0
                key = f"{match.group(1)}.{int(match.group(2)) - 1}.0.{match.group(3)}"
            elif callable(replacement):
                key = replacement(match)
            else:
                key = pattern.sub(replacement, key)
            break
        out[key] = value
    return out


def bottleneck_type_of_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``hnd``, ``entropic`` or None (a teacher) read off the keys."""
    if "backbone.body.bottleneck_layer.encoder.4.weight" in state_dict:
        return "entropic"
    return "hnd" if "backbone.body.layer1.encoder.encoder.7.weight" in state_dict else None


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, int | None]:
    """(model kind, bottleneck channels or None for a teacher) read off the keys and shapes."""
    if any(k.startswith("roi_heads.keypoint_predictor.") for k in state_dict):
        kind = "keypoint_rcnn"
    elif any(k.startswith("roi_heads.mask_predictor.") for k in state_dict):
        kind = "mask_rcnn"
    else:
        kind = "faster_rcnn"
    z = state_dict.get("backbone.body.layer1.encoder.encoder.7.weight")
    if z is None:
        z = state_dict.get("backbone.body.bottleneck_layer.encoder.4.weight")  # Entropic Student
    return kind, (int(z.shape[0]) if z is not None else None)


def _what(kind: str, channels: int | None) -> str:
    return f"{kind} teacher" if channels is None else f"{kind} student with a {channels}-channel bottleneck"


# ---------------------------------------------------------------------------------------------
# Fingerprint.


def fingerprint(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the sorted names, dtypes, shapes and bytes of a state dict.

    Independent of the file format and key order, so a model loaded from the original's
    file, from ours, or rebuilt from the same seed reports the same fingerprint.
    """
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # The array's buffer itself, not a copy of the weights (numpy's stubs do not declare ndarray a Buffer).
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Save.


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, then rename: readers never see half a file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def model_info(state_dict: Mapping[str, torch.Tensor], transform: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a weights file says about its model: kind, bottleneck channels (and type), and the transform it
    was built with (``transform_info``), so a head exported from it resizes as the server's model does."""
    kind, channels = describe_state_dict(state_dict)
    info: dict[str, Any] = {"kind": kind, "bottleneck_channels": channels}
    if bottleneck_type_of_state_dict(state_dict) == "entropic":
        info["bottleneck_type"] = "entropic"
    if transform:
        info["transform"] = transform
    return info


def transform_info(model: nn.Module) -> dict[str, Any] | None:
    """The model's GeneralizedRCNNTransform as plain data: ``{"min_size", "max_size", "image_mean",
    "image_std", "size_divisible"}`` (None for a model without one)."""
    t = getattr(model, "transform", None)
    if t is None or not hasattr(t, "min_size"):
        return None
    return {
        "min_size": int(t.min_size[-1]),
        "max_size": int(t.max_size),
        "image_mean": [float(v) for v in t.image_mean],
        "image_std": [float(v) for v in t.image_std],
        "size_divisible": int(getattr(t, "size_divisible", 32)),
    }


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> str:
    """Write ``model``'s weights and any training state (``extra``) atomically; returns the fingerprint.

    ``extra`` must hold only tensors, numbers, strings and containers (it is read back with
    ``weights_only=True``): optimizer / scheduler state dicts, epoch, config as a dict. The file's
    ``model_info`` records the model's transform (resize, normalization) beside its kind.
    """
    sd = model.state_dict()
    fields = {"model_info": model_info(sd, transform_info(model)), **extra}
    return _save_weights(path, CHECKPOINT_FORMAT, FORMAT_VERSION, sd, fingerprint(sd), **fields)


def _save_weights(
    path: str | os.PathLike,
    file_format: str,
    version: int,
    state_dict: Mapping[str, torch.Tensor],
    fp: str,
    **fields: Any,
) -> str:
    """The layout of every file hnd writes weights to (checkpoint, head export, filter): format and version,
    the weights, their fingerprint, then ``fields``; written atomically. Returns ``fp``."""
    atomic_torch_save(
        {"format": file_format, "version": version, "model": state_dict, "fingerprint": fp, **fields}, path
    )
    return fp


# ---------------------------------------------------------------------------------------------
# Load.


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read any supported checkpoint into ``{"format", "model": state_dict (current key names), ...}``.

    The original's layout gets ``format: "original"``; a bare state dict ``format: "state_dict"``.
    """
    raw = read_file(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(raw).__name__}, expected a dict)")
    if raw.get("format") in (CHECKPOINT_FORMAT, HEAD_FORMAT, FILTER_FORMAT):
        ckpt = dict(raw)
        if ckpt.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer hnd (format version {ckpt['version']})")
    elif isinstance(raw.get("model"), Mapping):
        ckpt = dict(raw, format="original")
    elif raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        ckpt = {"format": "state_dict", "model": raw}
    else:
        raise CheckpointError(f"{path}: not a model checkpoint (no 'model' state dict; keys: {sorted(raw)[:6]})")
    sd = ckpt["model"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    ckpt["model"] = upgrade_legacy_keys(sd)
    return ckpt


def _check_compatible(path: Any, sd: Mapping[str, torch.Tensor], model: nn.Module, keys: set[str] | None) -> None:
    """Say in one line why a state dict does not fit a model (kind, teacher/student, channels, keys)."""
    if is_filter_state_dict(sd):
        raise CheckpointError(f"{path}: holds only neural filter weights; name it in model.filter.checkpoint")

    want = (model_kind(model), bottleneck_channels_of(model))
    have = describe_state_dict(sd)
    have_type, want_type = bottleneck_type_of_state_dict(sd), bottleneck_type_of(model)
    if have != want or have_type != want_type:

        def what(desc: tuple[str, int | None], btype: str | None) -> str:
            return _what(*desc).replace(" student", " Entropic Student") if btype == "entropic" else _what(*desc)

        raise CheckpointError(f"{path}: holds a {what(have, have_type)}, but the model is a {what(want, want_type)}")
    model_sd = model.state_dict()
    expected = set(model_sd) if keys is None else keys
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    if unexpected and all(k.startswith(FILTER_PREFIX) for k in unexpected):
        raise CheckpointError(
            f"{path}: holds a neural filter ({FILTER_PREFIX}*), the model has none: "
            "add a model.filter section to the config"
        )
    if missing and all(k.startswith(FILTER_PREFIX) for k in missing):
        raise CheckpointError(
            f"{path}: holds no neural filter weights ({FILTER_PREFIX}*); "
            "set model.filter.checkpoint to the filter's file"
        )
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
    for k in expected:
        if tuple(sd[k].shape) != tuple(model_sd[k].shape) and not _TABLE_KEY.match(k):
            raise CheckpointError(
                f"{path}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(model_sd[k].shape)}"
            )


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, strict: bool = True, optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load a full checkpoint (ours, the original's, or a bare state dict) into ``model``.

    Returns the checkpoint dict (training state and metadata, ``model`` holding the
    upgraded state dict). With ``strict`` every key must match; otherwise keys absent
    from the file keep the model's values (e.g. a student initialised from a teacher).
    ``optional``: key prefixes that may be absent even with ``strict`` (they keep the model's
    values), e.g. a neural filter whose weights come from their own file.
    Raises CheckpointError naming the file and the problem.
    """
    ckpt = read_checkpoint(path)
    if ckpt["format"] == HEAD_FORMAT:
        raise CheckpointError(f"{path}: a head-only export; load it into the edge's Head with load_head()")
    if ckpt["format"] == FILTER_FORMAT:
        raise CheckpointError(f"{path}: holds only neural filter weights; name it in model.filter.checkpoint")
    sd = ckpt["model"]
    # An Entropic Student's prior takes the file's density-network widths (sc2bench / CompressAI files
    # use (3, 3, 3, 3); others load as saved), undone below if the file is refused.
    undo_layout = match_prior_layout(model, sd)
    try:
        absent = {k for k in model.state_dict() if k not in sd and k.startswith(optional)} if optional else set()
        if strict:
            _check_compatible(path, sd, model, None if not absent else set(model.state_dict()) - absent)
        # Check the stored fingerprint before touching the model, so a refused file leaves it as it was.
        stored = ckpt.get("fingerprint")
        if stored is not None and stored != fingerprint(sd):
            raise CheckpointError(f"{path}: weights do not match the fingerprint stored in the file (corrupted?)")
    except CheckpointError:
        undo_layout()
        raise
    model_sd = model.state_dict()
    usable = {
        k: v
        for k, v in sd.items()
        if k in model_sd and (tuple(v.shape) == tuple(model_sd[k].shape) or _TABLE_KEY.match(k))
    }
    model.load_state_dict(usable, strict=strict and not absent)
    check_prior_tables(path, model)
    return ckpt


def check_prior_tables(path: str | os.PathLike, module: nn.Module) -> None:
    """An Entropic Student's coding tables as loaded from ``path`` (any that were update()d) must be valid
    CDFs: CheckpointError naming the file, not an EntropyCodingError traceback at first use."""
    for eb in module.modules():
        if isinstance(eb, EntropyBottleneck) and eb.updated:
            try:
                prior_tables_of(eb)
            except EntropyCodingError as exc:
                raise CheckpointError(f"{path}: the entropy bottleneck's prior tables are invalid ({exc})") from None


def load_weights(path_or_url: str, model: nn.Module) -> dict[str, Any]:
    """Load full-model weights from a file or, only when given a URL, from torchvision's download cache."""
    if re.match(r"^https?://", path_or_url):
        # Only reached when a config or caller names a URL; tests never do.
        sd = torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", weights_only=True)
        ckpt: dict[str, Any] = {"format": "state_dict", "model": upgrade_legacy_keys(sd)}
        _check_compatible(path_or_url, ckpt["model"], model, None)
        model.load_state_dict(ckpt["model"])
        return ckpt
    return load_checkpoint(path_or_url, model)


# ---------------------------------------------------------------------------------------------
# Head-only export for the edge.


def export_head(path_in: str | os.PathLike, path_out: str | os.PathLike) -> str:
    """Write only the head's weights of a full student checkpoint; returns the full model's fingerprint.

    The export keeps full-model key names and carries the fingerprint of the full model,
    so an edge holding only the head still proves to the server which weights it runs.
    """
    sd, _, _ = read_student_state_dict(
        path_in, "already a head-only export", "holds a {what}; only a student can be split"
    )
    return save_head(path_out, sd, checkpoint_transform(path_in))


def save_head(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], transform: dict[str, Any] | None = None
) -> str:
    """Write the head's part of a full student's ``state_dict`` (a head-only export) with the full model's
    fingerprint and its transform; returns the fingerprint."""
    head_sd = OrderedDict((k, v) for k, v in state_dict.items() if is_head_key(k))
    info = model_info(state_dict, transform)
    return _save_weights(path, HEAD_FORMAT, FORMAT_VERSION, head_sd, fingerprint(state_dict), model_info=info)


def checkpoint_transform(path: str | os.PathLike) -> dict[str, Any] | None:
    """The transform a checkpoint's model was built with (``model_info["transform"]``), None when the file
    does not say (the original releases, files written before it was recorded)."""
    info = read_checkpoint(path).get("model_info")
    return info.get("transform") if isinstance(info, dict) else None


def read_student_state_dict(
    path: str | os.PathLike, head_only_error: str, teacher_error: str
) -> tuple[dict[str, torch.Tensor], str, int]:
    """The weights, kind and bottleneck channels of a full student checkpoint (what a head is cut from).

    CheckpointError ``PATH: head_only_error`` for a head-only export, ``PATH: teacher_error`` for a
    teacher (``{what}`` in it names the model, e.g. "faster_rcnn teacher").
    """
    ckpt = read_checkpoint(path)
    if ckpt["format"] == HEAD_FORMAT:
        raise CheckpointError(f"{path}: {head_only_error}")
    sd = ckpt["model"]
    kind, channels = describe_state_dict(sd)
    if channels is None:
        raise CheckpointError(f"{path}: {teacher_error.format(what=_what(kind, channels))}")
    return sd, kind, channels


def load_head(path: str | os.PathLike, head: nn.Module) -> str:
    """Load a head-only export (or the head part of a full checkpoint) into a Head; returns the full fingerprint."""
    ckpt = read_checkpoint(path)
    sd = ckpt["model"]
    full_fp = ckpt.get("fingerprint") if ckpt["format"] == HEAD_FORMAT else fingerprint(sd)
    if full_fp is None:
        raise CheckpointError(f"{path}: head export without a fingerprint")
    match_prior_layout(head, sd)  # an Entropic head's prior: the file's density-network widths
    expected = head_state_dict(head)
    have_kind = ckpt.get("model_info", {}).get("kind") if ckpt["format"] == HEAD_FORMAT else describe_state_dict(sd)[0]
    head_kind = getattr(head, "kind", None)
    if have_kind is not None and head_kind != have_kind:
        raise CheckpointError(f"{path}: weights of a {have_kind}, but the head belongs to a {head_kind}")
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} head keys missing, e.g. {', '.join(missing[:3])}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape) and not _TABLE_KEY.match(k):
            raise CheckpointError(f"{path}: {k} has shape {tuple(sd[k].shape)}, the head expects {tuple(v.shape)}")
    short = {}
    for full_key in expected:
        for s, f in head_prefixes(head).items():
            if full_key.startswith(f):
                short[s + full_key[len(f) :]] = sd[full_key]
                break
    head.load_state_dict(short, strict=True)
    check_prior_tables(path, head)
    return full_fp


# ---------------------------------------------------------------------------------------------
# Neural filter files (layouts: hnd.common.neural_filter)


def save_filter(path: str | os.PathLike, ext: Ext4ResNet, **extra: Any) -> str:
    """Write the filter's weights in the original's ext layout plus our metadata; returns their fingerprint.

    ``extra`` (best_value, epoch, config as a dict, ...) must be plain data (read back with weights_only).
    """
    sd = ext.state_dict()
    fields = {"threshold": ext.threshold, **extra}
    return _save_weights(path, FILTER_FORMAT, FILTER_FORMAT_VERSION, sd, fingerprint(sd), **fields)


def load_filter(path: str | os.PathLike, ext: Ext4ResNet) -> dict[str, Any]:
    """Load filter weights from any layout listed in the module docstring into ``ext`` (strict).

    Returns the checkpoint dict. Raises CheckpointError naming the file and the problem.
    """
    ckpt = read_checkpoint(path)
    sd = filter_state_dict_from(ckpt["model"])
    if not sd:
        raise CheckpointError(
            f"{path}: holds no neural filter weights (no Ext4ResNet keys, with or without the prefix {FILTER_PREFIX})"
        )
    expected = ext.state_dict()
    # num_batches_tracked is optional: BatchNorm fills it in when a file lacks it (older torch).
    required = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = sorted(required - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} neural filter keys missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} unexpected neural filter keys, e.g. {', '.join(unexpected[:3])}"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{path}: filter weight {k} has shape {tuple(v.shape)}, Ext4ResNet expects {tuple(expected[k].shape)}"
            )
    # Check the stored fingerprint first, so a refused file leaves the filter as it was.
    stored = ckpt.get("fingerprint") if ckpt.get("format") == FILTER_FORMAT else None
    if stored is not None and stored != fingerprint(sd):
        raise CheckpointError(f"{path}: filter weights do not match the fingerprint stored in the file (corrupted?)")
    ext.load_state_dict(sd, strict=False)  # missing num_batches_tracked keep 0, as BatchNorm would set
    return ckpt
