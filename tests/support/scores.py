"""Constructed score tables for protocol tests and benchmarks (benchmarks/metrics_bench.py).

These are not any model's output: they are random scores with a chosen dependence on the human
labels, in the import format of `tia2 import-scores`, so the protocol and the store can be
checked at full benchmark size without weights.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from tia2.store import Store


def synthetic_score_table(store: Store, models: dict[str, float], seed: int = 0,
                          with_contrast: bool = True) -> pa.Table:
    """Rows (set, image, prompt, reward_model, score) for every labelled image of the store:
    against its caption and, with `with_contrast`, every contrast prompt. For model m the caption
    score is `signal * mean_label + noise` and a contrast score is plain noise."""
    con = store.connect()
    captions = con.execute(
        """SELECT i.set, i.file AS image, p.text AS prompt, avg((l.label = 1)::INTEGER) AS quality
           FROM images i JOIN prompts p USING (prompt_id) JOIN labels l USING (image_id)
           GROUP BY ALL ORDER BY i.set, i.file""").df()
    parts = [captions.assign(kind="caption")]
    if with_contrast:
        contrast = con.execute(
            """SELECT i.set, i.file AS image, c.text AS prompt, 0.0 AS quality
               FROM images i JOIN contrast_prompts c USING (prompt_id)
               ORDER BY i.set, i.file, c.text""").df()
        parts.append(contrast.assign(kind="contrast"))
    base = pd.concat(parts, ignore_index=True)
    rng = np.random.default_rng(seed)
    tables = []
    for name, signal in models.items():
        score = signal * base["quality"].to_numpy() + rng.normal(size=len(base))
        tables.append(pa.table({"set": base["set"], "image": base["image"], "prompt": base["prompt"],
                                "reward_model": [name] * len(base), "score": score}))
    return pa.concat_tables(tables)
