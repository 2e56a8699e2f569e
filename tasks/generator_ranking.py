"""Stage: ranking text-to-image generators by reward (ImageReward §2.3, Table 1; its
test-benchmark.py). Per generator and prompt the mean reward of its images (and, with best-of-N,
the best of its first N), then the mean over prompts and the rank; each reward's ranking against a
human one (Spearman's ρ); Figure 3's box plot of min-max normalised per-prompt scores. The human
one is a file of ranks or wins, or people's answers of a pairwise annotation batch of the
generators' images (tasks/human_evaluation.py: each generator's share of its comparisons won).

A generator is a group of stored images: `NAME` (the `generator` column starts with NAME, no LoRA
adapter), `NAME+ADAPTER` (with the LoRA adapter whose path contains ADAPTER) or `set:SET` (every
image of SET, e.g. another model's images registered with `tia2 import-images`). Prompts are
matched by text, so generated and imported images of the same prompt compare; only prompts every
generator has count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tia2.errors import UserError
from tia2.specs import Spec
from tia2.store import Store


@dataclass(frozen=True)
class GeneratorChoice:
    label: str
    generator: str | None = None  # prefix of images.generator
    adapter: str | None = None    # part of images.lora
    set: str | None = None        # every image of this set

    @classmethod
    def parse(cls, text: str) -> "GeneratorChoice":
        if text.startswith("set:"):
            if not text[4:]:
                raise UserError("--generator set:SET needs a set name")
            return cls(text, set=text[4:])
        name, _, adapter = text.partition("+")
        if not name or (_ and not adapter):
            raise UserError(f"--generator {text!r}: write NAME, NAME+ADAPTER or set:SET")
        return cls(text, generator=name, adapter=adapter or None)


def generator_frame(store: Store, choices: list[GeneratorChoice], sets: list[str] | None) -> pd.DataFrame:
    """The images of every generator on the prompts they all have (matched by text), one row per
    image: generator label, set, prompt_id, caption, image_id, ordinal."""
    if len({c.label for c in choices}) < len(choices):
        raise UserError("a generator is named twice")
    if len(choices) < 2:
        raise UserError("ranking needs at least two --generator")
    con = store.connect()
    parts = []
    for choice in choices:
        if choice.set is not None:
            where, params = "i.set = $set", {"set": choice.set}
        else:
            where = "starts_with(i.generator, $generator) AND i.steps IS NOT NULL AND "
            params = {"generator": choice.generator}
            if choice.adapter is None:
                where += "i.lora IS NULL"
            else:
                where += "contains(i.lora, $adapter)"
                params["adapter"] = choice.adapter
            if sets:
                where += " AND i.set IN (SELECT unnest($sets))"
                params["sets"] = sets
        part = con.execute(
            f"""SELECT i.set, i.prompt_id, p.text AS caption, i.image_id, i.ordinal, i.generator, i.lora
                FROM images i JOIN prompts p USING (prompt_id) WHERE {where}
                ORDER BY p.text, i.ordinal, i.image_id""", params).df()
        if part.empty:
            raise UserError(f"generator {choice.label!r}: no such images"
                            + (f" in set(s) {', '.join(sets)}" if sets and choice.set is None else ""))
        distinct = part[["generator", "lora"]].drop_duplicates()
        if choice.set is None and len(distinct) > 1:
            listed = ", ".join(g + (f" (lora {lora})" if lora else "") for g, lora in distinct.itertuples(index=False))
            raise UserError(f"generator {choice.label!r} matches several generators ({listed}): write more of the name")
        parts.append(part.assign(label=choice.label))
    common = set.intersection(*(set(p["caption"]) for p in parts))
    if not common:
        raise UserError("the generators have no prompt in common (prompts are matched by their text)")
    frame = pd.concat([p[p["caption"].isin(common)] for p in parts], ignore_index=True)
    frame = frame.rename(columns={"label": "generator_label"})
    frame.index.name = "row"
    frame.attrs["prompts_left_out"] = {p["label"].iloc[0]: int(p["caption"].nunique() - len(common)) for p in parts}
    return frame


def read_human_ranking(path: str | Path) -> pd.Series:
    """A human ranking of generators: a CSV or JSON with `generator` and `rank` (1 is best) or
    `wins` (more is better). Returned as a score per generator, higher is better."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        table = pd.read_json(path) if path.suffix.lower() == ".json" else pd.read_csv(path)
    except Exception as exc:  # pandas raises many kinds for a damaged file
        raise UserError(f"{path}: cannot read it: {exc}") from exc
    column = "rank" if "rank" in table.columns else "wins" if "wins" in table.columns else None
    if "generator" not in table.columns or column is None:
        raise UserError(f"{path}: needs columns generator and rank (1 is best) or wins")
    values = pd.to_numeric(table[column], errors="coerce")
    if values.isna().any() or table["generator"].duplicated().any():
        raise UserError(f"{path}: every generator once, with a number as its {column}")
    return pd.Series((-values if column == "rank" else values).to_numpy(float), index=table["generator"].astype(str))


