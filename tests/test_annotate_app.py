"""The annotation app's HTTP API against the real server (uvicorn on 127.0.0.1): the personal
link, every task's answers and undo, who may read and write what, image URLs that try to leave
the store, oversized and malformed bodies (4xx and nothing written), the admin pages, and
answers from several annotators at once (none lost, none doubled)."""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest

from app.annotation_server import MAX_BODY, listening_socket
from tasks import annotate
from tasks.agreement import compute_agreement
from tests.support.annotation import SET, annotation_store
from tests.support.annotation_app import annotate_concurrently, running_server, some_answer
from tests.support.project import PROJECT
from tests.support.stores import copy_store

SPLIT = "split"  # a set whose rating items go to one annotator each: images only one of them may see
BATCHES = {task: f"{SET}-{task}" for task in ("rating", "ranking", "pairwise", "best-worst")}


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotate-app") / "store"
    store = annotation_store(root, prompts=3, images_per_prompt=4)
    annotation_store(root, prompts=2, images_per_prompt=2, set_name=SPLIT)
    tokens = {name: annotate.add_annotator(store, name)[1] for name in ("ann", "bob")}
    tokens["boss"] = annotate.add_annotator(store, "boss", role="admin")[1]
    for task in BATCHES:
        annotate.create_batch(store, task, SET, per_item=2, aspects=task == "rating")
    annotate.create_batch(store, "rating", SPLIT, per_item=1)
    return store, tokens


@pytest.fixture
def app(base_store, tmp_path):
    """A copy of the base store served by the real server; `client(name)` talks as that person."""
    store, tokens = base_store
    store = copy_store(store, tmp_path / "store")
    with running_server(store) as url:
        clients = []

        def client(name: str | None = None, token: str | None = None) -> httpx.Client:
            token = token or (tokens[name] if name else None)
            c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=30)
            clients.append(c)
            return c

        yield SimpleNamespace(url=url, store=store, tokens=tokens, client=client)
        for c in clients:
            c.close()


def table_bytes(store) -> dict[str, bytes]:
    """Every table file's bytes (and the append-only tables' parts), to show that nothing changed."""
    return {str(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.root.rglob("*.parquet"))}


def raw_get(url: str, path: str, token: str) -> tuple[int, bytes]:
    """A GET of `path` exactly as written (httpx would normalise dot segments away)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {token}")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def next_item(client: httpx.Client, batch: str) -> dict:
    page = client.get(f"/api/batches/{batch}/next").raise_for_status().json()
    return page["items"][0]


def split_items(store) -> dict[str, set[str]]:
    """The images of the split batch's items, per annotator name."""
    names = {a.annotator_id: a.name for a in annotate.annotators(store)}
    rows = store.read("annotation_assignments").to_pandas()
    rows = rows[rows["batch"] == f"{SPLIT}-rating"]
    return {names[a]: {i for shown in group["shown"] for i in shown} for a, group in rows.groupby("annotator_id")}


def test_the_personal_link_sets_a_strict_http_only_cookie_and_leads_to_the_person_s_page(app):
    with httpx.Client(base_url=app.url) as browser:
        response = browser.get(f"/a/{app.tokens['ann']}")
        assert response.status_code == 303 and response.headers["location"] == "/"
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/api/me").json() == {"name": "ann", "role": "annotator"}  # by the cookie alone
        home = browser.get("/")
        assert home.status_code == 200 and all(f"/batches/{b}" in home.text for b in BATCHES.values())
        assert "script-src 'self'" in home.headers["content-security-policy"]
        assert home.headers["referrer-policy"] == "no-referrer"
    with httpx.Client(base_url=app.url) as browser:
        assert browser.get(f"/a/{app.tokens['boss']}").headers["location"] == "/admin"
    with httpx.Client(base_url=app.url) as browser:
        forged = browser.get("/a/not-a-token")
        assert forged.status_code == 401 and "set-cookie" not in forged.headers
        assert browser.get("/").status_code == 401


