"""Stored scores carry the scoring code's revision in `model_version`, and scoring recomputes the
rows older code made with the same weights instead of keeping them."""

import pyarrow as pa

from tasks.score import score_images
from cli.main import main
from tia2.models import create_reward_model


def test_scoring_replaces_rows_of_older_scoring_code(image_store, capsys):  # noqa: F811
    store = image_store
    model = create_reward_model("tiny-clip")
    assert model.version == f"{model.identity}/scorer-{model.scorer_revision}"
    score_images(store, model, show_progress=False)
    current = store.read("scores").to_pandas().sort_values(["image_id", "text"], ignore_index=True)
    assert set(current.model_version) == {model.version}

    # The store as older code left it: rows under the weights' identity alone (before revisions
    # were recorded) and under revision 1, other numbers; and rows of other weights, to be kept.
    def version_of(rows, version, shift):
        return pa.Table.from_pandas(rows.assign(model_version=version, score=rows.score + shift), preserve_index=False)

    store.delete_rows("scores", "true", {})
    assert store.read("scores").num_rows == 0
    half = current.image_id.isin(sorted(set(current.image_id))[::2])
    store.append_missing("scores", version_of(current[half], model.identity, 1.0), compare="score")
    store.append_missing("scores", version_of(current[~half], f"{model.identity}/scorer-1", 2.0), compare="score")
    store.append_missing("scores", version_of(current, "other@sha256:0123456789ab/scorer-2", 3.0), compare="score")

    # A run that scores only some images (one shard, as a killed run) replaces only those rows.
    report = score_images(store, model, show_progress=False, shard=(0, 2))
    stored = store.read("scores").to_pandas()
    mine = stored[stored.model_version.str.startswith("random-init")]
    recomputed = set(mine.image_id[mine.model_version == model.version])
    assert report.rows_superseded == len(current[current.image_id.isin(recomputed)]) > 0
    assert not set(mine.image_id[mine.model_version != model.version]) & recomputed
    assert set(mine.image_id[mine.model_version != model.version]) == set(current.image_id) - recomputed

    assert main(["score", "--store", str(store.root), "--reward-model", "tiny-clip"]) == 0
    assert "rows of older scoring code replaced" in capsys.readouterr().out
    stored = store.read("scores").to_pandas()
    assert set(stored.model_version) == {model.version, "other@sha256:0123456789ab/scorer-2"}
    again = (stored[stored.model_version == model.version]
             .sort_values(["image_id", "text"], ignore_index=True))
    assert again.score.tolist() == current.score.tolist()  # the current code's numbers, recomputed
    assert (stored.model_version == "other@sha256:0123456789ab/scorer-2").sum() == len(current)
