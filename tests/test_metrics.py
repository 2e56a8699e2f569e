"""`tia2 metrics` on the real benchmark against an independent implementation of the protocol
that reads the release JSON and the score file directly (pandas + scikit-learn + scipy)."""

import functools
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from cli.main import main
from tests.support.stores import copy_store

SPECS = ["alpha", "textnorm(alpha, tau=0.5)", "textnorm(beta, tau=2)",
         "mean(textnorm(alpha, tau=0.5), textnorm(beta, tau=2))",
         "ur(textnorm(alpha, tau=0.5), textnorm(beta, tau=2), lam=3)", "mean(alpha, beta)"]


def independent_protocol(release, scores_file, spec_values):
    """Per-caption metrics straight from the files: DESIGN.md's protocol, written plainly."""
    scores = pd.read_parquet(scores_file)
    lookup = dict(zip(zip(*(scores[c].tolist() for c in ("set", "image", "prompt", "reward_model"))),
                      scores["score"].tolist()))
    rows = []
    for set_name in ("comprehensive", "counting", "composition"):
        labels = json.loads((release / f"human_annotations/human_labels_{set_name}.json").read_text())
        contrast = json.loads((release / f"prompts/prompt_set_{set_name}.json").read_text())
        by_caption = {}
        for entry in labels.values():
            by_caption.setdefault(entry["caption"], []).append(entry)
        for caption, entries in by_caption.items():
            others = [t for t in dict.fromkeys(contrast[caption]) if t != caption]
            z = np.array([int(sum(v == 1 for v in e["human_labels"]) >= 2) for e in entries])
            if z.min() == z.max():
                continue
            graded = np.array([np.mean([{1: 1, 0: 0, -1: 0.5}[v] for v in e["human_labels"]])
                               for e in entries])

            def raw(model, text, image):
                return lookup[(set_name, image, text, model)]

            @functools.cache
            def tn(model, tau, image):
                logits = np.array([raw(model, t, image) for t in [caption, *others]]) / tau
                peak = logits.max()  # log-sum-exp by hand (scipy's costs 0.3 ms a call)
                return float(np.exp(logits[0] - peak - np.log(np.exp(logits - peak).sum())))

            for spec, fn in spec_values.items():
                r = np.array([fn(raw, tn, caption, e["image"]) for e in entries])
                top = {k: np.argsort(-r, kind="stable")[:k] for k in (5, 10, 25)}
                ap = {k: average_precision_score(z[i], r[i]) if z[i].any() else 0.0 for k, i in top.items()}
                rows.append(dict(set=set_name, prompt=caption, reward=spec, n_images=len(z), human=z.mean(),
                                 auroc=roc_auc_score(z, r), auprc=average_precision_score(z, r),
                                 ap5=ap[5], ap10=ap[10], ap25=ap[25],
                                 spearman=spearmanr(r, graded).statistic,
                                 kendall=kendalltau(r, graded).statistic))
    return pd.DataFrame(rows)


def _ur(values, lam):
    values = np.array(values)
    return values.mean() - lam * ((values - values.mean()) ** 2).mean()


SPEC_VALUES = {
    "alpha": lambda raw, tn, cap, img: raw("alpha", cap, img),
    "textnorm(alpha, tau=0.5)": lambda raw, tn, cap, img: tn("alpha", 0.5, img),
    "textnorm(beta, tau=2)": lambda raw, tn, cap, img: tn("beta", 2, img),
    "mean(textnorm(alpha, tau=0.5), textnorm(beta, tau=2))":
        lambda raw, tn, cap, img: (tn("alpha", 0.5, img) + tn("beta", 2, img)) / 2,
    "ur(textnorm(alpha, tau=0.5), textnorm(beta, tau=2), lam=3)":
        lambda raw, tn, cap, img: _ur([tn("alpha", 0.5, img), tn("beta", 2, img)], 3),
    "mean(alpha, beta)": lambda raw, tn, cap, img: (raw("alpha", cap, img) + raw("beta", cap, img)) / 2,
}


@pytest.mark.slow
def test_metrics_match_an_independent_implementation(tmp_path, real_store, tia2_source,
                                                     real_scores_file, capsys):
    store = copy_store(real_store, tmp_path / "store")
    out = tmp_path / "per_caption.csv"
    args = ["metrics", "--store", str(store.root), "--out", str(out)]
    for spec in SPECS:
        args += ["--reward", spec]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "C100 (84)" in printed and "C150 (146)" in printed and "C300 (295)" in printed

    ours = pd.read_csv(out)
    assert list(ours.columns) == ["set", "prompt", "reward", "n_images", "human", "auroc", "auprc",
                                  "ap5", "ap10", "ap25", "spearman", "kendall"]
    assert len(ours) == (84 + 146 + 295) * len(SPECS)
    theirs = independent_protocol(tia2_source, real_scores_file, SPEC_VALUES)
    merged = ours.merge(theirs, on=["set", "prompt", "reward"], suffixes=("", "_ref"), validate="1:1")
    assert len(merged) == len(ours)
    for column in ["n_images", "human", "auroc", "auprc", "ap5", "ap10", "ap25", "spearman", "kendall"]:
        np.testing.assert_allclose(merged[column], merged[f"{column}_ref"], atol=1e-6, err_msg=column)

    # Stored in prompt_metrics and logged to MLflow with the plots.
    stored = store.connect().execute("SELECT count(*), count(DISTINCT run_id) FROM prompt_metrics").fetchall()[0]
    assert stored == (len(ours), 1)
    run_id = store.connect().execute("SELECT any_value(run_id) FROM prompt_metrics").fetchall()[0][0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"per_caption.csv", "table2.txt", "curves_counting.png", "set_means.json"} <= artifacts
    run = mlflow.get_run(run_id)
    assert run.data.metrics["counting/alpha/auroc"] == pytest.approx(
        ours[(ours.set == "counting") & (ours.reward == "alpha")].auroc.mean())


