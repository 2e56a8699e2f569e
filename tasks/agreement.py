"""The agreement stage (ImageReward Table 2a): how far annotators agree with each other, and
reward models with them, on one annotation batch or on a labelled set (TIA2's three annotators
per image). The statistics are tia2/agreement.py's; this module reads the judgements from the
store, stores the rows (`annotation_agreement`) and logs them to MLflow."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from tia2.agreement import (
    agreement_frame, aspect_agreement, ranking_agreement, rating_agreement, reward_agreement,
)
from tia2.annotation import FIRST_ANNOTATOR_ID, LABEL_VALUES
from tia2.errors import UserError
from tia2.specs import Spec
from tia2.store import TABLES, Store

RESAMPLES = 1000


TIA2_POSITION = "tia2#"  # TIA2's labels of an image, by position: tia2#1, tia2#2, tia2#3


@dataclass
class AgreementResult:
    scope: str
    kind: str            # rating or ranking
    annotators: int
    items: int
    table: pd.DataFrame  # measure, subject, other, value, low, high, n


def judgements(store: Store, scope: str) -> tuple[str, pd.DataFrame, pd.DataFrame | None]:
    """The kind (rating or ranking) of a batch's or a labelled set's judgements, their frame (the
    columns tia2.agreement takes), and the 1-7 aspect ratings of a rating batch (or None)."""
    con = store.connect("annotation_batches", "annotations", "annotators", "annotation_items", "images",
                        "labels", "preference_ranks")
    batch = con.execute("SELECT task FROM annotation_batches WHERE batch = ?", [scope]).fetchone()
    if batch is None:
        # people of the app by name; TIA2's own three labels by their position in the release
        labels = con.execute("""SELECT l.image_id AS item, i.prompt_id AS "group",
                                       CASE WHEN l.annotator < $first THEN $tia2 || (l.annotator + 1)::VARCHAR
                                            ELSE coalesce(p.name, l.annotator::VARCHAR) END AS annotator, l.label
                                FROM labels l JOIN images i USING (image_id)
                                LEFT JOIN annotators p ON p.annotator_id = l.annotator WHERE i.set = $set""",
                             {"set": scope, "tia2": TIA2_POSITION, "first": FIRST_ANNOTATOR_ID}).df()
        if labels.empty:
            batches = [b for (b,) in con.execute("SELECT batch FROM annotation_batches ORDER BY 1").fetchall()]
            raise UserError(f"{scope!r} is neither an annotation batch ({', '.join(batches) or 'none yet'}) "
                            f"nor a set with labelled images")
        return "rating", labels, None
    if batch[0] != "rating":
        ranks = con.execute("""SELECT item, image_id, annotator, rank FROM preference_ranks WHERE set = ?""",
                            [scope]).df()
        if ranks.empty:
            raise UserError(f"batch {scope!r} has no answers yet")
        return "ranking", ranks, None
    answers = con.execute("""SELECT i.image_ids[1] AS item, i.prompt_id AS "group", p.name AS annotator, n.answer
                             FROM annotations n JOIN annotation_items i USING (batch, item)
                             JOIN annotators p USING (annotator_id) WHERE n.batch = ?""", [scope]).df()
    if answers.empty:
        raise UserError(f"batch {scope!r} has no answers yet")
    parsed = answers["answer"].map(json.loads)
    labels = answers[["item", "group", "annotator"]].assign(label=[LABEL_VALUES[a["label"]] for a in parsed])
    aspects = pd.DataFrame([{"item": item, "annotator": who, "aspect": aspect, "value": value}
                            for item, who, answer in zip(answers["item"], answers["annotator"], parsed)
                            for aspect, value in answer.items() if aspect != "label"],
                           columns=["item", "annotator", "aspect", "value"])
    return "rating", labels, (aspects if not aspects.empty else None)


def reward_values(store: Store, specs: list[Spec], image_ids) -> dict[str, pd.Series]:
    """Each spec's value of the images, by image id, from the stored scores of their prompts."""
    from tasks.rewards import RewardEvaluator

    con = store.connect("images", "prompts")
    con.register("wanted", pd.DataFrame({"image_id": sorted(set(image_ids))}))
    frame = con.execute("""SELECT i.set, i.image_id, i.prompt_id, p.text AS caption FROM wanted
                           JOIN images i USING (image_id) JOIN prompts p USING (prompt_id)
                           ORDER BY i.image_id""").df()
    frame.index.name = "row"
    evaluator = RewardEvaluator(store, frame)
    evaluator.check(specs)
    return {str(spec): pd.Series(evaluator(spec), index=frame["image_id"].to_numpy()) for spec in specs}


