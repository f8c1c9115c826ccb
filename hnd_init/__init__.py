"""hnd: split-computing runtime for HND / GHND distilled R-CNN detectors.

This folder (``hnd_init/``, named so that it never shadows the installed package when
Python runs from the repository root) holds only the package root. The subpackages live in top-level
folders of the repository and are mapped in pyproject.toml:
``hnd.common`` -> ``common/``, ``hnd.proto`` -> ``proto/``, ``hnd.server`` ->
``server/``, ``hnd.edge`` -> ``edge/``, ``hnd.train`` -> ``train/``,
``hnd.bench`` -> ``bench/``.
"""

__version__ = "0.1.0"
