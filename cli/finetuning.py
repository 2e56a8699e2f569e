"""The commands that fine-tune generators against a reward and evaluate the adapters: finetune,
evaluate."""

from __future__ import annotations

from collections import Counter

from cli.command import Command, as_written, count, count_or_auto, defaults_of, device, finite, number, open_store

# the flags that set a hyperparameter of paper_config, by its (flat) name
HYPERPARAMETER_FLAGS = (
    "steps", "checkpoint_every", "seed", "denoise_steps", "guidance", "learning_rate", "batch_size", "lora_rank",
    "images_per_prompt", "keep", "kl_beta", "samples_per_iteration", "refl_lambda", "refl_sampler",
    "eval_images_per_prompt", "mixed_precision")


def finetune_arguments(p) -> None:
    from tasks.finetune import (
        ALGORITHMS,
        KL_COEFFICIENTS,
        MIXED_PRECISIONS,
        REFL_SAMPLERS,
        paper_config,
        record_finetune,
    )

    # each algorithm's paper values (the reward spec does not change them): what an unset flag means
    paper = {algo: paper_config(algo, "reward").flat() for algo in ALGORITHMS}

    def paper_default(name: str) -> str:
        """The value most algorithms have, then each other one's: `50; refl 40`."""
        values = {algo: str(v) if isinstance(v := settings[name], str) else as_written(v)
                  for algo, settings in paper.items()}
        usual = Counter(values.values()).most_common(1)[0][0]
        return "; ".join([usual] + [f"{algo} {value}" for algo, value in values.items() if value != usual])

    betas = [as_written(beta) for beta in KL_COEFFICIENTS]
    options = defaults_of(record_finetune)
    p.add_argument("--algo", required=True, choices=list(ALGORITHMS))
    p.add_argument("--reward", required=True, metavar="SPEC", help="the reward spec to maximise")
    p.add_argument("--model", required=True, metavar="ID", help="generator (tiny-sd, sd-2-1, sd-2-1-base)")
    p.add_argument("--set", action="append", metavar="NAME", help="training prompts of this set (repeatable)")
    p.add_argument("--max-prompts", type=count, metavar="N", help="only the first N prompts of each set")
    p.add_argument("--steps", type=count, metavar="N", help="target optimizer steps (default "
                   + ", ".join(f"{algo} {settings['steps']}" for algo, settings in paper.items()) + ")")
    p.add_argument("--checkpoint-every", type=count, metavar="N", help=f"(default {paper_default('checkpoint_every')})")
    p.add_argument("--seed", type=int, help=f"(default {paper_default('seed')})")
    p.add_argument("--denoise-steps", type=count, metavar="N",
                   help=f"sampling steps (default {paper_default('denoise_steps')})")
    p.add_argument("--guidance", type=finite, help=f"classifier-free guidance (default {paper_default('guidance')})")
    p.add_argument("--learning-rate", type=number(float, above=0), metavar="LR")
    p.add_argument("--batch-size", type=count, metavar="N")
    p.add_argument("--lora-rank", type=count, metavar="R",
                   help=f"LoRA rank, alpha = rank (default {paper_default('lora_rank')})")
    p.add_argument("--images-per-prompt", type=count, metavar="N",
                   help=f"rwr: images per prompt (default {paper['rwr']['images_per_prompt']})")
    p.add_argument("--keep", type=count, metavar="K", help=f"rwr: top K per prompt (default {paper['rwr']['keep']})")
    p.add_argument("--kl-beta", type=number(float, word="sweep", meaning="sweep"), metavar="B|sweep",
                   help=f"rwr: KL coefficient (default {as_written(paper['rwr']['kl_beta'])}); `sweep`: a run for "
                        f"each of {', '.join(betas[:-1])} and {betas[-1]}, then the one whose selected checkpoint "
                        f"beats the base model on the most images (TextNorm paper, Appendix A.2)")
    p.add_argument("--samples-per-iteration", type=count, metavar="N",
                   help=f"ddpo (default {paper['ddpo']['samples_per_iteration']})")
    p.add_argument("--refl-lambda", type=finite, metavar="L",
                   help="refl: reward loss scale (default "
                        f"{as_written(paper['refl']['refl_lambda'], scientific=True)})")
    p.add_argument("--refl-sampler", choices=list(REFL_SAMPLERS),
                   help="refl: the steps to the gradient step; ddpm (default): ReFL.py's stochastic DDPM without "
                        "guidance; ddim: deterministic DDIM with --guidance")
    p.add_argument("--mixed-precision", choices=list(MIXED_PRECISIONS),
                   help=f"autocast of the UNet and VAE (default {paper_default('mixed_precision')}; LoRA weights and "
                        "optimizer stay fp32); fp16, as the papers trained, scales the loss against underflowing "
                        "gradients")
    p.add_argument("--eval-images-per-prompt", type=count, metavar="N",
                   help="images per prompt for each checkpoint's comparison with the base (default "
                        f"{paper_default('eval_images_per_prompt')})")
    p.add_argument("--device", type=device, default=options["device"])
    p.add_argument("--weights", default=options["weights"], metavar="PATH",
                   help="generator weights (released or a folder)")
    p.add_argument("--random-init", action="store_true", help="the generator's architecture with random weights")


