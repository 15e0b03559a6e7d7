"""`ess serve`: an OpenAI-compatible chat endpoint over a guarded model, with the safety trace.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "seed",
                                 "top_k" (an extension), "stream"} -> a `chat.completion`, plus an
                                 `ess` object (the generation's `to_json()`: first verdict,
                                 intervention point, withdrawn tokens, the [CLS] trace); with
                                 "stream": true, server-sent `chat.completion.chunk` deltas of the
                                 released text, a final chunk carrying `ess`, then `data: [DONE]`
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"}

One model; requests from concurrent connections, streamed or not, are generated together in
batches (`Batcher`); a streaming client that disconnects ends only its own row.
Any OpenAI client works against it. Bad requests get a 400 with an OpenAI-style
`{"error": {"message", "type"}}` naming the field, never a traceback. The standard library's HTTP
server: no extra dependency, meant for a trusted network.
"""

from __future__ import annotations

import json
import queue
import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .data.encoding import ChatEncoder
from .generation import GenerationError, Policy, Request, Sampling, generate_stream

ROLES = ("system", "user", "assistant")
FINISH_REASONS = {"eos": "stop", "refusal": "stop", "length": "length"}
"""The generator's finish reasons in OpenAI's words; `ess.finish_reason` keeps the generator's own."""


class RequestError(ValueError):
    """A request the endpoint cannot answer as sent (HTTP 400)."""


@dataclass
class ServeConfig:
    """What `ess serve` serves, and how."""

    name: str
    """Model id reported by the API (`--model` as given)."""
    policy: Policy = field(default_factory=Policy)
    """Strategic attention and decoding of every answer."""
    max_new_tokens: int = 256
    """Tokens an answer may generate when the request sets no `max_tokens`."""
    batch_size: int = 8
    """Requests from different connections generated together, at most."""
    batch_wait: float = 0.01
    """Seconds a batch waits for more requests after its first one."""


def chat_request(body: object, config: ServeConfig) -> Request:
    """The guarded-generation request of an OpenAI chat-completion body; raises RequestError."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    if body.get("n", 1) != 1:
        raise RequestError("'n': only one choice per request is supported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}")
    chat = [_message(m, i) for i, m in enumerate(messages)]
    if chat[-1]["role"] != "user":
        raise RequestError(f"messages[{len(chat) - 1}]: the last message must be the user's")
    sampling = Sampling(
        max_new_tokens=_number(body, "max_tokens", int, config.max_new_tokens, least=1),
        temperature=_number(body, "temperature", float, 0.0, least=0),
        top_p=_number(body, "top_p", float, 1.0, least=0),
        top_k=_number(body, "top_k", int, 0, least=0),
        seed=_number(body, "seed", int, random.randrange(2**31)),  # no seed: not tied to the batch
    )
    return Request(chat, sampling=sampling, policy=config.policy)


def _message(message: object, index: int) -> dict[str, str]:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"messages[{index}]: expected {{role, content}} with role one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"messages[{index}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string")
    return {"role": message["role"], "content": content}


def _number(body: dict, key: str, kind: type, default, least: float | None = None):
    value = body.get(key)
    if value is None:
        return default
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (kind is int and not float(value).is_integer()):
        raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}")
    if least is not None and value < least:
        raise RequestError(f"'{key}' must be at least {least}")
    return kind(value)


def ess_object(generation, request: Request) -> dict:
    """The `ess` object of an answer: the generation's serialization and the policy's main fields."""
    policy = {"schedule": request.policy.schedule, "reliance": request.policy.reliance, "tau": request.policy.tau}
    return {**generation.to_json(), "policy": {**policy, "hold_back": request.policy.hold_back}}


def chunk(completion_id: str, name: str, delta: dict, finish_reason: str | None = None) -> dict:
    """One `chat.completion.chunk` of a streamed answer."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def chat_completion(generation, request: Request, prompt_tokens: int, name: str) -> dict:
    """An OpenAI `chat.completion` of one guarded generation, with the `ess` safety trace."""
    completion_tokens = len(generation.token_ids)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "finish_reason": FINISH_REASONS.get(generation.finish_reason, "stop"),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "ess": ess_object(generation, request),
    }


class _Pending:
    """One request waiting for its answer."""

    def __init__(self, request: Request):
        self.request = request
        self.done = threading.Event()
        self.answer: tuple[object, int] | None = None
        self.error: Exception | None = None
        self.texts: queue.Queue[str | None] = queue.Queue()
        """Released text as it clears; None once the answer (or the error) is set."""
        self.cancelled = threading.Event()


