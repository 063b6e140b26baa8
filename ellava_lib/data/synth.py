"""The synthetic four-benchmark suite: seeded question generators that mirror ScienceQA-IMG, VizWiz-VQA,
MM-Vet and LLaVA-Bench in answer form and metric (DESIGN section 4).

Determinism and disjoint splits: candidate ``j`` of a suite is drawn from ``random.Random(f"{seed}/{suite}/{j}")``;
its content (scene + question + answer) is hashed into 100 buckets and the bucket decides its split
(``test`` < 10 <= ``calib`` < 20 <= ``train``). A split is the first ``n`` candidates landing in it, so
splits never share an item and the same seed always gives byte-identical items.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ellava_lib.core.schema import OPTION_LETTERS, SUITES, Sample
from ellava_lib.data import scenes as sc
from ellava_lib.data.scenes import COLOURS, SHAPES, WORDS, Obj, Scene

SPLITS: tuple[str, ...] = ("train", "calib", "test")
_BUCKETS = {"test": range(0, 10), "calib": range(10, 20), "train": range(20, 100)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROPERTIES = (("hot", "cold"), ("heavy", "light"), ("soft", "hard"), ("wet", "dry"))
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


@dataclass(frozen=True)
class Item:
    """A generated item before rendering: the scene plus the Sample fields."""

    scene: Scene
    question: str
    answer: str
    category: str
    choices: tuple[str, ...] = ()
    context: str = ""
    answers: tuple[str, ...] = ()
    answerable: bool = True
    capabilities: tuple[str, ...] = ()

    def key(self) -> str:
        return "|".join([self.scene.key(), self.question, self.answer, self.context, ",".join(self.choices)])


# --------------------------------------------------------------------------- shared scene questions

def _relation_pair(rng: random.Random) -> tuple[Scene, Obj, Obj, str]:
    """A scene with an anchor object and the object directly ``rel`` it (both unique by name)."""
    while True:
        k = rng.randint(2, 5)
        objs = sc.sample_shapes(rng, k)
        rel = rng.choice(list(RELATIONS))
        dr, dc = RELATIONS[rel]
        pairs = [(a, b) for a in objs for b in objs if (b.row, b.col) == (a.row + dr, a.col + dc)]
        if pairs:
            anchor, target = rng.choice(pairs)
            return sc.make_scene(rng, objs), anchor, target, rel


def _unique_shape_scene(rng: random.Random, lo: int = 1, hi: int = 4) -> tuple[Scene, Obj]:
    objs = sc.sample_shapes(rng, rng.randint(lo, hi), unique_shapes=True)
    return sc.make_scene(rng, objs), rng.choice(objs)


def _unique_colour_scene(rng: random.Random, lo: int = 1, hi: int = 4) -> tuple[Scene, Obj]:
    """A scene whose target is the only object of its colour."""
    while True:
        objs = sc.sample_shapes(rng, rng.randint(lo, hi))
        counts = Counter(o.colour for o in objs)
        unique = [o for o in objs if counts[o.colour] == 1]
        if unique:
            return sc.make_scene(rng, objs), rng.choice(unique)


def _count_scene(rng: random.Random, lo: int = 1, hi: int = 9) -> tuple[Scene, str, int]:
    """A scene and a counting target: ``"objects"``, a colour or a shape, with its count."""
    objs = sc.sample_shapes(rng, rng.randint(lo, hi), unique_names=False)
    what = rng.choice(["objects", "colour", "shape"])
    if what == "objects":
        return sc.make_scene(rng, objs), "objects", len(objs)
    if what == "colour":
        c = rng.choice(list(COLOURS))
        return sc.make_scene(rng, objs), f"{c} objects", sum(o.colour == c for o in objs)
    s = rng.choice(SHAPES)
    return sc.make_scene(rng, objs), f"{s}s", sum(o.shape == s for o in objs)


def _word_scene(rng: random.Random) -> tuple[Scene, str]:
    """A three-letter word written across one row, plus up to two shapes elsewhere."""
    word = rng.choice(WORDS)
    row = rng.randrange(sc.GRID)
    objs = [Obj(row, c, "white", "glyph", ch.upper()) for c, ch in enumerate(word)]
    free = [(r, c) for r in range(sc.GRID) for c in range(sc.GRID) if r != row]
    for r, c in rng.sample(free, rng.randint(0, 2)):
        objs.append(Obj(r, c, rng.choice(list(COLOURS)), rng.choice(SHAPES)))
    return sc.make_scene(rng, tuple(objs)), word


def _digits_scene(rng: random.Random) -> tuple[Scene, int, int]:
    """Two digits in distinct cells (reading order = row-major), plus up to two shapes."""
    cells = sc.sample_cells(rng, 2 + rng.randint(0, 2))
    a, b = rng.randrange(10), rng.randrange(10)
    objs = [Obj(*cells[0], "white", "glyph", str(a)), Obj(*cells[1], "white", "glyph", str(b))]
    for r, c in cells[2:]:
        objs.append(Obj(r, c, rng.choice(list(COLOURS)), rng.choice(SHAPES)))
    return sc.make_scene(rng, tuple(objs)), a, b


def _options(rng: random.Random, answer: str, pool: list[str], n: int) -> tuple[tuple[str, ...], str]:
    """n shuffled options containing ``answer``; returns (options, answer letter)."""
    others = rng.sample([p for p in pool if p != answer], min(n - 1, len(pool) - 1))
    opts = others + [answer]
    rng.shuffle(opts)
    return tuple(opts), OPTION_LETTERS[opts.index(answer)]


# --------------------------------------------------------------------------- per-suite generators

def gen_sqa(rng: random.Random) -> Item:
    """ScienceQA-like: a context hint, a question, 2-5 options; the answer is the option letter."""
    kind = rng.choice(["property", "colour", "count", "spatial"])
    n = rng.randint(2, 5)
    if kind == "property":
        scene, target = _unique_shape_scene(rng, 1, 4)
        yes, no = rng.choice(PROPERTIES)
        hot = rng.sample(list(COLOURS), 3)
        context = f"In this world , {' and '.join(hot)} objects are {yes} . All other objects are {no} ."
        value = yes if target.colour in hot else no
        opts, letter = _options(rng, value, [yes, no], 2)
        return Item(scene, f"Is the {target.shape} {yes} or {no} ?", letter, kind, opts, context)
    if kind == "colour":
        scene, target = _unique_shape_scene(rng)
        opts, letter = _options(rng, target.colour, list(COLOURS), n)
        return Item(scene, f"Which colour is the {target.shape} ?", letter, kind, opts, "Look at the shapes .")
    if kind == "count":
        scene, what, k = _count_scene(rng, 1, 6)
        pool = [str(i) for i in range(0, 10)]
        opts, letter = _options(rng, str(k), pool, n)
        return Item(scene, f"How many {what} are in the picture ?", letter, kind, opts, "Count carefully .")
    scene, anchor, target, rel = _relation_pair(rng)
    pool = sorted({o.name for o in scene.objects} | {f"{c} {s}" for c in COLOURS for s in SHAPES})
    near = [o.name for o in scene.objects if o != target and o != anchor]
    extra = rng.sample([p for p in pool if p not in near and p != target.name], n - 1 - min(len(near), n - 1))
    opts = near[: n - 1] + extra + [target.name]
    rng.shuffle(opts)
    q = f"Which object is directly {rel} the {anchor.name} ?"
    return Item(scene, q, OPTION_LETTERS[opts.index(target.name)], kind, tuple(opts), "Look at where the shapes are .")


def _annotators(rng: random.Random, answer: str, alternatives: list[str], agree: tuple[int, int]) -> tuple[str, ...]:
    """Ten annotator answers: ``agree`` bounds how many give the canonical answer; the rest give
    alternatives (synonyms, near misses) or "unanswerable"."""
    k = rng.randint(*agree)
    rest = [rng.choice(alternatives + ["unanswerable"]) for _ in range(10 - k)]
    out = [answer] * k + rest
    rng.shuffle(out)
    return tuple(out)


def gen_vizwiz(rng: random.Random) -> Item:
    """VizWiz-like: short answers with 10 human answers; about a quarter of the images cannot answer."""
    kind = rng.choices(["colour", "shape", "count", "ocr", "unanswerable"], weights=[2, 2, 2, 1.5, 2.5])[0]
    if kind == "colour":
        scene, t = _unique_shape_scene(rng)
        alts = [c for c in COLOURS if c != t.colour][:2] + [f"{t.colour} colour", f"it is {t.colour}"]
        return Item(scene, f"What colour is the {t.shape} ?", t.colour, kind,
                    answers=_annotators(rng, t.colour, alts, (5, 10)))
    if kind == "shape":
        scene, t = _unique_colour_scene(rng)
        alts = [f"{t.shape} shape", f"a {t.shape}", rng.choice([s for s in SHAPES if s != t.shape])]
        return Item(scene, f"What shape is the {t.colour} object ?", t.shape, kind,
                    answers=_annotators(rng, t.shape, alts, (5, 10)))
    if kind == "count":
        scene, what, k = _count_scene(rng, 1, 9)
        alts = [NUMBER_WORDS[k], str(max(k - 1, 0)), str(k + 1)]
        return Item(scene, f"How many {what} are there ?", str(k), kind, answers=_annotators(rng, str(k), alts, (4, 9)))
    if kind == "ocr":
        scene, word = _word_scene(rng)
        alts = [word.upper(), f"{word} written", "text"]
        return Item(scene, "What word is written here ?", word, kind, answers=_annotators(rng, word, alts, (5, 10)))
    how = rng.choice(["blank", "blur", "absent"])
    if how == "absent":  # the object asked about was cropped away: no such shape in the picture
        objs = sc.sample_shapes(rng, rng.randint(1, 4), unique_shapes=True)
        missing = rng.choice([s for s in SHAPES if s not in {o.shape for o in objs}])
        scene, q = sc.make_scene(rng, objs), f"What colour is the {missing} ?"
    else:
        objs = sc.sample_shapes(rng, rng.randint(1, 4), unique_shapes=True)
        scene = sc.make_scene(rng, objs, degrade=how)
        q = rng.choice([f"What colour is the {rng.choice(SHAPES)} ?", "What word is written here ?",
                        f"What shape is the {rng.choice(list(COLOURS))} object ?"])
    alts = [rng.choice(list(COLOURS)), rng.choice(SHAPES), "nothing"]
    return Item(scene, q, "unanswerable", f"unanswerable-{how}",
                answers=_annotators(rng, "unanswerable", alts, (6, 10)), answerable=False)


def gen_mmvet(rng: random.Random) -> Item:
    """MM-Vet-like: open questions tagged with the capabilities they need (rec, ocr, spat, math)."""
    kind = rng.choice(["rec", "ocr", "spat", "math", "count"])
    if kind == "rec":
        if rng.random() < 0.5:
            scene, t = _unique_colour_scene(rng)
            return Item(scene, f"What shape is the {t.colour} object ?", t.shape, kind, capabilities=("rec",))
        scene, t = _unique_shape_scene(rng)
        return Item(scene, f"What colour is the {t.shape} ?", t.colour, kind, capabilities=("rec",))
    if kind == "ocr":
        scene, word = _word_scene(rng)
        return Item(scene, "What word is written in the image ?", word, kind, capabilities=("ocr",))
    if kind == "spat":
        scene, anchor, target, rel = _relation_pair(rng)
        return Item(scene, f"What is directly {rel} the {anchor.name} ?", target.name, kind,
                    capabilities=("rec", "spat"))
    if kind == "math":
        scene, a, b = _digits_scene(rng)
        if rng.random() < 0.5 or a < b:
            return Item(scene, "What is the sum of the two numbers ?", str(a + b), kind, capabilities=("ocr", "math"))
        return Item(scene, "What is the first number minus the second number ?", str(a - b), kind,
                    capabilities=("ocr", "math"))
    scene, what, k = _count_scene(rng, 1, 9)
    return Item(scene, f"How many {what} can you see ?", str(k), kind, capabilities=("rec", "math"))


def describe(scene: Scene) -> str:
    """The reference detailed description: object count, then each object and its cell, row-major."""
    n = len(scene.objects)
    parts = [f"there {'is' if n == 1 else 'are'} {n} {'object' if n == 1 else 'objects'} ."]
    parts += [f"a {o.name} is at the {o.where} ." for o in scene.objects]
    return " ".join(parts)


def gen_llavabench(rng: random.Random) -> Item:
    """LLaVA-Bench-like: detailed description, conversation and complex reasoning, with a reference."""
    kind = rng.choice(["detail", "conv", "complex"])
    if kind == "detail":
        scene = sc.make_scene(rng, sc.sample_shapes(rng, rng.randint(1, 4)))
        return Item(scene, "Describe the image in detail .", describe(scene), kind)
    if kind == "conv":
        scene, t = _unique_shape_scene(rng)
        if rng.random() < 0.5:
            return Item(scene, f"What colour is the {t.shape} ?", f"the {t.shape} is {t.colour} .", kind)
        return Item(scene, f"Where is the {t.shape} ?", f"the {t.shape} is at the {t.where} .", kind)
    objs = sc.sample_shapes(rng, rng.randint(2, 6), unique_names=False)
    scene = sc.make_scene(rng, objs)
    if rng.random() < 0.5:
        c = rng.choice(sorted({o.colour for o in objs}))
        left = sum(o.colour != c for o in objs)
        return Item(scene, f"If all the {c} objects were removed , how many objects would remain ?",
                    f"{left} {'object' if left == 1 else 'objects'} would remain , because {len(objs) - left} of the "
                    f"{len(objs)} objects are {c} .", kind)
    counts = Counter(o.colour for o in objs).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return Item(scene, "Which colour appears most often ?",
                    f"no single colour appears most often , {counts[0][0]} and {counts[1][0]} are tied .", kind)
    return Item(scene, "Which colour appears most often ?",
                f"{counts[0][0]} appears most often , with {counts[0][1]} objects .", kind)


GENERATORS: dict[str, Callable[[random.Random], Item]] = {
    "sqa": gen_sqa, "vizwiz": gen_vizwiz, "mmvet": gen_mmvet, "llavabench": gen_llavabench,
}


# --------------------------------------------------------------------------- splits

def bucket(item: Item) -> int:
    """Content hash of an item into 0..99 (sha256 of its canonical key)."""
    return int(hashlib.sha256(item.key().encode()).hexdigest()[:8], 16) % 100


def iter_items(suite: str, split: str, seed: int = 0) -> Iterator[Item]:
    """All items of a suite's split, in generation order (infinite)."""
    check_suite_split(suite, split)
    gen, keep = GENERATORS[suite], _BUCKETS[split]
    j = 0
    while True:
        item = gen(random.Random(f"{seed}/{suite}/{j}"))
        j += 1
        if bucket(item) in keep:
            yield item


