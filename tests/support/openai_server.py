"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

It answers POST /v1/chat/completions (and /chat/completions) from fixture replies keyed by the
user message, injects faults in the order they are queued (one per request), and records every
request it receives: path, headers and JSON body.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

# Faults, one per request, in the order queued with `fail`:
SLOW = "slow"  # answers after `slow_seconds`, later than the client's timeout
RATE_LIMITED = "429"  # HTTP 429 with a Retry-After header of `retry_after` seconds
SERVER_ERROR = "500"
UNAVAILABLE = "503"
NOT_JSON = "not-json"  # HTTP 200 whose body is not JSON
PROSE = "prose"  # a well-formed completion whose content has no list of captions
PROSE_REPLY = "I am sorry, but I cannot help with that. Perhaps try a different request."


class FakeOpenAI:
    def __init__(self, replies: dict[str, str] | None = None, slow_seconds: float = 1.5, retry_after: float = 0.3):
        self.replies = dict(replies or {})
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.requests: list[dict] = []
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def fail(self, *faults: str) -> None:
        """Queue faults for the next requests."""
        self._faults.extend(faults)

    def reply_for(self, prompt: str) -> str:
        """The fixture reply to a user message; by default a numbered list under a line of prose."""
        return self.replies.get(prompt, f"Here are some contrasting captions:\n1. {prompt} at night\n"
                                        f"2. {prompt} in the rain\n3. {prompt}, drawn in pencil")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _record(self, request: dict) -> None:
        with self._lock:
            self.requests.append(request)


def _handler(server: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path not in ("/v1/chat/completions", "/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            headers = {name.lower(): value for name, value in self.headers.items()}
            server._record({"path": self.path, "headers": headers, "body": body})
            fault = server._next_fault()
            if fault == SLOW:
                time.sleep(server.slow_seconds)
            if fault == RATE_LIMITED:
                return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                                  {"Retry-After": str(server.retry_after)})
            if fault in (SERVER_ERROR, UNAVAILABLE):
                return self._send(int(fault), {"error": {"message": "The server had an error", "type": "server_error"}})
            if fault == NOT_JSON:
                return self._send(200, b"<html>upstream proxy error</html>")
            prompt = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
            content = PROSE_REPLY if fault == PROSE else server.reply_for(prompt)
            self._send(200, {
                "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
            })

        def _send(self, status: int, payload, headers: dict | None = None):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): what a slow reply is for

        def log_message(self, format, *args):  # keep test output clean
            pass

    return Handler
