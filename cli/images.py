"""The commands over the store's images: score, generate, best-of-n."""

from __future__ import annotations

import sys

from cli.command import Command, count, count_or_auto, defaults_of, device, finite, open_store
from tia2.errors import UserError


def score_arguments(p) -> None:
    from tasks.score import record_score
    from tia2.models import list_models

    p.description += ", ".join(list_models()) + "; and those trained into the store (tia2 train-reward)"
    defaults = defaults_of(record_score)
    p.add_argument("--reward-model", required=True, metavar="NAME")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable)")
    p.add_argument("--batch-size", type=count, default=defaults["batch_size"], metavar="N",
                   help=f"images per batch (default {defaults['batch_size']})")
    p.add_argument("--device", type=device, default=defaults["device"],
                   help=f"cpu, cuda, cuda:1, ... (default {defaults['device']})")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    p.add_argument("--weights", default=defaults["weights"], metavar="PATH",
                   help="released weights from the hub/HF cache (default) or a local file/folder")
    p.add_argument("--random-init", action="store_true", help="the full-size architecture with random weights (timing)")
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help=f"seed of random weights (default {defaults['seed']})")


def run_score(args) -> int:
    from tasks.score import record_score

    weights = "random" if args.random_init else args.weights
    report = record_score(open_store(args, create=False), args.reward_model, weights, args.set,
                          args.batch_size, args.device, args.fp16, args.seed)
    print(f"{args.reward_model}: scored {report.images} images, {report.rows_added} new score rows, "
          f"{report.images_per_second:.1f} images/s")
    if report.rows_superseded:
        print(f"{report.rows_superseded} rows of older scoring code replaced by the current version's")
    if report.failures:
        print(f"{len(report.failures)} images could not be scored (table score_failures), e.g.:", file=sys.stderr)
        for image_id, reason in report.failures[:5]:
            print(f"  {image_id}: {reason}", file=sys.stderr)
        return 1
    return 0


SCORE = Command("score", "score the store's images with a reward model", """\
    Score every image that has pixels against its caption and all its contrast prompts,
    writing only the rows missing for this model and weights. Safe to kill and re-run.
    Unreadable images are recorded in score_failures; the command then exits with 1.
    Models: """, score_arguments, run_score)  # the registry's models follow (score_arguments)


def generate_arguments(p) -> None:
    from tasks.generate import record_generate
    from tia2.models.diffusion import DTYPES, list_generators

    p.description += ", ".join(list_generators())
    defaults = defaults_of(record_generate)
    p.add_argument("--model", required=True, metavar="ID", help="generator name (e.g. sd-2-1, tiny-sd)")
    p.add_argument("--images-per-prompt", type=count, default=defaults["images_per_prompt"], metavar="N")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable)")
    p.add_argument("--steps", type=count, default=defaults["steps"],
                   help=f"denoising steps (default {defaults['steps']}, TextNorm paper)")
    p.add_argument("--guidance", type=finite, default=defaults["guidance"],
                   help=f"classifier-free guidance (default {defaults['guidance']:g})")
    p.add_argument("--seed", type=int, default=defaults["base_seed"],
                   help=f"base seed (default {defaults['base_seed']})")
    p.add_argument("--batch-size", type=count_or_auto, default=defaults["batch_size"], metavar="N|auto",
                   help="images per batch, across prompts (default auto: on a GPU, as many as its free "
                        "memory holds, measured with two short runs; on the CPU 4)")
    p.add_argument("--max-prompts", type=count, metavar="N", help="only the first N prompts of each set")
    p.add_argument("--device", type=device, default=defaults["device"])
    p.add_argument("--weights", default=defaults["weights"], metavar="PATH",
                   help="released weights (hub / HF cache, default) or a local diffusers folder")
    p.add_argument("--random-init", action="store_true", help="the full-size architecture with random weights")
    p.add_argument("--lora", metavar="PATH", help="a LoRA adapter (pytorch_lora_weights.safetensors or its folder)")
    p.add_argument("--dtype", default=defaults["dtype"], choices=list(DTYPES), help="precision (fp16/bf16: GPU only)")
    p.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format (GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (GPU): ~1.5 min to compile, then 2.2x per image at batch 1 "
                        "(launch-bound)")


def run_generate(args) -> int:
    from tasks.generate import record_generate

    report = record_generate(open_store(args, create=False), args.model, "random" if args.random_init else args.weights,
                             args.set, args.images_per_prompt, args.steps, args.guidance, args.seed,
                             args.batch_size, args.max_prompts, args.device, args.lora, args.dtype,
                             args.channels_last, args.compile)
    print(f"{args.model}: made {report.images} images ({report.already_present} already present), "
          f"{report.images_per_second:.2f} images/s")
    return 0


GENERATE = Command("generate", "generate images for the store's prompts with a diffusion model", """\
    Make images for every prompt of the given sets with a Stable Diffusion pipeline. Image i of
    a prompt is seeded from (prompt, i, --seed): the same inputs give the same PNGs (on the CPU
    byte for byte, whatever the batch size). Files are content-addressed under the store's
    images/; a re-run makes only the missing images. Generators: """,
    generate_arguments, run_generate)  # the registry's generators follow (generate_arguments)


def best_of_n_arguments(p) -> None:
    p.add_argument("--n", required=True, metavar="N1,N2,...", help="e.g. 16,64,256")
    p.add_argument("--reward", action="append", required=True, metavar="SPEC", help="a reward spec (repeatable)")
    p.add_argument("--generator", metavar="NAME", help="whose images (start of images.generator, e.g. tiny-sd)")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable)")


def run_best_of_n(args) -> int:
    from tasks.best_of_n import record_best_of_n
    from tia2.specs import parse_spec

    try:
        ns = sorted({int(n) for n in args.n.split(",") if n.strip()})
    except ValueError:
        raise UserError(f"--n takes comma-separated whole numbers, got {args.n!r}") from None
    picks = record_best_of_n(open_store(args, create=False), [parse_spec(s) for s in args.reward], ns,
                             args.generator, args.set)
    table = picks.groupby(["reward", "n"], sort=False)["value"].mean().unstack("n")
    print(f"best-of-n over {picks['prompt_id'].nunique()} prompts ({picks['generator'].iloc[0]}): "
          f"mean reward of the picked image")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return 0


BEST_OF_N = Command("best-of-n", "pick the best of the first n images per prompt for reward specs", """\
    Best-of-n (TextNorm paper, section 5.2): per prompt, the image with the highest reward
    among its first n generated images, for every reward spec and n. Stores the picks in the
    best_of_n table and logs a contact sheet per prompt (rows: rewards, columns: n) to MLflow.
    The images must be scored by the specs' reward models (tia2 score).""", best_of_n_arguments, run_best_of_n)

COMMANDS = (SCORE, GENERATE, BEST_OF_N)
