"""The model side of scoring: :class:`Predictor` (batched forward) and logits -> probabilities.

Probabilities are the model's logits divided by model.json's ``temperature`` (see
:func:`probs_for_task`), then softmax (sigmoid for multi-label), exactly as the
``predictions_*.csv`` of ``medres train``; the ``pred`` column then applies model.json's
``threshold`` (:mod:`medres.score.ledger`).

On a CPU the model's torch thread count is measured, not assumed (:class:`ThreadTuner`): with
every core busy elsewhere (a shared machine, a decode thread), an OpenMP team as wide as the
cores waits at each op's barrier for a preempted thread, and a 2-thread ResNet-18 forward on
28 px batches was measured 3-5x slower than a 1-thread one (benchmarks/RESULTS.md, issue 18);
on an idle machine 2 threads are ~1.5x faster. The outputs do not depend on the thread
count (checked bitwise for ResNet-18 2D/3D fp32, ``tests/unit/test_score_threads.py``).

Imports: numpy, :mod:`medres.errors`; torch lazily.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from medres.errors import ConfigError


class ThreadTuner:
    """The torch thread count of each CPU forward pass, chosen from measured batches.

    ``most`` is the count the caller allows (all cores less the decode processes). Batch 0
    warms up at ``most``; batches 1 and 2 are timed at ``most`` and at 1 thread; then the
    faster (per item, a running mean of the last measurements) is used, and every
    ``every`` batches the other one is timed again, so that the choice follows the load of
    the machine. ``most <= 1`` always gives 1.
    """

    def __init__(self, most: int, every: int = 16) -> None:
        self.most, self.every = max(1, int(most)), max(2, int(every))
        self.calls = 0
        self.per_item: dict[int, float] = {}

    @property
    def best(self) -> int:
        """The thread count measured fastest so far (``most`` until both were timed)."""
        if len(self.per_item) < 2:
            return self.most
        return min(self.per_item, key=lambda t: (self.per_item[t], -t))

    def pick(self) -> int:
        """The thread count for the next batch."""
        if self.most <= 1:
            return 1
        n = self.calls
        if n <= 1:
            return self.most
        if n == 2:
            return 1
        best = self.best
        if n % self.every == 0:  # re-check the other count: the machine's load changes
            return 1 if best == self.most else self.most
        return best

    def record(self, threads: int, seconds: float, items: int) -> None:
        """Account one forward pass of ``items`` items at ``threads`` threads."""
        self.calls += 1
        if self.calls == 1 or items <= 0:
            return  # the warm-up batch (first-call allocations, kernel selection)
        v = seconds / items
        old = self.per_item.get(threads)
        self.per_item[threads] = v if old is None else 0.5 * (old + v)


class Predictor:
    """Batched forward: ``inference_mode``, channels_last, autocast by ``precision``.

    ``precision``: ``fp32`` (exact; no autocast), ``bf16`` (autocast to bfloat16 on CPU
    or CUDA), ``fp16`` (CUDA autocast), ``auto`` (fp16 AMP on CUDA, fp32 on CPU: bf16 on
    CPU is opt-in because it changes probabilities by up to ~1e-2, see the benchmark).
    ``to_probs`` maps logits to probabilities (the model's task decides how).
    ``tune_threads`` (CPU only): pick the torch thread count per batch, at most the count
    set when the first batch arrives, with a :class:`ThreadTuner`.
    """

    PRECISIONS = ("auto", "fp32", "bf16", "fp16")

    def __init__(
        self,
        model: Any,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        to_probs: Callable[[Any], Any] | None = None,
        channels_last: bool = True,
        dims: int | None = None,
        tune_threads: bool = True,
    ) -> None:
        import torch

        if precision not in self.PRECISIONS:
            raise ConfigError(
                f"--precision {precision!r}: unknown; choose one of {', '.join(self.PRECISIONS)}"
            )
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if precision == "auto":
            precision = "fp16" if cuda else "fp32"
        if precision == "fp16" and not cuda:
            raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.precision = precision
        self.model = model.to(self.device).eval()
        self.channels_last = channels_last
        self._formatted: set[int] = set()
        self.to_probs = to_probs or default_to_probs
        # CPU: the thread count per batch is measured (ThreadTuner), made on first use
        self.tune_threads = tune_threads and self.device.type == "cpu"
        self.tuner: ThreadTuner | None = None
        if dims in (2, 3):  # convert the weights now, not inside the first timed batch
            self._format_model(dims + 2)

    def _memory_format(self, ndim: int) -> Any:
        import torch

        if not self.channels_last:
            return None
        return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)

    def _format_model(self, ndim: int) -> Any:
        fmt = self._memory_format(ndim)
        if fmt is not None and ndim not in self._formatted:
            self.model = self.model.to(memory_format=fmt)
            self._formatted.add(ndim)
        return fmt

    def _autocast(self) -> Any:
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def __call__(self, batch: Any) -> np.ndarray:
        """Probabilities (B, K) of a (B, C, *spatial) batch: a numpy array or a tensor
        (already on the device when the batched preprocessing made it there)."""
        import torch

        if torch.is_tensor(batch):
            x = batch.to(torch.float32)
        else:
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        fmt = self._format_model(x.ndim)
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        with torch.inference_mode(), self._autocast():
            logits = self._forward(x)
        probs = self.to_probs(logits.float())
        return probs.detach().cpu().numpy().astype(np.float64)

    def _forward(self, x: Any) -> Any:
        """The model on ``x``; on CPU at the thread count the tuner picks (timed)."""
        import torch

        if not self.tune_threads:
            return self.model(x)
        if self.tuner is None:
            self.tuner = ThreadTuner(torch.get_num_threads())
        threads, before = self.tuner.pick(), torch.get_num_threads()
        if before != threads:
            torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            out = self.model(x)
            self.tuner.record(threads, time.perf_counter() - t0, int(x.shape[0]))
        finally:
            if before != threads:  # the process's setting is the caller's
                torch.set_num_threads(before)
        return out


def default_to_probs(logits: Any) -> Any:
    """Softmax over classes (binary models have two outputs, ``prob_0, prob_1``)."""
    import torch

    if logits.ndim == 2 and logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def _sigmoid(logits: Any) -> Any:
    import torch

    return torch.sigmoid(logits)


class _Scaled:
    """``to_probs(logits / temperature)``: a picklable temperature-scaled mapping."""

    def __init__(self, to_probs: Callable[[Any], Any], temperature: float) -> None:
        self.to_probs, self.temperature = to_probs, float(temperature)

    def __call__(self, logits: Any) -> Any:
        return self.to_probs(logits / self.temperature)


def probs_for_task(task: str, temperature: float = 1.0) -> Callable[[Any], Any]:
    """Logits -> probabilities as training does: sigmoid for multilabel, else softmax.

    ``temperature`` (model.json's, fitted on validation by ``medres train``) divides the
    logits first; 1 (the default, and what an older model.json without one means) leaves
    them as they are.
    """
    base = _sigmoid if task == "multilabel" else default_to_probs
    if not temperature > 0:
        raise ConfigError(f"temperature {temperature}: must be > 0; re-save the model dir")
    return base if temperature == 1.0 else _Scaled(base, temperature)
