"""The annotation page in a real headless browser (Debian's chromium driven by Playwright), for
every task: the personal link, answers by keyboard and by mouse, undo, reload and resume, the
next item's images loaded ahead, the progress bar, the all-done state, and the admin page's
numbers; then the answers' rows in the store. Screenshots go to $TIA2_SHOTS when it is set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tasks import annotate
from tasks.agreement import compute_agreement
from tests.support.annotation import SET, annotation_store
from tests.support.annotation_app import annotate_concurrently, running_server

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
expect = sync_api.expect

BATCHES = {task: f"{SET}-{task}" for task in ("rating", "ranking", "pairwise", "best-worst")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One annotator with every item of each task's batch (and the admin), served for the module;
    each test works in its own batch."""
    store = annotation_store(tmp_path_factory.mktemp("browser") / "store", prompts=3, images_per_prompt=4, size=96)
    tokens = {name: annotate.add_annotator(store, name)[1] for name in ("ann", "bob")}
    _, admin_token = annotate.add_annotator(store, "boss", role="admin")
    for task, batch in BATCHES.items():
        annotate.create_batch(store, task, SET, per_item=2, aspects=task == "rating")
    with running_server(store) as url:
        yield store, url, tokens, admin_token


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("TIA2_SHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class TaskPage:
    """The task page of one batch, with what the browser logged and requested."""

    def __init__(self, browser, url: str, token: str, batch: str, shots: Path):
        self.shots = shots
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.problems, self.requested = [], []
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(m.text))
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.goto(f"{url}/a/{token}")
        assert self.page.url == f"{url}/"
        self.shot("home")
        self.page.locator(f'a[href="/batches/{batch}"]').click()
        assert self.page.url == f"{url}/batches/{batch}"
        self.wait_for_item()

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"))

    def item(self) -> str:
        return self.page.locator("#annotate").get_attribute("data-item")

    def wait_for_item(self, not_this: str | None = None) -> str:
        """The item shown once the page has one (another than `not_this`) with its images loaded."""
        self.page.wait_for_function("([old]) => { const a = document.getElementById('annotate');"
                                    " return a.dataset.item !== undefined && a.dataset.item !== old"
                                    " && !a.classList.contains('busy'); }", arg=[not_this])
        self.page.wait_for_function("() => [...document.querySelectorAll('#stage img')]"
                                    ".every((img) => img.complete && img.naturalWidth > 0)")
        return self.item()

    def image_ids(self) -> list[str]:
        return self.page.locator("#stage img").evaluate_all("imgs => imgs.map(i => i.dataset.imageId)")

    def progress(self) -> str:
        return self.page.locator("#progress-text").inner_text()

    def next_was_preloaded(self, batch: str) -> bool:
        """Whether the images of the item after the shown one were requested already."""
        page = self.page.evaluate(f"fetch('/api/batches/{batch}/next?count=2').then(r => r.json())")
        return all(any(r.endswith(image["url"]) for r in self.requested)
                   for item in page["items"][1:] for image in item["images"])

    def answered(self, before: str, done: int, total: int) -> str:
        expect(self.page.locator("#progress-text")).to_have_text(f"{done} / {total}")
        assert self.page.locator("#progress").evaluate("p => [p.value, p.max]") == [done, total]
        return self.wait_for_item(not_this=before)


def stored_answers(store, batch: str) -> dict[str, dict]:
    rows = store.read("annotations").to_pandas()
    return {r.item: json.loads(r.answer) for r in rows[rows["batch"] == batch].itertuples()}


def keyboard(page, *keys: str) -> None:
    for key in keys:
        page.keyboard.press(key)


# Per task: the first answer by keyboard, the second by mouse, each yielding the stored answer it
# means over the image ids in the order shown; FINISH: the keys of one more answer.
def rating_steps(p: TaskPage):
    keyboard(p.page, "5", "Tab", "3", "g")  # alignment 5, Tab skips fidelity, harmlessness 3, good
    yield lambda ids: {"label": "good", "alignment": 5, "harmlessness": 3}
    p.page.get_by_role("button", name="Fidelity 6").click()
    p.shot("rating-aspects")
    p.page.get_by_role("button", name="Bad").click()
    yield lambda ids: {"label": "bad", "fidelity": 6}


def ranking_steps(p: TaskPage):
    keyboard(p.page, "2", "t", "4", "1")  # 2 and 4 tie first, then 1, then 3
    p.shot("ranking-picking")
    keyboard(p.page, "3", "Enter")
    yield lambda ids: {"ranks": {ids[1]: 1, ids[3]: 1, ids[0]: 2, ids[2]: 3}}
    for name in ("Image 3", "Image 1", "Tie with previous", "Image 4", "Image 2", "Submit"):
        p.page.get_by_role("button", name=name).click()
    yield lambda ids: {"ranks": {ids[2]: 1, ids[0]: 2, ids[3]: 2, ids[1]: 3}}