@dataclass
class GeneratorRanking:
    table: pd.DataFrame       # one row per (reward, generator): mean, best-of-N, ranks
    per_prompt: pd.DataFrame  # one row per (reward, generator, prompt)
    agreement: pd.DataFrame   # per reward: Spearman's ρ with the human ranking (when given)
    best_of: int | None
    human: pd.Series | None = None  # the human score per generator (higher is better), when given


def rank_generators(store: Store, choices: list[GeneratorChoice], specs: list[Spec], sets: list[str] | None = None,
                    best_of: int | None = None, human: pd.Series | None = None) -> GeneratorRanking:
    from scipy.stats import spearmanr

    from tasks.rewards import RewardEvaluator

    if not specs:
        raise UserError("give at least one --reward")
    if best_of is not None and best_of < 1:
        raise UserError(f"--best-of must be at least 1 (got {best_of})")
    frame = generator_frame(store, choices, sets)
    if best_of is not None:
        fewest = frame.groupby(["generator_label", "caption"]).size().min()
        if best_of > fewest:
            raise UserError(f"--best-of {best_of} needs {best_of} images per prompt; some generator has {fewest}")
    if human is not None:
        missing = sorted({c.label for c in choices} - set(human.index))
        if missing:
            raise UserError(f"the human ranking has no {', '.join(missing)} (it has {', '.join(human.index)})")
    evaluator = RewardEvaluator(store, frame)
    evaluator.check(specs)
    tables, per_prompt, agreement = [], [], []
    for spec in specs:
        scored = frame.assign(value=evaluator(spec), reward=str(spec))
        prompt_rows = scored.groupby(["generator_label", "caption"], sort=False).agg(mean=("value", "mean"))
        if best_of is not None:
            prompt_rows["best"] = scored[scored.groupby(["generator_label", "caption"]).cumcount() < best_of] \
                .groupby(["generator_label", "caption"], sort=False)["value"].max()
        prompt_rows = prompt_rows.reset_index().assign(reward=str(spec))
        per_prompt.append(prompt_rows)
        table = prompt_rows.groupby("generator_label", sort=False).agg(
            prompts=("caption", "size"), mean_reward=("mean", "mean"),
            **({"best_of_n": ("best", "mean")} if best_of is not None else {})).reset_index()
        table["rank"] = table["mean_reward"].rank(ascending=False, method="average")
        if best_of is not None:
            table["best_of_n_rank"] = table["best_of_n"].rank(ascending=False, method="average")
        table = table.assign(reward=str(spec)).rename(columns={"generator_label": "generator"})
        tables.append(table)
        if human is not None:
            truth = human.loc[table["generator"]].to_numpy()
            row = {"reward": str(spec), "spearman": float(spearmanr(table["mean_reward"], truth).statistic)}
            if best_of is not None:
                row["spearman_best_of_n"] = float(spearmanr(table["best_of_n"], truth).statistic)
            agreement.append(row)
    return GeneratorRanking(pd.concat(tables, ignore_index=True), pd.concat(per_prompt, ignore_index=True),
                            pd.DataFrame(agreement), best_of, human)


