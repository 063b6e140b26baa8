"""GPTJudge against a local fake chat-completions server (stdlib http.server on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ellava_lib.eval.gpt_judge import (
    CACHE_FILENAME,
    LLAVA_SYSTEM_PROMPT,
    MMVET_RETRY_SUFFIX,
    GPTJudge,
    JudgeError,
    llavabench_content,
    mmvet_query,
    parse_llavabench_scores,
    parse_mmvet_score,
)
from ellava_lib.eval.judge import Judge

FAKE_KEY = "sk-test-FAKEKEY-0123456789abcdefXYZ"


class FakeOpenAI:
    """A chat-completions server that replays canned replies and records every request."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, str]] = []  # (HTTP status, content or raw body), consumed in order
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = fake.replies.pop(0) if fake.replies else (200, "1.0")
                if status == 200:
                    payload = {"id": "x", "object": "chat.completion", "model": body["model"] + "-served",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                            "finish_reason": "stop"}]}
                    data = json.dumps(payload).encode()
                else:
                    data = content.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def reply(self, *contents: str | tuple[int, str]) -> None:
        self.replies.extend(c if isinstance(c, tuple) else (200, c) for c in contents)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def judge(server: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GPTJudge:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return GPTJudge(tmp_path / "cache", model="gpt-4-0613", base_url=server.url, api_key=FAKE_KEY,
                    retry_backoff_s=0.0, timeout_s=5.0)


def all_text(tmp_path: Path) -> bytes:
    """Every byte written under ``tmp_path`` (cache db and any journal files)."""
    return b"".join(p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file())


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("reply", "score"),
    [("0.5", 0.5), ("1.0", 1.0), ("0", 0.0), (" 0.3\n", 0.3), ("0.7 because", 0.7),
     ("1.5", None), ("-0.1", None), ("Correctness: 0.5", None), ("", None)],
)
def test_parse_mmvet(reply: str, score: float | None) -> None:
    assert parse_mmvet_score(reply) == score


@pytest.mark.parametrize(
    ("review", "scores"),
    [("8 9\nAssistant 2 is ...", (8.0, 9.0)), ("7, 6.5\nexplanation", (7.0, 6.5)), ("10 1", (10.0, 1.0)),
     ("Scores: 8 9\n", None), ("8\n9", None), ("8 11\n", None), ("", None), ("eight nine", None)],
)
def test_parse_llavabench(review: str, scores: tuple[float, float] | None) -> None:
    assert parse_llavabench_scores(review) == scores


def test_prompt_layouts() -> None:
    q = mmvet_query("What is x?", "-1<AND>-5", "x = -1")
    assert q.startswith("Compare the ground truth and prediction from AI models")
    assert "Question | Ground truth | Prediction | Correctness\n--- | --- | --- | ---\n" in q
    assert q.endswith("| 1.0\n\nWhat is x? | -1 <AND> -5 | x = -1 | ")
    c = llavabench_content("Q?", "REF", "ANS", "complex", context="CAP")
    assert c.startswith("[Context]\nCAP\n\n[Question]\nQ?\n\n[Assistant 1]\nREF\n\n[End of Assistant 1]\n\n"
                        "[Assistant 2]\nANS\n\n[End of Assistant 2]\n\n[System]\nWe would like to request")
    assert "scale of 1 to 10" in c and c.endswith("does not affect your judgment.\n\n")
    with pytest.raises(ValueError, match="unknown LLaVA-Bench category"):
        llavabench_content("q", "r", "a", "coding")


# ---------------------------------------------------------------- MM-Vet


def test_mmvet_good_score(judge: GPTJudge, server: FakeOpenAI) -> None:
    assert isinstance(judge, Judge) and judge.name == "gpt-4-0613"
    server.reply("0.5")
    assert judge.score_mmvet("What is x?", "-1<AND>-5", "x = -1") == 0.5
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {FAKE_KEY}"
    body = req["body"]
    assert body["model"] == "gpt-4-0613" and body["temperature"] == 0.0 and body["max_tokens"] == 3
    assert body["messages"] == [{"role": "user", "content": mmvet_query("What is x?", "-1<AND>-5", "x = -1")}]


def test_mmvet_retry_raises_temperature(judge: GPTJudge, server: FakeOpenAI) -> None:
    server.reply("The answer", "0.8")
    j = judge.judge_mmvet("q", "gt", "pred")
    assert j.scores == [0.8] and not j.failed and j.replies == ["The answer", "0.8"]
    assert [r["body"]["temperature"] for r in server.requests] == [0.0, 0.5]
    assert server.requests[1]["body"]["messages"][0]["content"].endswith(MMVET_RETRY_SUFFIX)
    assert j.response_model == "gpt-4-0613-served"


def test_mmvet_gives_zero_after_five_tries(judge: GPTJudge, server: FakeOpenAI) -> None:
    server.reply(*["n/a"] * 5, "1.0")
    j = judge.judge_mmvet("q", "gt", "pred")
    assert j.failed and j.scores == [0.0] and len(server.requests) == 5
    assert [r["body"]["temperature"] for r in server.requests] == [0.0, 0.5, 1.0, 1.5, 2.0]
    # the failure is a judgement too: cached, not re-asked
    assert judge.score_mmvet("q", "gt", "pred") == 0.0 and len(server.requests) == 5


# ---------------------------------------------------------------- LLaVA-Bench


