"""The commands of the human-preference benchmarks: ingest-preferences, preference-metrics,
rank-generators, generator-pairs (tasks/preferences.py, tasks/generator_ranking.py,
tasks/human_evaluation.py)."""

from __future__ import annotations

from cli.command import Command, count, defaults_of, open_store, set_name


def ingest_preferences_arguments(p) -> None:
    from tasks.preferences import DEFAULT_SETS, FORMATS

    p.add_argument("file", metavar="FILE")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="imagereward: its test.json; hpdv2: HPDv2's test.json; pairs: CSV/JSON/Parquet of pairs")
    p.add_argument("--set", type=set_name, metavar="NAME",
                   help="the set the items go to (default: " +
                        ", ".join(f"{name} for {fmt}" for fmt, name in DEFAULT_SETS.items()) + ")")
    p.add_argument("--images", metavar="DIR",
                   help="folder holding the image files as the file names them: registered with their sha256")


def run_ingest_preferences(args) -> int:
    from tasks.preferences import ingest_preferences

    report = ingest_preferences(open_store(args), args.file, args.format, args.set, args.images)
    new = report["new_rows"]
    print(f"ingested {args.file} into set {report['set']!r}: {report['items']} items, {report['images']} images "
          f"({report['images_with_pixels']} with pixels), {report['prompts']} prompts; rankings by "
          f"{', '.join(report['annotators'])}")
    print(f"  new rows: {new['prompts']} prompts, {new['images']} images, {new['preference_ranks']} ranks")
    return 0


INGEST_PREFERENCES = Command("ingest-preferences", "read human rankings or pairs of images (ImageReward, HPDv2, pairs)", """\
    Read a preference file into the store: each entry becomes an item, one prompt's images
    ranked together (lower rank is better, equal ranks tie), in preference_ranks.

      imagereward  ImageReward's test.json: [{id, prompt, generations, ranking}]
      hpdv2        HPDv2's test.json: [{prompt, image_path, rank, raw_annotations}]; each
                   annotator's ranking is kept beside the combined one (annotator consensus)
      pairs        CSV, JSON or Parquet: prompt, image_a, image_b, preference (a, b or tie)
                   [, item]; or Pick-a-Pic's caption, jpg_0, jpg_1, label_0, label_1 with the
                   images as bytes (written content-addressed into the store)

    An image's file is the path as written; score them with `tia2 score` (after --images) or
    import scores with `tia2 import-scores` (image = the file as written). Every entry is
    checked first; a problem is one line naming the file and entry, and nothing is written.""",
    ingest_preferences_arguments, run_ingest_preferences)


def preference_metrics_arguments(p) -> None:
    from tasks.preferences import CONSENSUS, MEAN_RANKS, record_preference_metrics

    p.add_argument("--reward", action="append", required=True, metavar="SPEC", help="a reward spec (repeatable)")
    p.add_argument("--set", action="append", metavar="NAME", help="only this preference set (repeatable; default: all)")
    p.add_argument("--annotator",
                   help=f"whose rankings: {CONSENSUS}, a file's combined ranking; {MEAN_RANKS}, each image's mean "
                        f"rank over its item's annotators (for a pair with three annotators and no tie, the "
                        f"majority's choice); or an annotator's name. Default: {CONSENSUS} for sets that have one, "
                        f"{MEAN_RANKS} for annotation batches")
    p.add_argument("--bootstrap", type=count, default=defaults_of(record_preference_metrics)["resamples"],
                   metavar="N", help="bootstrap resamples over items for the intervals (default %(default)s)")
    p.add_argument("--out", metavar="FILE.csv", help="write one row per item and reward to this CSV")


def run_preference_metrics(args) -> int:
    from tasks.preferences import format_details, format_table3, record_preference_metrics
    from tia2.specs import parse_spec

    specs = [parse_spec(s) for s in args.reward]
    result = record_preference_metrics(open_store(args, create=False), specs, args.set, args.annotator,
                                       args.bootstrap, args.out)
    print(format_table3(result))
    print(format_details(result))
    if args.out:
        print(f"\nper-item rows written to {args.out}")
    return 0


PREFERENCE_METRICS = Command("preference-metrics", "agreement of reward specs with human rankings (ImageReward Table 3)", """\
    Per item (one prompt's images), every pair of images; pairs never cross items.

      accuracy         ImageReward's test.py: of the pairs people rank differently, the share
                       the reward orders strictly the same way; a reward tie is a pair, never
                       a correct one; sum of correct / sum of pairs (the published figure)
      item mean        the same per item, averaged over items with pairs
      ties half        a reward tie counts one half
      tie-calibrated   Deutsch et al. 2023 (where people tie pairs): over all pairs, agreement
                       when the reward calls |difference| <= epsilon a tie, epsilon chosen to
                       maximise it (printed)
      HPDv2 ranking    HPDv2's evaluation.py: 1 - inversions / (n(n-1)/2) per item, averaged
      Pick-a-Pic       PickScore's evaluation: per pair 1 if the same answer (a, b or tie),
                       0.5 if one side says tie, else 0 (threshold 0)
      Recall@k         items with one human-best and one human-worst image: the best is among
      Filter@k         the reward's top k / the worst among its bottom k (k = 1, 2, 4; tied
                       rewards count by expectation over their order)

    Every figure has a 95 % bootstrap interval over items; every two rewards a paired bootstrap
    of their accuracy difference. Rows go to preference_metrics and --out; MLflow gets params,
    metrics, the CSVs and the bucket plot of ImageReward's Figure 16.""",
    preference_metrics_arguments, run_preference_metrics)


