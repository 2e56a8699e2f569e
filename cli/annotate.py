"""`tia2 annotate`: people's judgements of images (tasks/annotate.py, the app in app/).

  add-annotator  register an annotator (or the admin) and print their personal link
  create-batch   make a batch of rating, ranking, pairwise or best-worst items of a set
  serve          the annotation app (creates the batch first when --task and --set are given)
  progress       answers per batch and annotator
  agreement      agreement between annotators and of reward models with them
  export/import  a batch's tasks to Label Studio's JSON, and its annotations back
"""

from __future__ import annotations

import argparse
import textwrap

from cli.command import Command, Parser, count, defaults_of, open_store, port, set_name
from tia2.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def app_url(text: str) -> str:
    """An argparse type: where the app is served, an http(s) URL with a host."""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"must be the app's http:// or https:// address (got {text!r})")
    return text


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _batch_arguments(p, required: bool) -> None:
    from tasks.annotate import create_batch
    from tia2.annotation import TASKS

    defaults = defaults_of(create_batch)
    p.add_argument("--task", choices=TASKS, required=required,
                   help="rating: good / bad / skip per image (TIA2); ranking: k images of a prompt, ties allowed; "
                        "pairwise: A, B or tie; best-worst: the best and worst of up to 8")
    p.add_argument("--set", dest="set_name", type=set_name, required=required, metavar="NAME",
                   help="the prompt set whose images are annotated")
    p.add_argument("--name", metavar="BATCH", help="the batch's name (default SET-TASK)")
    p.add_argument("--per-item", type=count, default=defaults["per_item"], metavar="N",
                   help="annotators per item (default %(default)s, as TIA2)")
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help="seed of the item order, the assignment and the sides shown (default %(default)s)")
    p.add_argument("--images-per-item", type=count, metavar="K",
                   help="images shown together for ranking and best-worst (default: up to 8 of one prompt)")
    p.add_argument("--aspects", action="store_true",
                   help="rating: also ask ImageReward's 1-7 alignment, fidelity and harmlessness")


def _create_batch(store, args):
    from tasks.annotate import create_batch

    batch = create_batch(store, args.task, args.set_name, per_item=args.per_item, seed=args.seed,
                         images_per_item=args.images_per_item, aspects=args.aspects, name=args.name)
    print(f"batch {batch.batch!r}: {batch.items} {batch.task} items of set {batch.set!r} "
          f"({batch.new_items} new), {batch.per_item} annotators each")
    return batch


def run_add_annotator(args) -> int:
    from tasks.annotate import add_annotator

    annotator, token = add_annotator(open_store(args), args.name, "admin" if args.admin else "annotator",
                                     new_token=args.new_token)
    print(f"{annotator.role} {annotator.name!r} (id {annotator.annotator_id}); personal link, keep it secret:")
    print(f"  {args.url.rstrip('/')}/a/{token}")
    return 0


def run_create_batch(args) -> int:
    _create_batch(open_store(args), args)
    return 0


def run_serve(args) -> int:
    from app.annotation_server import listening_socket, serve
    from tasks.annotate import add_annotator, annotators, assign_pending

    if bool(args.task) != bool(args.set_name):
        raise UserError("give --task and --set together (or neither, to serve the store's batches)")
    store = open_store(args)
    sock = listening_socket(args.host, args.port)  # before any write: a taken port changes nothing
    try:
        if args.task:
            _create_batch(store, args)
        assign_pending(store)
    except BaseException:
        sock.close()
        raise
    url = _url(args.host, args.port)
    people = annotators(store)
    if not any(a.role == "admin" for a in people):
        admin, token = add_annotator(store, "admin", "admin")
        print(f"admin link (progress and agreement), keep it secret:\n  {url}/a/{token}")
    # the app reads the store on each request: what is missing now can be added while it runs
    if not store.read("annotation_batches").num_rows:
        print("note: the store has no annotation batches yet: make one with `tia2 annotate create-batch`")
    if not any(a.role == "annotator" for a in people):
        print(f"note: no annotators yet: `tia2 annotate add-annotator NAME --url {url}` makes one and prints "
              f"their link")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: links carry their token over plain HTTP; "
              f"put the app behind HTTPS to serve beyond this machine")
    print(f"serving the annotation app on {url} (ctrl-C stops it); "
          f"`tia2 annotate add-annotator NAME --url {url}` prints a link")
    serve(store, sock)
    return 0


def run_progress(args) -> int:
    from tasks.annotate import progress

    table = progress(open_store(args, create=False, write=False))
    if table.empty:
        raise UserError("no assigned items yet: create a batch and add annotators")
    print(table.to_string(index=False))
    return 0


def run_agreement(args) -> int:
    from tasks.agreement import format_agreement, record_agreement
    from tia2.specs import parse_spec

    specs = [parse_spec(text) for text in args.reward or ()]
    print(format_agreement(record_agreement(open_store(args, create=False), args.scope, specs, args.bootstrap)))
    return 0