def test_llavabench_scores(judge: GPTJudge, server: FakeOpenAI) -> None:
    server.reply("8 7\nAssistant 1 is more detailed.")
    assert judge.score_llavabench("What is it?", "It is ramen.", "Noodles.", "conv", context="A bowl") == (8.0, 7.0)
    body = server.requests[0]["body"]
    assert body["temperature"] == 0.2 and body["max_tokens"] == 1024
    assert body["messages"][0] == {"role": "system", "content": LLAVA_SYSTEM_PROMPT}
    assert body["messages"][1]["content"] == llavabench_content("What is it?", "It is ramen.", "Noodles.", "conv",
                                                               "A bowl")


def test_llavabench_retry_then_failure(judge: GPTJudge, server: FakeOpenAI) -> None:
    server.reply("I think both are fine.", "9 6\nok")
    assert judge.score_llavabench("q", "r", "a", "detail") == (9.0, 6.0)
    assert len(server.requests) == 2
    server.reply("no scores", "still none", "nope")
    j = judge.judge_llavabench("q2", "r", "a", "complex")
    assert j.failed and j.scores == [-1.0, -1.0] and len(j.replies) == 3
    assert judge.score_llavabench("q2", "r", "a", "complex") == (-1.0, -1.0)
    assert len(server.requests) == 5


# ---------------------------------------------------------------- cache


def test_cache_second_call_sends_no_request(judge: GPTJudge, server: FakeOpenAI, tmp_path: Path) -> None:
    server.reply("0.9", "6 8\nfine")
    assert judge.score_mmvet("q", "a", "b") == 0.9
    assert judge.score_llavabench("q", "r", "a", "conv") == (6.0, 8.0)
    assert len(server.requests) == 2
    assert judge.score_mmvet("q", "a", "b") == 0.9
    assert judge.score_llavabench("q", "r", "a", "conv") == (6.0, 8.0)
    assert len(server.requests) == 2 and judge.cache_hits == 2
    # a new judge over the same cache dir (a rerun) pays nothing either
    rerun = GPTJudge(tmp_path / "cache", model="gpt-4-0613", base_url=server.url, api_key="other")
    assert rerun.judge_mmvet("q", "a", "b").cached
    assert len(server.requests) == 2 and len(rerun.cache) == 2
    # another judge model is another key
    server.reply("0.1")
    other = GPTJudge(tmp_path / "cache", model="gpt-4o", base_url=server.url, api_key="other")
    assert other.score_mmvet("q", "a", "b") == 0.1 and len(server.requests) == 3
    assert (tmp_path / "cache" / CACHE_FILENAME).is_file()


# ---------------------------------------------------------------- configuration and secrets


def test_config_from_environment(monkeypatch: pytest.MonkeyPatch, server: FakeOpenAI, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("ELLAVA_JUDGE_MODEL", "my-judge")
    j = GPTJudge(tmp_path, retry_backoff_s=0.0)
    assert j.name == "my-judge" and j.base_url == server.url
    server.reply("0.4")
    assert j.score_mmvet("q", "a", "b") == 0.4
    assert server.requests[0]["auth"] == f"Bearer {FAKE_KEY}" and server.requests[0]["body"]["model"] == "my-judge"


def test_openai_endpoint_needs_a_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        GPTJudge(tmp_path)


def test_key_never_leaks(judge: GPTJudge, server: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                         capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    assert FAKE_KEY not in repr(judge) and FAKE_KEY not in str(judge)
    assert FAKE_KEY not in repr(vars(judge)) and FAKE_KEY not in str(vars(judge))
    server.reply("bad", "0.5", "x y z", "3 4\n")  # retries, so every log path runs
    judge.score_mmvet("q", "gt", "pred")
    judge.score_llavabench("q", "r", "a", "conv")
    # a 401 whose body echoes the key (as real endpoints do, partially) must not carry it into the error
    server.reply((401, json.dumps({"error": {"message": f"Incorrect API key provided: {FAKE_KEY}."}})))
    with pytest.raises(JudgeError) as err:
        judge.score_mmvet("another", "gt", "pred")
    assert "401" in str(err.value)
    # 5xx: retried, logged, then raised
    server.reply((500, f"server error for {FAKE_KEY}"), (503, "busy"), (502, FAKE_KEY))
    with pytest.raises(JudgeError) as err5:
        judge.score_mmvet("third", "gt", "pred")
    assert len(server.requests) == 8
    texts = [str(err.value), repr(err.value), str(err5.value), repr(err5.value), caplog.text,
             *(r.getMessage() for r in caplog.records)]
    out = capsys.readouterr()
    texts += [out.out, out.err]
    assert all(FAKE_KEY not in t for t in texts)
    assert "judge request attempt 1/3 failed" in caplog.text
    written = all_text(tmp_path)
    assert written and FAKE_KEY.encode() not in written
    assert FAKE_KEY[3:].encode() not in written  # not even without its prefix


def test_unreachable_endpoint_raises(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = GPTJudge(tmp_path, base_url=f"http://127.0.0.1:{port}/v1", api_key=FAKE_KEY, http_retries=2,
                 retry_backoff_s=0.0, timeout_s=2.0)
    with pytest.raises(JudgeError, match="after 2 attempts") as err:
        j.score_mmvet("q", "a", "b")
    assert FAKE_KEY not in str(err.value) and j.requests_sent == 2
    assert len(j.cache) == 0  # transport failures are not judgements
