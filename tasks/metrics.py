"""Stage: metrics of reward specs against TIA2's human labels, and the light tuning of τ and λ.

The protocol is DESIGN.md's (it reproduces the TextNorm paper's Table 2): per caption, AUROC,
AUPRC, AP@5/10/25 on the top-k images, Spearman ρ and Kendall τ-b against the graded label; a
set's value is the unweighted mean over captions whose binary labels are not all equal.

The metric functions below compute exactly what scikit-learn's `roc_auc_score`,
`average_precision_score` and scipy's `spearmanr` / `kendalltau` compute (the tests compare
them on tie-heavy cases); they are written on numpy over many captions at once because the
library calls cost ~1 ms each and a run evaluates thousands of captions.
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.stats import rankdata

from tasks.rewards import RewardEvaluator, load_frame
from tia2.errors import UserError
from tia2.specs import Model, Spec, TextNorm, UncertaintyRegularized, parse_spec
from tia2.store import Store

METRICS = ("auroc", "auprc", "ap5", "ap10", "ap25", "spearman", "kendall")
METRIC_LABELS = dict(zip(METRICS, ("AUROC", "AUPRC", "AP@5", "AP@10", "AP@25", "Spearman", "Kendall")))  # Table 2's
AP_METRICS = ("ap5", "ap10", "ap25")
CSV_COLUMNS = ["set", "prompt", "reward", "n_images", "human", *METRICS]
SET_LABELS = {"comprehensive": "C100", "counting": "C150", "composition": "C300"}


# --- per-caption metrics, for many captions at once ---------------------------------------------
def batch_metrics(z: np.ndarray, graded: np.ndarray, r: np.ndarray,
                  which: tuple[str, ...] = METRICS) -> dict[str, np.ndarray]:
    """The protocol's metrics for m captions of n images each: one row per caption, images in
    benchmark order. Returns one array of m values per metric."""
    out = {}
    order = np.argsort(-r, axis=1, kind="stable")  # descending; ties keep benchmark order
    r_sorted = np.take_along_axis(r, order, axis=1)
    z_sorted = np.take_along_axis(z, order, axis=1)
    if "auroc" in which or "spearman" in which:
        r_ranks = rankdata(r, axis=1)
    if "auroc" in which:
        pos = z.sum(axis=1)
        out["auroc"] = ((r_ranks * z).sum(axis=1) - pos * (pos + 1) / 2) / (pos * (z.shape[1] - pos))
    if "auprc" in which:
        out["auprc"] = _average_precision_sorted(z_sorted, r_sorted)
    for k in (5, 10, 25):
        if f"ap{k}" in which:
            out[f"ap{k}"] = _average_precision_sorted(z_sorted[:, :k], r_sorted[:, :k])
    if "spearman" in which:
        out["spearman"] = _pearson_rows(r_ranks, rankdata(graded, axis=1))
    if "kendall" in which:
        out["kendall"] = _kendall_tau_b_rows(r, graded)
    return {name: out[name] for name in which}


def _average_precision_sorted(z: np.ndarray, r: np.ndarray) -> np.ndarray:
    """average_precision_score per row of rows sorted by descending r: Σ (R_n − R_{n−1}) P_n over
    distinct thresholds. Each positive adds 1/P times the precision at the end of its tie group;
    0.0 for a row without positives."""
    n = r.shape[1]
    tps = np.cumsum(z, axis=1)
    precision = tps / np.arange(1, n + 1)
    is_end = np.ones_like(r, dtype=bool)
    is_end[:, :-1] = r[:, :-1] != r[:, 1:]
    positions = np.where(is_end, np.arange(n), n)
    end_of_group = np.minimum.accumulate(positions[:, ::-1], axis=1)[:, ::-1]
    pos = tps[:, -1]
    weighted = (z * np.take_along_axis(precision, end_of_group, axis=1)).sum(axis=1)
    return np.divide(weighted, pos, out=np.zeros(len(pos)), where=pos > 0)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.divide((a * b).sum(axis=1), denom, out=np.full(len(a), np.nan), where=denom > 0)


def _kendall_tau_b_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """scipy.stats.kendalltau (variant b) per row, from the signs of all pairs (n is small)."""
    i, j = np.triu_indices(x.shape[1], k=1)
    dx, dy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    denom = np.sqrt(np.count_nonzero(dx, axis=1).astype(float) * np.count_nonzero(dy, axis=1))
    return np.divide((dx * dy).sum(axis=1), denom, out=np.full(len(x), np.nan), where=denom > 0)


def caption_metrics(z, graded, r, which: tuple[str, ...] = METRICS) -> dict[str, float]:
    """The protocol's metrics for one caption's images (in benchmark order)."""
    batch = batch_metrics(*(np.asarray(a)[None, :] for a in (z, graded, r)), which)
    return {name: float(values[0]) for name, values in batch.items()}


def threshold_counts(z: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at each distinct score threshold, from the highest down
    (scikit-learn's `_binary_clf_curve`); for the ROC and PR plots."""
    order = np.argsort(-r, kind="stable")
    r_sorted = r[order]
    last_of_tie = np.append(np.flatnonzero(np.diff(r_sorted)), len(r_sorted) - 1)
    tps = np.cumsum(z[order])[last_of_tie]
    return tps, last_of_tie + 1 - tps


