"""Dataset directory: the manifest schema and I/O, class order, and exports.

Modules: ``manifest`` (``manifest.csv`` schema, reading, writing, validation, the class
order shared by training, evaluation and the exporters) and ``export`` (MONAI datalist
and nnU-Net raw-dataset exporters, chosen by name). May import: the core only (it sits
below ingest, train, evaluate and score, which all read manifests through it).
"""
