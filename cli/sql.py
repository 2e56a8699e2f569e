"""The command that reads the store's tables: sql."""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
import textwrap

from cli.command import Command, number, open_store

TABLE_VIEW_ROWS = 100  # the rows `tia2 sql` shows as a table unless --limit says otherwise: a look, not a dump


def sql_arguments(p) -> None:
    from tia2.store import TABLES

    p.description += "\n".join(textwrap.fill(", ".join(spec.schema.names), width=100,
                                             initial_indent=f"  {name:<24}", subsequent_indent=" " * 26)
                               for name, spec in TABLES.items())
    p.add_argument("query", metavar="QUERY")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    fmt.add_argument("--json", action="store_true", help="print JSON records")
    p.add_argument("--limit", type=number(int, minimum=0), metavar="N",
                   help=f"print at most N rows (default {TABLE_VIEW_ROWS} in the table view, all with --csv/--json; "
                        f"0: all)")


def run_sql(args) -> int:
    limit = args.limit if args.limit is not None else 0 if args.csv or args.json else TABLE_VIEW_ROWS
    with open_store(args, create=False, write=False).stream_readonly(args.query) as (columns, batches):
        rows = itertools.chain.from_iterable(batches)
        try:
            if args.csv:
                writer = csv.writer(sys.stdout)
                writer.writerow(columns)
                writer.writerows(itertools.islice(rows, limit or None))
            elif args.json:
                _write_json(columns, itertools.islice(rows, limit or None))
            else:
                shown = list(itertools.islice(rows, limit or None))
                _print_table(columns, shown, more=next(rows, None) is not None)
        except BrokenPipeError:  # e.g. `| head`: the reader has what it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _write_json(columns: list[str], rows) -> None:
    """A JSON list of records, written as the rows come."""
    sys.stdout.write("[")
    for i, row in enumerate(rows):
        sys.stdout.write(("," if i else "") + "\n " + json.dumps(dict(zip(columns, row)), default=str))
    sys.stdout.write("\n]\n")


def _print_table(columns: list[str], rows: list[tuple], more: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, box=None, header_style="bold")
    for row in rows:
        table.add_row(*("NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    Console(width=max(100, os.get_terminal_size(0).columns if sys.stdout.isatty() else 200)).print(table)
    count = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    print(f"(the first {count}; more with --limit N, all with --limit 0 or --csv/--json)" if more else f"({count})")


SQL = Command("sql", "run a read-only SQL query over the store's tables", """\
    Run one read-only query (SELECT, EXPLAIN) over the DuckDB catalog of the store.
    --csv and --json print every row as it comes; the table view shows the first rows.
    Example: tia2 sql "SELECT reward, set, avg(auroc) FROM prompt_metrics GROUP BY ALL"

    tables and their columns:
    """, sql_arguments, run_sql)  # the store's tables follow (sql_arguments)

COMMANDS = (SQL,)
