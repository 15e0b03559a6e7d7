"""`ess serve`: an OpenAI-compatible chat endpoint over a guarded model, with the safety trace.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "seed",
                                 "top_k" (an extension)} -> a `chat.completion`, plus an `ess`
                                 object: first verdict, intervention point and the [CLS] trace
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"}

One model; requests from concurrent connections are generated together in batches (`Batcher`).
Any OpenAI client works against it. Bad requests get a 400 with an OpenAI-style
`{"error": {"message", "type"}}` naming the field, never a traceback. The standard library's HTTP
server: no extra dependency, meant for a trusted network.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .data.encoding import ChatEncoder
from .generation import GenerationError, Policy, Request, Sampling, generate

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
    if body.get("stream"):
        raise RequestError("'stream': streaming is not supported; send stream=false")
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
        seed=_number(body, "seed", int, None),
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
        "ess": {
            "p_malicious": generation.p_malicious,
            "intervened": generation.intervened,
            "intervention_step": generation.intervention_step,
            "tokens_before_intervention": generation.tokens_before_intervention,
            "finish_reason": generation.finish_reason,
            "trace": [asdict(t) for t in generation.trace],
            "policy": {
                "schedule": request.policy.schedule,
                "reliance": request.policy.reliance,
                "tau": request.policy.tau,
            },
        },
    }


class _Pending:
    """One request waiting for its answer."""

    def __init__(self, request: Request):
        self.request = request
        self.done = threading.Event()
        self.answer: tuple[object, int] | None = None
        self.error: Exception | None = None


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
        pending = _Pending(request)
        self.queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.answer

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
                pending.done.set()

    def _answer(self, batch: list[_Pending]) -> bool:
        """Answer the batch; False where it failed as a whole (a lone request keeps its error)."""
        try:
            generations = generate(self.model, [p.request for p in batch], batch_size=len(batch))
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
            self._send(200, self.server.answer(body))
        except json.JSONDecodeError as error:
            self._error(400, f"the body is not JSON: {error}", "invalid_request_error")
        except RequestError as error:
            self._error(400, str(error), "invalid_request_error")
        except Exception as error:  # the server keeps serving; the client learns what failed
            print(f"ess serve: {type(error).__name__}: {error}", file=sys.stderr)
            self._error(500, f"{type(error).__name__}: {error}", "server_error")

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
