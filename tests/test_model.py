"""The scripted model on its own, over HTTP: the OpenAI chat-completions shapes opencode reads."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator

import pytest
import requests

from tests.support.llm import MODEL_ID, Reply, ScriptedModel, is_title_request, last_user_text


def chat(model: ScriptedModel, text: str, stream: bool = True, **extra: Any) -> requests.Response:
    body = {"model": MODEL_ID, "stream": stream,
            "messages": [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": text}],
            **extra}
    return requests.post(f"{model.url}/v1/chat/completions", json=body, timeout=10, stream=stream)


def chunks(resp: requests.Response) -> Iterator[dict[str, Any] | str]:
    """The ``data:`` payloads of an SSE response; ``[DONE]`` as the string."""
    for line in resp.iter_lines(decode_unicode=True):
        assert isinstance(line, str)
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def streamed_text(resp: requests.Response) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks(resp) if isinstance(c, dict))


def test_models_list(model: ScriptedModel) -> None:
    r = requests.get(f"{model.url}/v1/models", timeout=5)
    assert r.json()["data"][0]["id"] == MODEL_ID


def test_stream_shape_text(model: ScriptedModel) -> None:
    model.enqueue(Reply.text("hello there world"))
    resp = chat(model, "hi")
    assert resp.headers["content-type"].startswith("text/event-stream")
    got = list(chunks(resp))
    assert got[-1] == "[DONE]"
    frames = [c for c in got if isinstance(c, dict)]
    assert all(f["object"] == "chat.completion.chunk" for f in frames)
    assert frames[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(f["choices"][0]["delta"].get("content") or "" for f in frames) == "hello there world"
    assert frames[-1]["choices"][0]["finish_reason"] == "stop" and frames[-1]["usage"]["total_tokens"] > 0


def test_stream_shape_tool_calls(model: ScriptedModel) -> None:
    model.enqueue(Reply.tool_calls([("a_tool", {"x": 1}), ("b_tool", {"y": "z"})]))
    frames = [c for c in chunks(chat(model, "go")) if isinstance(c, dict)]
    calls: dict[int, dict[str, str]] = {}
    for f in frames:
        for tc in f["choices"][0]["delta"].get("tool_calls", []):
            entry = calls.setdefault(tc["index"], {"name": "", "arguments": "", "id": ""})
            entry["id"] += tc.get("id", "")
            entry["name"] += tc.get("function", {}).get("name", "")
            entry["arguments"] += tc.get("function", {}).get("arguments", "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("a_tool", {"x": 1}),
                                                                               ("b_tool", {"y": "z"})]
    assert len({c["id"] for c in calls.values()}) == 2
    assert frames[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_non_streaming(model: ScriptedModel) -> None:
    model.enqueue(Reply.text("plain"), Reply.tool_call("t", {"k": "v"}))
    body = chat(model, "one", stream=False).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "plain"
    body = chat(model, "two", stream=False).json()
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "t" and json.loads(call["function"]["arguments"]) == {"k": "v"}
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_queue_rules_default_and_reset(model: ScriptedModel) -> None:
    model.enqueue(Reply.text("first"), Reply.text("second"))
    model.add_rule(lambda r: "SPECIAL" in last_user_text(r), Reply.text("by rule"))
    model.add_rule(lambda r: "CALLABLE" in last_user_text(r), lambda r: Reply.text(last_user_text(r).lower()))
    model.add_rule(lambda r: r["nope"], Reply.text("a broken predicate never matches"))
    assert streamed_text(chat(model, "SPECIAL")) == "by rule"
    assert streamed_text(chat(model, "x")) == "first"
    assert streamed_text(chat(model, "CALLABLE One")) == "callable one"
    assert streamed_text(chat(model, "y")) == "second"
    assert streamed_text(chat(model, "z")) == "ok"
    model.reset()
    assert streamed_text(chat(model, "SPECIAL")) == "ok"
    assert len(model.requests) == 6


def test_title_requests_skip_the_queue(model: ScriptedModel) -> None:
    model.enqueue(Reply.text("queued"))
    title: dict[str, Any] = {"model": MODEL_ID, "stream": True, "messages": [
        {"role": "system", "content": "You are a title generator. You output ONLY a thread title."},
        {"role": "user", "content": "Generate a title for this conversation: hello"}]}
    resp = requests.post(f"{model.url}/v1/chat/completions", json=title, timeout=10, stream=True)
    assert streamed_text(resp) == "Scripted session"
    assert is_title_request(model.requests[0])
    assert streamed_text(chat(model, "real", tools=[{"type": "function", "function": {"name": "t"}}])) == "queued"
    assert model.chat_requests() == [model.requests[1]]


def test_script_tool_then_text(model: ScriptedModel) -> None:
    model.script_tool_then_text("claude-teams_read_inbox", {"team_name": "t"}, "all read", marker="M1")
    first = [c for c in chunks(chat(model, "M1 go")) if isinstance(c, dict)]
    assert first[-1]["choices"][0]["finish_reason"] == "tool_calls"
    follow: dict[str, Any] = {"model": MODEL_ID, "stream": True, "messages": [
        {"role": "user", "content": "M1 go"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "claude-teams_read_inbox", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "[]"}]}
    resp = requests.post(f"{model.url}/v1/chat/completions", json=follow, timeout=10, stream=True)
    assert streamed_text(resp) == "all read"


def test_error_reply(model: ScriptedModel) -> None:
    model.enqueue(Reply.error(503, "overloaded"))
    r = chat(model, "x")
    assert r.status_code == 503 and r.json()["error"]["message"] == "overloaded"


def test_slow_reply_streams_over_time(model: ScriptedModel) -> None:
    model.enqueue(Reply.slow("a b c d", 0.05))
    start = time.monotonic()
    assert streamed_text(chat(model, "x")) == "a b c d"
    assert time.monotonic() - start >= 0.2


def test_hang_until_released_and_wait_for_request(model: ScriptedModel) -> None:
    release = threading.Event()
    model.enqueue(Reply.hang(release, then=Reply.text("finally")))
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(streamed_text(chat(model, "HANG"))))
    t.start()
    req = model.wait_for_request(lambda r: last_user_text(r) == "HANG", timeout=5)
    assert req["stream"] is True
    t.join(0.3)
    assert t.is_alive() and not out
    release.set()
    t.join(5)
    assert out == ["finally"]


def test_wait_for_request_times_out(model: ScriptedModel) -> None:
    with pytest.raises(AssertionError, match="no matching request"):
        model.wait_for_request(lambda r: False, timeout=0.2)


def test_close_frees_a_hang(model: ScriptedModel) -> None:
    model.enqueue(Reply.hang(threading.Event()))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            _ = chat(model, "x").content
        except requests.RequestException as exc:
            errors.append(exc)
    t = threading.Thread(target=call)
    t.start()
    model.wait_for_request(lambda r: True, timeout=5)
    model.close()
    t.join(5)
    assert not t.is_alive()
