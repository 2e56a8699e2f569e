"""Preference sets through the store: ingestion of each format, bad input, and the figures of
stored scores against a direct computation from the files."""

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.preferences import compute_preference_metrics, ingest_preferences
from tasks.score import import_scores
from tia2.errors import UserError
from tia2.specs import parse_spec
from tia2.store import Store

TEST_JSON = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagereward" / "test.json"


def png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


def snapshot(store: Store) -> dict:
    return {p.name: p.read_bytes() for p in sorted(store.root.glob("*.parquet"))}


ITEMS = [  # two items share a prompt: their images never form pairs with each other
    {"id": "a", "prompt": "a red cube", "generations": ["a/1.png", "a/2.png", "a/3.png"], "ranking": [1, 2, 2]},
    {"id": "b", "prompt": "a red cube", "generations": ["b/1.png", "b/2.png"], "ranking": [2, 1]},
    {"id": "c", "prompt": "two cats", "generations": ["c/1.png", "c/2.png", "c/3.png", "c/4.png"],
     "ranking": [3, 1, 4, 2]},
    {"id": "d", "prompt": "a tie", "generations": ["d/1.png", "d/2.png"], "ranking": [1, 1]},
]


def write_items(folder: Path) -> Path:
    """ITEMS as folder/test.json and a decodable PNG for each of their images under folder/images."""
    images = folder / "images"
    for it in ITEMS:
        for n, f in enumerate(it["generations"]):
            (images / f).parent.mkdir(parents=True, exist_ok=True)
            (images / f).write_bytes(png((40 * n, 30, 0)))
    (folder / "test.json").write_text(json.dumps(ITEMS))
    return images


def write_scores(store: Store, tmp_path: Path, model: str, scores: dict[str, float]) -> None:
    rows = [{"set": "imagereward-test", "image": f, "prompt": it["prompt"], "reward_model": model, "score": scores[f]}
            for it in ITEMS for f in it["generations"]]
    pd.DataFrame(rows).to_csv(tmp_path / f"{model}.csv", index=False)
    import_scores(store, tmp_path / f"{model}.csv")


def test_imagereward_items_and_figures_against_a_direct_count(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps(ITEMS))
    store = Store(tmp_path / "store")
    report = ingest_preferences(store, tmp_path / "test.json", "imagereward")
    assert report["items"] == 4 and report["prompts"] == 3 and report["images"] == 11
    assert ingest_preferences(store, tmp_path / "test.json", "imagereward")["new_rows"] == \
        {"prompts": 0, "images": 0, "preference_ranks": 0}
    rng = np.random.default_rng(0)
    scores = {f: float(v) for f, v in zip([f for it in ITEMS for f in it["generations"]], rng.integers(0, 3, 11))}
    write_scores(store, tmp_path, "m", scores)
    result = compute_preference_metrics(store, [parse_spec("m")], resamples=50)
    rows = result.rewards[0].per_item.set_index("item")
    total_pairs = total_correct = 0
    for it in ITEMS:  # ImageReward test.py's loop, on the file
        r, v = it["ranking"], [scores[f] for f in it["generations"]]
        pairs = correct = 0
        for i, j in itertools.combinations(range(len(r)), 2):
            if r[i] != r[j]:
                pairs += 1
                correct += (v[i] > v[j]) if r[i] < r[j] else (v[i] < v[j])
        assert (rows.loc[it["id"], "pairs"], rows.loc[it["id"], "correct"]) == (pairs, correct)
        total_pairs, total_correct = total_pairs + pairs, total_correct + correct
    assert result.pairs == total_pairs == 2 + 1 + 6
    assert result.rewards[0].figures["accuracy"] == pytest.approx(total_correct / total_pairs)
    assert np.isnan(rows.loc["d", "accuracy"])  # all tied: no pairs
    assert "tie_calibrated" in result.rewards[0].figures  # people tie some pairs


def test_missing_scores_are_an_error_naming_the_model_and_count(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps(ITEMS))
    store = Store(tmp_path / "store")
    ingest_preferences(store, tmp_path / "test.json", "imagereward")
    rows = [{"set": "imagereward-test", "image": f, "prompt": it["prompt"], "reward_model": "m", "score": 1.0}
            for it in ITEMS[:2] for f in it["generations"]]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    import_scores(store, tmp_path / "m.csv")
    with pytest.raises(UserError, match="m: 6 images of set imagereward-test have no score for their caption"):
        compute_preference_metrics(store, [parse_spec("m")])


