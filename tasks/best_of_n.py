"""Stage: best-of-n (TextNorm paper §5.2), generators evaluated against rewards.

Best-of-n picks, per prompt, the image with the highest reward among the first n generated
(ordinals 0..n-1), for every reward spec and every n; a contact sheet per prompt shows the picks
as the paper's Figure 4 does (rows: reward specs, columns: n).
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from tasks.rewards import RewardEvaluator, generated_frame
from tia2.errors import UserError
from tia2.specs import Spec
from tia2.store import Store


def best_of_n(store: Store, specs: list[Spec], ns: list[int], generator: str | None = None,
              sets: list[str] | None = None) -> pd.DataFrame:
    """One row per (prompt, reward, n): the chosen image and its reward value. The first image
    (lowest ordinal) wins a tie."""
    if not ns or min(ns) < 1:
        raise UserError("--n takes positive numbers of images, e.g. 16,64,256")
    frame = generated_frame(store, generator, sets)
    evaluator = RewardEvaluator(store, frame)
    evaluator.check(specs)
    fewest = frame.groupby("prompt_id")["ordinal"].max().min() + 1
    if max(ns) > fewest:
        raise UserError(f"n={max(ns)} needs {max(ns)} images per prompt; some prompts have only {fewest} "
                        f"(generate more with --images-per-prompt)")
    rows = []
    for spec in specs:
        values = evaluator(spec)
        for n in ns:
            candidates = frame.assign(value=values)[frame["ordinal"] < n]
            best = candidates.sort_values(["prompt_id", "value", "ordinal"], ascending=[True, False, True],
                                          kind="stable").groupby("prompt_id", sort=False).head(1)
            rows.append(best.assign(reward=str(spec), n=n))
    picks = pd.concat(rows, ignore_index=True)
    picks["generator"] = frame.attrs["generator"]
    picks["lora"] = frame.attrs["lora"] or ""
    return picks[["set", "prompt_id", "caption", "generator", "lora", "reward", "n", "image_id", "path", "value"]]


def contact_sheet(picks: pd.DataFrame, prompt_id: str, tile: int = 160):
    """The picks for one prompt: a row per reward spec, a column per n (Figure 4's layout)."""
    from PIL import Image, ImageDraw

    mine = picks[picks["prompt_id"] == prompt_id]
    rewards = list(dict.fromkeys(mine["reward"]))
    ns = sorted(set(mine["n"]))
    left, top = 260, 40
    sheet = Image.new("RGB", (left + tile * len(ns), top + tile * len(rewards)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), mine["caption"].iloc[0][:110], fill="black")
    for c, n in enumerate(ns):
        draw.text((left + c * tile + 6, top - 16), f"n = {n}", fill="black")
    for r, reward in enumerate(rewards):
        draw.text((6, top + r * tile + tile // 2), reward[:42], fill="black")
        for c, n in enumerate(ns):
            pick = mine[(mine["reward"] == reward) & (mine["n"] == n)].iloc[0]
            with Image.open(pick["path"]) as image:
                sheet.paste(image.convert("RGB").resize((tile - 4, tile - 4)), (left + c * tile, top + r * tile))
    return sheet


def record_best_of_n(store: Store, specs: list[Spec], ns: list[int], generator: str | None = None,
                     sets: list[str] | None = None, max_sheets: int = 20,
                     parent_run_id: str | None = None) -> pd.DataFrame:
    """Select, store (`best_of_n`), log the selections and a contact sheet per prompt to MLflow."""
    import mlflow

    from tia2.tracking import log_text_files, metric_key, stage_run

    picks = best_of_n(store, specs, ns, generator, sets)
    params = {"rewards": [str(s) for s in specs], "n": ns, "generator": picks["generator"].iloc[0],
              "lora": picks["lora"].iloc[0], "prompts": picks["prompt_id"].nunique()}
    with stage_run("best-of-n", params, parent_run_id) as run:
        rows = picks.drop(columns=["set", "caption", "path"]).assign(run_id=run.info.run_id)
        store.upsert("best_of_n", pa.Table.from_pandas(rows, preserve_index=False))
        log_text_files({"best_of_n.csv": picks.to_csv(index=False)})
        mean_value = picks.groupby(["reward", "n"], sort=False)["value"].mean()
        mlflow.log_metrics({metric_key("mean_value", reward, f"n{n}"): float(v)
                            for (reward, n), v in mean_value.items()})
        for prompt_id in list(dict.fromkeys(picks["prompt_id"]))[:max_sheets]:
            mlflow.log_image(contact_sheet(picks, prompt_id), f"contact_sheets/{prompt_id}.png")
    return picks


