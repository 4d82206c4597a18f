"""The rows behind ``medres models``: architectures, sizes, reference cost and weights.

Pure data (no torch import), so the command answers instantly. Costs are the cached
:data:`medres.models.registry.REFERENCE_COST` figures (224x224x3 in 2D, 128^3x1 in 3D,
2 classes, standard stem; FLOPs = 2 x multiply-adds).

Owns the listing rows only. Imports core and the torch-free medres.models modules.
"""

from __future__ import annotations

from typing import Any

from medres.models.hub import cache_dir, resolve_url
from medres.models.registry import REFERENCE_COST, REFERENCE_INPUT, check_dims, list_archs
from medres.models.weights import WEIGHTS, available_weights, weights_table


def model_table(dims: int | None = None) -> list[dict[str, Any]]:
    """One row per (architecture, dims): name, dims, params, gflops, reference input, weights.

    ``weights`` lists the named sources usable for that row; in 3D, ``imagenet`` means the
    2D checkpoint inflated to 3D.
    """
    dims_list = (2, 3) if dims is None else (check_dims(dims),)
    rows = []
    for d in dims_list:
        size, channels = REFERENCE_INPUT[d]
        for arch in list_archs():
            params, gflops = REFERENCE_COST[(arch, d)]
            sources = available_weights(arch, d)
            labels = []
            for s in sources:
                spec = WEIGHTS[(arch, s)]
                suffix = " (inflated)" if spec.dims == 2 and d == 3 else ""
                labels.append(f"{s}{suffix}")
            rows.append(
                {
                    "name": arch,
                    "dims": d,
                    "params": params,
                    "gflops": gflops,
                    "reference_input": f"{channels}x" + "x".join([str(size)] * d),
                    "weights": ["none", *labels],
                }
            )
    return rows


def weight_files_table() -> list[dict[str, Any]]:
    """One row per published checkpoint with its effective URL and cache path.

    The URL honours ``MEDRES_WEIGHTS_MIRROR``/``MEDRES_WEIGHTS_URL_<KEY>``; ``cached`` says
    whether the file is already in ``$TORCH_HOME/hub/checkpoints/``.
    """
    folder = cache_dir()
    rows = []
    for row in weights_table():
        spec = WEIGHTS[(row["arch"], row["source"])]
        path = folder / spec.filename
        rows.append(
            {
                **row,
                "url": resolve_url(spec),
                "cache_path": str(path),
                "cached": path.is_file(),
                "env_key": f"MEDRES_WEIGHTS_URL_{spec.env_key}",
            }
        )
    return rows