def run_finetune(args) -> int:
    from tasks.finetune import paper_config, record_finetune, sweep_kl_coefficient

    sweep = args.kl_beta == "sweep"
    overrides = {name: getattr(args, name) for name in HYPERPARAMETER_FLAGS}
    if sweep:
        overrides["kl_beta"] = None
    if args.lora_rank is not None:
        overrides["lora_alpha"] = float(args.lora_rank)
    config = paper_config(args.algo, args.reward, **overrides)
    options = dict(sets=args.set, max_prompts=args.max_prompts,
                   weights="random" if args.random_init else args.weights, device=args.device)
    store = open_store(args, create=False)
    if not sweep:
        _print_finetune(record_finetune(store, args.model, config, **options))
        return 0
    result = sweep_kl_coefficient(store, args.model, config, **options)
    for beta, run in result.runs.items():
        print(f"KL coefficient {beta}:")
        _print_finetune(run)
    print("KL coefficient  run           selected step  beats base")
    for beta, run in result.runs.items():
        print(f"{beta:>14}  {run.run:<12}  {run.selected_step:>13}  {result.wins[beta]:>10}")
    print(f"chosen KL coefficient (most wins; ties to the larger): {result.chosen} "
          f"(run {result.runs[result.chosen].run})")
    return 0


def _print_finetune(result) -> None:
    config = result.config
    done = result.checkpoints[-1].step if result.checkpoints else result.start_step
    print(f"{config.algo} on {result.generator} against {config.reward}: steps {result.start_step} -> {done} "
          f"({result.steps_per_second:.2f} steps/s), adapters in {result.folder}")
    for c in result.checkpoints:
        print(f"  step {c.step:>6}  mean reward {c.mean_reward:.4f} (base {c.base_mean_reward:.4f})  "
              f"beats base {c.wins}/{c.n_eval}")
    if result.selected_step is not None:
        print(f"  selected checkpoint (earliest with the most wins): step {result.selected_step}")


FINETUNE = Command("finetune", "fine-tune a generator's UNet with LoRA against a reward spec", """\
    Fine-tune LoRA weights of the UNet (attention projections; the base stays frozen) on the
    store's prompts (--set, --max-prompts) to maximise a reward spec (any: a model, textnorm(...),
    mean(...), ur(...); scored online, on pixels). A step is one optimizer update.
      rwr   reward-weighted regression (TextNorm paper eq. 4): the base model makes N images per
            prompt, the top K by the reward are the data; loss = reward-weighted denoising loss
            + beta * distance of the noise prediction to the frozen base's (the KL term).
            Defaults (Table 4): 50 steps, guidance 7.5, AdamW lr 1e-5, wd 1e-2, batch 32,
            N 100, K 10, beta 0.5; try beta in 0, 0.25, 0.5, 0.75, 1 and keep the one whose
            selected checkpoint beats the base most often (Appendix A.2).
      ddpo  DDPO (Black et al. 2023; TextNorm eq. 5): DDIM sampling with eta 1 and per-step
            log-probabilities, per-prompt reward normalisation, PPO-clipped policy gradient
            over timesteps, one update per iteration of 256 samples. Defaults (Table 4):
            50 steps, guidance 5, lr 3e-4, wd 1e-4, batch 64. MLflow gets each step's
            approx_kl and clipfrac (as trl logs them).
      refl  ReFL (ImageReward Algorithm 1): denoise without gradients to a random step in
            [30, 39] of 40, one step with gradients, predict x0, decode, reward;
            loss = 1e-3 * ReLU(2 - reward) + the denoising loss on (caption, image) pairs (the
            store's images of the prompts, else the base model's). lr 1e-5, batch 64.
            --refl-sampler ddpm (the default) samples as ImageReward's ReFL.py: stochastic
            DDPM steps, no classifier-free guidance (the gradient step too); ddim:
            deterministic DDIM with --guidance.
    Checkpoints (adapter safetensors + optimizer state) every --checkpoint-every steps go to
    the store's adapters/<algo>-<run>/step-N, to MLflow (with base model, reward spec, step) and
    to the finetune_checkpoints table, each evaluated against the base model on the training
    prompts with fixed seeds. Re-running the same command continues from the last checkpoint.""",
    finetune_arguments, run_finetune)


