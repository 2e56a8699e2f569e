"""Best-of-n on tiny-sd images scored by tiny reward twins, checked against a direct computation."""

import mlflow
import numpy as np
import pytest

from tasks.generate import generate_images
from tasks.ingest import ingest_tia2
from tasks.score import score_images
from tests.support.stores import make_release
from cli.main import main
from tia2.models import create_reward_model
from tia2.models.diffusion import create_pipeline
from tia2.store import Store

pytestmark = pytest.mark.slow  # the module's store: tiny-sd's images, scored


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bon")
    store = Store(root / "store")
    ingest_tia2(store, str(make_release(root / "release")))
    generate_images(store, create_pipeline("tiny-sd"), ["counting"], images_per_prompt=4, steps=2)
    score_images(store, create_reward_model("tiny-clip"))
    return store


def test_best_of_n_matches_a_direct_computation(scored_store, capsys):
    assert main(["best-of-n", "--n", "1,2,4", "--reward", "tiny-clip", "--reward", "textnorm(tiny-clip, tau=0.05)",
                 "--store", str(scored_store.root)]) == 0
    assert "best-of-n over 2 prompts" in capsys.readouterr().out
    con = scored_store.connect()
    picks = {(p, r, n): i for p, r, n, i in con.execute(
        "SELECT prompt_id, reward, n, image_id FROM best_of_n").fetchall()}
    assert len(picks) == 2 * 2 * 3
    scores = con.execute(
        """SELECT i.prompt_id, i.ordinal, i.image_id, s.text = p.text AS is_caption, s.score
           FROM scores s JOIN images i USING (image_id) JOIN prompts p USING (prompt_id)""").df()
    for prompt_id, group in scores.groupby("prompt_id"):
        caption = group[group.is_caption].set_index("ordinal")
        for n in (1, 2, 4):
            raw = caption[caption.index < n]
            assert picks[(prompt_id, "tiny-clip", n)] == raw["image_id"][raw["score"].idxmax()]
            # TextNorm by hand: softmax of the caption among caption + contrast prompts, tau = 0.05
            values = {}
            for ordinal, image in group.groupby("ordinal"):
                if ordinal < n:
                    logits = image["score"].to_numpy() / 0.05
                    values[ordinal] = np.exp(logits[image["is_caption"].to_numpy()][0] - np.logaddexp.reduce(logits))
            best = max(values, key=lambda k: (values[k], -k))
            assert picks[(prompt_id, "textnorm(tiny-clip, tau=0.05)", n)] == caption.loc[best, "image_id"]
        assert picks[(prompt_id, "tiny-clip", 1)] == caption.loc[0, "image_id"]
    [run] = mlflow.search_runs(experiment_names=["tia2"], filter_string="tags.`tia2.stage` = 'best-of-n'",
                               output_format="list")
    sheets = mlflow.MlflowClient().list_artifacts(run.info.run_id, "contact_sheets")
    assert len(sheets) == 2


def test_best_of_n_needs_enough_images_and_scores(scored_store, capsys):
    assert main(["best-of-n", "--n", "8", "--reward", "tiny-clip", "--store", str(scored_store.root)]) == 2
    assert "n=8 needs 8 images per prompt" in capsys.readouterr().err
    assert main(["best-of-n", "--n", "2", "--reward", "tiny-blip2", "--store", str(scored_store.root)]) == 2
    assert "no scores for reward model 'tiny-blip2'" in capsys.readouterr().err
    assert main(["best-of-n", "--n", "a", "--reward", "tiny-clip", "--store", str(scored_store.root)]) == 2
