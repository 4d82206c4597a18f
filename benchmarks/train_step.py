"""medres engine throughput vs a bare PyTorch loop, and the share of step time spent loading.

For each case (ResNet-18 2D at 224^2, ResNet-18 3D at 96^3 by default) the same model,
optimizer settings and in-memory batches are trained alternately by

* ``bare``: ``zero_grad; loss = ce(model(x), y); backward; step`` in a plain loop;
* ``medres``: :func:`medres.train.engine.train_one_epoch` (LR schedule, loss accounting,
  progress hooks, timing, accumulation/clipping/AMP branches) over the same batches,

``--repeats`` times, swapping which goes first every repeat (median samples/s of each;
target ratio >= 0.85). The standard stem
is used at every size so that small quick-run sizes time the same network shape. Then the real input
path runs: NIfTI files on disk -> medres transforms cached in memory (CacheDataset) ->
random augmentation -> DataLoader -> ``train_one_epoch``, and the engine reports the
fraction of the epoch spent waiting for batches (target <= 20%).

Usage::

    python benchmarks/train_step.py                      # 224^2 / 96^3 (slow on CPU)
    python benchmarks/train_step.py --size2d 64 --size3d 32 --batch2d 8 --batch3d 2 --steps 3
    python benchmarks/train_step.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medres.models import build_model
from medres.train.engine import (
    TrainState,
    make_loss,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from medres.train.spec import TrainSpec, TransformSpec


def _batches(dims: int, size: int, batch: int, steps: int, seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(batch, 1, *(size,) * dims, generator=g),
            "label": torch.randint(0, 2, (batch,), generator=g),
            "index": torch.arange(batch),
        }
        for _ in range(steps)
    ]


def _bare_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[dict[str, Any]]
) -> float:
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(b["image"]), b["label"])
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def _engine_state(model: nn.Module, steps: int) -> TrainState:
    spec = TrainSpec(epochs=1000, lr=1e-4, warmup_epochs=0)
    opt = make_optimizer(model, spec)
    return TrainState(
        model=model,
        optimizer=opt,
        scheduler=make_scheduler(opt, spec, steps),
        loss_fn=make_loss("binary"),
        device=torch.device("cpu"),
        task="binary",
    )


def engine_vs_bare(dims: int, size: int, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """Alternate bare and engine epochs over identical batches; median samples/s each."""
    batches = _batches(dims, size, batch, steps)
    torch.manual_seed(0)
    # One model instance trained by both loops (each with its own optimizer): two instances
    # of the same network can differ in speed by 20-30% on a CPU through where their
    # parameters land in memory (huge pages, cache aliasing), which would otherwise be
    # measured as an engine difference. What each loop does to the weights does not
    # change the work per step.
    model = build_model("resnet18", dims, 1, 2, stem="standard")
    m_bare = m_eng = model
    opt_bare = torch.optim.AdamW(m_bare.parameters(), lr=1e-4, weight_decay=1e-4)
    state = _engine_state(m_eng, steps)
    _bare_epoch(m_bare, opt_bare, batches[:1])  # warm-up both
    train_one_epoch(state, batches[:1])
    bare, eng = [], []
    n = batch * steps
    for rep in range(repeats):
        # alternate which loop goes first so drift in machine load does not favour one
        for which in ("bare", "medres") if rep % 2 == 0 else ("medres", "bare"):
            if which == "bare":
                bare.append(n / _bare_epoch(m_bare, opt_bare, batches))
            else:
                t0 = time.perf_counter()
                train_one_epoch(state, batches)
                eng.append(n / (time.perf_counter() - t0))
    b, e = statistics.median(bare), statistics.median(eng)
    return {
        "case": f"resnet18 {dims}D {size}^{dims} batch {batch}",
        "bare_samples_s": round(b, 2),
        "medres_samples_s": round(e, 2),
        "ratio": round(e / b, 3),
        "bare_all": [round(v, 2) for v in bare],
        "medres_all": [round(v, 2) for v in eng],
    }


def data_share(dims: int, size: int, batch: int, steps: int, workers: int) -> dict[str, Any]:
    """Fraction of an epoch spent waiting for batches on the cached medres input path."""
    import nibabel as nib

    from medres.train.data import EpochSampler, build_loader, make_dataset, seed_loader_epoch
    from medres.train.transforms import build_transforms

    n = batch * steps
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        items = []
        src = int(size * 1.25)  # stored images are larger than the network input: resize cached
        for i in range(n):
            p = Path(tmp) / f"{i}.nii.gz"
            nib.save(
                nib.Nifti1Image(rng.normal(0, 300, (src,) * dims).astype(np.int16), np.eye(4)), p
            )
            items.append({"image": str(p), "channels": 1, "label": i % 2, "index": i})
        spec = TransformSpec(
            dims=dims, in_channels=1, image_size=(size,) * dims, intensity="ct_window"
        )
        t0 = time.perf_counter()
        ds = make_dataset(items, build_transforms(spec, train=True), cache="memory")
        cache_s = time.perf_counter() - t0
        loader = build_loader(ds, EpochSampler(n, seed=0), batch_size=batch, workers=workers)
        torch.manual_seed(0)
        state = _engine_state(build_model("resnet18", dims, 1, 2, stem="standard"), steps)
        fracs = []
        for epoch in range(3):
            seed_loader_epoch(loader, 0, epoch, 0)
            fracs.append(train_one_epoch(state, loader)["data_wait_frac"])
    return {
        "case": f"cached input path {dims}D {size}^{dims} batch {batch} workers {workers}",
        "cache_build_s": round(cache_s, 2),
        "data_wait_frac": round(statistics.median(fracs), 4),
        "all": [round(f, 4) for f in fracs],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size2d", type=int, default=224)
    ap.add_argument("--size3d", type=int, default=96)
    ap.add_argument("--batch2d", type=int, default=16)
    ap.add_argument("--batch3d", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="batches per timed epoch")
    ap.add_argument("--repeats", type=int, default=5, help="alternating repeats (median)")
    ap.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers for the input-path test"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--skip3d", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [(2, args.size2d, args.batch2d)] + (
        [] if args.skip3d else [(3, args.size3d, args.batch3d)]
    )
    results: dict[str, Any] = {"threads": args.threads, "engine": [], "input": []}
    for dims, size, batch in cases:
        r = engine_vs_bare(dims, size, batch, args.steps, args.repeats)
        results["engine"].append(r)
        print(f"{r['case']}: bare {r['bare_samples_s']} / medres {r['medres_samples_s']} samples/s "
              f"-> ratio {r['ratio']} (target >= 0.85)", flush=True)  # fmt: skip
        d = data_share(dims, size, batch, args.steps, args.workers)
        results["input"].append(d)
        print(f"{d['case']}: waiting for data {100 * d['data_wait_frac']:.1f}% of the epoch "
              f"(target <= 20%), cache built in {d['cache_build_s']} s", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