def evaluate_arguments(p) -> None:
    from tasks.evaluate_finetune import HUMAN, record_evaluate_finetune

    defaults = defaults_of(record_evaluate_finetune)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="RUN", help="a fine-tuning run: all its checkpoints, by step")
    which.add_argument("--adapter", action="append", metavar="PATH",
                       help="a LoRA adapter (pytorch_lora_weights.safetensors or its folder; repeatable)")
    p.add_argument("--model", required=True, metavar="ID", help="the base generator (tiny-sd, sd-2-1, sd-2-1-base)")
    p.add_argument("--weights", default=defaults["weights"], metavar="random|pretrained|FOLDER",
                   help=f"the base generator's weights (default {defaults['weights']})")
    p.add_argument("--gold", required=True, metavar=f"SPEC|{HUMAN}",
                   help=f"the gold reward of the over-optimisation curves; {HUMAN}: people (the images' labels, "
                        f"else a pairwise annotation batch of base vs adapter images)")
    p.add_argument("--proxy", metavar="SPEC", help="the optimised reward (default: the adapters' training reward)")
    p.add_argument("--reward", action="append", metavar="SPEC", help="another reward spec to compare with (repeatable)")
    p.add_argument("--set", action="append", metavar="NAME",
                   help="held-out prompts of this set (repeatable; default all)")
    p.add_argument("--max-prompts", type=count, metavar="N", help="only the first N held-out prompts of each set")
    p.add_argument("--images-per-prompt", type=count, default=defaults["images_per_prompt"], metavar="N",
                   help="images per prompt and model; best-of-n goes up to N (default "
                        f"{defaults['images_per_prompt']})")
    p.add_argument("--steps", type=count, default=defaults["denoise_steps"],
                   help=f"denoising steps per image (default {defaults['denoise_steps']})")
    p.add_argument("--guidance", type=finite, default=defaults["guidance"],
                   help=f"classifier-free guidance (default {as_written(defaults['guidance'])})")
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help=f"base seed of the images (default {defaults['seed']})")
    p.add_argument("--tol", type=number(float, minimum=0), default=defaults["tol"],
                   help=f"a pair whose values differ by at most this is a tie (default {as_written(defaults['tol'])})")
    p.add_argument("--reward-weights", default=defaults["reward_weights"], metavar="random|pretrained|PATH",
                   help=f"the reward models' weights (default {defaults['reward_weights']})")
    p.add_argument("--batch-size", type=count_or_auto, default=defaults["batch_size"], metavar="N|auto",
                   help="images per generation batch (default auto, as for generate)")
    p.add_argument("--device", type=device, default=defaults["device"])


def run_evaluate(args) -> int:
    from tasks.evaluate_finetune import record_evaluate_finetune, wins_table

    result = record_evaluate_finetune(
        open_store(args, create=False), args.model, args.gold, args.run, args.adapter or (), args.set,
        args.max_prompts, args.images_per_prompt, args.steps, args.guidance, args.seed, args.proxy, args.reward or (),
        args.tol, args.weights, args.reward_weights, args.device, args.batch_size)
    print(f"{len(result.adapters)} adapter(s) against {result.generator} on {len(result.prompts)} held-out prompts x "
          f"{args.images_per_prompt} images ({result.images_made} images made, {result.rows_scored} score rows added)")
    print("wins/ties/losses of the matched pairs (same prompt and seed) against the base model:")
    print(wins_table(result.win_tie_loss).to_string())
    if result.human:
        from tasks.human_evaluation import describe

        print(describe(result.human))
    print(f"\nproxy {result.proxy}, gold {result.gold}: means over fine-tuning steps (step 0: the base model)")
    print(result.steps_curve.drop(columns=["run"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("best-of-n of the base model's images by the proxy")
    print(result.best_of_n_curve.drop(columns=["kl"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


EVALUATE = Command("evaluate", "evaluate fine-tuned adapters against their base model on held-out prompts", """\
    Evaluate a fine-tuning run's checkpoints (--run, a key of finetune_checkpoints) or adapter
    files/folders (--adapter) against the base model (--model, --weights) on held-out prompts:
    the prompts of --set (first --max-prompts of each) that the adapters were not trained on.
    The base and every adapter make --images-per-prompt images per prompt from the same seeds,
    so image i of an adapter and image i of the base are a matched pair; every image is scored
    by the proxy (default: the reward the adapters were trained on), the reward models it
    combines, the gold (--gold: a reward spec, or `human`, below) and any --reward. Images and
    scores are cached in the store: a re-run makes only what is missing.
    Per reward spec and adapter, the pairs won (adapter above base + --tol), tied and lost go to
    the finetune_evaluation table. Over-optimisation (Gao et al. 2023): the proxy's and the
    gold's means over training steps, and over best-of-n of the base model's images against
    sqrt(KL), KL = log n - (n - 1)/n. MLflow gets the tables, the plots and image grids (a row
    per prompt, a column per model). TextNorm specs need contrast prompts (tia2 contrast).
    --gold human: the graded labels where every evaluated image has labels; else a pairwise
    annotation batch eval-<evaluation> (each adapter's image against the base image of the
    same prompt and seed, 3 annotators each; `tia2 annotate serve`). Run the evaluation again
    once people answered: the images are reused, and the "human" row per adapter counts the
    answered pairs (each pair's majority choice; equal votes are a tie), its gold over the
    steps being the adapter's win share against the base (a tie one half; the base 0.5).""",
    evaluate_arguments, run_evaluate)

COMMANDS = (FINETUNE, EVALUATE)
