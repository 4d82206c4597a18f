"""What the message filter learns before a command prints anything: :func:`learn_identity`.

Each command passes the folders and files it was given (``--out``, a manifest, a run or
model dir, a predictions CSV). For each of them, its folder and the two above it are
looked at: a folder that holds a key and stored tokens (a dataset, a scoring run) gives
its tokens (:func:`medres.phi.learn_tokens`), and a run folder's ``pipeline.yaml`` names
its dataset (``data.manifest``), whose tokens are restored too. So ``train``, ``evaluate``
and ``export-model`` pseudonymise a folder named after a patient of their dataset in every
line they print, although they read no DICOM header. Nothing here raises: an unreadable
file only means less is learned.

Imports: ``medres.phi``; yaml lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medres.phi import learn_tokens

log = logging.getLogger(__name__)


def _dataset_of_run(folder: Path) -> Path | None:
    """The dataset folder a run's ``pipeline.yaml`` names, if it names one."""
    spec = folder / "pipeline.yaml"
    if not spec.is_file() or spec.stat().st_size > 1 << 20:
        return None
    try:
        import yaml

        data = yaml.safe_load(spec.read_text(encoding="utf-8"))
        manifest = data["data"]["manifest"]
    except Exception:  # any malformed spec: nothing learned, the command reports it itself
        return None
    return Path(str(manifest)).parent if manifest else None


def learn_identity(*paths: Path | str | None) -> None:
    """Restore the stored identity tokens of every dataset and run behind ``paths``."""
    seen: set[Path] = set()
    for p in paths:
        if p is None or str(p) == "":
            continue
        path = Path(p)
        for folder in (path, path.parent, path.parent.parent):
            try:
                if folder in seen or not folder.is_dir():
                    continue
            except OSError:
                continue
            seen.add(folder)
            learn_tokens(folder)
            dataset = _dataset_of_run(folder)
            if dataset is not None and dataset not in seen:
                seen.add(dataset)
                learn_tokens(dataset)
