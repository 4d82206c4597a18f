"""Loading weights never executes pickled code, whatever torch's environment defaults say."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch

from medres.errors import WeightsError
from medres.models import read_state_dict
from medres.models import statedict as model_io


class _Payload:
    """Unpickling this creates ``marker`` (it calls ``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _tensors() -> dict[str, torch.Tensor]:
    return {"conv1.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.zeros(2)}


def _write(kind: str, path: Path, marker: Path) -> None:
    obj = {"state_dict": _tensors(), "extra": _Payload(marker)}
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle (protocol 5: STACK_GLOBAL opcodes) named .pth
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=5)


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
@pytest.mark.parametrize("force_no_weights_only", [False, True])
def test_pickle_payload_is_refused_before_loading(
    tmp_path, monkeypatch, kind, force_no_weights_only
):
    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write(kind, path, marker)
    with pytest.raises(WeightsError, match="pickled code") as exc:
        read_state_dict(path)
    assert "open" in str(exc.value) and "\n" not in str(exc.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
def test_torch_weights_only_is_the_second_guard(tmp_path, monkeypatch, kind):
    """With the opcode scan disabled, torch.load(weights_only=True) must still refuse."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(model_io, "scan_checkpoint", lambda path: None)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write(kind, path, marker)
    with pytest.raises(WeightsError, match="could not be loaded safely"):
        read_state_dict(path)
    assert not marker.exists()


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "full_model.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole nn.Module, not a state dict
    with pytest.raises(WeightsError):
        read_state_dict(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_state_dicts_load_in_both_formats(tmp_path, legacy):
    sd = {
        "module.conv1.weight": torch.randn(4, 3, 3, 3),
        "module.bn1.num_batches_tracked": torch.tensor(3),
    }
    path = tmp_path / "ok.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path, _use_new_zipfile_serialization=not legacy)
    out = read_state_dict(path)
    assert set(out) == {"conv1.weight", "bn1.num_batches_tracked"}
    assert torch.equal(out["conv1.weight"], sd["module.conv1.weight"])


def test_garbage_and_missing_files_are_weights_errors(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(WeightsError):
        read_state_dict(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"{}")
    with pytest.raises(WeightsError, match="safetensors"):
        read_state_dict(st)


@pytest.mark.parametrize("kind", ["zip", "plain"])
def test_control_the_payload_is_live(tmp_path, kind):
    """Control: an unsafe load does run the payload, so the refusals above mean something."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write(kind, path, marker)
    if kind == "zip":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert marker.exists()