def pairwise_steps(p: TaskPage):
    keyboard(p.page, "ArrowLeft")
    yield lambda ids: {"choice": "A", "winner": ids[0]}
    p.page.get_by_role("button", name="B is better").click()
    yield lambda ids: {"choice": "B", "winner": ids[1]}


def best_worst_steps(p: TaskPage):
    keyboard(p.page, "3", "1")
    p.shot("best-worst-picking")
    keyboard(p.page, "Enter")
    yield lambda ids: {"best": ids[2], "worst": ids[0]}
    for name in ("Image 2", "Image 4", "Submit"):
        p.page.get_by_role("button", name=name).click()
    yield lambda ids: {"best": ids[1], "worst": ids[3]}


STEPS = {"rating": rating_steps, "ranking": ranking_steps, "pairwise": pairwise_steps, "best-worst": best_worst_steps}
FINISH = {"rating": ["s"], "ranking": ["1", "2", "3", "4", "Enter"], "pairwise": ["t"],
          "best-worst": ["1", "2", "Enter"]}


@pytest.mark.parametrize("task", list(BATCHES))
def test_an_annotator_works_through_a_batch_in_the_browser(served, browser, shots, task):
    store, url, tokens, admin_token = served
    batch = BATCHES[task]
    p = TaskPage(browser, url, tokens["ann"], batch, shots)
    total = len(store.read("annotation_items").to_pandas().query("batch == @batch"))
    assert p.progress() == f"0 / {total}"
    prompt = p.page.locator("#prompt").inner_text()
    assert prompt.endswith("red apples")
    assert p.page.locator("#stage img").evaluate_all("imgs => imgs.map(i => i.alt)") == [prompt] * len(p.image_ids())
    p.shot(task)

    expected = {}
    steps = STEPS[task](p)
    for done in (1, 2):
        item, ids = p.item(), p.image_ids()
        assert p.next_was_preloaded(batch)
        expected[item] = next(steps)(ids)
        after = p.answered(item, done, total)
        if done == 1:
            first_after = after
    assert stored_answers(store, batch) == expected

    # undo (U) brings back the second item; Ctrl+Z then the first; the store follows
    second = list(expected)[1]
    p.page.keyboard.press("u")
    assert p.answered(p.item(), 1, total) == second
    assert set(stored_answers(store, batch)) == {list(expected)[0]}
    p.page.keyboard.press("Control+z")
    assert p.answered(second, 0, total) == list(expected)[0]
    assert stored_answers(store, batch) == {}

    # reload resumes where the server's queue says: the first unanswered item
    p.page.reload()
    assert p.wait_for_item() == list(expected)[0] and p.progress() == f"0 / {total}"
    keyboard(p.page, *FINISH[task])
    p.answered(list(expected)[0], 1, total)
    assert p.item() == first_after == second

    # the rest by keyboard, to the all-done state
    for done in range(2, total + 1):
        before = p.item()
        keyboard(p.page, *FINISH[task])
        expect(p.page.locator("#progress-text")).to_have_text(f"{done} / {total}")
        if done < total:
            p.wait_for_item(not_this=before)
    expect(p.page.get_by_role("heading", name="All done")).to_be_visible()
    assert p.item() == "" and len(stored_answers(store, batch)) == total
    p.shot(f"{task}-done")
    derived = {"rating": "labels", "ranking": "preference_ranks", "pairwise": "preference_ranks",
               "best-worst": "preference_ranks"}[task]
    rows = store.read(derived).to_pandas()
    if task == "rating":
        ann_id = next(a.annotator_id for a in annotate.annotators(store) if a.name == "ann")
        assert (rows["annotator"] == ann_id).sum() == total
    else:
        mine = rows[rows["set"] == batch]
        assert set(mine["item"]) == set(stored_answers(store, batch)) and set(mine["annotator"]) == {"ann"}

    # the admin page: this batch's row says all done, and once bob has answered too, how far they agree
    annotate_concurrently(url, [tokens["bob"]], batch, total)
    agreement = compute_agreement(store, batch).table
    admin = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    admin.goto(f"{url}/a/{admin_token}")
    assert admin.url == f"{url}/admin"
    row = admin.locator(f'#admin-progress tr[data-batch="{batch}"][data-annotator="ann"]')
    assert row.locator("td.done").inner_text() == str(total) and row.locator("td.total").inner_text() == str(total)
    assert row.locator("progress").evaluate("p => [p.value, p.max]") == [total, total]
    cells = admin.locator(f'section.agreement[data-batch="{batch}"] tbody tr').evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.innerText))")
    assert [c[:3] + [c[5]] for c in cells] == [[m, s, o, str(n)] for m, s, o, n in
                                                agreement[["measure", "subject", "other", "n"]].itertuples(index=False)]
    assert [c[3] for c in cells] == [f"{v:.3f}" if v == v else "–" for v in agreement["value"]]
    admin.screenshot(path=str(shots / "admin.png"), full_page=True)
    admin.context.close()
    assert not p.problems, p.problems
    p.context.close()

