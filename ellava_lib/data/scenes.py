"""Synthetic scenes: objects on a 3x3 grid, rendered deterministically to small RGB images.

Every object sits in one grid cell, and a cell is exactly one vision patch (``CELL`` pixels), so the
vision tower can read attributes patch by patch and the *language model* has to do the binding,
relations, counting, reading and arithmetic. Rendering is pure numpy (no fonts, no Pillow drawing), so
images are byte-identical across library versions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

GRID = 3  # cells per side
CELL = 16  # pixels per cell == vision patch size
IMAGE_SIZE = GRID * CELL

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
BACKGROUND = (24, 24, 28)
GLYPH_COLOUR = (240, 240, 240)

# 3x5 bitmap font (rows top to bottom, '#' = ink), drawn at 2x scale.
FONT: dict[str, tuple[str, ...]] = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    "A": (".#.", "#.#", "###", "#.#", "#.#"), "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": ("###", "#..", "#..", "#..", "###"), "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"), "F": ("###", "#..", "##.", "#..", "#.."),
    "G": ("###", "#..", "#.#", "#.#", "###"), "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "K": ("#.#", "##.", "#..", "##.", "#.#"),
    "L": ("#..", "#..", "#..", "#..", "###"), "M": ("#.#", "###", "###", "#.#", "#.#"),
    "N": ("##.", "#.#", "#.#", "#.#", "#.#"), "O": (".#.", "#.#", "#.#", "#.#", ".#."),
    "P": ("##.", "#.#", "##.", "#..", "#.."), "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": (".##", "#..", ".#.", "..#", "##."), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"), "W": ("#.#", "#.#", "###", "###", "#.#"),
    "X": ("#.#", "#.#", ".#.", "#.#", "#.#"), "Y": ("#.#", "#.#", ".#.", ".#.", ".#."),
}
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "box", "car", "hat", "pen", "cup", "bus", "map", "egg", "fox", "owl", "bee",
    "ant", "pig", "cow", "key", "bed", "toy", "sky", "ice", "tea", "art",
)
GLYPHS: tuple[str, ...] = tuple(FONT)


@dataclass(frozen=True)
class Obj:
    """One object in a cell: a coloured shape, or a glyph (``shape == "glyph"``, ``text`` set)."""

    row: int
    col: int
    colour: str
    shape: str
    text: str = ""

    @property
    def name(self) -> str:
        """Spoken name, e.g. ``"red circle"`` or ``"number 7"``."""
        if self.shape == "glyph":
            return f"number {self.text}" if self.text.isdigit() else f"letter {self.text.lower()}"
        return f"{self.colour} {self.shape}"

    @property
    def where(self) -> str:
        """Cell name: ``"top left"`` ... ``"center"`` ... ``"bottom right"``."""
        if (self.row, self.col) == (1, 1):
            return "center"
        return f"{ROWS[self.row]} {COLS[self.col]}"


@dataclass(frozen=True)
class Scene:
    """A set of objects on the grid plus how the image is degraded (``""``, ``"blank"``, ``"blur"``)."""

    objects: tuple[Obj, ...]
    degrade: str = ""
    noise_seed: int = 0
    jitter: tuple[tuple[int, int], ...] = field(default=())

    def at(self, row: int, col: int) -> Obj | None:
        """The object in cell (row, col), if any."""
        for o in self.objects:
            if (o.row, o.col) == (row, col):
                return o
        return None

    def key(self) -> str:
        """Canonical text of the scene content, used for hashing items into splits."""
        objs = ";".join(f"{o.row}{o.col}{o.colour}{o.shape}{o.text}" for o in sorted(self.objects, key=_cell))
        return f"{objs}|{self.degrade}"


def _cell(o: Obj) -> tuple[int, int]:
    return (o.row, o.col)


def sample_cells(rng: random.Random, k: int) -> list[tuple[int, int]]:
    """k distinct cells, in row-major order."""
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], k)
    return sorted(cells)


def sample_shapes(rng: random.Random, k: int, *, unique_shapes: bool = False,
                  unique_names: bool = True) -> tuple[Obj, ...]:
    """k coloured shapes in distinct cells. ``unique_names``: no two objects share colour *and* shape;
    ``unique_shapes``: no two share a shape (so "the circle" is unambiguous)."""
    cells = sample_cells(rng, k)
    shapes = rng.sample(SHAPES, k) if unique_shapes else [rng.choice(SHAPES) for _ in range(k)]
    objs: list[Obj] = []
    used: set[tuple[str, str]] = set()
    for (r, c), shape in zip(cells, shapes):
        colour = rng.choice(list(COLOURS))
        while unique_names and (colour, shape) in used:
            colour = rng.choice(list(COLOURS))
        used.add((colour, shape))
        objs.append(Obj(r, c, colour, shape))
    return tuple(objs)


def make_scene(rng: random.Random, objects: tuple[Obj, ...], degrade: str = "") -> Scene:
    """Attach rendering randomness (pixel noise seed, per-object jitter) to a set of objects."""
    jitter = tuple((rng.randint(-1, 1), rng.randint(-1, 1)) for _ in objects)
    return Scene(tuple(sorted(objects, key=_cell)), degrade, rng.randrange(2**31), jitter)


def _shape_mask(shape: str, size: int = CELL) -> np.ndarray:
    """Boolean ``size x size`` mask of a shape centred in the cell (radius ~ 5.5 px)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    r = 5.5
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (np.abs(x) <= r - 1) & (np.abs(y) <= r - 1)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= r + 0.5
    if shape == "cross":
        return ((np.abs(x) <= 1.5) & (np.abs(y) <= r)) | ((np.abs(y) <= 1.5) & (np.abs(x) <= r))
    if shape == "triangle":
        return (y <= r) & (y >= -r) & (np.abs(x) <= (y + r) / 2 + 0.5)
    raise ValueError(f"unknown shape {shape!r}")