@pytest.mark.parametrize("task", list(BATCHES))
def test_every_task_answers_changes_and_undo_over_the_api(app, task):
    ann = app.client("ann")
    batch = BATCHES[task]
    item = next_item(ann, batch)
    assert item["task"] == task and item["prompt"].endswith("red apples")
    assert all(image["url"] == f"/images/{image['image_id']}" for image in item["images"])
    first = some_answer(item, random.Random(0))
    second = next(a for seed in range(1, 100) if (a := some_answer(item, random.Random(seed))) != first)
    post = lambda answer: ann.post(f"/api/batches/{batch}/answers", json={"item": item["item"], "answer": answer})
    saved = post(first).raise_for_status().json()
    assert saved == {"saved": True, "changed": True, "done": 1, "total": saved["total"]}
    assert next_item(ann, batch)["item"] != item["item"]  # the queue moved on
    assert post(first).json()["changed"] is False  # the same answer again: nothing new
    assert post(second).json() == {"saved": True, "changed": True, "done": 1, "total": saved["total"]}
    log = app.store.read("annotation_log").to_pandas()
    assert list(log.sort_values("at")["action"]) == ["answer", "change"]
    stored = app.store.read("annotations").to_pandas()
    assert len(stored) == 1 and stored["source"].iloc[0] == "app"
    derived = "labels" if task == "rating" else "preference_ranks"
    assert app.store.read(derived).num_rows == (1 if task == "rating" else len(item["images"]))

    undone = ann.post(f"/api/batches/{batch}/undo").raise_for_status().json()
    assert undone == {"item": item["item"], "done": 0, "total": saved["total"]}
    assert next_item(ann, batch)["item"] == item["item"]  # the undone item comes back first
    assert app.store.read("annotations").num_rows == 0 and app.store.read(derived).num_rows == 0
    assert ann.post(f"/api/batches/{batch}/undo").json()["item"] is None


def test_no_forged_or_other_annotator_s_token_reads_or_writes_anything(app):
    ann_images = split_items(app.store)["ann"]
    bob = app.client("bob")
    ann_item = next(i for i in app.store.read("annotation_assignments").to_pylist()
                    if i["batch"] == f"{SPLIT}-rating" and set(i["shown"]) <= ann_images)
    before = table_bytes(app.store)
    for client in (app.client(), app.client(token="forged-token-" + "x" * 20)):
        for path in ("/api/me", "/api/batches", f"/api/batches/{BATCHES['rating']}/next",
                     f"/images/{next(iter(ann_images))}", "/api/admin/progress"):
            assert client.get(path).status_code == 401, path
        for path in (f"/api/batches/{BATCHES['rating']}/answers", f"/api/batches/{BATCHES['rating']}/undo"):
            assert client.post(path, json={"item": ann_item["item"], "answer": {"label": "good"}}).status_code == 401
    # bob's own token, ann's item: refused, and bob's undo touches only bob's answers (he has none)
    refused = bob.post(f"/api/batches/{SPLIT}-rating/answers", json={"item": ann_item["item"], "answer": {"label": "bad"}})
    assert refused.status_code == 403
    assert bob.post(f"/api/batches/{SPLIT}-rating/undo").json()["item"] is None
    assert table_bytes(app.store) == before
    # an answer of ann's stays hers: bob's undo does not remove it
    ann = app.client("ann")
    ann.post(f"/api/batches/{SPLIT}-rating/answers", json={"item": ann_item["item"], "answer": {"label": "good"}}).raise_for_status()
    after_ann = table_bytes(app.store)
    assert bob.post(f"/api/batches/{SPLIT}-rating/undo").json()["item"] is None
    assert table_bytes(app.store) == after_ann


def test_images_are_served_only_from_the_caller_s_items_and_urls_cannot_leave_the_store(app):
    split = split_items(app.store)
    assert split["ann"] and split["bob"] and not split["ann"] & split["bob"]
    mine, theirs = sorted(split["ann"])[0], sorted(split["bob"])[0]
    files = dict(zip(*app.store.read("images").select(["image_id", "path"]).to_pydict().values()))
    token = app.tokens["ann"]
    status, body = raw_get(app.url, f"/images/{mine}", token)
    assert status == 200 and body == open(files[mine], "rb").read()
    attempts = [
        f"/images/{theirs}",  # a real image, of another annotator's item
        "/images/..%2F..%2Fetc%2Fpasswd", "/images/../../etc/passwd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/images/..", "/images/%2Fetc%2Fpasswd", "/images//etc/passwd", f"/images/{files[mine]}",
        f"/images/{mine}%00", f"/images/{mine}/..%2F..%2Fstore.parquet", "/images/annotators.parquet",
        "/static/..%2Fannotation_server.py", "/static/../../tia2/store.py",
    ]
    for path in attempts:
        status, body = raw_get(app.url, path, token)
        assert status in (403, 404), (path, status)
        assert b"root:" not in body and b"PNG" not in body and b"import" not in body, path
    admin = app.client("boss")
    assert admin.get(f"/images/{mine}").status_code == 404  # the admin has no items either