# --- over a frame ----------------------------------------------------------------------------
@dataclass
class Captions:
    """The frame split into included captions (binary labels not all equal)."""
    frame: pd.DataFrame
    bounds: list[tuple[int, int]]   # [start, stop) frame rows of each included caption
    keys: pd.DataFrame              # set, prompt_id, prompt, n_images, human per included caption

    @classmethod
    def of(cls, frame: pd.DataFrame) -> Captions:
        prompt_ids = frame["prompt_id"].to_numpy()
        starts = np.flatnonzero(np.append(True, prompt_ids[1:] != prompt_ids[:-1]))
        stops = np.append(starts[1:], len(frame))
        z = frame["z"].to_numpy()
        bounds, keys = [], []
        for a, b in zip(starts, stops):
            human = z[a:b].mean()
            if 0.0 < human < 1.0:
                bounds.append((int(a), int(b)))
                row = frame.iloc[a]
                keys.append((row["set"], row["prompt_id"], row["caption"], int(b - a), float(human)))
        return cls(frame, bounds, pd.DataFrame(keys, columns=["set", "prompt_id", "prompt", "n_images", "human"]))

    def evaluate(self, rewards: np.ndarray, which: tuple[str, ...] = METRICS) -> pd.DataFrame:
        """Metrics per included caption; captions with the same number of images go together."""
        z, graded = self.frame["z"].to_numpy(), self.frame["graded"].to_numpy()
        starts = np.array([a for a, _ in self.bounds])
        sizes = np.array([b - a for a, b in self.bounds])
        values = {name: np.empty(len(self.bounds)) for name in which}
        for size in np.unique(sizes):
            captions = np.flatnonzero(sizes == size)
            rows = starts[captions][:, None] + np.arange(size)
            for name, result in batch_metrics(z[rows], graded[rows], rewards[rows], which).items():
                values[name][captions] = result
        return pd.concat([self.keys, pd.DataFrame(values)], axis=1)

    def mean_curves(self, rewards: np.ndarray, set_name: str, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ROC (TPR at each FPR of `grid`) and PR (precision at each recall of `grid`) curves,
        averaged over the set's included captions."""
        z = self.frame["z"].to_numpy()
        tprs, precisions = [], []
        for (a, b), caption_set in zip(self.bounds, self.keys["set"]):
            if caption_set != set_name:
                continue
            tps, fps = threshold_counts(z[a:b], rewards[a:b])
            tprs.append(np.interp(grid, np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]))
            precision, recall = tps / (tps + fps), tps / tps[-1]
            precisions.append(np.interp(grid, np.r_[0.0, recall], np.r_[1.0, precision]))
        return np.mean(tprs, axis=0), np.mean(precisions, axis=0)


