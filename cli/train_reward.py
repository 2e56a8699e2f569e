"""The command that trains a reward model on the store's preferences and registers it: train-reward."""

from __future__ import annotations

from cli.command import Command, as_written, count, defaults_of, device, finite, number, open_store

# the flags that set a training setting (tia2/reward_training.py), by its name
SETTING_FLAGS = ("steps", "epochs", "batch_size", "accumulation_steps", "learning_rate", "weight_decay", "warmup",
                 "max_grad_norm", "fix_rate", "new_head", "text_dropout", "validate_every", "validations_per_epoch",
                 "patience", "seed", "split", "validation_fraction", "mixed_precision", "gradient_checkpointing",
                 "workers")
positive = number(float, above=0)
non_negative = number(float, minimum=0)


def train_reward_arguments(p) -> None:
    from tasks.train_reward import record_train_reward
    from tia2.reward_training import FAMILY_SETTINGS, MIXED_PRECISIONS, SPLITS, RewardTrainingSettings

    ir, clip, default = FAMILY_SETTINGS["imagereward"], FAMILY_SETTINGS["clip"], RewardTrainingSettings()
    options = defaults_of(record_train_reward)

    def reference(name: str) -> str:
        values = {"imagereward": ir.get(name, getattr(default, name)), "CLIP": clip.get(name, getattr(default, name))}
        shown = {k: "none" if v is None else as_written(v) for k, v in values.items()}
        return shown["imagereward"] if len(set(shown.values())) == 1 else \
            f"ImageReward {shown['imagereward']}, CLIP family {shown['CLIP']}"

    p.add_argument("--base", required=True, metavar="MODEL",
                   help="the model to start from: a reward model of the registry (e.g. imagereward, pickscore, "
                        "clip, hpsv2, their tiny twins) or one trained before")
    p.add_argument("--set", action="append", required=True, metavar="NAME",
                   help="pairs from this set (repeatable): a preference set, an annotation batch, or a set of "
                        "labelled images (good over bad within a caption)")
    p.add_argument("--name", required=True, help="the name to register the trained model under")
    p.add_argument("--replace", action="store_true",
                   help="replace a model registered under --name (and remove the scores of its old versions)")
    p.add_argument("--annotator", metavar="NAME",
                   help="whose ranks of a preference set (default: its consensus where it has one, else the mean "
                        "rank over the item's annotators: `mean`)")
    p.add_argument("--weights", default=options["weights"], metavar="PATH",
                   help="the base's weights: released (hub / HF cache, default) or a local file or folder")
    p.add_argument("--random-init", action="store_true", help="the base's architecture with random weights")
    p.add_argument("--device", type=device, default=options["device"])
    p.add_argument("--stop-after", type=count, metavar="N",
                   help="stop after N steps of this call, with a checkpoint (re-run the command to continue)")
    group = p.add_argument_group("training settings (default: the base family's reference, ImageReward's "
                                 "train_one_node.sh or PickScore's trainer)")
    group.add_argument("--steps", type=count, metavar="N", help="optimizer steps (default: --epochs over the pairs)")
    group.add_argument("--epochs", type=positive, metavar="E", help=f"(default {reference('epochs')})")
    group.add_argument("--batch-size", type=count, metavar="N",
                       help=f"pairs per step over all processes (default {reference('batch_size')})")
    group.add_argument("--accumulation-steps", type=count, metavar="N",
                       help=f"micro-batches per step and process (default {reference('accumulation_steps')})")
    group.add_argument("--learning-rate", type=positive, metavar="LR",
                       help=f"AdamW, cosine decay to 0 (default {reference('learning_rate')})")
    group.add_argument("--weight-decay", type=non_negative, metavar="W",
                       help=f"(default {reference('weight_decay')})")
    group.add_argument("--warmup", type=non_negative, metavar="SHARE",
                       help=f"share of the steps with a linear warm-up (default {reference('warmup')})")
    group.add_argument("--max-grad-norm", type=positive, metavar="N",
                       help=f"clip the gradient norm (default {reference('max_grad_norm')})")
    group.add_argument("--fix-rate", type=non_negative, metavar="SHARE",
                       help=f"share of each tower's blocks frozen (default {reference('fix_rate')})")
    group.add_argument("--keep-head", dest="new_head", action="store_const", const=False,
                       help="ImageReward: train the base's head instead of a new one")
    group.add_argument("--text-dropout", type=non_negative, metavar="P",
                       help=f"ImageReward: its BERT's dropout while training (default {reference('text_dropout')})")
    group.add_argument("--validate-every", type=count, metavar="N",
                       help="steps between validations (default: --validations-per-epoch)")
    group.add_argument("--validations-per-epoch", type=count, metavar="N",
                       help=f"(default {reference('validations_per_epoch')})")
    group.add_argument("--patience", type=count, metavar="N",
                       help="stop after N validations without a better one (default: never)")
    group.add_argument("--seed", type=int, help="seed of the split, the pairs' order, new weights (default 0)")
    group.add_argument("--split", choices=list(SPLITS),
                       help="validation holds out whole prompts (default) or items")
    group.add_argument("--validation-fraction", type=finite, metavar="SHARE",
                       help=f"of the prompts or items (default {reference('validation_fraction')})")
    group.add_argument("--mixed-precision", choices=list(MIXED_PRECISIONS), help="bf16: autocast (default fp32)")
    group.add_argument("--gradient-checkpointing", action="store_const", const=True,
                       help="recompute activations in the backward pass (less memory, same result)")
    group.add_argument("--workers", type=number(int, minimum=0), metavar="N",
                       help="processes that read images ahead (default 0)")