class Batcher:
    """Answers requests from many connections in batches, on one thread that owns the model.

    A batch starts with the first waiting request and takes whatever else arrives within `wait`
    seconds, up to `batch_size`. If the batch cannot be generated together (one prompt too long for
    the context next to another's token budget), each request is answered alone, so one bad request
    fails only itself."""

    def __init__(self, model, batch_size: int, wait: float):
        self.model = model
        self.encoder = ChatEncoder.for_model(model)
        self.batch_size = batch_size
        self.wait = wait
        self.batches = 0
        self.queue: queue.Queue[_Pending] = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="ess-batcher").start()

    def submit(self, request: Request) -> tuple[object, int]:
        """(generation, prompt tokens) of one request; blocks until it is answered."""
        pending = self.start(request)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.answer

    def start(self, request: Request) -> _Pending:
        """Queue a request; its released text arrives on `.texts`, then `.answer` or `.error`."""
        pending = _Pending(request)
        self.queue.put(pending)
        return pending

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.batch_size and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            self.batches += 1
            if not self._answer(batch):
                for pending in batch:
                    self._answer([pending])
            for pending in batch:
                pending.texts.put(None)
                pending.done.set()

    def _answer(self, batch: list[_Pending]) -> bool:
        """Answer the batch; False where it failed as a whole before any text was released (a lone
        request keeps its error)."""
        try:
            stream = generate_stream(
                self.model, [p.request for p in batch], len(batch), cancelled=lambda i: batch[i].cancelled.is_set()
            )
            generations = [None] * len(batch)
            for event in stream:
                if event.text:
                    batch[event.index].texts.put(event.text)
                if event.generation is not None:
                    generations[event.index] = event.generation
            answers = [(g, len(self.encoder.query_ids(p.request.messages))) for p, g in zip(batch, generations)]
        except Exception as error:
            if len(batch) > 1:
                return False
            batch[0].error = RequestError(str(error)) if isinstance(error, GenerationError) else error
            return True
        for pending, answer in zip(batch, answers):
            pending.answer = answer
        return True


class ChatServer(ThreadingHTTPServer):
    """The HTTP server and the model it serves through a `Batcher`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], model, config: ServeConfig):
        super().__init__(address, _Handler)
        self.config = config
        self.batcher = Batcher(model, config.batch_size, config.batch_wait)

    def answer(self, body: object) -> dict:
        request = chat_request(body, self.config)
        generation, prompt_tokens = self.batcher.submit(request)
        return chat_completion(generation, request, prompt_tokens, self.config.name)

    def stream(self, body: object, send) -> None:
        """Stream the answer as `chat.completion.chunk`s through `send(payload | None)` (None:
        `[DONE]`); a send that fails (the client left) cancels the request's row."""
        request = chat_request(body, self.config)
        pending = self.batcher.start(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            send(chunk(completion_id, self.config.name, {"role": "assistant", "content": ""}))
            while (text := pending.texts.get()) is not None:
                send(chunk(completion_id, self.config.name, {"content": text}))
            pending.done.wait()
            if pending.error is not None:
                send({"error": {"message": str(pending.error), "type": "server_error"}})
            else:
                generation, _ = pending.answer
                finish = FINISH_REASONS.get(generation.finish_reason, "stop")
                send({**chunk(completion_id, self.config.name, {}, finish), "ess": ess_object(generation, request)})
            send(None)
        except OSError:  # the client disconnected: only its own row ends
            pending.cancelled.set()


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send(
                200, {"object": "list", "data": [{"id": self.server.config.name, "object": "model", "owned_by": "ess"}]}
            )
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            if isinstance(body, dict) and body.get("stream"):
                chat_request(body, self.server.config)  # a bad request gets its 400 before the stream starts
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                self.close_connection = True
                self.server.stream(body, self._event)
            else:
                self._send(200, self.server.answer(body))
        except json.JSONDecodeError as error:
            self._error(400, f"the body is not JSON: {error}", "invalid_request_error")
        except RequestError as error:
            self._error(400, str(error), "invalid_request_error")
        except Exception as error:  # the server keeps serving; the client learns what failed
            print(f"ess serve: {type(error).__name__}: {error}", file=sys.stderr)
            self._error(500, f"{type(error).__name__}: {error}", "server_error")

    def _event(self, payload: dict | None) -> None:
        data = "[DONE]" if payload is None else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send(status, {"error": {"message": message, "type": kind}})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        print(f"ess serve: {self.address_string()} {format % args}", file=sys.stderr)
