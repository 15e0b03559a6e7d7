"""`ess serve`: the OpenAI-compatible endpoint answers as guarded generation does, with the trace."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from ess.generation import Policy, Request, Sampling, generate
from ess.model import ESSModel
from ess.server import ChatServer, ServeConfig

QUESTION = [{"role": "user", "content": "How do I bake sourdough bread?"}]


@pytest.fixture(scope="module")
def served(tiny_llama):
    model = ESSModel.from_base(tiny_llama).eval()
    config = ServeConfig(name="tiny", max_new_tokens=12, batch_size=8, batch_wait=0.5)
    server = ChatServer(("127.0.0.1", 0), model, config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield model, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def _call(url: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_chat_completion_is_the_guarded_generation_with_its_trace(served):
    model, url, _ = served
    status, answer = _call(url + "/v1/chat/completions", {"model": "tiny", "messages": QUESTION, "max_tokens": 10})
    assert status == 200 and answer["object"] == "chat.completion" and answer["model"] == "tiny"
    expected = generate(model, [Request(QUESTION, sampling=Sampling(max_new_tokens=10), policy=Policy())])[0]
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] == len(expected.token_ids)
    ess = answer["ess"]
    assert ess["p_malicious"] == pytest.approx(expected.p_malicious, abs=1e-6)
    assert [t["step"] for t in ess["trace"]] == [t.step for t in expected.trace]
    assert ess["trace"][0]["rule"] == 0 and ess["policy"]["schedule"] == "annealing"


def test_a_malicious_verdict_answers_with_the_explained_refusal(served):
    model, url, _ = served
    threshold = model.config.threshold
    model.config.threshold = 0.0  # every query verdict malicious
    try:
        status, answer = _call(url + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4})
    finally:
        model.config.threshold = threshold
    assert status == 200
    assert answer["choices"][0]["message"]["content"].startswith(Policy().guiding_text)
    assert answer["ess"]["intervened"] and answer["ess"]["intervention_step"] == 0


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]: expected {role, content}"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"messages": QUESTION + [{"role": "assistant", "content": "Sure"}]}, "the last message must be the user's"),
        ({"messages": QUESTION, "temperature": -1}, "'temperature' must be at least 0"),
        ({"messages": QUESTION, "max_tokens": "ten"}, "'max_tokens' must be an integer"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "exceeds the model's context"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field(served, body, message):
    status, answer = _call(served[1] + "/v1/chat/completions", body)
    assert status == 400 and message in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"


def test_concurrent_requests_are_generated_together_and_fail_alone(served):
    model, url, server = served
    questions = [
        "What is a binary search?",
        "How do tides work?",
        "Suggest a name for a cat.",
        "Explain rain.",
        "word " * 600,
    ]  # the last is too long for the context: it fails, the batch does not
    answers: dict[int, tuple[int, dict]] = {}

    def ask(i: int) -> None:
        answers[i] = _call(
            url + "/v1/chat/completions", {"messages": [{"role": "user", "content": questions[i]}], "max_tokens": 6}
        )

    before = server.batcher.batches
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.batcher.batches - before < len(questions)  # some requests shared a batch
    assert answers[4][0] == 400 and "exceeds the model's context" in answers[4][1]["error"]["message"]
    alone = generate(
        model,
        [Request([{"role": "user", "content": q}], sampling=Sampling(max_new_tokens=6)) for q in questions[:4]],
        batch_size=1,
    )
    for i, expected in enumerate(alone):  # each connection got the answer to its own question
        status, answer = answers[i]
        assert status == 200 and answer["ess"]["p_malicious"] == pytest.approx(expected.p_malicious, abs=1e-4)


def test_models_health_and_unknown_routes(served):
    url = served[1]
    assert _call(url + "/v1/models") == (
        200,
        {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "ess"}]},
    )
    assert _call(url + "/health") == (200, {"status": "ok"})
    assert _call(url + "/v1/completions", {"prompt": "hi"})[0] == 404
    status, answer = _call(url + "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not JSON" in answer["error"]["message"]


def test_ess_serve_refuses_a_port_in_use_in_one_line(served, tmp_path, run_ess):
    port = served[1].rsplit(":", 1)[1]
    code, stderr = run_ess(["serve", "--model", str(tmp_path / "not-loaded"), "--port", port])
    assert (
        code == 2 and stderr.strip() == f"ess serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def _sse(url: str, body: dict) -> list:
    """The `data:` payloads of a raw streamed answer."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        lines = [line.decode().rstrip("\n") for line in response]
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_raw_http_stream_is_server_sent_chunks_ending_with_the_ess_object(served):
    _, url, _ = served
    body = {"messages": QUESTION, "max_tokens": 10, "temperature": 1.0, "seed": 7}
    chunks = _sse(url + "/v1/chat/completions", {**body, "stream": True})
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and final["ess"]["text"] == streamed
    status, answer = _call(url + "/v1/chat/completions", body)
    assert status == 200 and answer["choices"][0]["message"]["content"] == streamed


def test_openai_client_streams_and_not(served):
    import openai

    _, url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    kwargs = dict(model="tiny", messages=QUESTION, max_tokens=10, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**kwargs)
    pieces = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert streamed == whole.choices[0].message.content
    assert pieces[-1].model_extra["ess"]["text"] == streamed


def test_a_withdrawn_answer_never_streams_a_withdrawn_token(tiny_llama):
    from late import late_requests, lively
    from test_generation import _model
    from test_hold_back import BEFORE

    model = lively(_model(tiny_llama))
    request = late_requests(model, BEFORE["sampled"]["response_thresholds"])[0]  # stopped mid-way
    config = ServeConfig(name="tiny", policy=request.policy, max_new_tokens=24, batch_size=2, batch_wait=0.2)
    server = ChatServer(("127.0.0.1", 0), model, config)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        body = {"messages": request.messages, "max_tokens": 24, "temperature": 1.0, "seed": request.sampling.seed}
        expected = generate(model, [Request(request.messages, sampling=request.sampling, policy=request.policy)])[0]
        assert expected.intervened and expected.withdrawn_token_ids
        chunks = _sse(url, {**body, "stream": True})
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert streamed == expected.text and chunks[-1]["ess"]["withdrawn_text"] == expected.withdrawn_text
        assert expected.withdrawn_text.strip() and expected.withdrawn_text not in streamed
    finally:
        server.shutdown()
        server.server_close()
