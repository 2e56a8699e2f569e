"""Stage: the run report. One self-contained HTML page per benchmark run (plots and images
embedded as data URIs), logged to the flow's MLflow run as `report.html`: the headline numbers,
every stage that ran, Table 2, the reward models on the generated images (caption ranking and
score distributions), the fine-tuning (proxy and gold reward over steps, win/tie/loss, held-out
images beside the base model's) and the images of every prompt. The headline numbers also go to
the parent run's metrics, the stages and Table 2 to Prefect artifacts as markdown.
"""

from __future__ import annotations

import base64
import html
import io
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.evaluate_finetune import BASE, best_of_n_figure, steps_figure, win_tie_loss_figure, wins_table
from tasks.generate import prompts_to_generate
from tasks.metrics import METRIC_LABELS, METRICS, SET_LABELS
from tia2.artifacts import markdown_table, numeric_columns
from tia2.store import Store
from tia2.tracking import artifact_reference, metric_key, run_page_url, tracking_uri

GALLERY_PROMPTS = 24  # per set and per held-out evaluation: a page of a few MB however large the run
THUMBNAIL = 128       # px, the longest side of an image on the page

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}.meta{color:#555}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.data td:first-child{white-space:nowrap}
.glance{display:flex;flex-wrap:wrap;gap:.8em}.glance div{border:1px solid #ddd;border-radius:6px;padding:.5em .9em}
.glance b{display:block;font-size:1.5em}.plots{display:flex;flex-wrap:wrap;gap:.5em;align-items:flex-start}
.plots img{max-width:100%}.gallery{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;width:min-content}
.images{display:flex;gap:3px}figcaption{font-size:.85em;margin-top:.2em}
img.thumb{width:128px;image-rendering:pixelated;border:1px solid #ddd}"""

NO_METRICS = ("No metrics against human labels in this run: no reward specs are configured (`rewards`). "
              "TIA2's human labels are for its own images: register them (`image_folders`, `tia2 import-images`) "
              "or import their scores (`score_files`), and list the reward specs to evaluate under `rewards`. "
              "Generated images have no labels; the caption ranking needs none.")


# --- what the run did, in words and numbers -------------------------------------------------
def stage_rows(summary: dict) -> pd.DataFrame:
    """One row per stage that ran (cached ones too: their results are this run's), in words."""
    rows = [("ingest-tia2", ", ".join(f"{k} +{v}" for k, v in summary["ingest"]["new_rows"].items()))]
    if summary.get("selected"):
        s = summary["selected"]
        rows.append(("sample-prompts", f"{s['selected']} of {s['pool_size']} pool prompts, coverage "
                                       f"{s['coverage']:.1%} (random {s['random_coverage']:.1%})"))
    if summary.get("contrast"):
        c = summary["contrast"]
        rows.append(("contrast", f"{c['rows_added']} new {c['method']} contrast prompts for {c['prompts']} prompts"))
    if summary.get("generated"):
        g = summary["generated"]
        rows.append(("generate", f"{g['images']} new images with {g['generator']} ({g['images_per_prompt']} per "
                                 f"prompt, {g['steps']} steps, guidance {g['guidance']}, {g['shards']} shard(s); "
                                 f"{g['already_present']} already present; {g['images_per_second']} images/s)"))
    rows += [("import-images", f"{r['set']}: {r['registered']} image files registered ({r['new_images']} new)")
             for r in summary.get("image_folders") or []]
    rows += [("score", f"{s['reward_model']}: {s['images']} images, {s['rows_added']} new rows"
                       + (f", {s['rows_superseded']} of older scoring code replaced" if s["rows_superseded"] else "")
                       + (f", {s['failures']} unreadable" if s["failures"] else ""))
             for s in summary.get("scores") or []]
    rows += [("import-scores", f"{Path(r['file']).name}: {r['added']} of {r['rows']} rows added "
                               f"({', '.join(r['reward_models'])})") for r in summary.get("score_imports") or []]
    if summary.get("set_means"):
        means = pd.DataFrame(summary["set_means"])
        captions = means.groupby("set", sort=False)["captions"].first()
        rows.append(("metrics", f"{means['reward'].nunique()} reward specs on "
                                + ", ".join(f"{n} captions of {SET_LABELS.get(s, s)}" for s, n in captions.items())))
    for f in summary.get("finetune") or []:
        rows += finetune_rows(f)
    return pd.DataFrame(rows, columns=["stage", "result"])


def finetune_rows(f: dict) -> list[tuple[str, str]]:
    """(stage, result in words) of one fine-tuning report (flows/finetune.py) and its evaluation."""
    rows = [("finetune", f"{f['algo']} run {f['run']}: step {f['final_step']} mean reward {f['final_mean_reward']:.4f} "
                         f"(base {f['base_mean_reward']:.4f}, beats it {f['final_wins']}), selected step "
                         f"{f['selected_step']}")]
    if f.get("evaluation"):
        e = f["evaluation"]
        gold = [r for r in e["win_tie_loss"] if r["reward"] == e["gold"]]
        rows.append(("evaluate", f"run {f['run']}: {len(gold)} checkpoint(s) against the base model on "
                                 f"{e['heldout_prompts']} held-out prompts; gold {e['gold']} wins/ties/losses "
                                 + ", ".join(f"{r['adapter']} {r['wins']}/{r['ties']}/{r['losses']}" for r in gold)))
    return rows


def headline_metrics(summary: dict, ranking: pd.DataFrame | None) -> list[tuple[str, float, int]]:
    """The run's headline numbers for its parent MLflow run, as (key, value, step): images made,
    score rows added (in all and per model), each reward model's caption top-1, every spec's
    per-set means (the metrics run's keys), and per fine-tuning algorithm its mean rewards, its
    selected step and, at each evaluated checkpoint's step, the held-out win rate per reward spec."""
    values = []
    if summary.get("generated"):
        values += [("images_generated", summary["generated"]["images"], 0),
                   ("images_per_second", summary["generated"]["images_per_second"], 0)]
    scores = summary.get("scores") or []
    if scores:
        values.append(("rows_scored", sum(s["rows_added"] for s in scores), 0))
        values += [(metric_key("rows_scored", s["reward_model"]), s["rows_added"], 0) for s in scores]
    if ranking is not None:
        values += [(metric_key("caption_top1", label), top1, 0)
                   for label, top1 in zip(_model_labels(ranking), ranking["caption_top1"])]
    for row in summary.get("set_means") or []:
        values += [(metric_key(row["set"], row["reward"], m), row[m], 0) for m in METRICS if np.isfinite(row[m])]
    for f in summary.get("finetune") or []:
        algo = f["algo"]
        values += [(metric_key("finetune", algo, "mean_reward"), f["final_mean_reward"], f["final_step"]),
                   (metric_key("finetune", algo, "base_mean_reward"), f["base_mean_reward"], 0),
                   (metric_key("finetune", algo, "selected_step"), f["selected_step"], 0)]
        values += [(metric_key("finetune", algo, "heldout_win_rate", r["reward"]), r["wins"] / r["n"], r["step"])
                   for r in (f.get("evaluation") or {}).get("win_tie_loss", []) if r["step"] is not None]
    return values


def _model_labels(ranking: pd.DataFrame) -> list[str]:
    """Each ranking row's reward model, with its version where the model has several."""
    several = ranking["reward_model"].duplicated(keep=False)
    return [f"{m}@{v}" if dup else m for m, v, dup in zip(ranking["reward_model"], ranking["model_version"], several)]


def table2_frame(set_means: list[dict]) -> pd.DataFrame:
    """Per-set means laid out like the TextNorm paper's Table 2: a row per (set, reward spec),
    grouped by set, whose label and caption count stand on its first row."""
    by_set = pd.DataFrame(set_means).groupby("set", sort=False)  # the rows come spec by spec
    means = pd.concat([group for _, group in by_set], ignore_index=True)
    label = means["set"].map(lambda s: SET_LABELS.get(s, s)) + " (" + means["captions"].astype(str) + ")"
    frame = pd.DataFrame({"Set": label.where(~means["set"].duplicated(), ""), "Reward": means["reward"]})
    for m in METRICS:
        frame[METRIC_LABELS[m]] = means[m]
    return frame


# --- the Prefect artifacts ------------------------------------------------------------------
def report_markdown(summary: dict) -> str:
    """The `tia2-report` artifact: where the report is, and the stages as a list (the Prefect UI
    neither wraps a table's cells nor shows its scroll bar: long results would be cut off)."""
    run_id = summary["mlflow_run_id"]
    where = artifact_reference(run_id, "report.html")
    if run_page_url(run_id) is None:
        where += (f" (a local MLflow store: open the file in a browser, or browse the run with "
                  f"`mlflow ui --backend-store-uri {tracking_uri()}`)")
    return (f"## tia2 benchmark report\n\nReport: {where}, MLflow run `{run_id}`: headline numbers, Table 2, "
            f"score distributions, fine-tuning curves and the images of every prompt.\n\n"
            "### Stages\n\n" + "".join(f"- **{stage}**: {result}\n" for stage, result in stage_rows(summary).values))


def table2_markdown(summary: dict) -> str:
    """The `tia2-table2` artifact: Table 2 as a table per set, or why this run has none. The
    Prefect UI cuts a wide table off at its panel's edge: the numbers come first, the reward spec
    (which can be long) last."""
    head = "## Alignment with human labels (TextNorm paper, Table 2 layout)\n\n"
    if not summary.get("set_means"):
        return head + NO_METRICS + "\n"
    parts = [head + f"Means over the captions whose images' binary labels are not all equal; MLflow run "
                    f"`{summary['mlflow_run_id']}`.\n"]
    for set_name, means in pd.DataFrame(summary["set_means"]).groupby("set", sort=False):
        table = means[[*METRICS, "reward"]].rename(columns={"reward": "Reward", **METRIC_LABELS})
        parts.append(f"### {SET_LABELS.get(set_name, set_name)} ({means['captions'].iloc[0]} captions)\n\n"
                     f"{markdown_table(table, float_format='.3f')}\n")
    return "\n".join(parts)


# --- the HTML page --------------------------------------------------------------------------
def build_report(store: Store, summary: dict, ranking: pd.DataFrame | None) -> str:
    """The report page for a run's `summary` (the flow's return value) and its caption ranking
    (tasks.metrics.caption_ranking, None without reward models)."""
    run_id = summary["mlflow_run_id"]
    run_url = run_page_url(run_id)
    run_text = f'<a href="{html.escape(run_url)}">{run_id}</a>' if run_url else f"<code>{run_id}</code>"
    parts = [f"<h1>tia2 benchmark run</h1><p class=meta>{datetime.now(UTC):%Y-%m-%d %H:%M UTC} · store "
             f"<code>{html.escape(str(store.root))}</code> · MLflow run {run_text}</p>",
             "<h2>At a glance</h2>", _glance(summary, ranking),
             "<h2>Stages</h2>", _html_table(stage_rows(summary)),
             "<h2>Alignment with human labels (TextNorm paper, Table 2)</h2>", _table2_section(summary)]
    if ranking is not None:
        parts += ["<h2>Reward models on the scored images</h2><p>How often each reward model scores an image's "
                  "caption above all its contrast prompts, and its mean rank among them (needs no labels):</p>",
                  _html_table(ranking),
                  "<p>Score distributions: each image against its own caption and against its contrast prompts.</p>",
                  _figure(score_distributions_figure(store, ranking))]
    for f in summary.get("finetune") or []:
        parts += [f"<h2>Fine-tuning: {html.escape(f['algo'])} (run {html.escape(f['run'])})</h2>",
                  _finetune_section(store, f)]
    if summary.get("generated"):
        parts += [f"<h2>Images of {html.escape(summary['generated']['generator'])}</h2>",
                  _generated_section(store, summary["generated"])]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tia2 report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def _glance(summary: dict, ranking: pd.DataFrame | None) -> str:
    cards = []
    if summary.get("generated"):
        g = summary["generated"]
        cards.append((g["images"], "images generated", f"{g['generator']}, {g['already_present']} already there"))
    if summary.get("scores"):
        cards.append((sum(s["rows_added"] for s in summary["scores"]), "score rows added",
                      f"{len(summary['scores'])} reward models"))
    if ranking is not None and len(ranking):
        best = ranking.loc[ranking["caption_top1"].idxmax()]
        cards.append((f"{best['caption_top1']:.0%}", "best caption top-1", best["reward_model"]))
    if summary.get("set_means"):
        means = pd.DataFrame(summary["set_means"])
        best = means.loc[means["auroc"].idxmax()]
        cards.append((f"{best['auroc']:.3f}", "best AUROC",
                      f"{best['reward']} on {SET_LABELS.get(best['set'], best['set'])}"))
    for f in summary.get("finetune") or []:
        if f.get("evaluation"):
            gold = f["evaluation"]["gold"]
            last = [r for r in f["evaluation"]["win_tie_loss"] if r["reward"] == gold][-1]  # the last checkpoint
            cards.append((f"{last['wins']}/{last['n']}", f"{f['algo']} wins against the base",
                          f"{last['adapter']}, gold {gold}, held-out prompts"))
    return "<div class=glance>" + "".join(
        f"<div><b>{html.escape(str(value))}</b>{html.escape(what)}<br><small>{html.escape(note)}</small></div>"
        for value, what, note in cards) + "</div>"


def _table2_section(summary: dict) -> str:
    if not summary.get("set_means"):
        return "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(NO_METRICS)) + "</p>"  # markdown's code
    frame = table2_frame(summary["set_means"])
    metric_columns = list(METRIC_LABELS.values())
    groups = frame["Set"].ne("").cumsum()  # the rows of one set
    best = frame[metric_columns].eq(frame[metric_columns].groupby(groups).transform("max"))
    best[frame.groupby(groups)["Reward"].transform("size").eq(1)] = False  # a set with one spec: no best
    return (_html_table(frame, bold=best, float_format=".3f") + "<p class=meta>Means over the captions (their count "
            "in brackets) whose images' binary labels are not all equal; the best value of each set in bold.</p>")


def score_distributions_figure(store: Store, ranking: pd.DataFrame):
    """A panel per reward model (and version) of the ranking: histograms of the scores of images
    against their own caption and against its contrast prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    con = store.connect()
    con.register("ranked_models", ranking[["reward_model", "model_version"]])
    scores = con.execute("""
        SELECT s.reward_model, s.model_version, s.score, s.text = p.text AS is_caption
        FROM scores s JOIN ranked_models USING (reward_model, model_version)
        JOIN images i USING (image_id) JOIN prompts p USING (prompt_id)""").df()
    columns = min(3, len(ranking))
    rows = -(-len(ranking) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.9 * rows), squeeze=False)
    for ax, label, model in zip(axes.flat, _model_labels(ranking), ranking.itertuples()):
        mine = scores[(scores["reward_model"] == model.reward_model) & (scores["model_version"] == model.model_version)]
        bins = np.histogram_bin_edges(mine["score"], bins=24)
        ax.hist(mine.loc[~mine["is_caption"], "score"], bins=bins, density=True, alpha=0.55, color="C7",
                label="contrast prompts")
        ax.hist(mine.loc[mine["is_caption"], "score"], bins=bins, density=True, alpha=0.65, color="C0",
                label="caption")
        ax.set(title=label, xlabel="score")
        ax.set_yticks([])
    for ax in axes.flat[len(ranking):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _finetune_section(store: Store, f: dict) -> str:
    parts = [f"<p>{html.escape(f['algo'])} trained to step {f['final_step']}: mean reward "
             f"{f['final_mean_reward']:.4f} against the base model's {f['base_mean_reward']:.4f} on its training "
             f"prompts (beats it {f['final_wins']}); selected step {f['selected_step']} (the earliest with the "
             f"most wins). Adapters: <code>{html.escape(f['folder'])}</code></p>"]
    e = f.get("evaluation")
    if not e:
        return "".join(parts)
    table = pd.DataFrame(e["win_tie_loss"])
    parts += [f"<p>Every checkpoint against the base model on {e['heldout_prompts']} held-out prompts, image by image "
              f"(same prompt and seed): proxy <code>{html.escape(e['proxy'])}</code>, gold "
              f"<code>{html.escape(e['gold'])}</code>.</p><div class=plots>",
              _figure(steps_figure(pd.DataFrame(e["steps_curve"]), e["proxy"], e["gold"])),
              _figure(win_tie_loss_figure(table)),
              _figure(best_of_n_figure(pd.DataFrame(e["best_of_n_curve"]), e["proxy"], e["gold"])),
              "</div><p>Wins/ties/losses against the base model:</p>", _html_table(wins_table(table).reset_index()),
              "<p>Held-out images, the base model's and each checkpoint's side by side (image i of a row always from "
              "the same seed):</p>",
              _heldout_images(store, pd.DataFrame(e["images"]))]
    return "".join(parts)


def _heldout_images(store: Store, images: pd.DataFrame) -> str:
    paths = _paths(store, images["image_id"])
    variants = list(dict.fromkeys(images["variant"]))
    prompts = list(dict.fromkeys(zip(images["prompt_id"], images["caption"])))
    rows = []
    for prompt_id, caption in prompts[:GALLERY_PROMPTS]:
        mine = images[images["prompt_id"] == prompt_id]
        cells = "".join("<td><div class=images>" + "".join(_thumbnail(paths[i], caption)
                                                          for i in mine.loc[mine["variant"] == v, "image_id"])
                        + "</div></td>" for v in variants)
        rows.append(f"<tr><td>{html.escape(caption)}</td>{cells}</tr>")
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(v if v != BASE else 'base model')}</th>"
                                           for v in variants) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table>" + _shown(min(len(prompts), GALLERY_PROMPTS), len(prompts))


def _generated_section(store: Store, generated: dict) -> str:
    """Every prompt the generation stage made images for, by set (in the config's order), each
    with its whole caption."""
    prompts = prompts_to_generate(store, list(generated["sets"]), generated["max_prompts"])
    images = store.connect().execute(
        """SELECT prompt_id, image_id, path FROM images
           WHERE generator = ? AND lora IS NULL AND steps = ? AND guidance = ? AND ordinal < ?
             AND prompt_id IN (SELECT unnest(?)) ORDER BY prompt_id, ordinal""",
        [f"{generated['generator']}@{generated['identity']}", generated["steps"], float(generated["guidance"]),
         generated["images_per_prompt"], [p for p, _, _ in prompts]]).df()
    by_prompt = {pid: list(group["path"]) for pid, group in images.groupby("prompt_id", sort=False)}
    parts = []
    for set_name in generated["sets"]:
        mine = [(pid, text) for pid, text, s in prompts if s == set_name]
        figures = [f"<figure><div class=images>{''.join(_thumbnail(path, text) for path in by_prompt.get(pid, []))}"
                   f"</div><figcaption>{html.escape(text)}</figcaption></figure>"
                   for pid, text in mine[:GALLERY_PROMPTS]]
        parts.append(f"<h3>{html.escape(SET_LABELS.get(set_name, set_name))}</h3><div class=gallery>{''.join(figures)}"
                     f"</div>{_shown(len(figures), len(mine))}")
    return "".join(parts)


def _shown(shown: int, total: int) -> str:
    return "" if shown == total else f"<p class=meta>The first {shown} of {total} prompts (all in the store).</p>"


def _paths(store: Store, image_ids) -> dict[str, str]:
    return dict(store.connect().execute("SELECT image_id, path FROM images WHERE image_id IN (SELECT unnest(?))",
                                        [list(image_ids)]).fetchall())


# --- HTML pieces ----------------------------------------------------------------------------
def _html_table(frame: pd.DataFrame, bold: pd.DataFrame | None = None, float_format: str = ".4g") -> str:
    """A table with numbers right-aligned (floats in `float_format`), text escaped, and the cells
    where `bold` (a mask of the frame's shape) is true in bold."""
    numeric = dict(zip(frame.columns, numeric_columns(frame)))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for i in range(len(frame)):
        cells = []
        for c in frame.columns:
            value = frame[c].iloc[i]
            text = "" if pd.isna(value) else format(value, float_format) if isinstance(value, float) \
                else html.escape(str(value))
            if bold is not None and c in bold.columns and bold[c].iloc[i]:
                text = f"<b>{text}</b>"
            cells.append(f"<td class=num>{text}</td>" if numeric[c] else f"<td>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class=data><tr>{head}</tr>{''.join(rows)}</table>"


def _figure(fig) -> str:
    """A matplotlib figure as an embedded PNG (and closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)  # two fine-tuning plots side by side on the page
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _thumbnail(path: str, caption: str) -> str:
    """An image file as an embedded thumbnail: PNG when small, else downscaled JPEG."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    kind = "png"
    if max(image.size) > THUMBNAIL:
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        kind = "jpeg"
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return (f'<img class=thumb alt="{html.escape(caption)}" '
            f'src="data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}">')


def record_report(store: Store, summary: dict, ranking: pd.DataFrame | None) -> str:
    """Log the headline numbers and the report to the active MLflow run (the flow's parent run);
    returns the report's URI."""
    import mlflow

    from tia2.tracking import log_text_files

    by_step: dict[int, dict[str, float]] = {}
    for key, value, step in headline_metrics(summary, ranking):
        by_step.setdefault(int(step), {})[key] = float(value)
    for step, values in sorted(by_step.items()):
        mlflow.log_metrics(values, step=step)
    log_text_files({"report.html": build_report(store, summary, ranking)})
    return f"{mlflow.get_artifact_uri()}/report.html"
