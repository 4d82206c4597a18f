"""Evaluation: predictions in, ``metrics.json`` + ``report.html`` out (``medres evaluate``).

Modules: ``config`` (:class:`EvaluateConfig`, the settings, validated once), ``table``
(one predictions CSV and its cells), ``inputs`` (run dir or predictions CSV ->
typed :class:`Predictions`), ``metrics`` (AUC, DeLong, bootstrap, calibration on arrays),
``comparisons`` (paired DeLong tests, Holm), ``subgroups`` (metrics per ``--by`` value),
``evaluate`` (the run: evaluators per task, metrics.json; :func:`run_evaluate`) and
``report`` (the self-contained HTML page from a metrics dict).

May import: the core, :mod:`medres.dataset` and :mod:`medres.models.modeldir` (model.json
as a typed ``ModelMeta``); never torch, train, score or the CLI. Entry point for callers::

    from medres.evaluate.evaluate import EvaluateConfig, run_evaluate
"""
