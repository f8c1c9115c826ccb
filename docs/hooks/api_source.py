"""MkDocs hook: let mkdocstrings find ``hnd.*`` in the repository's layout.

pyproject.toml maps the package onto top-level folders (``hnd`` -> ``hnd_init/``, ``hnd.common`` ->
``common/``, ...). Griffe, mkdocstrings' loader, reads source from a search path and cannot follow that
mapping, so this hook lays out a temporary ``hnd/`` tree of symlinks into the repository and puts it
first on the Python handler's search path. The API pages document the checked-out source.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[2]


def package_tree(into: Path) -> Path:
    """``into/hnd/...``: the package as installed, made of symlinks to the repository's folders."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in sorted(mapping.items()):  # "hnd" before "hnd.common"
        target = into.joinpath(*name.split("."))
        if name == "hnd":
            target.mkdir(parents=True)
            for item in (ROOT / folder).iterdir():
                (target / item.name).symlink_to(item)
        else:
            target.symlink_to(ROOT / folder, target_is_directory=True)
    return into


@event_priority(100)  # before mkdocstrings reads its handlers' options
def on_config(config, **kwargs):  # MkDocs event
    tmp = Path(tempfile.mkdtemp(prefix="hnd-api-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    handlers = config.plugins["mkdocstrings"].config.handlers
    python = handlers.setdefault("python", {})
    python["paths"] = [str(package_tree(tmp))]
    return config
