"""Benchmark: the annotation app under load. The real server on 127.0.0.1 over a temporary store
of tiny random images; simulated annotators (one thread and HTTP client each) fetch their next
item and answer it, as the page does, all at once.

    .venv/bin/python benchmarks/annotate_bench.py [--annotators 20] [--answers 2000] [--task pairwise]

Checks that no answer is lost or doubled (the store's annotations are exactly the acknowledged
answers, and each wrote one log row) and prints the answer requests' p50/p95/p99 latency and the
answers per second. It stops by itself: after --answers answers, or --timeout seconds (exit 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import annotate  # noqa: E402
from tests.support.annotation import SET, annotation_store  # noqa: E402
from tests.support.annotation_app import annotate_concurrently, running_server  # noqa: E402
from tia2.annotation import MIN_IMAGES  # noqa: E402


def bench_store(root: Path, task: str, annotators: int, answers_each: int):
    """A store with enough items that every annotator has `answers_each` of their own."""
    images = {"rating": 1, "pairwise": 5}.get(task, 4)  # pairwise: 10 pairs per prompt
    per_prompt = {"rating": images, "pairwise": math.comb(images, 2)}.get(task, 1)
    store = annotation_store(root, prompts=math.ceil(answers_each / per_prompt), images_per_prompt=max(images, MIN_IMAGES[task]))
    tokens = dict(annotate.add_annotator(store, f"annotator{n:02d}") for n in range(annotators))
    batch = annotate.create_batch(store, task, SET, per_item=annotators).batch  # everyone answers every item
    return store, tokens, batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--answers", type=int, default=2000, help="in all (split evenly between the annotators)")
    parser.add_argument("--task", default="pairwise", choices=("rating", "ranking", "pairwise", "best-worst"))
    parser.add_argument("--timeout", type=float, default=600, help="seconds before it gives up")
    args = parser.parse_args(argv)
    answers_each = math.ceil(args.answers / args.annotators)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store, tokens, batch = bench_store(Path(tmp) / "store", args.task, args.annotators, answers_each)
        print(f"store: {args.annotators} annotators x {answers_each} {args.task} answers of batch {batch!r} "
              f"({time.perf_counter() - start:.1f} s to build)")
        with running_server(store) as url:
            result = annotate_concurrently(url, list(tokens.values()), batch, answers_each, timeout=args.timeout)
        stored = store.read("annotations").to_pandas()
        token_of = {a.annotator_id: token for a, token in tokens.items()}
        rows = sorted(zip(stored["item"], stored["annotator_id"].map(token_of)))
        log_rows = store.read("annotation_log").num_rows
    acknowledged = sorted(result.acknowledged)
    lost = len(set(acknowledged) - set(rows))
    doubled = len(rows) - len(set(rows)) + len(acknowledged) - len(set(acknowledged))
    extra = len(set(rows) - set(acknowledged))
    latency = np.percentile(np.array(result.latencies) * 1000, [50, 95, 99])
    print(f"answers acknowledged: {len(acknowledged)}, stored: {len(rows)}, log rows: {log_rows}; "
          f"lost {lost}, doubled {doubled}, unacknowledged but stored {extra}")
    print(f"answer latency: p50 {latency[0]:.1f} ms, p95 {latency[1]:.1f} ms, p99 {latency[2]:.1f} ms; "
          f"{len(acknowledged) / result.seconds:.1f} answers/s over {result.seconds:.1f} s "
          f"({args.annotators} annotators at once, each fetching its next item before answering)")
    ok = lost == doubled == extra == 0 and len(acknowledged) == args.annotators * answers_each == log_rows
    print("OK" if ok else "FAILED: the store does not hold exactly the acknowledged answers")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
