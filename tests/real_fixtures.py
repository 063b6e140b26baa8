"""Writers of small parquet files in the exact upstream schemas of the four real benchmarks (test fixtures).

The files are written with ``datasets`` so they carry the same Hugging Face feature metadata as the hub's
(images are ``{"bytes", "path"}`` structs) and load through the same code path as hub data.
:func:`write_benchmark_tree` lays out all four under ``root/<benchmark>/`` as ``Tier.data_dir`` expects.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
import PIL.Image as PIL_Image

CORRUPT = b"\x89PNG\r\n\x1a\n this is not really a png"


def png(color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB", size: tuple[int, int] = (6, 4)) -> dict:
    """A tiny PNG as the ``{"bytes", "path"}`` struct of ``datasets.Image``."""
    buf = io.BytesIO()
    PIL_Image.new(mode, size, color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_parquet(path: Path, rows: list[dict[str, Any]], features: Any) -> Path:
    """Write ``rows`` with hub ``features`` (HF schema metadata included) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [r.get(name) for r in rows] for name in features}
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


S = datasets.Value("string")

# lmms-lab/ScienceQA (config ScienceQA-IMG) / lmms-lab/ScienceQA-IMG card features
SQA_FEATURES = datasets.Features({
    "image": datasets.Image(), "question": S, "choices": datasets.Sequence(S), "answer": datasets.Value("int8"),
    "hint": S, "task": S, "grade": S, "subject": S, "topic": S, "category": S, "skill": S, "lecture": S,
    "solution": S,
})
# lmms-lab/VizWiz-VQA card features
VIZWIZ_FEATURES = datasets.Features({
    "question_id": S, "image": datasets.Image(), "question": S, "answers": datasets.Sequence(S), "category": S,
})
# lmms-lab/MMVet (columns used by lmms-eval; capability a comma-separated string)
MMVET_FEATURES = datasets.Features({
    "question_id": S, "image": datasets.Image(), "question": S, "answer": S, "image_source": S, "capability": S,
})
# lmms-lab/llava-bench-in-the-wild card features
LLAVA_FEATURES = datasets.Features({
    "question_id": datasets.Value("int8"), "question": S, "image": datasets.Image(), "caption": S,
    "gpt_answer": S, "category": S, "image_id": S,
})


def sqa_row(i: int, **kw: Any) -> dict[str, Any]:
    row = {
        "image": png((i * 20 % 255, 10, 10)), "question": f"Which is item {i}?", "choices": ["cat", "dog", "fish"],
        "answer": i % 3, "hint": f"Hint {i}.", "task": "closed choice", "grade": "grade3", "subject": "natural science",
        "topic": "biology", "category": "Animals", "skill": "identify", "lecture": "L", "solution": "S",
    }
    row.update(kw)
    return row




def write_benchmark_tree(root: Path, n: int = 6, n_train: int = 24) -> Path:
    """``n`` clean evaluation rows of each benchmark (plus ``n_train`` ScienceQA-IMG train rows, the
    calibration split, of which row 1 has an undecodable image) under ``root/<benchmark>/``."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    train = [sqa_row(i, image=png(colours[i % 6], size=(24, 24))) for i in range(n_train)]
    train[1]["image"] = {"bytes": CORRUPT, "path": None}
    write_parquet(root / "scienceqa" / "ScienceQA-IMG" / "train-00000-of-00001.parquet", train, SQA_FEATURES)
    write_parquet(root / "scienceqa" / "ScienceQA-IMG" / "test-00000-of-00001.parquet",
                  [sqa_row(i, image=png(colours[i % 6], size=(24, 24))) for i in range(n)], SQA_FEATURES)
    answers = ["red", "red", "red ", "Red", "pink", "red", "red", "unanswerable", "red", "red"]
    write_parquet(root / "vizwiz" / "data" / "val-00000-of-00001.parquet",
                  [{"question_id": f"VizWiz_val_{i:08d}.jpg", "image": png(colours[i % 6], size=(24, 24)),
                    "question": "what color is this?", "answers": answers, "category": "other"} for i in range(n)],
                  VIZWIZ_FEATURES)
    write_parquet(root / "mmvet" / "data" / "test-00000-of-00001.parquet",
                  [{"question_id": f"v1_{i}", "image": png(colours[i % 6], size=(24, 24)),
                    "question": "What colour is the square?", "answer": "red<OR>crimson", "image_source": "web",
                    "capability": "rec" if i % 2 else "rec,spat"} for i in range(n)], MMVET_FEATURES)
    write_parquet(root / "llavabench" / "data" / "train-00000-of-00001.parquet",
                  [{"question_id": i, "question": "Describe the image in detail.",
                    "image": png(colours[i % 6], size=(24, 24)),
                    "caption": "A coloured square.", "gpt_answer": "The image shows a red square.",
                    "category": ("conv", "detail", "complex")[i % 3], "image_id": f"{i:03d}"} for i in range(n)],
                  LLAVA_FEATURES)
    return root