@dataclass
class MetricsResult:
    per_caption: pd.DataFrame        # CSV_COLUMNS plus prompt_id, one row per (caption, spec)
    captions: Captions
    rewards: dict[str, np.ndarray]   # spec -> reward of every frame row


def compute_metrics(store: Store, specs: list[Spec], sets: list[str] | None = None) -> MetricsResult:
    """Per-caption metrics of every spec over the included captions of the given sets."""
    frame = load_frame(store, sets)
    evaluator = RewardEvaluator(store, frame)
    evaluator.check(specs)
    captions = Captions.of(frame)
    tables, rewards = [], {}
    for spec in specs:
        rewards[str(spec)] = evaluator(spec)
        table = captions.evaluate(rewards[str(spec)])
        table.insert(3, "reward", str(spec))
        tables.append(table)
    return MetricsResult(pd.concat(tables, ignore_index=True), captions, rewards)


def set_means(per_caption: pd.DataFrame) -> pd.DataFrame:
    """Unweighted means over captions, per (set, reward), in the order the rewards were given."""
    grouped = per_caption.groupby(["set", "reward"], sort=False)
    means = grouped[list(METRICS)].mean()
    means.insert(0, "captions", grouped.size())
    return means.reset_index()


def format_table2(means: pd.DataFrame) -> str:
    """The per-set means laid out like the TextNorm paper's Table 2."""
    width = max(12, *(len(r) for r in means["reward"]))
    head = f"{'Set':<12} {'Reward':<{width}} " + " ".join(f"{h:>8}" for h in METRIC_LABELS.values())
    lines = [head, "-" * len(head)]
    for set_name, group in means.groupby("set", sort=False):
        label = f"{SET_LABELS.get(set_name, set_name)} ({group['captions'].iloc[0]})"
        for i, row in enumerate(group.itertuples()):
            values = " ".join(f"{getattr(row, m):>8.3f}" for m in METRICS)
            lines.append(f"{label if i == 0 else '':<12} {row.reward:<{width}} {values}")
    return "\n".join(lines)


# --- tuning of τ and λ (TextNorm paper §4.3: tuned lightly by the mean of the AP metrics) -----
DEFAULT_TAUS = tuple(float(t) for t in np.round(np.logspace(-3, 2, 16), 6))
DEFAULT_LAMS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass
class TuneResult:
    grid: pd.DataFrame   # set, reward, model, tau, lam, ap_mean (one row per grid point)
    best: pd.DataFrame   # the best grid row per (set, model), and per set for the ensemble