def test_oversized_and_malformed_submissions_get_a_4xx_and_write_nothing(app):
    ann = app.client("ann")
    items = {task: next_item(ann, batch) for task, batch in BATCHES.items()}
    ids = {task: [i["image_id"] for i in item["images"]] for task, item in items.items()}
    before = table_bytes(app.store)
    url = f"/api/batches/{BATCHES['rating']}/answers"
    big = json.dumps({"item": items["rating"]["item"], "answer": {"label": "good", "pad": "x" * MAX_BODY}})
    assert ann.post(url, content=big, headers={"content-type": "application/json"}).status_code == 413
    chunked = ann.post(url, content=(big[i:i + 4096].encode() for i in range(0, len(big), 4096)))
    assert chunked.status_code == 413  # no Content-Length: counted while read
    assert ann.post(f"/api/batches/{BATCHES['rating']}/undo", content=big).status_code == 413
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"good"', b"{}", b'{"item": 3, "answer": {}}',
                 json.dumps({"item": items["rating"]["item"]}).encode(),
                 json.dumps({"item": items["rating"]["item"], "answer": {"label": "good"}, "extra": 1}).encode()):
        assert ann.post(url, content=body).status_code == 422, body
    bad_answers = {
        "rating": [{"label": "great"}, {"label": "good", "alignment": 8}, {"label": "good", "alignment": "7"},
                   {"label": "good", "fidelity": True}, {"label": "good", "colour": 3}, "good", None],
        "ranking": [{"ranks": {i: 1 for i in ids["ranking"][:-1]}}, {"ranks": {i: 0 for i in ids["ranking"]}},
                    {"ranks": {**{i: 1 for i in ids["ranking"]}, "someone-else": 2}}, {"ranks": []}],
        "pairwise": [{"choice": "C"}, {"choice": "a"}, {"winner": ids["pairwise"][0]}, {}],
        "best-worst": [{"best": ids["best-worst"][0], "worst": ids["best-worst"][0]},
                       {"best": ids["best-worst"][0], "worst": "not-in-item"}, {"best": ids["best-worst"][0]}],
    }
    for task, answers in bad_answers.items():
        for answer in answers:
            response = ann.post(f"/api/batches/{BATCHES[task]}/answers", json={"item": items[task]["item"], "answer": answer})
            assert response.status_code == 422, (task, answer, response.text)
    assert ann.post(url, json={"item": "no-such-item", "answer": {"label": "good"}}).status_code in (403, 404)
    assert ann.post("/api/batches/no-such-batch/answers", json={"item": "x", "answer": {}}).status_code == 404
    assert ann.get(f"/api/batches/{BATCHES['rating']}/next", params={"count": 0}).status_code == 422
    assert ann.get(f"/api/batches/{BATCHES['rating']}/next", params={"count": 10 ** 6}).status_code == 422
    assert table_bytes(app.store) == before


