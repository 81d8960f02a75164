"""The captioning world: 64 px scenes of 1-3 objects (size, colour, shape) whose captions name every object and, for
two objects, how they are placed ("a small red circle to the left of a large blue square").

Captions follow a small grammar with several phrasings per scene kind (``TEMPLATES``); :mod:`accord.worlds.
referee` parses them back. Some object kinds (colour + shape) and some placements (shape, relation, shape) never
occur in training: the ``heldout`` split is made of scenes that have at least one of them.

    write_world(out, train=3000, heldout=300, seed=0)  ->  out/train/*.png|txt|json, out/heldout/...

With ``counterfactuals`` each training scene also gets its counterfactual (``s00001.counterfactual.png`` + ``.txt``):
the same picture with one thing changed (:func:`counterfactual`), the shard builder's counterfactual members.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from accord.worlds.shapes import COLORS, draw_shape

SIZES = {"small": 5.0, "large": 9.0}  # radius in px at 64 px
COLOURS = {c: COLORS[c] for c in ("red", "green", "blue", "yellow", "purple")}  # the demo world's palette
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")  # objects[0] <relation> objects[1]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
HELD_OUT_OBJECTS = {("red", "square"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square")}
HELD_OUT_PLACEMENTS = {
    ("circle", "above", "square"),
    ("triangle", "left of", "circle"),
    ("square", "below", "triangle"),
}
# {o} / {o1} / {o2} / {o3}: "<size> <colour> <shape>"; {rel}: RELATION_PHRASES; {rel_it}: RELATION_PHRASES_IT
TEMPLATES = {
    1: ("a {o} on a plain background", "there is one {o} in the picture", "the image shows a single {o}"),
    2: ("a {o1} {rel} a {o2}", "there is a {o1} {rel} a {o2}", "a {o2} with a {o1} {rel_it}"),
    3: ("a {o1}, a {o2} and a {o3}", "three shapes: {o1}, {o2} and {o3}"),
}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
RELATION_PHRASES_IT = {"left of": "to its left", "right of": "to its right", "above": "above it", "below": "below it"}
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Obj:
    size: str
    colour: str
    shape: str

    def words(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    relation: str | None = None  # two objects: objects[0] <relation> objects[1]

    def held_out_parts(self) -> list[str]:
        """The held-out object kinds and placements this scene shows."""
        parts = [f"{o.colour} {o.shape}" for o in self.objects if (o.colour, o.shape) in HELD_OUT_OBJECTS]
        if self.relation is not None:
            a, b = self.objects
            if (a.shape, self.relation, b.shape) in HELD_OUT_PLACEMENTS:
                parts.append(f"{a.shape} {self.relation} {b.shape}")
        return parts

    def to_json(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        return cls(tuple(Obj(**o) for o in data["objects"]), data.get("relation"))


def arrangement(scene: Scene) -> str | None:
    """Where a two-object scene's objects are, whichever is named first: the relation of the object whose words sort
    first to the other ("a small red circle to the left of a large blue square" and "a large blue square to the right
    of a small red circle" both give "right of": the square is right of the circle). A picture determines it; it
    does not determine the relation as captioned, which depends on the order the caption names the objects in.
    None without a relation, or for two objects of the same words (either could be first)."""
    if scene.relation is None:
        return None
    a, b = scene.objects
    if a.words() == b.words():
        return None
    return scene.relation if a.words() < b.words() else INVERSE[scene.relation]


def axis(scene: Scene) -> str | None:
    """Whether a two-object scene's objects are side by side ("left of") or one above the other ("above"): their
    positions, without telling them apart. None without a relation."""
    if scene.relation is None:
        return None
    return "left of" if scene.relation in ("left of", "right of") else "above"


def caption(scene: Scene, template: str) -> str:
    objs = scene.objects
    slots = {"o": objs[0].words()} if len(objs) == 1 else {f"o{i + 1}": o.words() for i, o in enumerate(objs)}
    if scene.relation is not None:
        slots |= {"rel": RELATION_PHRASES[scene.relation], "rel_it": RELATION_PHRASES_IT[scene.relation]}
    return template.format(**slots)


CHANGES = ("colour", "shape", "size", "relation")


def one_change(scene: Scene, what: str, rng: np.random.Generator) -> Scene | None:
    """``scene`` with one thing changed: one object's colour, shape or size, or the relation inverted (None for a
    scene without a relation)."""
    if what == "relation":
        return Scene(scene.objects, INVERSE[scene.relation]) if scene.relation else None
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    o = objs[i]
    options = {
        "colour": [Obj(o.size, c, o.shape) for c in COLOURS if c != o.colour],
        "shape": [Obj(o.size, o.colour, sh) for sh in SHAPES if sh != o.shape],
        "size": [Obj(sz, o.colour, o.shape) for sz in SIZES if sz != o.size],
    }[what]
    objs[i] = options[int(rng.integers(len(options)))]
    return Scene(tuple(objs), scene.relation)


def changed_captions(
    scenes: list[Scene], what: str, rng: np.random.Generator
) -> tuple[list[int], list[str], list[str]]:
    """For each scene that ``one_change(scene, what)`` applies to: its index, its caption and the changed scene's
    caption, both in one phrasing drawn from ``rng`` (a minimal pair of captions: only the change differs)."""
    rows, true, changed = [], [], []
    for k, scene in enumerate(scenes):
        other = one_change(scene, what, rng)
        if other is not None:
            template = TEMPLATES[len(other.objects)][int(rng.integers(len(TEMPLATES[len(other.objects)])))]
            rows.append(k)
            true.append(caption(scene, template))
            changed.append(caption(other, template))
    return rows, true, changed


def counterfactual(
    scene: Scene, rng: np.random.Generator, heldout: bool = False, first: str | None = None
) -> Scene | None:
    """``scene`` with one thing changed (a :data:`CHANGES` kind drawn among those that apply; ``first``: that kind
    whenever it applies), showing held-out parts only when ``heldout``: a training scene's counterfactual is a true
    pair trained on, so it may not show a combination held out of training. None when no change qualifies."""
    order = [str(w) for w in rng.permutation(CHANGES)]
    if first is not None:
        order = [first, *(w for w in order if w != first)]
    for what in order:
        other = one_change(scene, what, rng)
        if other is not None and other != scene and (heldout or not other.held_out_parts()):
            return other
    return None


def random_scene(rng: np.random.Generator, heldout: bool) -> Scene:
    """A scene of the training distribution, or (``heldout``) one with at least one held-out part."""
    while True:
        n = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
        objs = tuple(
            Obj(str(rng.choice(list(SIZES))), str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))) for _ in range(n)
        )
        scene = Scene(objs, str(rng.choice(RELATIONS)) if n == 2 else None)
        if bool(scene.held_out_parts()) == heldout:
            return scene


def layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres: two objects placed by their relation, three in a row left to right."""
    s = IMAGE_SIZE
    r = [SIZES[o.size] for o in scene.objects]
    if len(r) == 1:
        return [tuple(rng.uniform(r[0] + 2, s - r[0] - 2, size=2))]
    if len(r) == 3:
        return [(s * (i + 0.5) / 3 + rng.uniform(-2, 2), s / 2 + rng.uniform(-12, 12)) for i in range(3)]
    assert scene.relation is not None  # two objects always have one
    near, far = s * 0.27 + rng.uniform(-3, 3), s * 0.73 + rng.uniform(-3, 3)
    across = [s / 2 + rng.uniform(-10, 10) for _ in range(2)]
    first, second = {"left of": (near, far), "right of": (far, near), "above": (near, far), "below": (far, near)}[
        scene.relation
    ]
    if scene.relation in ("left of", "right of"):
        return [(first, across[0]), (second, across[1])]
    return [(across[0], first), (across[1], second)]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    s = IMAGE_SIZE
    bg = rng.integers(70, 190, size=3)
    img = Image.fromarray(np.clip(bg + rng.normal(0, 14, size=(s, s, 3)), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj, (cx, cy) in zip(scene.objects, layout(scene, rng), strict=True):
        fill = tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in COLOURS[obj.colour])
        draw_shape(draw, obj.shape, cx, cy, SIZES[obj.size], fill)
    return img


def write_world(
    out: Path,
    train: int,
    heldout: int,
    seed: int = 0,
    progress: bool = True,
    counterfactuals: bool = False,
    counterfactuals_first: str | None = None,
) -> dict[str, int]:
    """``out/train`` and ``out/heldout``: ``s*.png`` + a caption ``.txt`` (a random phrasing) + the scene ``.json``
    (the referee's ground truth). ``counterfactuals``: each training scene's counterfactual beside it, rendered from
    the same random draws (background, noise, jitter), so that the two pictures differ in the changed thing only,
    and captioned in the same phrasing; the scenes themselves are the same with and without.
    ``counterfactuals_first``: a :data:`CHANGES` kind each counterfactual makes wherever it applies (``relation``:
    every two-object scene's counterfactual has its relation inverted); the scenes are the same whatever it is."""
    if counterfactuals_first is not None and counterfactuals_first not in CHANGES:
        raise ValueError(f"counterfactuals_first: {counterfactuals_first!r} is not one of {CHANGES}")
    rng = np.random.default_rng(seed)
    jobs = [("train", i) for i in range(train)] + [("heldout", i) for i in range(heldout)]
    for split in ("train", "heldout"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for split, i in tqdm(jobs, desc="render captioning world", unit="scene", disable=not progress):
        scene = random_scene(rng, heldout=split == "heldout")
        stem = out / split / f"s{i:05d}"
        draws = rng.bit_generator.state  # where the picture's draws start: the counterfactual repeats them
        render(scene, rng).save(stem.with_suffix(".png"))
        template = str(rng.choice(TEMPLATES[len(scene.objects)]))
        stem.with_suffix(".txt").write_text(caption(scene, template) + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"scene": scene.to_json(), "held_out": scene.held_out_parts()}))
        other = (
            counterfactual(scene, np.random.default_rng([seed, i, 1]), first=counterfactuals_first)
            if counterfactuals
            else None
        )
        if split == "train" and other is not None:
            same = np.random.default_rng()
            same.bit_generator.state = draws
            cf = stem.with_name(f"{stem.name}.counterfactual")
            render(other, same).save(cf.with_name(cf.name + ".png"))
            cf.with_name(cf.name + ".txt").write_text(caption(other, template) + "\n")
    return {"train": train, "heldout": heldout}


def write_minimal_pairs(out: Path, pairs: int, seed: int = 0, heldout: bool = True) -> int:
    """``pairs`` Winoground-style minimal pairs: a scene and the same scene with one thing changed (``one_change``),
    each rendered and captioned in the same phrasing; both samples' json carry the pair id (and the scene, and its
    held-out parts). Returns the number of samples written (2 per pair)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(pairs):
        while True:
            scene = random_scene(rng, heldout=heldout)
            other = one_change(scene, str(rng.choice(CHANGES)), rng)
            if other is not None and other != scene:
                break
        template = str(rng.choice(TEMPLATES[len(scene.objects)]))
        for j, s in enumerate((scene, other)):
            stem = out / f"p{i:05d}_{j}"
            render(s, rng).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption(s, template) + "\n")
            meta = {"scene": s.to_json(), "held_out": s.held_out_parts(), "pair": f"p{i:05d}"}
            stem.with_suffix(".json").write_text(json.dumps(meta))
            written += 1
    return written
