"""``python -m medseg``: the ``medseg`` command, where no console script is installed (a package on
``PYTHONPATH``, as on a machine that takes its packages from a folder of wheels)."""

from medseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
