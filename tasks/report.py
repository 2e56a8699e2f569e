"""Stage: the run report. One self-contained HTML page per benchmark run — what each stage did,
the caption-ranking and Table 2 tables, and image grids of the generated images — logged to the
run's MLflow run as `report.html`.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime

import pandas as pd

from tasks.generate import sample_grid
from tia2.store import Store

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:.8em}
img{max-width:100%;border:1px solid #ddd}"""


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0)


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def stage_rows(summary: dict) -> pd.DataFrame:
    """One row per stage that ran, with what it did in words."""
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
        rows.append(("generate", f"{g['images']} new images with {g['generator']} ({g['already_present']} present, "
                                 f"{g['images_per_second']} images/s)"))
    rows += [("score", f"{s['reward_model']}: {s['images']} images, {s['rows_added']} new rows")
             for s in summary.get("scores", [])]
    rows += [("finetune", f"{f['algo']} run {f['run']}: step {f['final_step']} mean reward {f['final_mean_reward']:.4f} "
                          f"(base {f['base_mean_reward']:.4f}, beats it {f['final_wins']}), selected step "
                          f"{f['selected_step']}") for f in summary.get("finetune") or []]
    rows += [("evaluate", f"run {f['run']} on {f['evaluation']['heldout_prompts']} held-out prompts, gold "
                          f"{f['evaluation']['gold']}: wins/ties/losses {f['evaluation']['win_tie_loss']}")
             for f in summary.get("finetune") or [] if f.get("evaluation")]
    return pd.DataFrame(rows, columns=["stage", "result"])


def build_report(store: Store, summary: dict, ranking: pd.DataFrame | None, generator_names: list[str]) -> str:
    """The report page for a run's `summary` (the flow's return value) and its caption ranking
    (tasks.metrics.caption_ranking, None without reward models)."""
    parts = [f"<h1>tia2 benchmark run</h1><p>{datetime.now(UTC):%Y-%m-%d %H:%M UTC} · store "
             f"<code>{html.escape(str(store.root))}</code> · MLflow run <code>{summary['mlflow_run_id']}</code></p>",
             "<h2>Stages</h2>", _table(stage_rows(summary))]
    if ranking is not None:
        parts += ["<h2>Caption ranking</h2><p>How often each reward model scores an image's caption above "
                  "all its contrast prompts (needs no labels).</p>", _table(ranking)]
    if summary.get("table2"):
        parts += ["<h2>Alignment with human labels (TextNorm paper, Table 2 layout)</h2>",
                  f"<pre>{html.escape(summary['table2'])}</pre>"]
    for name in generator_names:
        grid = sample_grid(store, name)
        if grid is not None:
            parts += [f"<h2>Images of {html.escape(name)}</h2>", _png(grid)]
    return f"<!doctype html><html><head><meta charset='utf-8'><title>tia2 report</title><style>{STYLE}</style>" \
           f"</head><body>{''.join(parts)}</body></html>"


def record_report(store: Store, summary: dict, ranking: pd.DataFrame | None) -> str:
    """Log the report to the active MLflow run (the flow's parent run); returns its URI."""
    import mlflow

    from tia2.tracking import log_text_files

    log_text_files({"report.html": build_report(store, summary, ranking, generator_names(store))})
    return f"{mlflow.get_artifact_uri()}/report.html"


def generator_names(store: Store) -> list[str]:
    """The generators (name@identity) of the store's generated images."""
    rows = store.connect().execute("SELECT DISTINCT generator FROM images WHERE path IS NOT NULL AND seed IS NOT NULL "
                                   "ORDER BY 1").fetchall()
    return [name for (name,) in rows]