def tune(store: Store, models: list[str], sets: list[str] | None = None,
         taus: tuple[float, ...] = DEFAULT_TAUS, lams: tuple[float, ...] = DEFAULT_LAMS) -> TuneResult:
    """Best τ of textnorm(M, tau) per model and set; then, with two or more models, the best λ
    of ur(textnorm(M1, tau=τ1*), ..., lam=λ) per set. Objective: mean of AP@5, AP@10, AP@25."""
    frame = load_frame(store, sets)
    evaluator = RewardEvaluator(store, frame)
    model_specs = [parse_spec(m) for m in models]
    for spec in model_specs:
        if not isinstance(spec, Model):
            raise ValueError(f"tune takes reward model names, got {spec}")
    evaluator.check([TextNorm(m, 1.0) for m in model_specs])
    captions = Captions.of(frame)
    grid_rows = []

    def objective(spec: Spec) -> pd.Series:
        table = captions.evaluate(evaluator(spec), AP_METRICS)
        return table.groupby("set", sort=False)[list(AP_METRICS)].mean().mean(axis=1)

    for model, tau in itertools.product(model_specs, taus):
        spec = TextNorm(model, tau)
        for set_name, value in objective(spec).items():
            grid_rows.append(dict(set=set_name, reward=str(spec), model=str(model), tau=tau,
                                  lam=np.nan, ap_mean=value))
    grid = pd.DataFrame(grid_rows)
    best_tau = grid.loc[grid.groupby(["set", "model"], sort=False)["ap_mean"].idxmax()]
    columns = ["set", "model", "reward", "tau", "lam", "ap_mean"]
    best = [best_tau[columns]]
    if len(model_specs) >= 2:
        lam_rows = []
        for set_name, group in best_tau.groupby("set", sort=False):
            parts = tuple(TextNorm(parse_spec(m), t) for m, t in zip(group["model"], group["tau"]))
            for lam in lams:
                spec = UncertaintyRegularized(parts, lam)
                value = objective(spec).get(set_name)
                lam_rows.append(dict(set=set_name, reward=str(spec), model="ensemble", tau=np.nan,
                                     lam=lam, ap_mean=value))
        lam_grid = pd.DataFrame(lam_rows)
        grid = pd.concat([grid, lam_grid], ignore_index=True)
        best.append(lam_grid.loc[lam_grid.groupby("set", sort=False)["ap_mean"].idxmax(), columns])
    return TuneResult(grid=grid, best=pd.concat(best, ignore_index=True))


# --- figures and the recorded run --------------------------------------------------------------
CURVE_GRID = np.linspace(0.0, 1.0, 101)


def curves_figure(result: MetricsResult, set_name: str):
    """Mean ROC and PR curves over the set's captions, one line per reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.6))
    for spec, rewards in result.rewards.items():
        tpr, precision = result.captions.mean_curves(rewards, set_name, CURVE_GRID)
        roc_ax.plot(CURVE_GRID, tpr, label=spec)
        pr_ax.plot(CURVE_GRID, precision, label=spec)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (mean over captions)")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall (mean over captions)")
    pr_ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{set_name}: {SET_LABELS.get(set_name, set_name)}")
    fig.tight_layout()
    return fig


def tune_figure(result: TuneResult):
    """AP-mean against τ (per model, log scale) and against λ (ensemble), one panel per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(result.grid["set"]))
    has_lam = (result.grid["model"] == "ensemble").any()
    fig, axes = plt.subplots(1 + has_lam, len(sets), figsize=(4.2 * len(sets), 3.6 * (1 + has_lam)),
                             squeeze=False)
    for col, set_name in enumerate(sets):
        rows = result.grid[result.grid["set"] == set_name]
        for model, group in rows[rows["model"] != "ensemble"].groupby("model", sort=False):
            axes[0][col].plot(group["tau"], group["ap_mean"], marker=".", label=model)
        axes[0][col].set(xscale="log", xlabel="tau", ylabel="mean AP@5/10/25", title=set_name)
        axes[0][col].legend(fontsize=7)
        if has_lam:
            ens = rows[rows["model"] == "ensemble"]
            axes[1][col].plot(ens["lam"], ens["ap_mean"], marker=".")
            axes[1][col].set(xscale="symlog", xlabel="lambda (ur ensemble)", ylabel="mean AP@5/10/25")
    fig.tight_layout()
    return fig


def metrics_rows(result: MetricsResult, run_id: str | None):
    """The per-caption table in the `prompt_metrics` schema."""
    table = result.per_caption.assign(run_id=run_id)
    return pa.Table.from_pandas(table, preserve_index=False)


