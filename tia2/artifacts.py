"""The content of Prefect artifacts: markdown tables, which the Prefect UI renders as tables
(text laid out with spaces in a code block breaks into stray lines or is cut off at the panel's
width), and rows for table artifacts."""

from __future__ import annotations

import math

import pandas as pd


def markdown_table(frame: pd.DataFrame, float_format: str = ".4g") -> str:
    """A GitHub-flavoured markdown table of the frame: floats in `float_format`, numeric columns
    right-aligned."""
    header = [str(c) for c in frame.columns]
    lines = [_row(header), "|" + "|".join("---:" if n else "---" for n in numeric_columns(frame)) + "|"]
    lines += [_row([_cell(v, float_format) for v in row]) for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def numeric_columns(frame: pd.DataFrame) -> list[bool]:
    """Which columns hold numbers (right-aligned in a table); booleans do not count."""
    return [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
            for c in frame.columns]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(value, float_format: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return format(value, float_format)
    return str(value).replace("|", "\\|").replace("\n", " ")


def records(frame: pd.DataFrame) -> list[dict]:
    """The frame's rows as dicts, missing values None: JSON for a table artifact, plain values
    for a task's result."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")