def check_suite_split(suite: str, split: str) -> None:
    """Raise a one-line ValueError for an unknown suite or split."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def to_sample(item: Item, suite: str, split: str, index: int, render: bool = True) -> Sample:
    """Turn an Item into the kit's Sample (rendering the image unless ``render`` is False)."""
    return Sample(
        id=f"{suite}-{split}-{index:05d}", suite=suite, split=split, question=item.question, answer=item.answer,
        image=sc.render(item.scene) if render else None, choices=list(item.choices), context=item.context,
        answers=list(item.answers), answerable=item.answerable, capabilities=list(item.capabilities),
        category=item.category, meta={"scene": item.scene.key()},
    )


#: Items drawn so far per (suite, split, seed), and the iterator that continues each stream. Items are frozen,
#: so the prefix is shared: a sweep worker draws every job's test and calibration items from one stream instead
#: of regenerating them per job (about 1.3 s a job on the tiny default).
_STREAMS: dict[tuple[str, str, int], tuple[Iterator[Item], list[Item]]] = {}
#: Rendered samples of the last few ``generate`` calls (each holds ``n`` small PIL images).
_RENDERED: dict[tuple[str, str, int, int], tuple[Sample, ...]] = {}
_RENDERED_MAX = 8


def _prefix(suite: str, split: str, n: int, seed: int) -> list[Item]:
    """The first ``n`` items of a stream (extends the cached stream as needed; a new list each call)."""
    key = (suite, split, seed)
    if key not in _STREAMS:
        _STREAMS[key] = (iter_items(suite, split, seed), [])
    it, items = _STREAMS[key]
    while len(items) < n:
        items.append(next(it))
    return items[:n]


def generate(suite: str, split: str, n: int, seed: int = 0, render: bool = True) -> list[Sample]:
    """The first ``n`` samples of a suite's split (a fresh list; rendered samples are shared between calls of
    the same arguments and must not be modified)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    check_suite_split(suite, split)
    key = (suite, split, n, seed)
    if render and key in _RENDERED:
        return list(_RENDERED[key])
    out = [to_sample(item, suite, split, i, render) for i, item in enumerate(_prefix(suite, split, n, seed))]
    if render:
        if len(_RENDERED) >= _RENDERED_MAX:
            _RENDERED.pop(next(iter(_RENDERED)))
        _RENDERED[key] = tuple(out)
    return out


def generate_items(suite: str, split: str, n: int, seed: int = 0) -> list[Item]:
    """The first ``n`` raw items (scene + text) of a suite's split; cheap, no rendering."""
    check_suite_split(suite, split)
    return _prefix(suite, split, n, seed)
