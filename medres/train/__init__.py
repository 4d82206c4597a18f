"""Training: manifest + pipeline spec -> a run directory (layer 4).

Modules, in pipeline order: ``spec`` (frozen pipeline dataclasses, YAML), ``resolve``
(auto choices from the manifest), ``transforms`` (MONAI array transforms + dict
wrappers), ``data`` (labels, datasets, deterministic loaders), ``engine`` (fit /
train_one_epoch / evaluate), ``checkpoint`` (state on disk, resume), ``outputs`` (history,
predictions, model dir) and ``run`` (``run_train``: the stages in sequence). May import
``medres.dataset``, ``medres.ingest`` public modules, ``medres.models`` and core
(device/DDP from ``medres.runtime``).
"""