def test_the_admin_pages_need_the_admin_token_and_show_each_annotator_s_progress(app):
    ann, admin = app.client("ann"), app.client("boss")
    for _ in range(2):
        item = next_item(ann, BATCHES["pairwise"])
        ann.post(f"/api/batches/{BATCHES['pairwise']}/answers",
                 json={"item": item["item"], "answer": {"choice": "A"}}).raise_for_status()
    for path in ("/admin", "/api/admin/progress", f"/api/admin/agreement?batch={BATCHES['pairwise']}"):
        assert app.client().get(path).status_code == 401
        assert app.client(token="forged").get(path).status_code == 401
        assert ann.get(path).status_code == 403
        assert admin.get(path).status_code == 200
    rows = {(r["batch"], r["annotator"]): r for r in admin.get("/api/admin/progress").json()}
    pairs = len(app.store.read("annotation_items").to_pandas().query("batch == @BATCHES['pairwise']"))
    assert rows[(BATCHES["pairwise"], "ann")]["done"] == 2 and rows[(BATCHES["pairwise"], "bob")]["done"] == 0
    assert rows[(BATCHES["pairwise"], "ann")]["total"] == pairs
    assert set(rows) == {(b, name) for b in [*BATCHES.values()] for name in ("ann", "bob")} | \
        {(f"{SPLIT}-rating", "ann"), (f"{SPLIT}-rating", "bob")}
    page = admin.get("/admin").text
    assert f'<td class="num done">2</td><td class="num total">{pairs}</td>' in page
    assert admin.get("/api/admin/agreement").status_code == 422  # which batch?
    assert admin.get("/api/admin/agreement", params={"batch": "no-such-batch"}).status_code == 404

    # agreement as it stands: bob gives the same two answers, so every pair of them agrees
    bob = app.client("bob")
    ids = {a.name: a.annotator_id for a in annotate.annotators(app.store)}
    for item in app.store.read("annotations").to_pandas()["item"]:
        shown = {r["annotator_id"]: r["shown"] for r in app.store.read("annotation_assignments").to_pylist()
                 if r["item"] == item}
        same_side = "A" if shown[ids["bob"]][0] == shown[ids["ann"]][0] else "B"
        bob.post(f"/api/batches/{BATCHES['pairwise']}/answers",
                 json={"item": item, "answer": {"choice": same_side}}).raise_for_status()
    rows = admin.get("/api/admin/agreement", params={"batch": BATCHES["pairwise"]}).json()
    expected = compute_agreement(app.store, BATCHES["pairwise"]).table
    assert [(r["measure"], r["subject"], r["other"], r["n"]) for r in rows] == \
        list(zip(expected["measure"], expected["subject"], expected["other"], expected["n"]))
    assert rows and all(r["value"] == pytest.approx(v) for r, v in zip(rows, expected["value"]) if r["value"] is not None)
    section = admin.get("/admin").text.split(f'data-batch="{BATCHES["pairwise"]}">', 1)[1].split("</section>")[0]
    assert all(r["measure"] in section for r in rows)


def test_serving_a_store_with_nothing_to_annotate_says_what_to_do_next(tmp_path):
    """`tia2 annotate serve` on a new store: the admin link, and how to add batches and annotators
    (the running app picks them up)."""
    with listening_socket(port=0) as probe:
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "--store", str(tmp_path / "store"), "annotate", "serve",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=PROJECT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = []
        while not lines or not lines[-1].startswith("serving the annotation app"):
            line = proc.stdout.readline()
            assert line, lines
            lines.append(line)
        assert httpx.get(f"http://127.0.0.1:{port}/api/me", timeout=60).status_code == 401  # waits in the backlog
    finally:
        proc.terminate()
        proc.wait(30)
    out = "".join(lines)
    assert f"http://127.0.0.1:{port}/a/" in out
    assert "no annotation batches yet: make one with `tia2 annotate create-batch`" in out
    assert f"no annotators yet: `tia2 annotate add-annotator NAME --url http://127.0.0.1:{port}`" in out


def test_the_server_binds_this_machine_only_by_default():
    with listening_socket(port=0) as sock:
        assert sock.getsockname()[0] == "127.0.0.1"


def test_annotators_answering_at_once_lose_and_double_nothing(tmp_path):
    store = annotation_store(tmp_path / "store", prompts=2, images_per_prompt=5)  # 2 x 10 pairs, all to everyone
    tokens = dict(annotate.add_annotator(store, f"person{n}") for n in range(5))
    batch = annotate.create_batch(store, "pairwise", SET, per_item=5).batch
    with running_server(store) as url:
        result = annotate_concurrently(url, list(tokens.values()), batch, answers_each=20, timeout=300)
    assert len(result.acknowledged) == 100 and len(set(result.acknowledged)) == 100
    stored = store.read("annotations").to_pandas()
    token_of = {a.annotator_id: token for a, token in tokens.items()}
    assert sorted(zip(stored["item"], stored["annotator_id"].map(token_of))) == sorted(result.acknowledged)
    assert store.read("preference_ranks").num_rows == 200  # two images per answer
    assert store.read("annotation_log").num_rows == 100
