"""Contrast prompts: the rules against the TIA2 release, the LLM method through the real openai
client and a local OpenAI-compatible server with injected faults, the stage, the CLI and the
store's schema change."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.contrast import (
    CATEGORIES,
    FEW_SHOT_EXAMPLES,
    RULES_GENERATOR,
    SYSTEM_MESSAGE,
    LLMSettings,
    build_contrast,
    counted_phrases,
    detect_categories,
    llm_messages,
    other_colours,
    other_counts,
    parse_reply,
    rule_contrasts,
)
from tasks.ingest import ingest_tia2
from tests.support.openai_server import (
    NOT_JSON,
    PROSE,
    RATE_LIMITED,
    SERVER_ERROR,
    SLOW,
    UNAVAILABLE,
    FakeOpenAI,
)
from cli.main import main
from tia2.english import article
from tia2.errors import UserError
from tia2.store import Store, stable_id

SECRET = f"sk-test-{uuid.uuid4().hex}"  # unique, so finding it anywhere is a leak


def _release(source, set_name: str) -> dict[str, list[str]]:
    return json.loads((source / "prompts" / f"prompt_set_{set_name}.json").read_text())


def _normal(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".!")


# --- rules -----------------------------------------------------------------------------------
def test_count_rule_reproduces_every_tia2_counting_set(tia2_source):
    release = _release(tia2_source, "counting")
    assert len(release) == 150
    for caption, contrasts in release.items():
        made = other_counts(caption)
        assert sorted(made) == sorted(contrasts) and len(set(made)) == len(made), caption
        assert set(contrasts) <= set(rule_contrasts(caption))


def test_composition_rules_contain_the_release_rule_made_prompts(tia2_source):
    """The release lists 12 rule-made prompts first (each object alone, counts 1-3, A-like-B and
    B-like-A); three of them lack the "and" ("two airplanes two apples"): with it they are made too."""
    release = _release(tia2_source, "composition")
    assert len(release) == 300
    for caption, contrasts in release.items():
        made = set(rule_contrasts(caption))
        missing = [t for t in contrasts[:12] if t not in made]
        assert len(missing) == 3 and all(" and " not in t for t in missing), caption
        for quirk in missing:
            second = list(re.finditer(r" (two|three) ", quirk))[-1]
            assert quirk[:second.start()] + " and" + quirk[second.start():] in made
        assert {t for t in contrasts[10:12] if "-like " in t} == {t for t in made if "-like " in t}


def test_figure_8_and_the_brief_example():
    made = rule_contrasts("a realistic photo of an airplane and an apple")
    for expected in ("a realistic photo of an airplane", "a realistic photo of an apple",
                     "a realistic photo of two airplanes and an apple", "a realistic photo of an airplane-like apple",
                     "a realistic photo of an apple-like airplane", "a realistic photo of two airplanes"):
        assert expected in made


@pytest.mark.parametrize("category", CATEGORIES)
def test_detector_puts_table_19_inputs_in_their_category(category):
    (original, _), = FEW_SHOT_EXAMPLES[category]
    assert category in detect_categories(original)


def test_detector_follows_the_paper_example_and_ignores_a_photo_frame():
    assert detect_categories("A black colored car") == ["counting", "colors"]
    assert detect_categories("a realistic photo of three deer") == ["counting"]
    assert detect_categories("a realistic photo of an apple and a teddy bear") == ["composition", "counting"]


def test_counted_phrases():
    def read(text):
        return [(p.count, p.noun) for p in counted_phrases(text)]

    assert read("Greek statue of two men tripping over a cat.") == [(2, "man"), (1, "cat")]
    assert read("a realistic photo of five teddy bears") == [(5, "teddy bear")]
    assert read("a realistic photo of two horses and three vases") == [(2, "horse"), (3, "vase")]
    assert read("A glowing mushroom in the forest") == [(1, "glowing mushroom")]
    assert read("a car parked on the street") == [(1, "car")]
    assert read("a few cats in a box") == [(1, "box")]


def test_spatial_rules_swap_objects_and_relations():
    made = rule_contrasts("An umbrella on top of a spoon.")
    for expected in ("A spoon.", "An umbrella.", "A spoon on top of an umbrella.", "An umbrella below a spoon.",
                     "An umbrella to the left of a spoon.", "An umbrella to the right of a spoon.",
                     "Two umbrellas on top of a spoon."):
        assert expected in made
    made = rule_contrasts("A cat on the left of a dog.")
    assert "A cat to the right of a dog." in made and "A cat to the left of a dog." not in made


def test_colour_rules_swap_colours_and_keep_articles_right():
    assert "A brown bird and a blue bear." in rule_contrasts("A blue bird and a brown bear.")
    others = other_colours("an orange car next to a red cup")
    assert len(others) == 4
    for text in others:
        words = text.split()
        assert words[0] == article(words[1]) and "orange car next to a red cup" not in text


def test_text_rule_misspells_the_quoted_text():
    made = [t for t in rule_contrasts("A sign that says 'Diffusion'.") if t.startswith("A sign that says")]
    assert len(made) == 4
    for text in made:
        word = re.fullmatch(r"A sign that says '(\w+)'\.", text)[1]
        assert word != "Diffusion" and word[:2] == "Di" and abs(len(word) - 9) <= 1


def test_rules_never_return_the_prompt_or_repeats(tia2_source):
    prompts = [*_release(tia2_source, "comprehensive"), "", "dog and horse", "A cat. a cat", "two cats and two cats"]
    for prompt in prompts + [original for examples in FEW_SHOT_EXAMPLES.values() for original, _ in examples]:
        made = rule_contrasts(prompt)
        keys = [_normal(t) for t in made]
        assert _normal(prompt) not in keys and len(set(keys)) == len(keys), prompt
    assert rule_contrasts("dog and horse") == [] and rule_contrasts("sunset over snowy mountains") == []


# --- the LLM reply parser and messages -----------------------------------------------------------
@pytest.mark.parametrize("reply, expected", [
    ("1. Two cats.\n2) Three cats.\n3: A dog.", ["Two cats.", "Three cats.", "A dog."]),
    ("- Two cats\n* A dog\n• A bird", ["Two cats", "A dog", "A bird"]),
    ("Here are some captions:\n\n1. \"Two cats.\"\n2. “A dog.”\nI hope these help!", ["Two cats.", "A dog."]),
    ('"Two cats.", "A dog."\n"A bird."', ["Two cats.", "A dog.", "A bird."]),
    ('```json\n["Two cats.", "A dog."]\n```', ["Two cats.", "A dog."]),
    ("Contrasting captions:1. Two cats.\n2. A dog.\n", ["Two cats.", "A dog."]),
    ("1. Counting:\n2. **Two cats.**\n3. two  CATS\n4. A cat\n5. a cat.", ["Two cats."]),
    ("I am sorry, I can't do that. Here is a poem about a cat.", []),
    ("", []),
])
def test_parse_reply(reply, expected):
    assert parse_reply(reply, "A cat.") == expected


def test_messages_follow_algorithm_1():
    system, user = llm_messages("A black colored car", ["counting", "colors"])
    assert user == {"role": "user", "content": "A black colored car"}
    assert system["role"] == "system" and system["content"].startswith(SYSTEM_MESSAGE + "counting[\n")
    assert ("Original prompt:Four cars on the street.\nContrasting captions:1. Two cars on the street.\n"
            "2. Three cars on the street.\n3. Five cars on the street.\n4. Six cars on the street.\n]\ncolors[\n"
            "Original prompt:A blue bird and a brown bear.\n") in system["content"]
    assert system["content"].endswith("4. Two bears, one brown and the other unexpectedly blue.\n]\n")
    assert llm_messages("x", [])[0]["content"] == SYSTEM_MESSAGE


# --- the LLM method through a local server ------------------------------------------------
PROMPTS = ["A black colored car", "An umbrella on top of a spoon."]


@pytest.fixture
def llm_server():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def _store(tmp_path, texts=PROMPTS, set_name="demo") -> Store:
    store = Store(tmp_path / "store")
    store.upsert("prompts", pa.Table.from_pylist([
        {"prompt_id": stable_id(set_name, t), "text": t, "set": set_name, "category": None, "subcategory": None,
         "source": "test"} for t in texts]))
    return store


def _settings(server, **changes) -> LLMSettings:
    return LLMSettings(**{"base_url": server.base_url, "timeout": 0.5, "retries": 2, "backoff": 0.01, **changes})


def _rows(store, prompt) -> list[tuple]:
    return store.connect().execute(
        "SELECT c.text, c.method, c.generator, c.note FROM contrast_prompts c JOIN prompts p USING (prompt_id) "
        "WHERE p.text = ? ORDER BY c.text", [prompt]).fetchall()


def _llm_rows(server, prompt) -> list[tuple]:
    return sorted((text, "llm", "gpt-4-0613", None) for text in parse_reply(server.reply_for(prompt), prompt))


def test_llm_contrasts_through_the_openai_client(tmp_path, llm_server, api_key):
    store = _store(tmp_path)
    report = build_contrast(store, "llm", llm=_settings(llm_server))
    assert (report.api_requests, report.cached_replies, report.fallbacks) == (2, 0, {})
    for prompt in PROMPTS:
        assert _rows(store, prompt) == _llm_rows(llm_server, prompt) and len(_rows(store, prompt)) == 3
    first = llm_server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["headers"]["authorization"] == f"Bearer {SECRET}"
    assert {k: first["body"][k] for k in ("model", "temperature", "frequency_penalty")} == {
        "model": "gpt-4-0613", "temperature": 0.0, "frequency_penalty": 0.2}
    assert first["body"]["messages"] == llm_messages(PROMPTS[0], ["counting", "colors"])
    assert report.by_method == {"llm": 6} and report.by_category["llm"]["spatial"] == 3


def test_cache_prevents_a_second_call(tmp_path, llm_server, api_key):
    store = _store(tmp_path)
    build_contrast(store, "llm", llm=_settings(llm_server))
    assert len(llm_server.requests) == 2
    again = build_contrast(store, "llm", llm=_settings(llm_server))
    assert (again.api_requests, again.cached_replies, again.rows_added) == (0, 2, 0)
    with FakeOpenAI() as other_server:  # the cache key does not depend on the server
        assert build_contrast(store, "llm", llm=_settings(other_server)).api_requests == 0
        assert other_server.requests == []
    assert len(llm_server.requests) == 2
    warmer = build_contrast(store, "llm", llm=_settings(llm_server, temperature=0.5))
    assert warmer.api_requests == 2 and len(llm_server.requests) == 4
    assert llm_server.requests[-1]["body"]["temperature"] == 0.5
    assert store.read("llm_replies").num_rows == 4


@pytest.mark.parametrize("fault", [SLOW, RATE_LIMITED, SERVER_ERROR, UNAVAILABLE])
def test_transient_faults_are_retried(tmp_path, llm_server, api_key, fault):
    store = _store(tmp_path, PROMPTS[:1])
    llm_server.fail(fault)
    started = time.monotonic()
    report = build_contrast(store, "llm", llm=_settings(llm_server))
    if fault == RATE_LIMITED:  # Retry-After (0.3 s) wins over the 0.01 s backoff
        assert time.monotonic() - started >= llm_server.retry_after
    assert len(llm_server.requests) == 2 and report.fallbacks == {} and report.api_requests == 1
    assert _rows(store, PROMPTS[0]) == _llm_rows(llm_server, PROMPTS[0])


def test_exhausted_retries_fall_back_to_rules_with_the_reason(tmp_path, llm_server, api_key):
    store = _store(tmp_path, PROMPTS[:1])
    llm_server.fail(UNAVAILABLE, SLOW, UNAVAILABLE)
    report = build_contrast(store, "llm", llm=_settings(llm_server))
    assert len(llm_server.requests) == 3 and report.fallbacks == {PROMPTS[0]: "HTTP 503, 3 attempts"}
    generator = f"{RULES_GENERATOR} (fallback from gpt-4-0613)"
    assert _rows(store, PROMPTS[0]) == sorted((t, "rules", generator, "HTTP 503, 3 attempts")
                                              for t in rule_contrasts(PROMPTS[0]))
    assert store.read("llm_replies").num_rows == 0  # nothing to cache: the next run asks again
    assert build_contrast(store, "llm", llm=_settings(llm_server)).api_requests == 1
    assert ("Two black colored cars", "llm", "gpt-4-0613", None) not in _rows(store, PROMPTS[0])
    assert {m for _, m, _, _ in _rows(store, PROMPTS[0])} == {"llm", "rules"}


@pytest.mark.parametrize("fault, reason", [(NOT_JSON, "the response is not a chat completion (JSONDecodeError)"),
                                           (PROSE, "the reply has no list of captions")])
def test_garbage_falls_back_to_rules_with_the_reason(tmp_path, llm_server, api_key, fault, reason):
    store = _store(tmp_path, PROMPTS[:1])
    llm_server.fail(fault)
    report = build_contrast(store, "llm", llm=_settings(llm_server))
    assert len(llm_server.requests) == 1 and report.fallbacks == {PROMPTS[0]: reason}
    assert {(m, note) for _, m, _, note in _rows(store, PROMPTS[0])} == {("rules", reason)}
    # A completion is cached even when it holds no captions: asking again would give the same.
    assert store.read("llm_replies").num_rows == (fault == PROSE)


def test_the_key_never_reaches_logs_mlflow_or_the_store(tmp_path, llm_server, api_key, isolated_tracking,
                                                        caplog, capsys):
    caplog.set_level(logging.DEBUG)
    store = _store(tmp_path)
    llm_server.fail(SERVER_ERROR)  # the first prompt falls back (no retries): its note is stored too
    assert main(["contrast", "--method", "llm", "--llm-base-url", llm_server.base_url, "--llm-retries", "0",
                 "--store", str(store.root)]) == 0
    out, err = capsys.readouterr()
    assert "llm: 2 prompts, " in out and "1 prompts got rules instead" in err and "HTTP 500, 1 attempts" in err
    assert all(r["headers"]["authorization"] == f"Bearer {SECRET}" for r in llm_server.requests)
    files = [p for root in (isolated_tracking, store.root) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "contrast_sample.json" for p in files)
    assert any(p.name == "llm_replies.parquet" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text + out + err


def test_missing_key_or_refused_request_is_one_line(tmp_path, llm_server, monkeypatch, capsys):
    store = _store(tmp_path, PROMPTS[:1])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = ["contrast", "--method", "llm", "--store", str(store.root), "--llm-base-url"]
    assert main([*base, llm_server.base_url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OPENAI_API_KEY" in err
    monkeypatch.setenv("MY_KEY", SECRET)
    assert main([*base, llm_server.base_url.removesuffix("/v1") + "/nowhere", "--llm-api-key-env", "MY_KEY"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 404" in err and SECRET not in err


# --- the stage, dataset and missing_only -------------------------------------------------------
def test_missing_only_builds_only_for_prompts_without_contrast(tmp_path, mini_release):
    store = _store(tmp_path, ["a realistic photo of two cats", "sunset over mountains"], "generated")
    ingest_tia2(store, str(mini_release))
    dataset_rows = store.read("contrast_prompts").num_rows
    report = build_contrast(store, "rules", missing_only=True)
    assert (report.prompts, report.without_contrast) == (2, 1)
    assert report.rows_added == len(rule_contrasts("a realistic photo of two cats")) == report.by_method["rules"]
    assert store.read("contrast_prompts").num_rows == dataset_rows + report.rows_added
    assert report.by_set == {"generated": {"rules": report.rows_added}}
    assert report.by_category == {"rules": {"counting": report.rows_added}}
    again = build_contrast(store, "rules", missing_only=True)
    assert (again.prompts, again.rows_added) == (1, 0)  # the sunset, for which no rule applies


def test_dataset_reports_counts_per_set_or_says_how_to_ingest(tmp_path, mini_release):
    store = _store(tmp_path, ["a cat"], "generated")
    with pytest.raises(UserError, match="tia2 ingest-tia2"):
        build_contrast(store, "dataset")
    ingest_tia2(store, str(mini_release))
    report = build_contrast(store, "dataset", ["counting", "composition"])
    assert report.prompts == 4 and report.rows_added == 0
    assert report.by_set == {"composition": {"dataset": 6}, "counting": {"dataset": 6}}


def test_cli_rules_and_mlflow_record(tmp_path, mini_release, capsys):
    import mlflow

    store = _store(tmp_path, ["a realistic photo of an airplane and an apple"], "generated")
    ingest_tia2(store, str(mini_release))
    assert main(["contrast", "--method", "rules", "--set", "generated", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rules: 1 prompts, 16 new contrast prompts\n") and "generated      rules 16" in out
    [run] = mlflow.search_runs(experiment_names=["tia2"], filter_string="tags.`tia2.stage` = 'contrast'",
                               output_format="list")
    assert run.data.metrics["rows/rules/composition"] == 16 and run.data.metrics["prompts"] == 1
    assert run.data.params["method"] == "rules" and "llm_model" not in run.data.params
    sample = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/contrast_sample.json")
    assert sample["columns"][:3] == ["set", "prompt", "contrast"] and len(sample["data"]) == 3
    assert {row[1] for row in sample["data"]} == {"a realistic photo of an airplane and an apple"}


@pytest.mark.parametrize("args, message", [
    (["--method", "magic"], "unknown contrast method 'magic'"),
    (["--method", "rules", "--set", "nope"], "unknown set(s) nope"),
    (["--method", "llm", "--temperature", "3"], "temperature goes from 0 to 2"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    store = _store(tmp_path, ["a cat"])
    assert main(["contrast", *args, "--store", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


# --- the store's schema change -------------------------------------------------------------
def test_a_store_written_before_the_note_column_opens_and_works(tmp_path, mini_release):
    store = Store(tmp_path / "store")
    ingest_tia2(store, str(mini_release))
    old = store.read("contrast_prompts").drop_columns(["note"])
    pq.write_table(old, store.root / "contrast_prompts.parquet")
    (store.root / "llm_replies.parquet").unlink()
    reopened = Store(store.root)
    assert reopened.connect().execute("SELECT count(*), count(note) FROM contrast_prompts").fetchall() == [(18, 0)]
    assert reopened.read("llm_replies").num_rows == 0
    assert ingest_tia2(reopened, str(mini_release))["new_rows"]["contrast_prompts"] == 0
    assert build_contrast(reopened, "rules", ["counting"]).rows_added > 0
