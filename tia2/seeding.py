"""One seed, one result, under any task runner.

Module initialisers (`nn.Linear.reset_parameters`, LoRA's `A`, ...) can draw only from torch's
global RNG, which every thread of the process shares: two models built at once by a thread-pool
task runner interleave their draws, and the same seed gives other weights. Every model build
therefore runs inside `seeded_init`, which holds the global RNG for one thread at a time; every
sampling step draws from its own seeded `torch.Generator` instead and never touches it. Image i of
a prompt is seeded from (prompt_id, i, base seed) alone (`image_seed`), whatever the batch.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager

_GLOBAL_RNG = threading.RLock()  # re-entrant: a model build may build its parts through here too


@contextmanager
def seeded_init(seed: int):
    """Run the block with torch's global RNG to itself, seeded with `seed`, and give the caller's
    RNG state back afterwards. Builds from released weights go through here as well: their
    initialisers draw too (before the checkpoint overwrites them), and would shift a seeded
    build running beside them."""
    import torch

    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def image_seed(prompt_id: str, index: int, base_seed: int) -> int:
    """The seed of image `index` of a prompt: generation's, and fine-tuning's training and
    evaluation images."""
    return int(hashlib.sha256(f"{prompt_id}:{index}:{base_seed}".encode()).hexdigest()[:15], 16)