def record_metrics(store: Store, specs: list[Spec], sets: list[str] | None = None,
                   out_csv: str | None = None, parent_run_id: str | None = None) -> pd.DataFrame:
    """Compute, store (`prompt_metrics`), write the CSV and log the run to MLflow.

    Returns the per-set means. The CSV is written atomically (temp file, rename)."""
    import mlflow

    from tia2.tracking import log_figure, log_text_files, metric_key, stage_run

    if out_csv:
        check_output_file(out_csv)
    result = compute_metrics(store, specs, sets)
    means = set_means(result.per_caption)
    csv_text = result.per_caption[CSV_COLUMNS].to_csv(index=False, float_format="%.10g")
    params = {"rewards": [str(s) for s in specs], "sets": sorted(set(result.per_caption["set"])),
              "store": str(store.root), "captions": int(result.captions.keys.shape[0])}
    with stage_run("metrics", params, parent_run_id) as run:
        store.upsert("prompt_metrics", metrics_rows(result, run.info.run_id))
        mlflow.log_metrics({
            metric_key(row.set, row.reward, m): float(getattr(row, m))
            for row in means.itertuples() for m in METRICS if np.isfinite(getattr(row, m))
        })
        mlflow.log_table(means, "set_means.json")
        log_text_files({"per_caption.csv": csv_text, "table2.txt": format_table2(means) + "\n",
                        "set_means.csv": means.to_csv(index=False)})
        for set_name in dict.fromkeys(result.per_caption["set"]):
            log_figure(curves_figure(result, set_name), f"curves_{set_name}.png")
    if out_csv:
        write_text_atomic(out_csv, csv_text)
    return means


def record_tune(store: Store, models: list[str], sets: list[str] | None = None,
                taus: tuple[float, ...] = DEFAULT_TAUS, lams: tuple[float, ...] = DEFAULT_LAMS,
                parent_run_id: str | None = None) -> TuneResult:
    import mlflow

    from tia2.tracking import log_figure, log_text_files, stage_run

    result = tune(store, models, sets, taus, lams)
    params = {"reward_models": models, "sets": sets or "all", "taus": taus, "lams": lams}
    with stage_run("tune", params, parent_run_id):
        log_text_files({"grid.csv": result.grid.to_csv(index=False),
                        "best.csv": result.best.to_csv(index=False)})
        mlflow.log_table(result.best, "best.json")
        log_figure(tune_figure(result), "tune.png")
    return result


def check_output_file(path: str, example: str = "metrics.csv") -> None:
    """A UserError, before any work, when `path` cannot become a file: a folder (the message
    suggests `example` in it), or a place this process may not write."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{path} is a folder: give a file name, e.g. {target / example}")
    parent = next(p for p in target.absolute().parents if p.exists())  # the folder it would be made in
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {parent} is not a folder this user may write to")


def write_text_atomic(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --- without human labels ---------------------------------------------------------------------
def caption_ranking(store: Store, reward_models: list[str]) -> pd.DataFrame:
    """Per reward model (and version): over the images scored against their caption and contrast
    prompts, how often the caption scores strictly highest (top-1) and its mean rank among the
    texts (ties ranked against the caption). Needs no human labels, so it also describes
    generated images."""
    return store.connect().execute(
        """
        WITH texts AS (
            SELECT prompt_id, text, true AS is_caption FROM prompts
            UNION ALL SELECT prompt_id, text, false FROM contrast_prompts
            WHERE (prompt_id, text) NOT IN (SELECT (prompt_id, text) FROM prompts)),
        ranked AS (
            SELECT s.reward_model, s.model_version, s.image_id, t.is_caption, count(*) OVER w AS n_texts,
                   -- texts scoring at least as high: a tie counts against the caption
                   count(*) OVER (w ORDER BY s.score DESC RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS r
            FROM scores s JOIN images i USING (image_id)
            JOIN texts t ON t.prompt_id = i.prompt_id AND t.text = s.text
            WHERE s.reward_model IN (SELECT unnest($models))
            WINDOW w AS (PARTITION BY s.reward_model, s.model_version, s.image_id))
        SELECT reward_model, model_version, count(*) AS images, avg(n_texts) AS texts_per_image,
               avg((r = 1)::DOUBLE) AS caption_top1, avg(r) AS caption_mean_rank
        FROM ranked WHERE is_caption AND n_texts > 1
        GROUP BY ALL ORDER BY reward_model, model_version
        """, {"models": reward_models}).df()