@pytest.mark.parametrize("entries, message", [
    ([{"id": "a", "prompt": "p", "generations": ["x.png"], "ranking": [1]}],
     "entry 0 (id 'a'): generations must list at least two images"),
    ([{"id": "a", "prompt": "p", "generations": ["x.png", "y.png"], "ranking": [1]}],
     "entry 0 (id 'a'): ranking must give one rank per image (2)"),
    ([{"id": "a", "prompt": "p", "generations": ["x.png", "y.png"], "ranking": [1, "first"]}],
     "entry 0 (id 'a'): ranking must be numbers"),
    ([{"id": "a", "prompt": "p", "generations": ["x.png", "y.png"], "ranking": [1, 2]},
      {"id": "a", "prompt": "q", "generations": ["z.png", "w.png"], "ranking": [1, 2]}], "item 'a' appears twice"),
    ([{"id": "a", "prompt": "p", "generations": ["x.png", "y.png"], "ranking": [1, 2]},
      {"id": "b", "prompt": "q", "generations": ["x.png", "w.png"], "ranking": [1, 2]}],
     "item 'b': image 'x.png' is also an image of another prompt"),
    ([{"prompt": "p"}], "entry 0: needs fields id, prompt, generations, ranking"),
    ({"not": "a list"}, "expected a non-empty JSON list"),
])
def test_bad_entries_are_one_error_and_nothing_is_written(tmp_path, entries, message):
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    store = Store(tmp_path / "store")
    before = snapshot(store)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ingest_preferences(store, tmp_path / "bad.json", "imagereward")
    assert snapshot(store) == before


def test_image_files_are_registered_and_an_unreadable_one_is_an_error(tmp_path):
    images = write_items(tmp_path)
    store = Store(tmp_path / "store")
    report = ingest_preferences(store, tmp_path / "test.json", "imagereward", images_dir=images)
    assert report["images_with_pixels"] == 11
    assert store.connect().execute("SELECT count(*) FROM images WHERE sha256 IS NOT NULL AND path IS NOT NULL "
                                   "AND width = 8").fetchall()[0][0] == 11
    (images / "c/2.png").write_text("not an image")
    other = Store(tmp_path / "other")
    with pytest.raises(UserError, match=r"item 'c': .*c/2.png: not an image file"):
        ingest_preferences(other, tmp_path / "test.json", "imagereward", images_dir=images)
    with pytest.raises(UserError, match="none of the 11 images"):
        ingest_preferences(other, tmp_path / "test.json", "imagereward", images_dir=tmp_path)


def test_hpdv2_keeps_each_annotator(tmp_path):
    data = [{"prompt": "p", "image_path": ["1.jpg", "2.jpg", "3.jpg"], "rank": [1, 2, 3],
             "raw_annotations": [[1, 2, 3], [2, 1, 3]]}]
    (tmp_path / "test.json").write_text(json.dumps(data))
    store = Store(tmp_path / "store")
    report = ingest_preferences(store, tmp_path / "test.json", "hpdv2")
    assert report["set"] == "hpdv2-test" and report["annotators"] == ["annotator-1", "annotator-2", "consensus"]
    assert store.connect().execute("SELECT count(*) FROM preference_ranks").fetchall()[0][0] == 9


def test_pairs_csv_and_pickapic_parquet(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, color in (("x.png", "red"), ("y.png", "blue"), ("z.png", "green")):
        (images / name).write_bytes(png(color))
    pd.DataFrame({"prompt": ["p", "p", "q"], "image_a": ["x.png", "x.png", "y.png"],
                  "image_b": ["y.png", "z.png", "z.png"], "preference": ["a", "tie", "B"]}).to_csv(
        tmp_path / "pairs.csv", index=False)
    store = Store(tmp_path / "store")
    with pytest.raises(UserError, match="also an image of another prompt"):
        ingest_preferences(store, tmp_path / "pairs.csv", "pairs", images_dir=images)
    pd.DataFrame({"prompt": ["p", "p"], "image_a": ["x.png", "x.png"], "image_b": ["y.png", "z.png"],
                  "preference": ["a", "tie"]}).to_csv(tmp_path / "pairs.csv", index=False)
    report = ingest_preferences(store, tmp_path / "pairs.csv", "pairs", images_dir=images)
    assert report["items"] == 2 and report["images"] == 3
    ranks = store.connect().execute("SELECT item, rank FROM preference_ranks JOIN images USING (image_id) "
                                    "ORDER BY item, ordinal").fetchall()
    assert ranks == [("0", 1.0), ("0", 2.0), ("1", 1.0), ("1", 1.0)]

    pd.DataFrame({"caption": ["c", "c"], "jpg_0": [png("red"), png("white")], "jpg_1": [png("blue"), png("black")],
                  "label_0": [1.0, 0.5], "label_1": [0.0, 0.5]}).to_parquet(tmp_path / "pap.parquet")
    report = ingest_preferences(store, tmp_path / "pap.parquet", "pairs", set_name="pickapic")
    assert report["images_with_pixels"] == 4
    stored = store.connect().execute("SELECT path, sha256 FROM images WHERE set = 'pickapic'").fetchall()
    assert all(Path(p).is_file() and Path(p).parent == store.images_dir and Path(p).stem == sha for p, sha in stored)
    bad = pd.DataFrame({"caption": ["c"], "jpg_0": [png("red")], "jpg_1": [b"garbage"], "label_0": [1.0],
                        "label_1": [0.0]})
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="bad.parquet: item '0': image 2: its bytes are not an image"):
        ingest_preferences(store, tmp_path / "bad.parquet", "pairs", set_name="pickapic2")


