"""Reading weight files into state dicts without executing code.

* ``.safetensors`` are read with ``safetensors`` (no code path can execute anything).
* Anything else (``.pth``/``.pt``/``.bin``) is treated as a torch pickle. Two layers guard
  it: (1) before torch sees the file, its pickle streams (``*.pkl`` members of the zip
  format, or the leading pickles of the legacy format) are scanned opcode by opcode, and a
  reference to any callable outside ``torch.*``, ``collections.OrderedDict`` and
  ``_codecs.encode`` (or an unresolvable one) refuses the file; (2) ``torch.load`` is then
  called with ``weights_only=True`` passed explicitly, which also wins over
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (that variable only changes the default).

Owns :func:`read_state_dict` and :func:`scan_checkpoint`. Imports core and
:mod:`medres.models.modeldir` (file names) only.
"""

from __future__ import annotations

import io
import os
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from medres.errors import WeightsError
from medres.models.modeldir import MODEL_JSON, WEIGHTS_FILE

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("_codecs", "encode")}
_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")


# --- pickle pre-scan ----------------------------------------------------------------------


def _global_allowed(module: str, name: str) -> bool:
    if (module, name) in _SAFE_GLOBALS:
        return True
    return module == "torch" or module.startswith("torch.")


def _scan_pickle(stream: BinaryIO, label: str) -> Any:
    """Walk one pickle's opcodes; refuse non-torch globals. Returns the last pushed constant."""
    memo: dict[Any, Any] = {}
    pushed: list[Any] = []
    last_const: Any = None
    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                if not _global_allowed(module, attr):
                    raise WeightsError(_refusal(label, f"{module}.{attr}"))
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise WeightsError(_refusal(label, "an unresolvable global"))
                if not _global_allowed(module, attr):
                    raise WeightsError(_refusal(label, f"{module}.{attr}"))
                pushed.append(None)
            elif name.startswith("EXT"):
                raise WeightsError(_refusal(label, "a copyreg extension reference"))
            elif name in _STRING_OPS:
                pushed.append(str(arg) if not isinstance(arg, bytes) else None)
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif name in ("LONG", "LONG1", "LONG4", "INT", "BININT", "BININT1", "BININT2"):
                last_const = arg
                pushed.append(None)
            elif name not in ("PROTO", "FRAME", "STOP", "MARK"):
                pushed.append(None)
    except WeightsError:
        raise
    except Exception as exc:  # malformed pickle: let nothing through
        raise WeightsError(
            f"{label} is not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
            "re-save it with torch.save(state_dict) or convert it to .safetensors"
        ) from None
    return last_const


def _refusal(label: str, what: str) -> str:
    return (
        f"{label} contains pickled code ({what}) and was refused without loading it; only "
        "plain tensor state dicts are accepted: convert the file to .safetensors on a "
        "trusted machine"
    )


def scan_checkpoint(path: Path) -> None:
    """Refuse ``path`` if any of its pickle streams references a non-torch callable."""
    label = str(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith(".pkl")]
            if not pkls:
                raise WeightsError(
                    f"{label} is a zip file without a torch pickle; not a checkpoint"
                )
            for member in pkls:
                with zf.open(member) as fh:
                    _scan_pickle(io.BytesIO(fh.read()), f"{label}:{member}")
        return
    with open(path, "rb") as fh:
        first = _scan_pickle(fh, label)
        if first == _LEGACY_MAGIC:
            # legacy torch format: magic, protocol, sys_info, the object, storage keys
            for _ in range(4):
                _scan_pickle(fh, label)


def check_weights_file(source: str | None) -> None:
    """Fail fast on a ``--weights`` PATH that does not exist or holds pickled code.

    Named sources (``imagenet``, ``none``, ...) pass; a file is checked the way
    :func:`read_state_dict` will read it, before any planning or training starts.
    """
    from medres.models.weights import is_named_source

    if not source or is_named_source(source):
        return
    p = Path(source).expanduser()
    if p.is_dir() or p.suffix == ".safetensors":
        return  # read_state_dict resolves model dirs; safetensors hold no code
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist; check the path given to --weights")
    scan_checkpoint(p)


# --- reading weights -----------------------------------------------------------------------


def _unwrap_state_dict(obj: Any, label: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{label} holds a {type(obj).__name__}, not a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            name = str(key)
            for prefix in ("module.", "_orig_mod."):
                name = name.removeprefix(prefix)
            out[name] = value
    if not out:
        raise WeightsError(f"{label} contains no tensors; is it a model checkpoint?")
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, a torch ``.pth``/``.pt`` file or a medres model dir.

    Wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and ``module.`` prefixes (DDP,
    MedicalNet) are removed. Pickled code is refused before anything is unpickled.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / MODEL_JSON).is_file() or (p / WEIGHTS_FILE).is_file():
            p = p / WEIGHTS_FILE
        elif (p / "model" / WEIGHTS_FILE).is_file():
            p = p / "model" / WEIGHTS_FILE
        else:
            raise WeightsError(
                f"{p} is a folder without {WEIGHTS_FILE}; pass a model dir or a file"
            )
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist; check the path given to --weights")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap_state_dict(load_file(str(p), device="cpu"), str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(
                f"{p} is not a valid safetensors file ({exc}); re-export it"
            ) from None
    scan_checkpoint(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{p} could not be loaded safely ({first[:200]}); only plain tensor state dicts "
            "are accepted: convert it to .safetensors on a trusted machine"
        ) from None
    return _unwrap_state_dict(obj, str(p))
