"""The fine-tuning algorithms, one module each, over the diffusion mechanics of
`tia2.models.diffusion_training`: `rwr` (reward-weighted regression), `ddpo` (DDPO-IS policy
gradient) and `refl` (ReFL). The fine-tuning stage (`tasks/finetune.py`) holds what they share:
the configuration, the optimizer, the loop with its checkpoints, resume and evaluation.

Every algorithm module has the same small shape, which the stage's loop calls:

    Settings    a frozen dataclass, e.g. `RwrSettings`: the algorithm's own hyperparameters, the
                papers' values as defaults (the stage's `FinetuneConfig` holds one of each)
    step(diffusion, reward, prompts, settings, data, rng, batch_size) -> {"loss": ..., ...}
                one optimizer step's loss, its gradients accumulated through
                `diffusion.backward` (the loop clips and applies them), and its metrics

`reward(images, prompt_ids)` maps images in [0, 1] to one reward each, differentiably (the stage's
`OnlineReward`, or any function of that shape); `prompts` are (prompt_id, text) pairs; every random
draw of a step comes from `rng`, the run's generator. `data` is what the algorithm prepared before
training: RWR's top-K images (`rwr.top_k_data`), ReFL's (caption, image) pairs
(`refl.pretraining_pairs`), and for DDPO its per-prompt reward statistics (`ddpo.PerPromptStats`),
which each step updates. A step uses the arguments it needs.
"""