def run_train_reward(args) -> int:
    from tasks.train_reward import record_train_reward

    settings = {name: getattr(args, name) for name in SETTING_FLAGS}
    result = record_train_reward(open_store(args, create=False), args.base, args.set, args.name, settings,
                                 "random" if args.random_init else args.weights, args.device, args.replace,
                                 args.annotator, args.stop_after)
    training, state = result.training, result.training.state
    print(f"{result.base} on {result.data['pairs']} pairs of {', '.join(args.set)}: {result.items_train} items "
          f"({training.train_pairs} pairs) to train, {result.items_validation} ({training.validation_pairs}) to "
          f"validate; steps {state.step - training.steps_done} -> {state.step} of {training.total_steps} "
          f"({training.pairs_per_second:.1f} pairs/s), run {result.run}")
    for entry in state.history:
        print(f"  step {entry['step']:>6}  validation accuracy {entry['validation_accuracy']:.4f}  "
              f"loss {entry['validation_loss']:.4f}")
    if not training.finished:
        print(f"stopped at step {state.step}: re-run the command to continue")
        return 0
    stopped = " (early stopping)" if state.stopped_early else ""
    print(f"best validation accuracy {state.best[0]:.4f} at step {state.best_step}{stopped} (untrained "
          f"{training.untrained_accuracy:.4f}); registered as {result.name}, version {result.version}")
    if result.scores_removed:
        print(f"{result.scores_removed} score rows of its old version(s) removed")
    print(f"score with it: tia2 score --reward-model {result.name}")
    return 0


TRAIN_REWARD = Command("train-reward", "train a reward model on people's preferences and register it", """\
    Train a reward model from --base on the store's preferences, ImageReward's way (its §2.2):
    every pair of one prompt's images that people rank differently is a comparison, and the loss
    is -log sigmoid(f(T, better) - f(T, worse)). Pairs come from each --set: a preference set
    (tia2 ingest-preferences), an annotation batch (rankings, pairs, best-worst), or a set of
    labelled images (TIA2's labels, people's ratings: the good images of a caption over its bad
    ones). Validation holds out whole prompts (--split item: items), drawn with --seed.
    ImageReward bases get a new MLP head (N(0, 1/(d+1))) and their lower 70 % frozen
    (--fix-rate); CLIP-family bases (pickscore, clip, hpsv2) train logit_scale x cosine (or the
    cosine) whole, as PickScore's trainer. AdamW, cosine decay after --warmup; validation
    preference accuracy (ImageReward's test.py) every --validate-every steps, the best kept,
    --patience for early stopping. Several GPUs: torchrun --nproc-per-node N -m cli train-reward
    ... (each process trains its share of every step's pairs). Checkpoints in the store's
    reward_training/<run>/; re-running the command continues. When done, the best weights are
    registered as --name (the store's reward_models/NAME/, a card in reward_model_cards, an MLflow
    run with the curves and the model): tia2 score --reward-model NAME, specs such as
    textnorm(NAME, tau=1), fine-tuning and the benchmark take it.""", train_reward_arguments, run_train_reward)

COMMANDS = (TRAIN_REWARD,)
