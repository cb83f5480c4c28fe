"""Packaging: the ``fuseserve`` package is the ``services/`` folder; its subpackages are found here.

Every folder under ``services/`` with an ``__init__.py`` ships as ``fuseserve.<path>`` (metadata,
extras and tools stay in pyproject.toml), so a new subpackage needs no list kept by hand.
"""

from pathlib import Path

from setuptools import setup

SOURCE = Path(__file__).resolve().parent / "services"


def packages() -> list[str]:
    found = []
    for init in sorted(SOURCE.rglob("__init__.py")):
        parts = init.parent.relative_to(SOURCE).parts
        found.append(".".join(("fuseserve", *parts)))
    return found


setup(packages=packages(), package_dir={"fuseserve": "services"})
