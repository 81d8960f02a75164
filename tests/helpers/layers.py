"""The import rules of ``src/accord``, read from the source with ``ast`` (nothing is imported):

1. **Layers.** Every room (a subpackage, or a top-level module) sits in one layer of the table in CONTRIBUTING.md; a
   module may import from its own room and from rooms in lower layers only. Rooms that share a layer do not import
   each other.
2. **No cycles** between modules, counting imports inside functions too, and the package that ``from package import
   module`` runs first (``from accord import collectives`` depends on ``accord/__init__.py``).
3. **No private names across modules**: ``from accord.x import _name`` only within module ``accord.x`` itself.
4. **Imports inside functions** only of the heavy or optional dependencies in ``LAZY`` (each with the reason), never
   of accord's own modules except the ones ``LAZY_ACCORD`` names with theirs.

``check(src, layers)`` returns one line per violation; the test asserts none (and that each rule catches a planted
violation).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

# third-party modules a function may import, and why they are not imported at the top of the module
LAZY = {
    "deepspeed": "2-4 s to import and logs while doing so; only training and export need it",
    "transformers": "seconds to import; the data workers and the scorer load it only for a tokenizer or a tower",
    "torchvision": "~1 s to import; only image decoding and resizing use it",
    "torchaudio": "starts threads at import (a forked data worker can deadlock) and loads native codecs",
    "decord": "one of three video backends; a run uses one",
    "torchcodec": "one of three video backends; needs FFmpeg's shared libraries",
    "av": "PyAV's native FFmpeg libraries, for video only",
    "cairosvg": "SVG inputs only; needs the system libcairo",
    "imageio_ffmpeg": "optional: a bundled ffmpeg binary when the system has none",
    "pyarrow": "parquet manifests only",
    "matplotlib": "~0.5 s to import; only plots need it",
    "pycocoevalcap": "the experiments extra (Java); only the captioning experiment's language metrics",
    "onnx": "the onnx extra; only accord export --onnx",
    "skimage": "the demo extra; real photos for the demo corpus",
    "wandb": "only with log.wandb; slow to import",
    "torch.utils.tensorboard": "only with log.tensorboard; imports tensorboard",
    "mlflow": "only with log.mlflow (the mlflow extra); ~1.5 s to import",
    "aiohttp": "fsspec's HTTP client: only http(s) shards and their faults; ~0.3 s to import",
    "botocore": "s3fs's client: only s3:// shards' faults, and only where the s3 extra is installed",
    "torch": "the shard builder's processes do not load torch unless they resample audio",
    "ray": "the ray extra; only build-shards --distributor ray",
}
# (importer, imported) pairs of accord modules imported inside a function, and why
LAZY_ACCORD = {
    ("accord", "accord.consistency.backbone"): "`import accord` (every data worker does) must not load torch and "
    "transformers; accord.load_backbone loads them when called",
}


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str  # module name (``from a.b import c`` names a.b.c when that is a module, else a.b)
    names: tuple[str, ...]  # names taken by ``from ... import``
    lineno: int
    in_function: bool
    package: str | None = None  # ``from a import b`` of a module a.b runs package a first: an edge for cycles


def read_layers(contributing: Path) -> list[list[str]]:
    """The layer table of CONTRIBUTING.md as module names, bottom layer first. The table is the block between the
    ``<!-- layers -->`` markers: top layer first, one layer per line, rooms (``train`` for ``accord.train``, ``accord``
    for the package itself) separated by ``|``, a comment after two spaces."""
    text = contributing.read_text()
    block = re.search(r"<!-- layers -->\s*```\w*\n(.*?)```\s*<!-- /layers -->", text, re.S)
    if block is None:
        raise ValueError(f"{contributing}: no ```...``` block between <!-- layers --> and <!-- /layers -->")
    layers = []
    for line in block.group(1).splitlines():
        rooms = line.split("  ", 1)[0].strip()
        if rooms:
            layers.append([r if r == "accord" else f"accord.{r}" for r in map(str.strip, rooms.split("|"))])
    return layers[::-1]


def module_names(src: Path) -> dict[str, Path]:
    """``accord.x.y`` -> file, for every module under ``src`` (the folder holding the ``accord`` package)."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        nested = id(node) in in_function
        if isinstance(node, ast.Import):
            found += [Import(name, a.name, (), node.lineno, nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names = tuple(a.name for a in node.names)
            targets = {f"{base}.{n}" if f"{base}.{n}" in modules else base for n in names}
            found += [
                Import(name, t, names, node.lineno, nested, base if t != base and base in modules else None)
                for t in sorted(targets)
            ]
    return found


def room_of(module: str) -> str:
    """``accord.data.loader`` -> ``accord.data``; ``accord.config`` -> itself; the package -> ``accord``."""
    return ".".join(module.split(".")[:2])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def check(src: Path, layers: list[list[str]]) -> list[str]:
    """Every violation of the four rules in the ``accord`` package under ``src``, one line each."""
    modules = module_names(src)
    layer_of = {room: i for i, rooms in enumerate(layers) for room in rooms}
    problems = [
        f"{room}: a room that is in no layer of CONTRIBUTING.md"
        for room in sorted({room_of(m) for m in modules} - set(layer_of))
    ]
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        where = f"{path.relative_to(src.parent)}"
        for imp in imports_of(name, path, modules):
            top = imp.imported.split(".")[0]
            if imp.in_function and top != "accord":
                if not any(imp.imported == k or imp.imported.startswith(k + ".") for k in LAZY):
                    problems.append(
                        f"{where}:{imp.lineno}: imports {imp.imported} inside a function; import it at "
                        "the top, or add it to LAZY with the reason"
                    )
                continue
            if top != "accord":
                continue
            target = imp.imported if imp.imported in modules else room_of(imp.imported)
            edges[name].add(target)
            if imp.package is not None and imp.package != name:
                edges[name].add(imp.package)
            if imp.in_function and (name, imp.imported) not in LAZY_ACCORD:
                problems.append(
                    f"{where}:{imp.lineno}: imports {imp.imported} inside a function (accord's modules "
                    "are imported at the top; a cycle this avoids is a layering problem)"
                )
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private and imp.imported != name:
                problems.append(f"{where}:{imp.lineno}: imports private {', '.join(private)} of {imp.imported}")
            mine, theirs = room_of(name), room_of(imp.imported)
            if mine == theirs or mine not in layer_of or theirs not in layer_of:
                continue
            if layer_of[theirs] > layer_of[mine]:
                problems.append(
                    f"{where}:{imp.lineno}: {mine} imports {imp.imported}, a higher layer "
                    f"({theirs} is above {mine} in CONTRIBUTING.md)"
                )
            elif layer_of[theirs] == layer_of[mine]:
                problems.append(
                    f"{where}:{imp.lineno}: {mine} imports {imp.imported}; rooms of one layer are independent"
                )
    for component in cycles({m: {t for t in e if t in modules} for m, e in edges.items()}):
        problems.append(f"import cycle: {' -> '.join(component)}")
    return problems
