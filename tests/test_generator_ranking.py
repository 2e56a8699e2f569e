"""Ranking generators by stored rewards, against a direct computation (test-benchmark.py's
mean of per-prompt means) and scipy's Spearman correlation."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.stats import spearmanr

from tasks.generator_ranking import GeneratorChoice, rank_generators, read_human_ranking
from tasks.score import import_scores
from tia2.errors import UserError
from tia2.specs import parse_spec
from tia2.store import Store, stable_id

PROMPTS = ["a red cube", "two cats", "a tree at night"]
GENERATORS = {"gen-a@1": None, "gen-b@2": None, "gen-a@1+lora": "adapters/run/step-000010/w.safetensors"}


def store_with_images(tmp_path, images_per_prompt=3):
    """Three generated "generators" over set s, and an imported set holding two of the prompts."""
    store = Store(tmp_path / "store")
    prompts, images = [], []
    for set_name, texts in (("s", PROMPTS), ("other-model", PROMPTS[:2])):
        for text in texts:
            pid = stable_id(set_name, text)
            prompts.append(dict(prompt_id=pid, text=text, set=set_name, category=None, subcategory=None,
                                source="test"))
            makers = GENERATORS.items() if set_name == "s" else [(None, None)]
            for generator, lora in makers:
                for k in range(images_per_prompt):
                    file = f"{generator or 'other'}-{pid}-{k}.png"
                    images.append(dict(image_id=stable_id(set_name, file), prompt_id=pid, set=set_name, file=file,
                                       ordinal=k, seed=k, generator=generator and generator.split("+")[0],
                                       lora=lora, steps=10 if generator else None, guidance=None, path=None,
                                       sha256=None, width=None, height=None))
    store.upsert("prompts", pa.Table.from_pylist(prompts))
    store.upsert("images", pa.Table.from_pylist(images))
    frame = store.connect().execute("SELECT i.set, i.file AS image, p.text AS prompt FROM images i "
                                    "JOIN prompts p USING (prompt_id) ORDER BY i.image_id").df()
    rng = np.random.default_rng(0)
    frame.assign(reward_model="m", score=rng.normal(size=len(frame))).to_csv(tmp_path / "m.csv", index=False)
    import_scores(store, tmp_path / "m.csv")
    return store, pd.read_csv(tmp_path / "m.csv")


def test_means_ranks_best_of_and_spearman_against_a_direct_computation(tmp_path):
    store, scores = store_with_images(tmp_path)
    choices = [GeneratorChoice.parse(t) for t in ("gen-a", "gen-b", "gen-a+run", "set:other-model")]
    human = pd.Series([4.0, 1.0, 2.0, 3.0], index=[c.label for c in choices])
    result = rank_generators(store, choices, [parse_spec("m")], best_of=2, human=human)
    table = result.table.set_index("generator")
    assert set(table["prompts"]) == {2}  # only the prompts every generator has
    expected = {}
    for label, prefix in (("gen-a", "gen-a@1-"), ("gen-b", "gen-b@2-"), ("gen-a+run", "gen-a@1+lora-"),
                          ("set:other-model", "other-")):
        mine = scores[scores["image"].str.startswith(prefix) & scores["prompt"].isin(PROMPTS[:2])]
        per_prompt = mine.groupby("prompt")["score"].mean()
        best = mine.assign(k=mine["image"].str[-5].astype(int)).query("k < 2").groupby("prompt")["score"].max()
        expected[label] = per_prompt.mean()
        assert table.loc[label, "mean_reward"] == pytest.approx(per_prompt.mean())
        assert table.loc[label, "best_of_n"] == pytest.approx(best.mean())
    order = sorted(expected, key=expected.get, reverse=True)
    assert [table.loc[g, "rank"] for g in order] == [1, 2, 3, 4]
    rho = spearmanr([expected[c.label] for c in choices], human.to_numpy()).statistic
    assert result.agreement["spearman"].iloc[0] == pytest.approx(rho)


@pytest.mark.parametrize("choices, message", [
    (["gen-a"], "at least two --generator"),
    (["gen-a", "gen-c"], "generator 'gen-c': no such images"),
    (["gen", "gen-b"], "matches several generators"),
    (["gen-a", "gen-a"], "named twice"),
])
def test_bad_generators(tmp_path, choices, message):
    store, _ = store_with_images(tmp_path, images_per_prompt=1)
    with pytest.raises(UserError, match=message):
        rank_generators(store, [GeneratorChoice.parse(c) for c in choices], [parse_spec("m")])


def test_best_of_more_than_stored_and_a_human_file_missing_a_generator(tmp_path):
    store, _ = store_with_images(tmp_path, images_per_prompt=2)
    choices = [GeneratorChoice.parse("gen-a"), GeneratorChoice.parse("gen-b")]
    with pytest.raises(UserError, match="--best-of 3 needs 3 images per prompt"):
        rank_generators(store, choices, [parse_spec("m")], best_of=3)
    (tmp_path / "human.csv").write_text("generator,wins\ngen-a,10\n")
    with pytest.raises(UserError, match="the human ranking has no gen-b"):
        rank_generators(store, choices, [parse_spec("m")], human=read_human_ranking(tmp_path / "human.csv"))
    (tmp_path / "bad.csv").write_text("model,score\ngen-a,1\n")
    with pytest.raises(UserError, match="needs columns generator and rank"):
        read_human_ranking(tmp_path / "bad.csv")


def test_the_command_prints_stores_and_logs(tmp_path, capsys):
    import mlflow

    from cli.main import main

    store, _ = store_with_images(tmp_path)
    (tmp_path / "human.csv").write_text("generator,rank\ngen-a,1\ngen-b,2\n")
    assert main(["rank-generators", "--generator", "gen-a", "--generator", "gen-b", "--reward", "m",
                 "--reward", "mean(m, m)", "--best-of", "2", "--human", str(tmp_path / "human.csv"),
                 "--store", str(store.root)]) == 0
    printed = capsys.readouterr().out
    assert "Spearman's rho with the human ranking" in printed and "best of 2 per prompt" in printed
    stored = store.connect().execute("SELECT reward, generator, rank FROM generator_rankings ORDER BY ALL").fetchall()
    assert len(stored) == 4 and {r[2] for r in stored} == {1.0, 2.0}
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`tia2.stage` = 'rank-generators'",
                                output_format="list")
    assert {"ranking.csv", "per_prompt.csv", "ranking.txt", "ranking.png"} <= \
        {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert main(["rank-generators", "--generator", "gen-a", "--reward", "m", "--store", str(store.root)]) == 2
    assert "at least two --generator" in capsys.readouterr().err
