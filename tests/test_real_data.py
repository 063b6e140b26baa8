"""Real-data manifests and loaders, on small parquet fixtures in the upstream column schemas.

The fixtures are written with ``datasets`` (so the parquet files carry the same Hugging Face feature
metadata as the hub files: images are ``{"bytes", "path"}`` structs) and loaded through the same code path
as hub data. No test touches the network: outbound connections are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

datasets = pytest.importorskip("datasets")
PIL_Image = pytest.importorskip("PIL.Image")

from real_fixtures import (
    CORRUPT,
    LLAVA_FEATURES,
    MMVET_FEATURES,
    SQA_FEATURES,
    VIZWIZ_FEATURES,
    png,
    sqa_row,
    write_parquet,
)

from ellava_lib.core.schema import Sample
from ellava_lib.data.manifest import (
    Manifest,
    ManifestError,
    load_manifest,
    render_prompt,
)
from ellava_lib.data.real import (
    DataLoadError,
    LoadReport,
    draw_calibration_ids,
    load_real_suite,
    majority_answer,
)

pytestmark = pytest.mark.usefixtures("no_network")  # conftest: nothing may reach the network


@pytest.fixture
def sqa_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sqa"
    rows = [
        sqa_row(0),
        sqa_row(1, hint="", image=png((120,), mode="L")),  # no context; grayscale image -> RGB
        sqa_row(2, image={"bytes": CORRUPT, "path": None}),  # undecodable image
        sqa_row(3, question=None),  # missing field
        sqa_row(4, answer=7),  # answer index out of range
        sqa_row(5, choices=["yes", "no", "maybe", "never", "always"], answer=4, image=png((1, 2, 3, 128), mode="RGBA")),
    ]
    write_parquet(root / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows, SQA_FEATURES)
    train = [sqa_row(i) for i in range(40)]
    write_parquet(root / "ScienceQA-IMG" / "train-00000-of-00001.parquet", train, SQA_FEATURES)
    return root


@pytest.fixture
def vizwiz_dir(tmp_path: Path) -> Path:
    ans_ok = ["white", "White", "white ", "grey", "white", "white", "gray", "white", "white", "white"]
    ans_un = ["unanswerable"] * 6 + ["unsuitable"] * 2 + ["blue", "red"]
    rows = [
        {"question_id": "VizWiz_val_00000000.jpg", "image": png(), "question": "what color is this?",
         "answers": ans_ok, "category": "other"},
        {"question_id": "VizWiz_val_00000001.jpg", "image": png(), "question": "what is this?",
         "answers": ans_un, "category": "unanswerable"},
        {"question_id": "VizWiz_val_00000002.jpg", "image": {"bytes": CORRUPT, "path": None}, "question": "q?",
         "answers": ans_ok, "category": "other"},
        {"question_id": "VizWiz_val_00000003.jpg", "image": png(), "question": "q?", "answers": None,
         "category": "other"},
    ]
    write_parquet(tmp_path / "vizwiz" / "data" / "val-00000-of-00005-abc.parquet", rows, VIZWIZ_FEATURES)
    return tmp_path / "vizwiz"


@pytest.fixture
def mmvet_dir(tmp_path: Path) -> Path:
    rows = [
        {"question_id": "v1_0", "image": png(), "question": "What is x in the equation?", "answer": "-1<AND>-5",
         "image_source": "web", "capability": "ocr,math"},
        {"question_id": "v1_1", "image": png(), "question": "Who is this?", "answer": "a cat",
         "image_source": "web", "capability": "rec,know,gen"},
        {"question_id": "v1_2", "image": None, "question": "q?", "answer": "x", "image_source": "web",
         "capability": "rec"},  # missing image
        {"question_id": "v1_3", "image": {"bytes": b"", "path": None}, "question": "q?", "answer": "x",
         "image_source": "web", "capability": "rec"},  # empty bytes: undecodable
        {"question_id": "v1_4", "image": png(), "question": "q?", "answer": "x", "image_source": "web",
         "capability": None},  # missing capability
    ]
    write_parquet(tmp_path / "mmvet" / "data" / "test-00000-of-00001.parquet", rows, MMVET_FEATURES)
    return tmp_path / "mmvet"


@pytest.fixture
def llava_dir(tmp_path: Path) -> Path:
    rows = [
        {"question_id": 0, "question": "What is the name of this dish?", "image": png(), "caption": "A bowl of ramen.",
         "gpt_answer": "It is ramen.", "category": "conv", "image_id": "001"},
        {"question_id": 1, "question": "Describe the image in detail.", "image": png(), "caption": "A red square.",
         "gpt_answer": "The image shows a red square.", "category": "detail", "image_id": "002"},
        {"question_id": 2, "question": "Why?", "image": {"bytes": CORRUPT, "path": None}, "caption": "c",
         "gpt_answer": "Because.", "category": "complex", "image_id": "003"},
        {"question_id": 3, "question": "Why?", "image": png(), "caption": "c", "gpt_answer": None,
         "category": "complex", "image_id": "004"},
    ]
    write_parquet(tmp_path / "llava" / "data" / "train-00000-of-00001.parquet", rows, LLAVA_FEATURES)
    return tmp_path / "llava"


def parquet_dataset(path: Path, tmp_path: Path) -> Any:
    """A ``datasets.Dataset`` read from a fixture file (what a hub load returns), cached under tmp."""
    return datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf_cache"))


def load(name: str, data_dir: Path, tmp_path: Path, **kw: Any) -> LoadReport:
    return load_real_suite(name, data_dir=data_dir, cache_dir=tmp_path / "hf_cache", **kw)


def assert_rgb(sample: Sample) -> None:
    assert isinstance(sample.image, PIL_Image.Image)
    assert sample.image.mode == "RGB"


# ---------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    ("name", "suite", "primary", "config", "split", "rows"),
    [
        ("scienceqa", "sqa", "lmms-lab/ScienceQA", "ScienceQA-IMG", "test", 2017),
        ("vizwiz", "vizwiz", "lmms-lab/VizWiz-VQA", None, "val", 4319),
        ("mmvet", "mmvet", "lmms-lab/MMVet", None, "test", 218),
        ("llavabench", "llavabench", "lmms-lab/llava-bench-in-the-wild", None, "train", 60),
    ],
)
def test_manifest_facts(name: str, suite: str, primary: str, config: str | None, split: str, rows: int) -> None:
    m = load_manifest(name)
    assert isinstance(m, Manifest)
    assert (m.name, m.suite, m.config, m.split, m.expected_rows) == (name, suite, config, split, rows)
    assert m.repos == (primary, primary.replace("lmms-lab/", "lmms-lab-encoder/"))
    assert m.revision is None
    assert m.column_for("image") is not None
    if name == "scienceqa":
        assert m.calibration is not None and m.calibration.split == "train"
        assert m.calibration.expected_rows == 6218
    else:
        assert m.calibration is None


def test_manifest_labels_and_judges() -> None:
    assert load_manifest("mmvet").labels == ("rec", "ocr", "know", "gen", "spat", "math")
    assert load_manifest("llavabench").labels == ("conv", "detail", "complex")
    assert load_manifest("scienceqa").judge is None
    assert load_manifest("mmvet").judge["model"] == "gpt-4-0613"


def test_manifest_by_path() -> None:
    path = Path(__file__).resolve().parents[1] / "ellava_lib" / "data" / "manifests" / "mmvet.yaml"
    assert load_manifest(path).name == "mmvet"


def test_unknown_benchmark() -> None:
    with pytest.raises(ManifestError, match="unknown benchmark 'mmbench'"):
        load_manifest("mmbench")
    with pytest.raises(ManifestError, match="not found"):
        load_manifest("/nonexistent/dir/x.yaml")


GOOD_MANIFEST = """\
name: custom
suite: mmvet
repos: [org/ds, org2/ds]
config: null
split: test
revision: null
expected_rows: 3
fields: {question_id: id, image: image, question: question, answer: answer, capability: capabilities}
required: [image, question, answer]
prompt: {template: "{question}"}
metric: {name: gpt_score}
judge: null
"""


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        (GOOD_MANIFEST.replace("split: test\n", ""), "missing required key 'split'"),
        (GOOD_MANIFEST.replace("suite: mmvet", "suite: mmbench"), "suite 'mmbench'"),
        (GOOD_MANIFEST.replace("repos: [org/ds, org2/ds]", "repos: []"), "'repos' must be"),
        (GOOD_MANIFEST.replace("expected_rows: 3", "expected_rows: -1"), "expected_rows"),
        (GOOD_MANIFEST.replace("answer: answer,", "answer: answr_field,"), "not a Sample field"),
        (GOOD_MANIFEST.replace("required: [image, question, answer]", "required: [nope]"), "not in 'fields'"),
        (GOOD_MANIFEST.replace('prompt: {template: "{question}"}', "prompt: 3"), "'prompt' must be"),
        (GOOD_MANIFEST + "calibration_split: {repos: [org/ds], split: test}\n", "training split"),
        (GOOD_MANIFEST.replace("image: image,", "image: question,"), "more than one column"),
    ],
)
def test_malformed_manifest(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError, match=match):
        load_manifest(path)


def test_good_custom_manifest(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_MANIFEST)
    m = load_manifest(path)
    assert m.repos == ("org/ds", "org2/ds") and m.calibration is None


# ---------------------------------------------------------------- mapping


def test_sqa_mapping_and_skips(sqa_dir: Path, tmp_path: Path) -> None:
    rep = load("scienceqa", sqa_dir, tmp_path)
    assert rep.source == f"local:{sqa_dir}" and rep.revision.startswith("local-sha256:")
    assert rep.rows_read == 6 and rep.split == "test"
    by_id = {s.id: s for s in rep.samples}
    assert sorted(by_id) == ["sqa-test-00000", "sqa-test-00001", "sqa-test-00005"]
    s0 = by_id["sqa-test-00000"]
    assert (s0.suite, s0.split, s0.question, s0.answer) == ("sqa", "test", "Which is item 0?", "A")
    assert s0.choices == ["cat", "dog", "fish"] and s0.context == "Hint 0."
    assert s0.meta["subject"] == "natural science" and s0.meta["answer_index"] == 0
    assert by_id["sqa-test-00001"].answer == "B" and by_id["sqa-test-00001"].context == ""
    assert by_id["sqa-test-00005"].answer == "E" and len(by_id["sqa-test-00005"].choices) == 5
    for s in rep.samples:
        assert_rgb(s)
    assert by_id["sqa-test-00000"].image.getpixel((0, 0)) == (0, 10, 10)
    skipped = dict(rep.skipped)
    assert skipped["sqa-test-00002"].startswith("undecodable image")
    assert skipped["sqa-test-00003"] == "missing field: question"
    assert skipped["sqa-test-00004"].startswith("invalid field: answer index 7")
    assert rep.skip_counts == {"undecodable image": 1, "missing field": 1, "invalid field": 1}
    assert len(rep.samples) + len(rep.skipped) == rep.rows_read  # nothing dropped silently
    summary = rep.summary()
    assert summary["skipped"] == 3 and summary["samples"] == 3


def test_vizwiz_mapping(vizwiz_dir: Path, tmp_path: Path) -> None:
    rep = load("vizwiz", vizwiz_dir, tmp_path)
    by_id = {s.id: s for s in rep.samples}
    ok = by_id["VizWiz_val_00000000.jpg"]
    assert len(ok.answers) == 10 and ok.answers[1] == "White"
    assert ok.answer == "white" and ok.answerable is True
    assert ok.question == "what color is this?" and ok.meta["category"] == "other"
    un = by_id["VizWiz_val_00000001.jpg"]
    assert un.answer == "unanswerable" and un.answerable is False
    skipped = dict(rep.skipped)
    assert sorted(skipped) == ["VizWiz_val_00000002.jpg", "VizWiz_val_00000003.jpg"]
    assert skipped["VizWiz_val_00000002.jpg"].startswith("undecodable image")
    assert skipped["VizWiz_val_00000003.jpg"] == "missing field: answers"
    assert all(s.image.mode == "RGB" for s in rep.samples)


def test_majority_answer_ties_go_to_first() -> None:
    assert majority_answer(["b", "a", "a", "b"]) == "b"
    assert majority_answer(["Yes", "yes ", "no"]) == "yes"


def test_mmvet_mapping(mmvet_dir: Path, tmp_path: Path) -> None:
    rep = load("mmvet", mmvet_dir, tmp_path)
    by_id = {s.id: s for s in rep.samples}
    assert sorted(by_id) == ["v1_0", "v1_1"]
    assert by_id["v1_0"].capabilities == ["ocr", "math"] and by_id["v1_0"].answer == "-1<AND>-5"
    assert by_id["v1_1"].capabilities == ["rec", "know", "gen"]
    assert by_id["v1_0"].meta["image_source"] == "web"
    skipped = dict(rep.skipped)
    assert skipped["v1_2"] == "missing field: image"
    assert skipped["v1_3"].startswith("undecodable image")
    assert skipped["v1_4"] == "missing field: capability"


def test_llavabench_mapping(llava_dir: Path, tmp_path: Path) -> None:
    rep = load("llavabench", llava_dir, tmp_path)
    by_id = {s.id: s for s in rep.samples}
    assert sorted(by_id) == ["0", "1"]
    s = by_id["0"]
    assert (s.answer, s.category, s.split) == ("It is ramen.", "conv", "train")
    assert s.meta["caption"] == "A bowl of ramen." and s.meta["image_id"] == "001"
    assert s.context == ""  # the caption is for the judge only, never part of the model prompt
    assert by_id["1"].category == "detail"
    skipped = dict(rep.skipped)
    assert skipped["2"].startswith("undecodable image") and skipped["3"] == "missing field: gpt_answer"


def test_limit_reads_first_rows(sqa_dir: Path, tmp_path: Path) -> None:
    rep = load("scienceqa", sqa_dir, tmp_path, limit=3)
    assert rep.rows_read == 3
    assert [s.id for s in rep.samples] == ["sqa-test-00000", "sqa-test-00001"]
    assert [i for i, _ in rep.skipped] == ["sqa-test-00002"]
    assert load("scienceqa", sqa_dir, tmp_path, limit=0).samples == []
    with pytest.raises(ValueError):
        load("scienceqa", sqa_dir, tmp_path, limit=-1)


def test_single_parquet_file_as_data_dir(mmvet_dir: Path, tmp_path: Path) -> None:
    rep = load("mmvet", mmvet_dir / "data" / "test-00000-of-00001.parquet", tmp_path)
    assert len(rep.samples) == 2


def test_schema_change_is_an_error(tmp_path: Path) -> None:
    feats = datasets.Features({k: v for k, v in MMVET_FEATURES.items() if k != "capability"})
    rows = [{"question_id": "v1_0", "image": png(), "question": "q", "answer": "a", "image_source": "web"}]
    write_parquet(tmp_path / "mm" / "test.parquet", rows, feats)
    with pytest.raises(DataLoadError, match="capability"):
        load("mmvet", tmp_path / "mm", tmp_path)


def test_missing_meta_column_is_a_warning(tmp_path: Path) -> None:
    feats = datasets.Features({k: v for k, v in MMVET_FEATURES.items() if k != "image_source"})
    rows = [{"question_id": "v1_0", "image": png(), "question": "q", "answer": "a", "capability": "rec"}]
    write_parquet(tmp_path / "mm" / "test.parquet", rows, feats)
    rep = load("mmvet", tmp_path / "mm", tmp_path)
    assert len(rep.samples) == 1 and "image_source" not in rep.samples[0].meta
    assert any("'image_source'" in w for w in rep.warnings)


def test_missing_split_files(sqa_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataLoadError, match="no parquet files for split 'validation'"):
        load("scienceqa", sqa_dir, tmp_path, split="validation")


def test_render_prompt(sqa_dir: Path, vizwiz_dir: Path, tmp_path: Path) -> None:
    sqa = load_manifest("scienceqa")
    s = {x.id: x for x in load("scienceqa", sqa_dir, tmp_path).samples}
    assert render_prompt(sqa, s["sqa-test-00000"]) == (
        "Context: Hint 0.\nWhich is item 0?\nA. cat\nB. dog\nC. fish\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert render_prompt(sqa, s["sqa-test-00001"]).startswith("Which is item 1?\nA. cat")
    viz = load_manifest("vizwiz")
    v = load("vizwiz", vizwiz_dir, tmp_path).samples[0]
    assert render_prompt(viz, v) == (
        "what color is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase."
    )
    prompts = pytest.importorskip("ellava_lib.data.prompts")
    if hasattr(prompts, "question_text"):  # the kit's prompt builder must agree with the manifests
        for sample in (*s.values(), v):
            man = sqa if sample.suite == "sqa" else viz
            assert prompts.question_text(sample) == render_prompt(man, sample)


# ---------------------------------------------------------------- hub path (faked, offline)


def test_fallback_repo_is_used_and_reported(mmvet_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple] = []
    local = parquet_dataset(mmvet_dir / "data" / "test-00000-of-00001.parquet", tmp_path)

    def fake_hub(repo, config, split, revision, local_files_only, cache_dir):
        calls.append((repo, config, split, revision, local_files_only))
        if repo == "lmms-lab/MMVet":
            raise FileNotFoundError("Dataset 'lmms-lab/MMVet' doesn't exist on the Hub")
        return local

    rep = load_real_suite("mmvet", hub_loader=fake_hub, local_files_only=True)
    assert rep.source == "lmms-lab-encoder/MMVet"
    assert [c[0] for c in calls] == ["lmms-lab/MMVet", "lmms-lab-encoder/MMVet"]
    assert calls[0][1:] == (None, "test", None, True)
    assert len(rep.samples) == 2
    assert any("5 rows, manifest expects 218" in w for w in rep.warnings)


def test_primary_repo_preferred_and_pinned_revision(mmvet_dir: Path, tmp_path: Path) -> None:
    local = parquet_dataset(mmvet_dir / "data" / "test-00000-of-00001.parquet", tmp_path)
    man = load_manifest("mmvet")
    sha = "0123456789abcdef0123456789abcdef01234567"
    pinned = Manifest(**{**man.__dict__, "revision": sha})
    rep = load_real_suite(pinned, hub_loader=lambda *a: local, limit=1)
    assert rep.source == "lmms-lab/MMVet" and rep.revision == sha and rep.warnings == []


def test_all_repos_fail() -> None:
    def fake_hub(repo, *rest):
        raise ConnectionError(f"Couldn't reach '{repo}' on the Hub")

    with pytest.raises(DataLoadError, match="lmms-lab/VizWiz-VQA.*lmms-lab-encoder/VizWiz-VQA"):
        load_real_suite("vizwiz", hub_loader=fake_hub)


# ---------------------------------------------------------------- calibration


def test_calibration_ids_deterministic(sqa_dir: Path, tmp_path: Path) -> None:
    kw = {"data_dir": sqa_dir, "cache_dir": tmp_path / "hf_cache"}
    a = draw_calibration_ids("scienceqa", 8, seed=0, **kw)
    assert a == draw_calibration_ids("scienceqa", 8, seed=0, **kw)
    assert a == sorted(a) and len(set(a)) == 8
    assert all(i.startswith("sqa-train-000") for i in a)
    assert a != draw_calibration_ids("scienceqa", 8, seed=1, **kw)
    assert set(draw_calibration_ids("scienceqa", 4, seed=0, **kw)) <= set(a)  # prefix-stable
    assert draw_calibration_ids("scienceqa", 8, seed=0, num_rows=40) == a  # no data needed with num_rows
    # the ids name rows of the calibration (train) split as load_real_suite names them
    cal = load_real_suite("scienceqa", split="train", **kw)
    assert cal.split == "train" and len(cal.samples) == 40
    assert set(a) <= {s.id for s in cal.samples}
    with pytest.raises(ValueError):
        draw_calibration_ids("scienceqa", 41, seed=0, **kw)
    with pytest.raises(ManifestError, match="no calibration_split"):
        draw_calibration_ids("mmvet", 2, seed=0, num_rows=10)


def test_calibration_ids_golden() -> None:
    # pinned values: a change here changes which training rows every run calibrates on
    assert draw_calibration_ids("scienceqa", 3, seed=0, num_rows=6218) == GOLDEN_SQA_IDS


GOLDEN_SQA_IDS = ["sqa-train-04506", "sqa-train-05192", "sqa-train-05793"]
