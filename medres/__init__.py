"""medres: medical-imaging deep learning from hospital scans to a validated model."""

__version__ = "0.1.0"

__all__ = ["__version__"]