def run_export(args) -> int:
    import json
    import os
    from urllib.parse import quote

    from tasks.annotate import export_label_studio
    from tasks.metrics import check_output_file, write_text_atomic

    check_output_file(args.out, "tasks.json")
    if args.config:
        check_output_file(args.config, "config.xml")

    def image_url(image_id: str, path: str | None) -> str:
        path = path or ""
        return args.image_url.format(image_id=quote(image_id), path=quote(path),
                                     relpath=quote(os.path.relpath(path, args.document_root) if path else ""))

    tasks, config = export_label_studio(open_store(args, create=False, write=False), args.batch, image_url)
    write_text_atomic(args.out, json.dumps(tasks, indent=1) + "\n")
    if args.config:
        write_text_atomic(args.config, config)
    print(f"{len(tasks)} Label Studio tasks of batch {args.batch!r} written to {args.out}"
          + (f", the labeling config to {args.config}" if args.config else ""))
    return 0


def run_import(args) -> int:
    from tasks.annotate import import_label_studio

    report = import_label_studio(open_store(args, create=False), args.file, args.create_annotators)
    print(f"imported {report['answers']} answers ({report['changed']} new or changed) into "
          f"{', '.join(report['batches'])}" + (f"; new annotators: {', '.join(report['annotators_added'])}"
                                                if report["annotators_added"] else ""))
    return 0


SUBCOMMANDS = {
    "add-annotator": ("register an annotator and print their personal link", run_add_annotator),
    "create-batch": ("make a batch of items of a set and assign them", run_create_batch),
    "serve": ("serve the annotation app", run_serve),
    "progress": ("answers per batch and annotator", run_progress),
    "agreement": ("agreement between annotators, and of reward models with them (ImageReward Table 2a)",
                  run_agreement),
    "export": ("a batch's items as Label Studio tasks", run_export),
    "import": ("annotations back from Label Studio's JSON export", run_import),
}


def annotate_arguments(p) -> None:
    sub = p.add_subparsers(dest="annotate_command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    for name, (help_text, run) in SUBCOMMANDS.items():
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.set_defaults(func=run)
        q.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS,
                       help="store root (default: $TIA2_STORE or ./storage)")
        if name == "add-annotator":
            q.add_argument("name", metavar="NAME", help="letters, digits and . _ @ + -")
            q.add_argument("--admin", action="store_true", help="the admin (progress and agreement pages)")
            q.add_argument("--new-token", action="store_true", help="a new link for an existing annotator")
            q.add_argument("--url", type=app_url, default=_url(DEFAULT_HOST, DEFAULT_PORT),
                           help="where the app is served, for the link (default %(default)s)")
        elif name == "create-batch":
            _batch_arguments(q, required=True)
        elif name == "serve":
            _batch_arguments(q, required=False)
            q.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s: this machine only)")
            q.add_argument("--port", type=port, default=DEFAULT_PORT, help="port (default %(default)s)")
        elif name == "agreement":
            from tasks.agreement import RESAMPLES

            q.add_argument("scope", metavar="BATCH_OR_SET",
                           help="an annotation batch, or a set whose images have labels (e.g. TIA2's)")
            q.add_argument("--reward", action="append", metavar="SPEC",
                           help="also each reward spec against the annotators (repeatable)")
            q.add_argument("--bootstrap", type=count, default=RESAMPLES, metavar="N",
                           help="bootstrap resamples over items (default %(default)s)")
        elif name == "export":
            q.add_argument("--batch", required=True)
            q.add_argument("--format", choices=("label-studio",), default="label-studio")
            q.add_argument("--out", required=True, metavar="TASKS.json", help="the tasks, to import into Label Studio")
            q.add_argument("--config", metavar="CONFIG.xml", help="also write the project's labeling config here")
            q.add_argument("--image-url", default="/data/local-files/?d={relpath}", metavar="TEMPLATE",
                           help="each image's URL, from {image_id}, {path} or {relpath} (default %(default)s: "
                                "Label Studio's local files, with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT = --document-root)")
            q.add_argument("--document-root", default="/", metavar="DIR",
                           help="what {relpath} is relative to (default %(default)s)")
        elif name == "import":
            q.add_argument("file", metavar="EXPORT.json", help="Label Studio's JSON export of the project")
            q.add_argument("--format", choices=("label-studio",), default="label-studio")
            q.add_argument("--create-annotators", action="store_true",
                           help="register Label Studio's annotators not known here (without links)")


def run_annotate(args) -> int:
    return args.func(args)


ANNOTATE = Command("annotate", "people's judgements: annotators, batches, the annotation app, agreement", textwrap.dedent(__doc__),
                   annotate_arguments, run_annotate)

COMMANDS = (ANNOTATE,)