def _glyph_mask(char: str, size: int = CELL) -> np.ndarray:
    """Boolean mask of a 3x5 glyph drawn at 2x scale (6x10 px), centred in the cell."""
    bits = np.array([[ch == "#" for ch in row] for row in FONT[char]], dtype=bool)
    big = np.kron(bits, np.ones((2, 2), dtype=bool))
    mask = np.zeros((size, size), dtype=bool)
    top, left = (size - big.shape[0]) // 2, (size - big.shape[1]) // 2
    mask[top:top + big.shape[0], left:left + big.shape[1]] = big
    return mask


_MASKS: dict[str, np.ndarray] = {}


def object_mask(o: Obj) -> np.ndarray:
    """Cached mask of an object's shape or glyph."""
    key = o.text if o.shape == "glyph" else o.shape
    if key not in _MASKS:
        _MASKS[key] = _glyph_mask(key) if o.shape == "glyph" else _shape_mask(key)
    return _MASKS[key]


def render(scene: Scene) -> Image.Image:
    """Render a scene to an ``IMAGE_SIZE``-square RGB image (uint8), with mild pixel noise.

    ``degrade == "blank"``: background only; ``"blur"``: the rendered image box-blurred with a
    ``CELL``-wide kernel, so colours survive as blobs but shapes and glyphs cannot be told apart.
    """
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUND
    if scene.degrade != "blank":
        for o, (dy, dx) in zip(scene.objects, scene.jitter or [(0, 0)] * len(scene.objects)):
            mask = np.roll(object_mask(o), (dy, dx), axis=(0, 1))
            colour = GLYPH_COLOUR if o.shape == "glyph" else COLOURS[o.colour]
            cell = img[o.row * CELL:(o.row + 1) * CELL, o.col * CELL:(o.col + 1) * CELL]
            cell[mask] = colour
    if scene.degrade == "blur":
        img = _box_blur(img, CELL // 2)
    noise = np.random.default_rng(scene.noise_seed).integers(-6, 7, size=img.shape)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8), mode="RGB")


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur with edge padding: mean over a (2r+1)^2 window."""
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        p = np.pad(img, pad, mode="edge")
        c = np.cumsum(p, axis=axis, dtype=np.float64)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        n = img.shape[axis]
        img = (np.take(c, range(k, k + n), axis=axis) - np.take(c, range(0, n), axis=axis)) / k
    return img.astype(np.float32)


def cell_labels(scene: Scene) -> tuple[list[int], list[int]]:
    """Per-cell supervision for vision pretraining, row-major over the grid.

    Returns (colour ids, kind ids): colour 0 = empty, 1.. = ``COLOURS`` order, glyphs get
    ``len(COLOURS) + 1``; kind 0 = empty, 1..5 = ``SHAPES``, then one id per glyph in ``GLYPHS``.
    Degraded images get -100 everywhere (ignored by the loss).
    """
    n = GRID * GRID
    if scene.degrade:
        return [-100] * n, [-100] * n
    colour, kind = [0] * n, [0] * n
    names = list(COLOURS)
    for o in scene.objects:
        i = o.row * GRID + o.col
        if o.shape == "glyph":
            colour[i], kind[i] = len(names) + 1, 1 + len(SHAPES) + GLYPHS.index(o.text)
        else:
            colour[i], kind[i] = 1 + names.index(o.colour), 1 + SHAPES.index(o.shape)
    return colour, kind


N_COLOUR_LABELS = len(COLOURS) + 2
N_KIND_LABELS = 1 + len(SHAPES) + len(GLYPHS)
