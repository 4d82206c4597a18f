"""``python -m medres``: the same as the ``medres`` command (torchrun uses this form)."""

from medres.cli import main

if __name__ == "__main__":
    main()
