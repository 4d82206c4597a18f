"""Process runtime: device resolution, torchrun DDP set-up, CPU threads, seeding, autocast.

Owns the one device-resolution function (:func:`resolve_device`) that training and
scoring share, the DDP process-group lifecycle under ``torchrun`` (ranks read from the
environment, gloo on CPU, nccl on CUDA), the CPU thread count per process, global seeding
and determinism switches, autocast contexts, and :func:`unwrap` (strip DDP/compile
wrappers). Core layer: imports only ``medres.errors``; torch is imported lazily inside
the functions, so ``import medres.runtime`` stays cheap (CLI start-up).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medres.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "DistEnv",
    "Runtime",
    "auto_threads",
    "autocast",
    "barrier",
    "cpu_has_amx",
    "dist_env",
    "init_distributed",
    "resolve_device",
    "seed_everything",
    "set_threads",
    "setup_runtime",
    "shutdown_distributed",
    "unwrap",
]


# ------------------------------------------------------------------------------------ device
def resolve_device(name: str, *, setting: str = "--device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a ``torch.device``.

    ``auto`` picks CUDA when visible, else the CPU. ``auto`` and a bare ``cuda`` take the
    GPU of this process's ``LOCAL_RANK`` (torchrun), modulo the visible device count.
    Asking for CUDA where none is visible raises :class:`ConfigError` naming ``setting``
    (the option or pipeline field the value came from).
    """
    import torch

    name = (name or "auto").strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name != "auto" and not (name == "cuda" or name.startswith("cuda:")):
        raise ConfigError(f"{setting} is {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise ConfigError(
            f"{setting} is {name}: no CUDA device is visible here; use --device cpu or auto"
        )
    if ":" in name:
        try:
            return torch.device("cuda", int(name.split(":", 1)[1]))
        except ValueError:
            raise ConfigError(f"{setting} is {name!r}; use cuda:N with a GPU index N") from None
    local = dist_env().local_rank
    return torch.device("cuda", local % max(torch.cuda.device_count(), 1))


# --------------------------------------------------------------------------------------- DDP
@dataclass(frozen=True)
class DistEnv:
    """The torchrun environment of this process (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def dist_env() -> DistEnv:
    """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from the environment."""

    def env_int(key: str, default: int) -> int:
        return int(os.environ.get(key, "") or default)

    world = env_int("WORLD_SIZE", 1)
    return DistEnv(
        rank=env_int("RANK", 0),
        world=world,
        local_rank=env_int("LOCAL_RANK", 0),
        local_world=env_int("LOCAL_WORLD_SIZE", world),
    )


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) unless already joined."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _dist_on() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _dist_on():
        import torch.distributed as dist

        dist.barrier()


def shutdown_distributed() -> None:
    """Final barrier, then leave the process group (no-op without one)."""
    if _dist_on():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


@dataclass(frozen=True)
class Runtime:
    """Where this process computes and which DDP rank it is."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_runtime(device: str, *, threads: int = 0, setting: str = "--device") -> Runtime:
    """Resolve the device, pin CUDA, join DDP under torchrun and set the CPU threads.

    ``threads`` 0 means automatic on CPU (:func:`auto_threads`), torch's default on CUDA.
    """
    import torch

    env = dist_env()
    dev = resolve_device(device, setting=setting)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if env.world > 1:
        init_distributed(dev)
    set_threads(threads, dev, env.local_world)
    return Runtime(device=dev, rank=env.rank, world=env.world, local_rank=env.local_rank)


# ----------------------------------------------------------------------------------- threads
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``/``machine()``."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def auto_threads(procs_on_node: int) -> int:
    """CPU threads per process: the machine's cores shared among this node's processes.

    The count depends on the machine only, never on its momentary load: a different thread
    count changes float reductions in the last bits, so a load-dependent count made two runs
    with the same seed differ (issue #17). On a machine shared with other jobs, oversubscription
    can cost a lot (measured on 2 cores at load ~5: 6 s per epoch with one thread, 35 s with
    two); pin the count there with ``train.threads`` / ``--threads``.
    """
    import torch

    cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores) // max(procs_on_node, 1))


def set_threads(threads: int, device: torch.device, procs_on_node: int = 1) -> int:
    """Set torch's intra-op threads (``threads`` or automatic on CPU); returns the count set, 0 = unchanged."""
    import torch

    n = threads or (auto_threads(procs_on_node) if device.type == "cpu" else 0)
    if n > 0:
        torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------------- seeding
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` switches to deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------------- autocast
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (where CPU bf16 autocast pays off)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            return any(line.startswith("flags") and "amx_bf16" in line for line in fh)
    except OSError:
        return False


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------- modules
def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers."""
    from torch import nn

    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