def test_missing_scores_are_named(tmp_path, real_store, capsys):
    store = copy_store(real_store, tmp_path / "store")
    assert main(["metrics", "--store", str(store.root), "--reward", "gamma"]) == 2
    assert "no scores for reward model 'gamma'" in capsys.readouterr().err
    assert main(["metrics", "--store", str(store.root), "--reward", "textnorm(alpha, tau=1, contrast=llm)"]) == 2
    assert "no contrast prompts of method 'llm'" in capsys.readouterr().err
    assert store.read("prompt_metrics").num_rows == 0


def test_partially_missing_scores_are_counted(tmp_path, mini_release, capsys):
    import pyarrow.parquet as pq

    from tasks.ingest import ingest_tia2
    from tia2.store import Store
    from tests.support.scores import synthetic_score_table

    store = Store(tmp_path / "store")
    ingest_tia2(store, str(mini_release))
    rows = synthetic_score_table(store, {"m": 1.0}).to_pandas()
    counting = rows[rows.set == "counting"]
    dropped = rows.drop(index=[counting.index[0], counting.index[-1]])  # a caption and a contrast row
    pq.write_table(__import__("pyarrow").Table.from_pandas(dropped, preserve_index=False), tmp_path / "s.parquet")
    assert main(["import-scores", str(tmp_path / "s.parquet"), "--store", str(store.root)]) == 0
    assert main(["metrics", "--store", str(store.root), "--reward", "textnorm(m, tau=1)"]) == 2
    err = capsys.readouterr().err
    assert "m: 1 images of set counting have no score for their caption" in err
    assert "1 of 72 (image, contrast prompt) scores are missing" in err


@pytest.mark.parametrize("spec, message", [
    ("textnorm(alpha, tau=0)", "tau must be > 0"),
    ("mean(alpha, textnorm(beta, tau=1)", "unbalanced parentheses"),
    ("median(alpha, beta)", "unknown function 'median'"),
])
def test_bad_spec_on_the_command_line_writes_nothing(tmp_path, real_store, capsys, spec, message):
    store = copy_store(real_store, tmp_path / "store")
    out = tmp_path / "out.csv"
    assert main(["metrics", "--store", str(store.root), "--reward", "alpha", "--reward", spec,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert store.read("prompt_metrics").num_rows == 0 and not out.exists()


def test_unknown_set_is_an_error(tmp_path, real_store, capsys):
    store = copy_store(real_store, tmp_path / "store")
    assert main(["metrics", "--store", str(store.root), "--reward", "alpha", "--set", "nope"]) == 2
    assert "unknown set(s) nope" in capsys.readouterr().err


def test_tune_finds_the_grid_maximum(tmp_path, real_store, capsys):
    from tasks.metrics import tune

    store = copy_store(real_store, tmp_path / "store")
    taus = (0.1, 1.0, 10.0)
    assert main(["tune", "--store", str(store.root), "--reward-model", "alpha", "--reward-model", "beta",
                 "--set", "counting", "--tau", "0.1,1,10", "--lam", "0,1"]) == 0
    printed = capsys.readouterr().out
    result = tune(store, ["alpha", "beta"], ["counting"], taus, (0.0, 1.0))
    grid = result.grid
    alpha = grid[grid.model == "alpha"]
    best_tau = alpha.loc[alpha.ap_mean.idxmax(), "tau"]
    assert f"counting       alpha            tau={best_tau:g}" in printed
    assert len(grid) == 2 * len(taus) + 2
    ens = grid[grid.model == "ensemble"]
    assert ens.reward.str.startswith("ur(textnorm(alpha").all()
    # The CLI run logged the grid, the best values and the plot.
    [run] = mlflow.search_runs(experiment_names=["tia2"], filter_string="tags.`tia2.stage` = 'tune'",
                               output_format="list")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"grid.csv", "best.csv", "tune.png"} <= artifacts


def test_caption_ranking_counts_ties_against_the_caption(tmp_path, mini_release):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.ingest import ingest_tia2
    from tasks.metrics import caption_ranking
    from tasks.score import import_scores
    from tia2.store import Store
    from tests.support.scores import synthetic_score_table

    store = Store(tmp_path / "store")
    ingest_tia2(store, str(mini_release))
    rows = synthetic_score_table(store, {"m": 0.0}).to_pandas()
    captions = set(store.read("prompts").column("text").to_pylist())
    is_caption = rows["prompt"].isin(captions)
    # Every image: caption 1.0, contrasts 0.0 -> top-1 everywhere, except the first image, where
    # one contrast prompt ties with the caption.
    rows["score"] = is_caption.astype(float)
    first = rows["image"].eq(rows["image"].iloc[0]) & rows["set"].eq(rows["set"].iloc[0])
    rows.loc[rows.index[first & ~is_caption][0], "score"] = 1.0
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "s.parquet")
    import_scores(store, tmp_path / "s.parquet")
    [result] = caption_ranking(store, ["m"]).to_dict("records")
    assert result["images"] == 24 and result["texts_per_image"] == 4
    assert result["caption_top1"] == pytest.approx(23 / 24)
    assert result["caption_mean_rank"] == pytest.approx((23 * 1 + 2) / 24)
