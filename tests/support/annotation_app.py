"""For the annotation app's tests and benchmark: the real server on 127.0.0.1 in a thread (on a
port the system picked), valid random answers, and simulated annotators answering at once."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from dataclasses import dataclass, field

from tia2.store import Store


@contextlib.contextmanager
def running_server(store: Store):
    """The annotation app served by uvicorn on 127.0.0.1 in a thread: yields its base URL, and
    stops it (and its answer writer) on exit."""
    import uvicorn

    from app.annotation_server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # handed to uvicorn bound, so no other process can take the port meanwhile
    server = uvicorn.Server(uvicorn.Config(create_app(store), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the annotation server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def some_answer(item: dict, rng: random.Random) -> dict:
    """A valid random answer to an item as the API shows it (the formats of tia2.annotation)."""
    ids = [image["image_id"] for image in item["images"]]
    if item["task"] == "rating":
        answer = {"label": rng.choice(["good", "bad", "skip"])}
        if item["settings"].get("aspects"):
            answer["alignment"] = rng.randint(1, 7)
        return answer
    if item["task"] == "ranking":
        return {"ranks": {i: rng.randint(1, len(ids)) for i in ids}}
    if item["task"] == "pairwise":
        return {"choice": rng.choice(["A", "B", "tie"])}
    best, worst = rng.sample(ids, 2)
    return {"best": best, "worst": worst}


@dataclass
class Annotated:
    """What simulated annotators were told: each acknowledged answer (item, token), each answer
    request's latency in seconds, and the wall time of the whole run."""
    acknowledged: list[tuple[str, str]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0


def annotate_concurrently(url: str, tokens: list[str], batch: str, answers_each: int, *, seed: int = 0,
                          timeout: float = 600.0) -> Annotated:
    """One thread per token answers its next `answers_each` items of `batch` over HTTP, as the
    page does (next, then the answer); RuntimeError on the first failure, or when `timeout`
    seconds pass first."""
    import httpx

    result, lock, errors = Annotated(), threading.Lock(), []
    deadline = time.monotonic() + timeout

    def annotator(n: int, token: str) -> None:
        try:
            answer_queue(n, token)
        except Exception as exc:  # a thread's exception would otherwise only be printed
            errors.append(f"annotator {n}: {exc}")

    def answer_queue(n: int, token: str) -> None:
        rng = random.Random(f"{seed}/{n}")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            for _ in range(answers_each):
                if errors:
                    return  # another one failed: the run is over
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not done after {timeout:.0f} s")
                items = client.get(f"/api/batches/{batch}/next", params={"count": 1}).raise_for_status().json()["items"]
                if not items:
                    raise RuntimeError("ran out of items")
                start = time.perf_counter()
                response = client.post(f"/api/batches/{batch}/answers",
                                       json={"item": items[0]["item"], "answer": some_answer(items[0], rng)})
                took = time.perf_counter() - start
                if response.status_code != 200 or response.json().get("saved") is not True:
                    raise RuntimeError(f"{response.status_code} {response.text}")
                with lock:
                    result.latencies.append(took)
                    result.acknowledged.append((items[0]["item"], token))

    threads = [threading.Thread(target=annotator, args=(n, token)) for n, token in enumerate(tokens)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    return result