def format_ranking(result: GeneratorRanking) -> str:
    """Table 1's layout: a row per generator, per reward its mean over prompts and rank."""
    wide = result.table.pivot(index="generator", columns="reward", values="mean_reward")
    ranks = result.table.pivot(index="generator", columns="reward", values="rank")
    rewards = list(dict.fromkeys(result.table["reward"]))
    generators = list(dict.fromkeys(result.table["generator"]))
    width = max(len("generator"), *map(len, generators))
    columns = [max(14, len(r)) for r in rewards]
    lines = [f"{'generator':<{width}}  " + "  ".join(f"{r:>{w}}" for r, w in zip(rewards, columns))]
    for g in generators:
        lines.append(f"{g:<{width}}  " + "  ".join(
            f"{f'{wide.loc[g, r]:.4f} ({ranks.loc[g, r]:g})':>{w}}" for r, w in zip(rewards, columns)))
    if result.best_of is not None:
        best = result.table.pivot(index="generator", columns="reward", values="best_of_n")
        lines.append(f"best of {result.best_of} per prompt:")
        for g in generators:
            lines.append(f"{g:<{width}}  " + "  ".join(f"{best.loc[g, r]:>{w}.4f}" for r, w in zip(rewards, columns)))
    lines.append(f"mean reward over {int(result.table['prompts'].iloc[0])} prompts (rank; 1 is best)")
    if result.human is not None and "batch" in result.human.attrs:
        attrs = result.human.attrs
        lines.append(f"people (batch {attrs['batch']}, {attrs['answers']} answers; {attrs['left_out']} left out: not "
                     f"two of these generators): share of comparisons won, a tie one half: "
                     + ", ".join(f"{g} {result.human[g]:.3f}" for g in generators if g in result.human.index))
    for row in result.agreement.to_dict("records"):
        lines.append(f"{row['reward']}: Spearman's rho with the human ranking {row['spearman']:+.3f}"
                     + (f" (best of {result.best_of}: {row['spearman_best_of_n']:+.3f})"
                        if "spearman_best_of_n" in row else ""))
    return "\n".join(lines)


def ranking_figure(result: GeneratorRanking):
    """ImageReward's Figure 3: per reward, each generator's per-prompt mean scores, min-max
    normalised over all generators and prompts of that reward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(dict.fromkeys(result.per_prompt["reward"]))
    fig, axes = plt.subplots(1, len(rewards), figsize=(4.5 * len(rewards), 3.8), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        rows = result.per_prompt[result.per_prompt["reward"] == reward]
        low, high = rows["mean"].min(), rows["mean"].max()
        scaled = (rows["mean"] - low) / (high - low) if high > low else rows["mean"] * 0
        generators = list(dict.fromkeys(rows["generator_label"]))
        ax.boxplot([scaled[rows["generator_label"] == g] for g in generators], tick_labels=generators)
        ax.set(title=reward, ylabel="per-prompt score, min-max normalised")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def record_rank_generators(store: Store, choices: list[GeneratorChoice], specs: list[Spec],
                           sets: list[str] | None = None, best_of: int | None = None,
                           human_file: str | None = None, parent_run_id: str | None = None) -> GeneratorRanking:
    """Rank, store (`generator_rankings`) and log params, metrics, the tables and the plot to MLflow."""
    import mlflow

    from tia2.tracking import log_figure, log_text_files, metric_key, stage_run

    from tasks.human_evaluation import HUMAN_BATCH, generator_win_shares

    if human_file and human_file.startswith(HUMAN_BATCH):
        human = generator_win_shares(store, human_file[len(HUMAN_BATCH):], choices, sets)
    else:
        human = read_human_ranking(human_file) if human_file else None
    result = rank_generators(store, choices, specs, sets, best_of, human)
    params = {"generators": [c.label for c in choices], "rewards": [str(s) for s in specs],
              "sets": sets or "all", "best_of": best_of, "human": human_file or "none",
              "prompts": int(result.table["prompts"].iloc[0])}
    with stage_run("rank-generators", params, parent_run_id) as run:
        rows = result.table.assign(sets=",".join(sets or []), best_of=best_of or 0, run_id=run.info.run_id)
        for column in ("best_of_n", "best_of_n_rank"):
            if column not in rows:
                rows[column] = np.nan
        store.upsert("generator_rankings", pa.Table.from_pandas(rows, preserve_index=False))
        mlflow.log_metrics({metric_key(r["reward"], r["generator"], "mean_reward"): float(r["mean_reward"])
                            for r in result.table.to_dict("records")})
        mlflow.log_metrics({metric_key(r["reward"], "spearman"): r["spearman"]
                            for r in result.agreement.to_dict("records") if np.isfinite(r["spearman"])})
        log_text_files({"ranking.csv": result.table.to_csv(index=False),
                        "per_prompt.csv": result.per_prompt.to_csv(index=False),
                        "ranking.txt": format_ranking(result) + "\n"})
        log_figure(ranking_figure(result), "ranking.png")
    return result
