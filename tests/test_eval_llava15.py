"""Evaluation as LLaVA-1.5 on the real-data path: pad-to-square, the vicuna_v1 conversation, the LLaVA-Bench caption
as the judge's context, the answering judge model recorded, VizWiz val vs test-dev. Fixtures are small parquet files
in the upstream schemas; the GPT judge talks to a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

datasets = pytest.importorskip("datasets")

from real_fixtures import LLAVA_FEATURES, VIZWIZ_FEATURES, png, write_benchmark_tree, write_parquet  # noqa: E402

from ellava_lib.cli import main as cli_main  # noqa: E402
from ellava_lib.core.schema import Sample  # noqa: E402
from ellava_lib.data import prompts  # noqa: E402
from ellava_lib.data.real import load_real_suite  # noqa: E402
from ellava_lib.data.real_image import expand_to_square, mean_fill, prepare_image  # noqa: E402
from ellava_lib.eval import evaluate, metrics  # noqa: E402
from ellava_lib.eval.gpt_judge import LLAVA_SYSTEM_PROMPT, llavabench_content, mmvet_query  # noqa: E402
from ellava_lib.eval.judge import Judge, LocalJudge  # noqa: E402
from ellava_lib.eval.vizwiz_testdev import evalai_answer, submission_image  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_network")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # llava-hf/llava-1.5-7b-hf preprocessor_config.json image_mean
FAKE_KEY = "sk-evalreal-FAKE-KEY-5f3c9a0e7d1b42"
REQUESTED, SERVED = "gpt-4-0613", "gpt-4-0613-snapshot-served"


# ---------------------------------------------------------------- 1. pad to square


def _gradient(w: int, h: int):
    """An RGB image whose every pixel is distinct: (x * 20, y * 20, 7)."""
    import PIL.Image

    img = PIL.Image.new("RGB", (w, h))
    img.putdata([(x * 20, y * 20, 7) for y in range(h) for x in range(w)])
    return img


@pytest.mark.parametrize(("w", "h"), [(8, 4), (3, 7)])
def test_pad_to_square_keeps_pixels_centred_on_the_mean_colour(w: int, h: int) -> None:
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_mean=list(CLIP_MEAN)))
    fill = mean_fill(proc.image_processor)
    assert fill == tuple(int(m * 255) for m in CLIP_MEAN) == (122, 116, 104)  # LLaVA's int(), not round()
    image = _gradient(w, h)
    out = prepare_image(image, proc, "pad")
    side = max(w, h)
    assert out.size == (side, side) and out.mode == "RGB"
    dx, dy = (side - w) // 2, (side - h) // 2
    for y in range(side):
        for x in range(side):
            inside = dx <= x < dx + w and dy <= y < dy + h
            expected = image.getpixel((x - dx, y - dy)) if inside else fill
            assert out.getpixel((x, y)) == expected, (x, y)
    assert prepare_image(image, proc, "crop") is image  # the processor's own crop: unchanged
    square = _gradient(5, 5)
    assert expand_to_square(square, fill) is square
    with pytest.raises(ValueError, match="image mode"):
        prepare_image(image, proc, "stretch")


def test_pad_survives_the_processor_where_crop_cuts() -> None:
    """Through a CLIP image processor (shortest edge + centre crop, as llava-hf's): padded, the top band is the
    normalized mean (about 0), the whole image is kept; cropped, the top rows are image content."""
    from ellava_lib.model.tiny import build_image_processor

    ip = build_image_processor()
    image = _gradient(12, 6)
    padded = ip(images=prepare_image(image, ip, "pad"), return_tensors="pt")["pixel_values"][0]
    cropped = ip(images=image, return_tensors="pt")["pixel_values"][0]
    side = padded.shape[-1]
    band = padded[:, : side // 8, :]  # rows well above the pasted image (it spans the middle half)
    assert band.abs().max() < 0.02
    assert cropped[:, : side // 8, :].abs().max() > 0.5


# ---------------------------------------------------------------- 2. conversation format


def _sqa() -> Sample:
    return Sample(id="s", suite="sqa", split="test", question="Which is item 0?", answer="A", image=_gradient(2, 2),
                  choices=["cat", "dog", "fish"], context="Hint 0.")


def test_vicuna_v1_prompt_is_llava15s() -> None:
    body = ("Context: Hint 0.\nWhich is item 0?\nA. cat\nB. dog\nC. fish\n"
            "Answer with the option's letter from the given choices directly.")
    assert prompts.sample_prompt(_sqa(), "vicuna_v1") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\n" + body + " ASSISTANT:")
    assert prompts.sample_prompt(_sqa(), "llava_v1") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\n" + body + " ASSISTANT:")
    assert prompts.sample_prompt(_sqa()) == prompts.sample_prompt(_sqa(), "hf") == f"USER: <image>\n{body} ASSISTANT:"
    with pytest.raises(ValueError, match="prompt format"):
        prompts.chat_prompt("q", fmt="chatml")


def test_defaults_by_data_kind() -> None:
    assert evaluate.input_format("real") == {"prompt_format": "vicuna_v1", "image_mode": "pad"}
    assert evaluate.input_format("synthetic") == {"prompt_format": "hf", "image_mode": "crop"}
    cfg = evaluate.EvalConfig(data="real", prompt_format="hf", image_mode="crop")
    assert cfg.input_format() == {"prompt_format": "hf", "image_mode": "crop"}
    with pytest.raises(ValueError, match="image mode"):
        evaluate.EvalConfig(data="real", image_mode="stretch")


class _Recording:
    """A processor that records the texts and images it is called with, delegating everything else."""

    def __init__(self, proc: Any) -> None:
        self._proc, self.texts, self.images = proc, [], []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proc, name)

    def __call__(self, text, images, **kw):
        self.texts += list(text)
        self.images += list(images)
        return self._proc(text=text, images=images, **kw)


def test_real_evaluation_feeds_llava15_inputs(micro_model, tmp_path: Path) -> None:
    model, proc = micro_model
    rows = [{"question_id": f"VizWiz_val_{i:08d}.jpg", "image": png((200, 30, 30), size=(16, 8)),
             "question": "what color is this?", "answers": ["red"] * 10, "category": "other"} for i in range(2)]
    write_parquet(tmp_path / "data" / "vizwiz" / "data" / "val-00000-of-00001.parquet", rows, VIZWIZ_FEATURES)
    rec = _Recording(proc)
    cfg = evaluate.EvalConfig(suites=("vizwiz",), data="real", data_dir=str(tmp_path / "data"), limit=2)
    frame = evaluate.evaluate(model, rec, cfg, tmp_path / "out", progress=False)
    assert all(t.startswith(prompts.VICUNA_V1_SYSTEM + " USER: <image>\nwhat color is this?") for t in rec.texts)
    assert len(rec.images) == 2 and all(im.size == (16, 16) for im in rec.images)
    assert rec.images[0].getpixel((0, 0)) == (122, 116, 104) and rec.images[0].getpixel((0, 8)) == (200, 30, 30)
    assert set(frame["split"]) == {"val"}  # VizWiz is scored on val and says so
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["config"]["prompt_format"] == "vicuna_v1" and record["config"]["image_mode"] == "pad"
    assert record["splits"] == {"vizwiz": "val"}


# ---------------------------------------------------------------- 3. LLaVA-Bench caption -> judge context


class _ContextJudge(Judge):
    name = "ctx"

    def __init__(self) -> None:
        self.contexts: list[str] = []

    def score_mmvet(self, question: str, gt: str, pred: str) -> float:
        return 1.0

    def score_llavabench(self, question, reference, answer, category, *, context=""):
        self.contexts.append(context)
        return 8.0, 6.0


def test_llavabench_caption_reaches_the_judge(tmp_path: Path) -> None:
    rows = [{"question_id": 0, "question": "What dish?", "image": png(), "caption": "A bowl of ramen.",
             "gpt_answer": "Ramen.", "category": "conv", "image_id": "001"},
            {"question_id": 1, "question": "Why?", "image": png(), "caption": None, "gpt_answer": "Because.",
             "category": "complex", "image_id": "002"}]
    write_parquet(tmp_path / "llava" / "train.parquet", rows, LLAVA_FEATURES)
    rep = load_real_suite("llavabench", data_dir=tmp_path / "llava", cache_dir=tmp_path / "hf")
    assert [s.meta["caption"] for s in rep.samples] == ["A bowl of ramen."]
    assert dict(rep.skipped) == {"1": "missing field: caption"}  # no caption, no upstream-exact review
    judge = _ContextJudge()
    _, items = metrics.suite_scores("llavabench", rep.samples, ["It is ramen."], judge)
    assert judge.contexts == ["A bowl of ramen."]
    assert items == [{"reference_score": 8.0, "score": 6.0, "judge_model": "ctx", "judge_failed": False}]
    # a caption list (as in LLaVA's context.jsonl) is joined with newlines, as upstream joins it
    feats = datasets.Features({**LLAVA_FEATURES, "caption": datasets.Sequence(datasets.Value("string"))})
    write_parquet(tmp_path / "llava2" / "train.parquet", [{**rows[0], "caption": ["One.", "Two."]}], feats)
    rep2 = load_real_suite("llavabench", data_dir=tmp_path / "llava2", cache_dir=tmp_path / "hf")
    assert rep2.samples[0].meta["caption"] == "One.\nTwo."
    # the local judge accepts the caption and ignores it
    local = LocalJudge()
    assert local.score_llavabench("q", "a red cat", "a red cat", "conv", context="anything") == \
        local.score_llavabench("q", "a red cat", "a red cat", "conv")


# ---------------------------------------------------------------- 4-5. fake OpenAI server: what is sent, what is kept


class FakeServer:
    """An OpenAI-compatible /chat/completions endpoint that records requests and answers as ``SERVED``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"auth": self.headers.get("Authorization"), "body": body})
                system = body["messages"][0]["role"] == "system"
                content = "7 8\nAssistant 2 is close." if system else "0.6"
                data = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": SERVED,
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": content}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeServer()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def test_fake_server_speaks_the_openai_protocol(server: FakeServer) -> None:
    """The official client parses the fake's replies: the judge is tested against the real wire format."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url, api_key=FAKE_KEY, max_retries=0, timeout=5.0)
    reply = client.chat.completions.create(model=REQUESTED, messages=[{"role": "user", "content": "score?"}],
                                           max_tokens=3, temperature=0.0)
    assert reply.model == SERVED and reply.choices[0].message.content == "0.6"
    assert server.requests[0]["body"]["model"] == REQUESTED
    assert server.requests[0]["auth"] == f"Bearer {FAKE_KEY}"


def test_gpt_judged_eval_records_the_answering_model(micro_model_dir: Path, server: FakeServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = write_benchmark_tree(tmp_path / "data", n=2, n_train=4)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("ELLAVA_JUDGE_MODEL", REQUESTED)
    for suite in ("mmvet", "llavabench"):  # the judging is under test, not 1024-token answers of a micro model
        monkeypatch.setitem(evaluate.REAL_MAX_NEW_TOKENS, suite, 8)
    out = tmp_path / "ev"
    assert cli_main(["eval", "--model", str(micro_model_dir), "--data", "real", "--data-dir", str(data),
                     "--suite", "mmvet,llavabench", "--limit", "2", "--judge", "gpt", "--out", str(out),
                     "--quiet"]) == 0
    preds = {(r["suite"], r["id"]): r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    # what the judge sent: the requested model, LLaVA's reviewer with the caption as [Context], MM-Vet's grader
    bodies = [r["body"] for r in server.requests]
    assert {b["model"] for b in bodies} == {REQUESTED}
    assert len(bodies) == len({json.dumps(b["messages"]) for b in bodies})  # a repeated prompt is a cache hit
    reviews = [b for b in bodies if b["messages"][0]["role"] == "system"]
    assert reviews
    for b in reviews:
        assert b["messages"][0]["content"] == LLAVA_SYSTEM_PROMPT and b["temperature"] == 0.2
        sent = b["messages"][1]["content"]
        p = next(p for k, p in preds.items() if k[0] == "llavabench" and f"\n{p['prediction']}\n" in sent)
        assert b["messages"][1]["content"] == llavabench_content(p["question"], p["answer"], p["prediction"],
                                                                 p["category"], context="A coloured square.")
        assert b["messages"][1]["content"].startswith("[Context]\nA coloured square.\n\n[Question]\n")
    grades = [b for b in bodies if b["messages"][0]["role"] == "user"]
    assert {b["messages"][0]["content"] for b in grades} == {
        mmvet_query(p["question"], p["answer"], p["prediction"]) for k, p in preds.items() if k[0] == "mmvet"}
    # what was kept: the requested judge and the model that answered, per item and per number
    for (suite, _), p in preds.items():
        assert (p["judge"], p["judge_model"], p["judge_failed"]) == (REQUESTED, SERVED, False)
        assert p["score"] == (0.6 if suite == "mmvet" else 8.0)
    frame = pd.read_csv(out / "metrics.csv")
    assert set(frame["judge"]) == {REQUESTED} and set(frame["judge_model"]) == {SERVED}
    assert frame.set_index(["suite", "metric"]).loc[("llavabench", "overall"), "score"] == pytest.approx(800 / 7)
    record = json.loads((out / "eval.json").read_text())
    assert record["judge"] == REQUESTED and record["judge_models"] == {"mmvet": SERVED, "llavabench": SERVED}
    # the key is never printed nor written anywhere under the output folder (judge cache included)
    written = b"".join(f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file())
    assert FAKE_KEY.encode() not in written and FAKE_KEY[3:].encode() not in written
    printed = capsys.readouterr()
    assert FAKE_KEY not in printed.out and FAKE_KEY not in printed.err
    assert all(r["auth"] == f"Bearer {FAKE_KEY}" for r in server.requests)  # it was sent, as a header only


# ---------------------------------------------------------------- 6. VizWiz val vs test-dev


def test_evalai_answer_and_image_names() -> None:
    assert evalai_answer("Two dogs?") == "2 dogs"
    assert evalai_answer("It's red, blue.") == "it 's red blue"
    assert evalai_answer(" The  cat.\n") == "cat"
    assert submission_image("VizWiz_test_00000007") == "VizWiz_test_00000007.jpg"
    assert submission_image("VizWiz_test_00000007.jpg") == "VizWiz_test_00000007.jpg"


def test_vizwiz_testdev_submission(micro_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_benchmark_tree(tmp_path / "data", n=2, n_train=4)
    test_rows = [{"question_id": "VizWiz_test_00000000", "image": png(size=(10, 6)), "question": "what is this?",
                  "answers": None, "category": None},
                 {"question_id": "VizWiz_test_00000001.jpg", "image": png(size=(6, 10)), "question": "what colour?",
                  "answers": [], "category": None}]
    write_parquet(data / "vizwiz" / "data" / "test-00000-of-00001.parquet", test_rows, VIZWIZ_FEATURES)
    out, sub = tmp_path / "ev", tmp_path / "upload" / "vizwiz_testdev.json"
    assert cli_main(["eval", "--model", str(micro_model_dir), "--data", "real", "--data-dir", str(data),
                     "--suite", "vizwiz", "--limit", "2", "--out", str(out), "--quiet",
                     "--vizwiz-testdev-out", str(sub)]) == 0
    upload = json.loads(sub.read_text())
    assert [u["image"] for u in upload] == ["VizWiz_test_00000000.jpg", "VizWiz_test_00000001.jpg"]
    assert all(set(u) == {"image", "answer"} and u["answer"] == evalai_answer(u["answer"]) for u in upload)
    frame = pd.read_csv(out / "metrics.csv")
    assert set(frame["split"]) == {"val"}  # the scored VizWiz number is a val number
    record = json.loads((out / "eval.json").read_text())
    assert record["splits"] == {"vizwiz": "val"}
    assert record["vizwiz_testdev"]["questions"] == 2 and record["vizwiz_testdev"]["split"] == "test"
    assert "vizwiz val" in capsys.readouterr().out
    # test-dev items are never scored: they carry no answers
    rep = load_real_suite("vizwiz", split="test", data_dir=data / "vizwiz", cache_dir=tmp_path / "hf", unlabelled=True)
    assert [s.answers for s in rep.samples] == [[], []] and all(s.meta["unlabelled"] for s in rep.samples)
    with pytest.raises(ValueError, match="without annotator answers"):
        metrics.suite_metrics("vizwiz", rep.samples, ["a", "b"])
    # only with real data; a usage error writes nothing
    bad = tmp_path / "bad"
    assert cli_main(["eval", "--model", str(micro_model_dir), "--out", str(bad), "--quiet",
                     "--vizwiz-testdev-out", str(tmp_path / "x.json")]) == 2
    assert not bad.exists() and not (tmp_path / "x.json").exists()
