"""Test machinery shared by tests and benchmarks (never imported by ``medres``).

``tests/`` is on ``sys.path`` while pytest runs (``tests/conftest.py``, rootdir prepend
mode), so tests import ``from helpers.models import ...``; benchmarks add the folder
themselves.
"""