@pytest.mark.skipif(not TEST_JSON.is_file(), reason="needs ../shared/data/imagereward/test.json")
def test_the_imagereward_test_set(tmp_path):
    store = Store(tmp_path / "store")
    report = ingest_preferences(store, TEST_JSON, "imagereward")
    assert (report["items"], report["images"], report["prompts"]) == (466, 2720, 463)
    frame = store.connect().execute("SELECT count(*) FROM preference_ranks WHERE set = 'imagereward-test'").fetchall()
    assert frame[0][0] == 2720


def test_the_commands_a_reviewer_runs(tmp_path, capsys, isolated_tracking):
    """ingest-preferences, import-scores and preference-metrics --out with its MLflow run,
    through `tia2`; the CSV's counts against the file."""
    import mlflow

    from cli.main import main

    (tmp_path / "test.json").write_text(json.dumps(ITEMS))
    store = ["--store", str(tmp_path / "store")]
    assert main(["ingest-preferences", str(tmp_path / "test.json"), "--format", "imagereward", *store]) == 0
    scores = {f: float(i % 3) for i, f in enumerate(f for it in ITEMS for f in it["generations"])}
    pd.DataFrame([{"set": "imagereward-test", "image": f, "prompt": it["prompt"], "reward_model": "m",
                   "score": scores[f]} for it in ITEMS for f in it["generations"]]).to_csv(tmp_path / "m.csv",
                                                                                          index=False)
    assert main(["import-scores", str(tmp_path / "m.csv"), *store]) == 0
    out = tmp_path / "got.csv"
    assert main(["preference-metrics", "--set", "imagereward-test", "--reward", "m", "--bootstrap", "20",
                 "--out", str(out), *store]) == 0
    printed = capsys.readouterr().out
    assert "Preference" in printed and "Recall" in printed and "Filter" in printed
    got = pd.read_csv(out, dtype={"item": str}).set_index("item")
    for it in ITEMS:
        r, v = it["ranking"], [scores[f] for f in it["generations"]]
        pairs = [(i, j) for i, j in itertools.combinations(range(len(r)), 2) if r[i] != r[j]]
        correct = sum((v[i] > v[j]) if r[i] < r[j] else (v[i] < v[j]) for i, j in pairs)
        assert (got.loc[it["id"], "pairs"], got.loc[it["id"], "correct"]) == (len(pairs), correct)
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`tia2.stage` = 'preference-metrics'",
                                output_format="list")
    assert "m/accuracy" in run.data.metrics and run.data.params["pairs"] == "9"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"per_item.csv", "summary.csv", "comparisons.csv", "table3.txt", "buckets.png"} <= artifacts
    assert Store(tmp_path / "store").connect().execute("SELECT count(*) FROM preference_metrics").fetchall()[0][0] == 4


def test_command_mistakes_are_one_line_and_write_nothing(tmp_path, capsys):
    from cli.main import main

    (tmp_path / "bad.json").write_text(json.dumps([{"id": "a", "prompt": "p", "generations": ["x.png"],
                                                    "ranking": [1]}]))
    store = Store(tmp_path / "store")
    before = snapshot(store)
    assert main(["ingest-preferences", str(tmp_path / "bad.json"), "--format", "imagereward",
                 "--store", str(store.root)]) == 2
    assert "entry 0 (id 'a'): generations must list at least two images" in capsys.readouterr().err
    assert main(["ingest-preferences", str(tmp_path / "bad.json"), "--format", "hpsv3",
                 "--store", str(store.root)]) == 2
    assert main(["preference-metrics", "--reward", "m", "--store", str(store.root)]) == 2
    assert "has no preference sets" in capsys.readouterr().err
    assert snapshot(store) == before


def test_registered_images_are_scored_by_tia2_score(tmp_path, capsys):
    from cli.main import main

    images = write_items(tmp_path)
    store = ["--store", str(tmp_path / "store")]
    assert main(["ingest-preferences", str(tmp_path / "test.json"), "--format", "imagereward",
                 "--images", str(images), *store]) == 0
    assert main(["score", "--reward-model", "tiny-clip", "--set", "imagereward-test", *store]) == 0
    assert main(["preference-metrics", "--reward", "tiny-clip", "--bootstrap", "10", *store]) == 0
    rows = Store(tmp_path / "store").connect().execute(
        "SELECT count(*) FROM scores s JOIN images i USING (image_id) JOIN prompts p USING (prompt_id) "
        "WHERE s.text = p.text AND i.set = 'imagereward-test'").fetchall()[0][0]
    assert rows == 11