def rank_generators_arguments(p) -> None:
    p.add_argument("--generator", action="append", required=True, metavar="G",
                   help="NAME (images whose generator starts with it, no adapter), NAME+ADAPTER (with the "
                        "LoRA adapter whose path contains ADAPTER) or set:SET (every image of SET); repeatable")
    p.add_argument("--reward", action="append", required=True, metavar="SPEC", help="a reward spec (repeatable)")
    p.add_argument("--set", action="append", metavar="NAME",
                   help="only prompts of this set for the generated images (repeatable; default: all)")
    p.add_argument("--best-of", type=count, metavar="N", help="also the best of each prompt's first N images")
    p.add_argument("--human", metavar="FILE|batch:NAME",
                   help="a human ranking (CSV/JSON: generator, rank with 1 best, or generator, wins), or batch:NAME, "
                        "people's answers of a pairwise annotation batch (tia2 generator-pairs): each generator's "
                        "share of its comparisons won, a tie one half; Spearman's rho with each reward's ranking")


def run_rank_generators(args) -> int:
    from tasks.generator_ranking import GeneratorChoice, format_ranking, record_rank_generators
    from tia2.specs import parse_spec

    choices = [GeneratorChoice.parse(g) for g in args.generator]
    specs = [parse_spec(s) for s in args.reward]
    result = record_rank_generators(open_store(args, create=False), choices, specs, args.set, args.best_of,
                                    args.human)
    print(format_ranking(result))
    return 0


RANK_GENERATORS = Command("rank-generators", "rank generators by reward (ImageReward Table 1)", """\
    Per generator and prompt the mean reward of its images (and with --best-of N the best of
    the first N), then the mean over prompts and the rank (1 is best), as ImageReward's
    test-benchmark.py. Prompts are matched by text; only those every generator has count.
    With --human, Spearman's rho of each reward's ranking with people's: a file, or
    batch:NAME, the answers of a pairwise batch of the generators' images (`tia2
    generator-pairs`; every answer counts, as ImageReward aggregates all annotators'). Stored in
    generator_rankings; MLflow gets the tables and the box plot of ImageReward's Figure 3.""",
    rank_generators_arguments, run_rank_generators)


def generator_pairs_arguments(p) -> None:
    from tasks.human_evaluation import generator_pairs_batch

    defaults = defaults_of(generator_pairs_batch)
    p.add_argument("--generator", action="append", required=True, metavar="G",
                   help="NAME, NAME+ADAPTER or set:SET, as for rank-generators (repeatable, at least two)")
    p.add_argument("--set", action="append", metavar="NAME",
                   help="only prompts of this set for the generated images (repeatable; default: all)")
    p.add_argument("--images-per-prompt", type=count, metavar="K",
                   help="pair each prompt's first K images of each generator (default: as many as all have)")
    p.add_argument("--per-item", type=count, default=defaults["per_item"], metavar="N",
                   help="annotators per pair (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help="seed of the pair order, the assignment and the sides shown (default %(default)s)")
    p.add_argument("--name", metavar="BATCH", help="the batch's name (default generators-<hash of the choice>)")


def run_generator_pairs(args) -> int:
    from tasks.generator_ranking import GeneratorChoice
    from tasks.human_evaluation import HUMAN_BATCH, generator_pairs_batch

    choices = [GeneratorChoice.parse(g) for g in args.generator]
    batch = generator_pairs_batch(open_store(args, create=False), choices, args.set,
                                  images_per_prompt=args.images_per_prompt, per_item=args.per_item, seed=args.seed,
                                  name=args.name)
    print(f"batch {batch.batch!r}: {batch.items} pairs of {', '.join(c.label for c in choices)} "
          f"({batch.new_items} new), {batch.per_item} annotators each")
    print(f"serve it with `tia2 annotate serve`; then `tia2 rank-generators "
          + " ".join(f"--generator {c.label}" for c in choices) + f" --reward SPEC --human {HUMAN_BATCH}{batch.batch}`")
    return 0


GENERATOR_PAIRS = Command("generator-pairs", "make a pairwise annotation batch of generators' images", """    For people to compare generators (ImageReward's human evaluation, Table 1): of every prompt
    all the generators have (matched by text), each generator's k-th image with a file (by
    ordinal: generated images of the same seed) against each other generator's k-th image,
    one pairwise item per two generators, --per-item annotators each. Idempotent: the same
    choice again adds only images not yet in the batch. Serve it with `tia2 annotate serve`;
    `tia2 rank-generators --human batch:NAME` then ranks by people's answers.""",
    generator_pairs_arguments, run_generator_pairs)

COMMANDS = (INGEST_PREFERENCES, PREFERENCE_METRICS, RANK_GENERATORS, GENERATOR_PAIRS)