def compute_agreement(store: Store, scope: str, specs: list[Spec] = (), resamples: int = RESAMPLES,
                      seed: int = 0) -> AgreementResult:
    kind, frame, aspects = judgements(store, scope)
    images = frame["item"] if kind == "rating" else frame["image_id"]
    if kind == "rating":
        rows = rating_agreement(frame, resamples, seed)
        if aspects is not None:
            rows += aspect_agreement(aspects, resamples, seed)
    else:
        rows = ranking_agreement(frame, resamples, seed)
    if specs:
        rows += reward_agreement(frame, reward_values(store, list(specs), images), kind, resamples, seed)
    return AgreementResult(scope, kind, int(frame["annotator"].nunique()), int(frame["item"].nunique()),
                           agreement_frame(rows))


def format_agreement(result: AgreementResult) -> str:
    table = result.table.copy()
    table["95% interval"] = [f"[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "" for lo, hi in zip(table["low"], table["high"])]
    table["value"] = table["value"].map(lambda v: f"{v:.3f}" if np.isfinite(v) else "n/a")
    head = (f"agreement on {result.scope!r} ({result.kind}): {result.items} items, {result.annotators} annotators")
    lines = [head, table[["measure", "subject", "other", "value", "95% interval", "n"]].to_string(index=False)]
    if table["subject"].str.startswith(TIA2_POSITION).any():
        lines.append(f"{TIA2_POSITION}1-3 are the positions of TIA2's three labels per image: the release does not say\n"
                     f"whether a position is one person throughout, so rows per {TIA2_POSITION}N compare positions; the\n"
                     f"pooled rows (all) and Krippendorff's alpha do not depend on who is who")
    return "\n".join(lines)


def record_agreement(store: Store, scope: str, specs: list[Spec] = (), resamples: int = RESAMPLES,
                     parent_run_id: str | None = None) -> AgreementResult:
    """Compute, store (`annotation_agreement`, replacing the scope's rows) and log to MLflow."""
    import mlflow

    from tia2.tracking import log_text_files, metric_key, stage_run

    store.check_writable()
    result = compute_agreement(store, scope, specs, resamples)
    params = {"scope": scope, "kind": result.kind, "rewards": [str(s) for s in specs], "items": result.items,
              "annotators": result.annotators, "bootstrap": resamples, "store": str(store.root)}
    with stage_run("agreement", params, parent_run_id) as run:
        rows = result.table.assign(scope=scope, run_id=run.info.run_id)
        stored = store.read("annotation_agreement").to_pandas()
        old = stored[stored["scope"] == scope][["scope", "measure", "subject", "other"]]
        store.upsert_together({"annotation_agreement": pa.Table.from_pandas(rows, schema=TABLES["annotation_agreement"].schema,
                                                                              preserve_index=False)},
                              remove={"annotation_agreement": pa.Table.from_pandas(old, preserve_index=False)})
        mlflow.log_metrics({metric_key(r["measure"], r["subject"], r["other"] or "all"): float(r["value"])
                            for r in result.table.to_dict("records") if np.isfinite(r["value"])})
        log_text_files({"agreement.csv": result.table.to_csv(index=False), "agreement.txt": format_agreement(result) + "\n"})
    return result
