"""Dataset directory: the manifest schema and I/O, class order, and exports (MONAI datalist, nnU-Net)."""
