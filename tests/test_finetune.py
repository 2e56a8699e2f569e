"""Fine-tuning (tasks/finetune.py): real LoRA training of tiny-sd against tiny reward twins, the
online reward against the offline one, checkpoints, resume, selection, MLflow and the CLI."""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
import torch

from tasks.finetune import (OnlineReward, choose_kl_coefficient, finetune, paper_config, record_finetune,
                            select_checkpoint, training_prompts)
from tests.support.stores import store_with_prompts
from cli.main import main
from tia2.errors import UserError
from tia2.finetuning import ddpo, refl, rwr
from tia2.finetuning.ddpo import PerPromptStats
from tia2.models.diffusion import apply_lora, create_pipeline
from tia2.models.diffusion_training import Diffusion, adapter_disabled, ddim_step_with_logprob
from tia2.store import Store, stable_id

TEXTS = ["a photo of two cats", "three red apples on a table"]
# Small enough for the CPU: 4 DDIM steps, no guidance, 4 evaluation images per prompt.
TINY = dict(denoise_steps=4, guidance=1.0, batch_size=4, lora_rank=4, lora_alpha=4.0, eval_images_per_prompt=4,
            samples_per_iteration=8, stats_min_count=4, refl_start=2, refl_end=3)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_store(path, texts=TEXTS) -> Store:
    return store_with_prompts(path, texts)


def tiny_sd(size=None):
    """tiny-sd, making `size`-px images when given (it makes 64 px): 16 px runs about 5x faster (bf16
    15x), for the tests whose checks do not depend on the image size."""
    generator = create_pipeline("tiny-sd")
    if size:
        generator.pipeline.unet.register_to_config(sample_size=size // generator.pipeline.vae_scale_factor)
    return generator


def train(store, algo, reward="tiny-clip", size=None, **overrides):
    prompts = training_prompts(store, None, None)
    config = paper_config(algo, reward, **{**TINY, **overrides})
    return finetune(store, tiny_sd(size), config, prompts, OnlineReward(reward, store, prompts))


# --- rules ------------------------------------------------------------------------------------
def test_select_checkpoint_is_the_earliest_maximum():
    assert select_checkpoint([100, 200, 300, 400], [3, 7, 7, 5]) == 200
    assert select_checkpoint([5, 10], [0, 0]) == 5
    with pytest.raises(ValueError):
        select_checkpoint([1, 2], [3])


def test_kl_coefficient_with_most_wins_larger_on_ties():
    assert choose_kl_coefficient({0.0: 4, 0.25: 9, 0.5: 6}) == 0.25
    assert choose_kl_coefficient({0.0: 5, 0.5: 5, 1.0: 2}) == 0.5


def test_paper_defaults_and_the_refl_window_for_other_step_counts():
    rwr, ddpo, refl = (paper_config(a, "textnorm( tiny-clip,tau=0.05 )") for a in ("rwr", "ddpo", "refl"))
    assert (rwr.learning_rate, rwr.batch_size, rwr.guidance, rwr.rwr.images_per_prompt, rwr.rwr.keep) == \
        (1e-5, 32, 7.5, 100, 10)
    assert (ddpo.learning_rate, ddpo.batch_size, ddpo.guidance, ddpo.ddpo.samples_per_iteration) == (3e-4, 64, 5.0, 256)
    assert (refl.denoise_steps, refl.refl.refl_start, refl.refl.refl_end, refl.refl.refl_lambda) == (40, 30, 39, 1e-3)
    assert rwr.reward == "textnorm(tiny-clip, tau=0.05)"
    assert paper_config("rwr", "tiny-clip", denoise_steps=10).denoise_steps == 10
    short = paper_config("refl", "tiny-clip", denoise_steps=8)
    assert (short.refl.refl_start, short.refl.refl_end) == (6, 7)
    with pytest.raises(UserError, match="refl_start"):
        paper_config("refl", "tiny-clip", denoise_steps=8, refl_start=5, refl_end=9)


def test_ddim_log_prob_is_the_gaussian_density_of_the_step():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prev, log_prob = ddim_step_with_logprob(scheduler, output, t, sample, 1.0, torch.Generator().manual_seed(0))
    mean, _ = ddim_step_with_logprob(scheduler, output, t, sample, 1e-12, prev_sample=prev)
    # eta -> 0 gives the mean; the log-prob is that of N(mean, std) at the drawn sample
    alpha, alpha_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 100]
    std = ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
    x0 = (sample - (1 - alpha).sqrt() * output) / alpha.sqrt()
    expected_mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std ** 2).sqrt() * output
    expected = torch.distributions.Normal(expected_mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected)
    deterministic = scheduler.step(output, t, sample, eta=0.0).prev_sample
    assert not torch.allclose(prev, deterministic)


# --- the online reward equals the offline one ---------------------------------------------------
def test_online_reward_matches_offline_specs_on_the_same_scores(tmp_path):
    from PIL import Image

    from tasks.contrast import rule_contrasts
    from tasks.generate import generate_images
    from tasks.rewards import RewardEvaluator, generated_frame
    from tia2.models import create_reward_model
    from tia2.specs import parse_spec

    store = make_store(tmp_path / "store")
    now = datetime.now(timezone.utc)
    store.upsert("contrast_prompts", pa.Table.from_pylist([
        dict(prompt_id=stable_id("test", t), text=c, method="rules", generator="rules-v1", created_at=now, note=None)
        for t in TEXTS for c in rule_contrasts(t)]))
    generate_images(store, create_pipeline("tiny-sd"), images_per_prompt=2, steps=2)
    frame = generated_frame(store)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255)
                          .permute(2, 0, 1) for p in frame.path])
    contrasts = {pid: [r[0] for r in store.connect().execute(
        "SELECT text FROM contrast_prompts WHERE prompt_id = ?", [pid]).fetchall()] for pid in frame.prompt_id}
    rows = []
    for name in ("tiny-clip", "tiny-hpsv2"):
        model = create_reward_model(name)
        for i, row in enumerate(frame.itertuples()):
            texts = [row.caption, *contrasts[row.prompt_id]]
            with torch.no_grad():
                scores = model(model.preprocess_tensor(pixels[i:i + 1].expand(len(texts), -1, -1, -1)), texts)
            rows += [dict(image_id=row.image_id, text=t, reward_model=name, model_version=model.identity,
                          score=float(s), run_id=None, scored_at=now) for t, s in zip(texts, scores)]
    store.append_missing("scores", pa.Table.from_pylist(rows), compare="score")
    offline = RewardEvaluator(store, frame)
    prompts = training_prompts(store, None, None)
    for spec in ("textnorm(tiny-clip, tau=0.05, contrast=rules)", "mean(tiny-clip, tiny-hpsv2)",
                 "ur(textnorm(tiny-clip, tau=0.1, contrast=rules), textnorm(tiny-hpsv2, tau=0.02, contrast=rules), lam=2)"):
        with torch.no_grad():
            online = OnlineReward(spec, store, prompts)(pixels, list(frame.prompt_id))
        np.testing.assert_allclose(online.numpy(), offline(parse_spec(spec)), rtol=0, atol=1e-5, err_msg=spec)


def test_online_reward_is_differentiable_and_needs_contrast_prompts(tmp_path):
    from tia2.errors import UserError

    store = make_store(tmp_path / "store")
    prompts = training_prompts(store, None, None)
    reward = OnlineReward("ur(textnorm(tiny-clip, tau=0.05), tiny-aesthetic, lam=1)", store, prompts)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    reward(images, [p for p, _ in prompts]).sum().backward()
    assert images.grad.abs().sum() > 0
    odd = make_store(tmp_path / "odd", ["sunset over mountains"])
    with pytest.raises(UserError, match="sunset over mountains.*no contrast prompts"):
        OnlineReward("textnorm(tiny-clip, tau=0.05)", odd, training_prompts(odd, None, None))


# --- training raises the reward ----------------------------------------------------------------
# ReFL against tiny-clip's cosine (its spread over one prompt's images is about 0.03): measured
# gains over the base model's mean on 32 evaluation images after 20 steps, seeds 0-2: at 64 px with
# the default DDPM chain +0.019, +0.029, +0.033 (31, 32, 32 of 32 images beat the base's), with
# refl_sampler ddim +0.029, +0.029, +0.034 (32, 32, 31); at 16 px (what runs here, 6x faster), seeds
# 0-5: +0.032, +0.032, +0.029, +0.037, +0.030, +0.016 (30, 31, 29, 31, 32, 26); learning rate 1e-6:
# +0.0000 (seeds 0, 1).
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refl_raises_the_reward_above_the_base_model(tmp_path, seed):
    # one checkpoint: an intermediate one would only add an evaluation (it draws nothing from the run's generator)
    result = train(make_store(tmp_path / "store"), "refl", seed=seed, steps=20, checkpoint_every=20,
                   learning_rate=5e-2, refl_lambda=100.0, eval_images_per_prompt=16, size=16)
    final = result.checkpoints[-1]
    assert final.step == 20
    assert final.mean_reward > result.base_mean_reward + 0.008, (seed, final, result.base_mean_reward)
    assert final.wins >= 0.75 * final.n_eval


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ddpo", "rwr"])
def test_ddpo_and_rwr_train_the_adapter(tmp_path, algo):
    from safetensors.torch import load_file

    store = make_store(tmp_path / "store")
    result = train(store, algo, steps=2, checkpoint_every=1, learning_rate=1e-2, samples_per_iteration=4,
                   images_per_prompt=4, keep=2, size=16)
    first, last = (load_file(c.path) for c in result.checkpoints)
    up = [k for k in last if "lora_B" in k or "lora.up" in k]
    assert up and all(last[k].abs().sum() > 0 for k in up)  # B starts at zero: the updates moved it
    assert any(not torch.equal(first[k], last[k]) for k in up)
    assert all(np.isfinite(c.loss) for c in result.checkpoints)
    rows = store.connect().execute("SELECT algo, step, wins, n_eval FROM finetune_checkpoints ORDER BY step").fetchall()
    assert rows == [(algo, 1, result.checkpoints[0].wins, 8), (algo, 2, result.checkpoints[1].wins, 8)]


# --- RWR on a trained tiny-sd ---------------------------------------------------------------------
# On tiny-sd as built (a random UNet) RWR's and DDPO's gains are not measurable: a random UNet's
# samples are not what its denoiser regresses to, so fitting its top-K images moved all images
# alike (tiny-clip -0.006 after training on the top-K, -0.008 on the bottom-K), and runs landed
# within +-0.0006 of the base with no consistent sign over seeds. After a minute of denoising
# pre-training the samples are, and RWR's gain is learnable: measured below.
# session scope: built once per worker, whatever order the worker runs its tests in
@pytest.fixture(scope="session")
def trained_tiny_sd():
    """tiny-sd at 16 px after 800 denoising steps on 4 disc pictures per test prompt, and those
    pictures' latents; tests fine-tune copies of it."""
    from tia2.models.trained_tiny import trained_tiny_sd

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trained = trained_tiny_sd(TEXTS)
    torch.set_num_threads(threads)
    return trained


@pytest.mark.slow
@pytest.mark.xdist_group("trained-tiny-sd")  # one worker pre-trains it once
def test_the_trained_tiny_sd_samples_near_its_training_pictures(trained_tiny_sd):
    """What makes RWR's gain learnable: deterministic samples land near the training latents
    (measured: 3.9-7.6 apart, against 15.4 between training latents) and use several of them."""
    generator, latents = trained_tiny_sd
    diffusion = Diffusion(generator.pipeline, denoise_steps=4, guidance=1.0)
    latents = latents[:4].flatten(1)  # the first prompt's
    samples = diffusion.sample([TEXTS[0]] * 16, list(range(16))).flatten(1)
    distances = torch.cdist(samples, latents)
    spacing = torch.pdist(latents).mean()
    assert distances.min(dim=1).values.median() < 0.6 * spacing, (distances.min(dim=1).values, spacing)
    assert len(set(distances.argmin(dim=1).tolist())) >= 3


# Measured on the trained tiny-sd, tiny-clip (per-image spread 0.01-0.02), 60 steps, top 2 of 32
# images per prompt, β = 0, learning rate 3e-2, seeds 0-5: gains +0.0110, +0.0092, +0.0178,
# +0.0076, +0.0066, +0.0133 (51, 48, 52, 42, 44, 51 of 64 images beat the base's); against the
# negated reward tiny-clip fell by 0.0085, 0.0111, 0.0178, 0.0108, 0.0070, 0.0092. On another CPU
# (an AMD EPYC, 2 threads; the pre-trained model's floats differ by CPU and thread count, and 800
# steps carry the difference) the same seeds gave +0.0119, +0.0108, +0.0057, +0.0071, +0.0051,
# +0.0058 (53, 50, 43, 43, 43, 42 of 64) and fell by 0.0127, 0.0040, 0.0177, 0.0106, 0.0101,
# 0.0137 (42, 36, 57, 48, 46, 42 of 64); under the test suite's workers seed 2 gained +0.0042
# (38 of 64). So each seed must move the right way, and the margin holds for the mean over seeds.
# 120 steps instead of 60 were no steadier (one seed of six fell against the negated reward).
# (Top 2 of 16, before the adapter's initial weights came from the seed: +0.003 to +0.013.)
# DDPO on the same model is not learnable at CPU sample counts: its estimate of
# the policy gradient points nowhere near the exact (reparameterised) gradient of the expected
# reward from 32 to 512 samples (benchmarks/ddpo_gradient_check.py; RESULTS.md), and runs
# drifted down at learning rates that move the adapter (1e-2, 32 samples an iteration: -0.015
# after 40 steps). Its gain is asserted on a GPU (below), its steps on the toy further down.
SEEDS = (0, 1, 2)


@pytest.mark.slow
@pytest.mark.xdist_group("trained-tiny-sd")
def test_rwr_raises_the_reward_of_a_trained_tiny_sd(tmp_path, trained_tiny_sd):
    configs = [paper_config("rwr", "tiny-clip", **{**TINY, **dict(
        seed=seed, steps=60, checkpoint_every=60, learning_rate=3e-2, images_per_prompt=32, keep=2, kl_beta=0.0,
        batch_size=8, eval_images_per_prompt=32)}) for seed in SEEDS]
    assert_gain_follows_tiny_clip(tmp_path, trained_tiny_sd[0], configs)


@pytest.fixture(scope="session")
def trained_tiny_sd_on_gpu():
    from tia2.models.trained_tiny import trained_tiny_sd

    return trained_tiny_sd(TEXTS, device="cuda")[0]


# DDPO's policy-gradient estimate needs thousands of trajectories per iteration on tiny-sd before
# it points along the reward's gradient (benchmarks/ddpo_gradient_check.py), out of a CPU's reach.
# On an H100 this test passed for seeds 0-2 (3 minutes in all), each seed by the margin.
# benchmarks/ddpo_tiny_sd_gain.py there, lr 3e-2, 30 iterations: 16384 samples +0.041 (negated
# -0.057); 4096 and 1024 samples missed for some seeds (4096, seed 0: -0.011; 1024, seed 1:
# negated only -0.004). RESULTS.md.
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DDPO on tiny-sd needs a GPU's sample counts")
def test_ddpo_raises_the_reward_of_a_trained_tiny_sd_on_a_gpu(tmp_path, trained_tiny_sd_on_gpu):
    configs = [paper_config("ddpo", "tiny-clip", **{**TINY, **dict(
        seed=seed, steps=30, checkpoint_every=30, learning_rate=3e-2, samples_per_iteration=8192, batch_size=4096,
        stats_buffer=8192, eval_images_per_prompt=32)}) for seed in SEEDS]
    assert_gain_follows_tiny_clip(tmp_path, trained_tiny_sd_on_gpu, configs, device="cuda")


def assert_gain_follows_tiny_clip(tmp_path, generator, configs, margin=0.004, device="cpu"):
    """Trained on tiny-clip with each config (a seed each), the adapter's mean tiny-clip exceeds
    the base model's, with more than half the evaluation images beating the base's; over the
    seeds, by `margin` on average with 60% of the images. Trained on the negated reward (which its
    evaluation scores too), tiny-clip falls the same way."""
    store = make_store(tmp_path / "store")
    prompts = training_prompts(store, None, None)
    reward = OnlineReward("tiny-clip", store, prompts, device=device)
    for direction, objective in (("up", reward), ("down", lambda images, prompt_ids: -reward(images, prompt_ids))):
        finals = [finetune(make_store(tmp_path / f"{direction}-{config.seed}"), copy.deepcopy(generator), config,
                           prompts, objective).checkpoints[-1] for config in configs]
        gains = [final.mean_reward - final.base_mean_reward for final in finals]  # of the objective trained on
        assert all(g > 0 and f.wins > f.n_eval / 2 for g, f in zip(gains, finals)), (direction, finals)
        assert np.mean(gains) > margin and sum(f.wins for f in finals) >= 0.6 * sum(f.n_eval for f in finals), \
            (direction, finals)


# --- RWR and DDPO on a toy diffusion model (their steps as in `finetune`) ---------------------------
class ToyUNet(torch.nn.Module):
    """A v-prediction "UNet": 0.5·x plus a learned bias, the adapter, which starts at zero (as LoRA's
    B) and is switched off like the LoRA adapter."""

    def __init__(self, shape):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(shape))
        self.enabled = True

    def disable_adapters(self):
        self.enabled = False

    def enable_adapters(self):
        self.enabled = True

    def forward(self, latents, t, cond):
        return 0.5 * latents + (self.bias if self.enabled else 0)


def toy_diffusion(denoise_steps=4, shape=(4, 2, 2), **scheduler_options):
    """tiny-sd's scheduler (DDIM, v-prediction; `scheduler_options` on top) around `ToyUNet`; images
    are the first three latent channels. The real `Diffusion` sampling, denoising-loss inputs,
    guidance and backward pass (fp32)."""
    from diffusers import DDIMScheduler

    from tia2.models.diffusion import generator_config

    class Toy(Diffusion):
        def __init__(self):
            scheduler = {k: v for k, v in generator_config("tiny-sd")["scheduler"].items() if not k.startswith("_")}
            self.scheduler = DDIMScheduler(**{**scheduler, **scheduler_options})
            self.scheduler.set_timesteps(denoise_steps)
            self.timesteps = [int(t) for t in self.scheduler.timesteps]
            self.unet, self.latent_shape = ToyUNet(shape), shape
            self.guidance, self.device = 1.0, torch.device("cpu")
            self.scaler = torch.amp.GradScaler("cpu", enabled=False)

        def embed(self, texts):
            return torch.zeros(len(texts), 1), torch.zeros(len(texts), 1)

        def predict(self, latents, t, cond):
            return self.unet(latents, t, cond)

        def decode(self, latents):
            return latents[:, :3]

    return Toy()


def toy_reward(images, prompt_ids):
    return images[:, 0].mean(dim=(1, 2))  # the first channel's mean: a direction the bias can move


TOY_PROMPTS = [("p1", "one"), ("p2", "two")]


def toy_train(algo, seed, sign=1.0, **overrides):
    """Train the toy's bias with `algo` against sign·toy_reward; the reward of its deterministic
    samples from 64 fixed seeds against the base model's of the same seeds: (gain of the mean, wins, n)."""
    from tasks.finetune import _optimizer, _update

    config = paper_config(algo, "tiny-clip", **{**dict(denoise_steps=4, guidance=1.0, batch_size=8, steps=20,
                                                        learning_rate=5e-2, samples_per_iteration=16,
                                                        stats_min_count=4, images_per_prompt=16, keep=4),
                                                 **overrides, "seed": seed})
    diffusion = toy_diffusion(config.denoise_steps)
    reward = lambda images, prompt_ids: sign * toy_reward(images, prompt_ids)  # noqa: E731
    params = list(diffusion.unet.parameters())
    optimizer = _optimizer(params, config)
    rng = torch.Generator().manual_seed(seed)
    data = rwr.top_k_data(diffusion, reward, TOY_PROMPTS, config.rwr, config.seed) if algo == "rwr" else \
        PerPromptStats(config.ddpo.stats_buffer, config.ddpo.stats_min_count)
    texts, seeds = ["one", "two"] * 32, list(range(10_000, 10_064))
    with adapter_disabled(diffusion.unet):
        base = toy_reward(diffusion.decode(diffusion.sample(texts, seeds)), None)
    for _ in range(config.steps):
        metrics = _update(diffusion, reward, TOY_PROMPTS, config, data, rng, params, optimizer)
        assert all(np.isfinite(value) for value in metrics.values())
    final = toy_reward(diffusion.decode(diffusion.sample(texts, seeds)), None)
    return float(final.mean() - base.mean()), int((final > base).sum()), len(final)


# Gains (per-image spread of the base's rewards: 0.19), 20 steps, seeds 0-19: RWR (top 4 of 16 per
# prompt, β = 0.5 on the ε-distance) +0.116 to +0.261 (mean 0.175, sd 0.045; on the raw v-distance
# it was +0.070 to +0.190); DDPO (16 samples an iteration) +0.24 to +0.49 (mean 0.36, sd 0.08).
# Against the negated reward: RWR -0.088 to -0.211, DDPO -0.23 to -0.49. Learning rate 1e-6:
# +0.000 (all 64 'wins' by a hair: the margin is what can fail).
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("algo, margin", [("rwr", 0.03), ("ddpo", 0.1)])
def test_rwr_and_ddpo_raise_a_learnable_reward_on_a_toy_diffusion_model(algo, margin, seed):
    gain, wins, n = toy_train(algo, seed)
    assert gain > margin and wins >= 0.75 * n, (algo, seed, gain, wins)
    # the gain follows the reward, not a drift of training: against the negated reward it falls
    gain, wins, n = toy_train(algo, seed, sign=-1.0)
    assert gain < -margin and wins <= 0.25 * n, (algo, seed, gain, wins)


def test_ddpo_step_is_the_policy_gradient_of_the_expected_reward():
    """`ddpo.step`'s gradient (PPO-clipped ratio, z-scored advantages, log-probabilities averaged
    over the D latent values and the T steps) is the exact gradient of the stochastic sampler's
    expected reward (reparameterised) divided by T·D·std(reward)."""
    import math

    diffusion, n = toy_diffusion(), 8192
    bias = diffusion.unet.bias
    rng = torch.Generator().manual_seed(0)
    latents = torch.randn((n, *diffusion.latent_shape), generator=rng)
    for t in diffusion.timesteps:
        latents, _ = ddim_step_with_logprob(diffusion.scheduler, diffusion.predict(latents, t, None), t, latents, 1.0,
                                            rng)
    rewards = toy_reward(diffusion.decode(latents), None)
    rewards.mean().backward()
    exact, bias.grad = bias.grad.flatten(), None
    config = paper_config("ddpo", "tiny-clip", denoise_steps=4, samples_per_iteration=n, batch_size=2048)
    ddpo.step(diffusion, toy_reward, TOY_PROMPTS, config.ddpo, PerPromptStats(config.ddpo.stats_buffer, 10 ** 9),
              torch.Generator().manual_seed(1), config.batch_size)
    scale = len(diffusion.timesteps) * math.prod(diffusion.latent_shape) * float(rewards.detach().std())
    ascent = -bias.grad.flatten() * scale
    assert torch.nn.functional.cosine_similarity(ascent, exact, dim=0) > 0.95
    assert 0.8 < ascent.norm() / exact.norm() < 1.25  # e.g. log-probs of the wrong step: 0.14


def test_ddpo_advantages_are_per_prompt_z_scores_over_a_buffer():
    stats = PerPromptStats(buffer=3, min_count=2)
    advantages = stats.advantages(["a", "b", "a", "b"], torch.tensor([1.0, 10.0, 3.0, 20.0]))
    torch.testing.assert_close(advantages, torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-5, rtol=0)
    # the last 3 rewards of a prompt: a's pool is [3, 5, 7]
    torch.testing.assert_close(stats.advantages(["a", "a"], torch.tensor([5.0, 7.0])),
                               torch.tensor([0.0, 1.5 ** 0.5]), atol=1e-5, rtol=0)
    assert stats.history == {"a": [3.0, 5.0, 7.0], "b": [10.0, 20.0]}
    few = PerPromptStats(buffer=3, min_count=3)  # too few of a prompt yet: the batch's statistics
    torch.testing.assert_close(few.advantages(["a", "b"], torch.tensor([1.0, 3.0])), torch.tensor([-1.0, 1.0]),
                               atol=1e-5, rtol=0)


def test_rwr_keeps_each_prompts_top_images_with_their_weights():
    from tia2.seeding import image_seed

    diffusion = toy_diffusion()
    config = paper_config("rwr", "tiny-clip", denoise_steps=4, images_per_prompt=8, keep=3, seed=5)
    data = rwr.top_k_data(diffusion, toy_reward, TOY_PROMPTS, config.rwr, config.seed)
    pools = []
    for pid, text in TOY_PROMPTS:
        with adapter_disabled(diffusion.unet):
            made = diffusion.sample([text] * 8, [image_seed(pid, i, 5) for i in range(8)])
        pools.append(toy_reward(diffusion.decode(made), None))
    kept = torch.cat([pool.sort(descending=True).values[:3] for pool in pools])
    torch.testing.assert_close(data["rewards"], kept)
    assert data["texts"] == ["one"] * 3 + ["two"] * 3
    torch.testing.assert_close(toy_reward(diffusion.decode(data["latents"]), None), kept)
    pool = torch.cat(pools)
    assert pool.min() < 0  # outside [0, 1]: min-max normalised over the pool
    torch.testing.assert_close(data["weights"], (kept - pool.min()) / (pool.max() - pool.min()))
    unit = rwr.top_k_data(diffusion, lambda images, ids: torch.sigmoid(toy_reward(images, ids)), TOY_PROMPTS,
                          config.rwr, config.seed)
    torch.testing.assert_close(unit["weights"], unit["rewards"])  # rewards in [0, 1] are the weights


# --- details checked against the references (trl, ddpo-pytorch, ImageReward's ReFL.py) -------------
def record_unet_calls(diffusion) -> list[tuple]:
    """Wrap the toy's `predict`: the list that each call's (latents, t, cond) is appended to."""
    calls, predict = [], diffusion.predict

    def recording(latents, t, cond):
        calls.append((latents, t, cond))
        return predict(latents, t, cond)

    diffusion.predict = recording
    return calls


def test_rwr_regulariser_is_the_distance_of_noise_predictions_for_v_prediction():
    """Fan et al.'s KL term compares ε-predictions; a v-prediction UNet's ε is
    sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·x_t, so the raw outputs' distance is 1/ᾱ_t times too large."""
    diffusion = toy_diffusion()
    assert diffusion.scheduler.config.prediction_type == "v_prediction"
    bias = diffusion.unet.bias
    with torch.no_grad():
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
    calls = record_unet_calls(diffusion)
    data = {"latents": torch.randn((4, *diffusion.latent_shape), generator=torch.Generator().manual_seed(1)),
            "texts": ["one"] * 4, "weights": torch.zeros(4)}  # no regression term: the loss is β·penalty
    config = paper_config("rwr", "tiny-clip", denoise_steps=4, batch_size=16, kl_beta=0.5)
    loss = rwr.step(diffusion, None, TOY_PROMPTS, config.rwr, data, torch.Generator().manual_seed(2),
                    config.batch_size)["loss"]
    (noisy, t, _), (base_noisy, base_t, _) = calls  # the adapter's call, then the base model's
    assert torch.equal(noisy, base_noisy) and torch.equal(t, base_t)
    alpha = diffusion.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v, v_base = 0.5 * noisy + bias.detach(), 0.5 * noisy  # ToyUNet with and without its adapter
    eps, eps_base = (alpha.sqrt() * out + (1 - alpha).sqrt() * noisy for out in (v, v_base))
    assert loss == pytest.approx(0.5 * float(((eps - eps_base) ** 2).mean()), rel=1e-5)
    raw = 0.5 * float(((v - v_base) ** 2).mean())
    assert abs(loss - raw) > 0.2 * raw


def test_ddim_step_with_set_alpha_to_one_ends_at_timestep_zero_as_trl():
    """trl (like ddpo-pytorch) clamps the previous timestep at 0; `set_alpha_to_one`'s ᾱ = 1 after
    the last step would give it zero variance and a NaN log-probability."""
    from diffusers import DDIMScheduler
    from trl.models.modeling_sd_base import scheduler_step

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True,
                              steps_offset=1)  # SD 2.1's, but for set_alpha_to_one
    scheduler.set_timesteps(10)
    rng = torch.Generator().manual_seed(0)
    sample = torch.randn((2, 4, 8, 8), generator=rng)
    for t in scheduler.timesteps.tolist():
        output = torch.randn(sample.shape, generator=rng)
        prev, log_prob = ddim_step_with_logprob(scheduler, output, t, sample, 1.0, rng)
        assert torch.isfinite(log_prob).all(), t
        reference = scheduler_step(scheduler, output, torch.tensor(t), sample, eta=1.0, prev_sample=prev)
        torch.testing.assert_close(log_prob, reference.log_probs)
        sample = prev


def test_ddpo_trains_with_set_alpha_to_one():
    diffusion = toy_diffusion(set_alpha_to_one=True)
    config = paper_config("ddpo", "tiny-clip", denoise_steps=4, samples_per_iteration=16, batch_size=8,
                          stats_min_count=4)
    metrics = ddpo.step(diffusion, toy_reward, TOY_PROMPTS, config.ddpo,
                        PerPromptStats(config.ddpo.stats_buffer, config.ddpo.stats_min_count),
                        torch.Generator().manual_seed(0), config.batch_size)
    assert all(np.isfinite(value) for value in metrics.values()), metrics
    grad = diffusion.unet.bias.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_ddpo_reports_approx_kl_and_clip_fraction_as_trl(monkeypatch):
    """approx_kl = ½·mean((log p − log p_old)²) and clipfrac = mean(|p/p_old − 1| > clip_range) over
    every sample and timestep; here the trained policy is a little off the sampling one."""
    diffusion = toy_diffusion()
    predict = diffusion.predict

    def off_policy(latents, t, cond):  # with gradients on, i.e. in the training pass
        output = predict(latents, t, cond)
        return 1.01 * output if torch.is_grad_enabled() else output

    diffusion.predict = off_policy
    sampled, scored = [], []
    step = ddpo.ddim_step_with_logprob

    def recording(*args, prev_sample=None, **kwargs):
        prev, log_prob = step(*args, prev_sample=prev_sample, **kwargs)
        (sampled if prev_sample is None else scored).append(log_prob.detach())
        return prev, log_prob

    monkeypatch.setattr(ddpo, "ddim_step_with_logprob", recording)
    config = paper_config("ddpo", "tiny-clip", denoise_steps=4, samples_per_iteration=16, batch_size=16,
                          stats_min_count=4, clip_range=1e-3)  # about half the toy's ratios are clipped
    metrics = ddpo.step(diffusion, toy_reward, TOY_PROMPTS, config.ddpo,
                        PerPromptStats(config.ddpo.stats_buffer, config.ddpo.stats_min_count),
                        torch.Generator().manual_seed(0), config.batch_size)
    log_ratio = torch.cat(scored) - torch.cat(sampled)  # one minibatch: the same order
    assert metrics["approx_kl"] == pytest.approx(0.5 * float((log_ratio ** 2).mean()), rel=1e-6)
    clipped = (log_ratio.exp() - 1).abs() > config.ddpo.clip_range
    assert metrics["clipfrac"] == pytest.approx(float(clipped.float().mean()))
    assert metrics["approx_kl"] > 0 and 0 < metrics["clipfrac"] < 1, metrics


@pytest.mark.slow
def test_record_finetune_logs_each_steps_loss_and_ddpos_diagnostics(tmp_path):
    import mlflow

    config = paper_config("ddpo", "tiny-clip", **{**TINY, "steps": 2, "checkpoint_every": 2,
                                                   "eval_images_per_prompt": 1})
    record_finetune(make_store(tmp_path / "store"), "tiny-sd", config)
    run, = mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = mlflow.MlflowClient()
    for name in ("loss", "approx_kl", "clipfrac"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2] and all(np.isfinite(m.value) for m in history), name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "mean_reward")] == [2]


def refl_on_the_toy(sampler: str, seed: int = 0):
    """One `refl.step` on the toy with guidance 7.5 and tellable embeddings (captions 1, the empty
    prompt 0): the images the reward saw, the UNet's calls and the run's generator afterwards."""
    diffusion = toy_diffusion()
    diffusion.guidance = 7.5
    diffusion.embed = lambda texts: (torch.ones(len(texts), 1), torch.zeros(len(texts), 1))
    calls, seen = record_unet_calls(diffusion), []

    def reward(images, prompt_ids):
        seen.append(images.detach())
        return toy_reward(images, prompt_ids)

    config = paper_config("refl", "tiny-clip", denoise_steps=4, refl_start=2, refl_end=3, batch_size=4,
                          refl_sampler=sampler)
    data = {"latents": torch.zeros((4, *diffusion.latent_shape)), "texts": ["one"] * 4}
    rng = torch.Generator().manual_seed(seed)
    refl.step(diffusion, reward, TOY_PROMPTS, config.refl, data, rng, config.batch_size)
    return seen[0], calls, rng


def test_refl_samples_as_the_reference_by_default_without_guidance():
    assert paper_config("refl", "tiny-clip").refl.refl_sampler == "ddpm"
    images, calls, _ = refl_on_the_toy("ddpm")
    assert len(calls) >= 4 and all(bool((cond == 1).all()) for _, _, cond in calls)  # captions only
    guided_images, guided_calls, _ = refl_on_the_toy("ddim")
    assert any(bool((cond == 0).any()) for _, _, cond in guided_calls)  # guidance's empty prompts
    assert not torch.allclose(images, guided_images)  # the toy ignores the text: the samplers differ


def test_refl_reference_chain_draws_from_the_runs_generator_alone():
    torch.manual_seed(1)
    global_state = torch.get_rng_state()
    images, _, rng = refl_on_the_toy("ddpm", seed=3)
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(2)
    assert torch.equal(refl_on_the_toy("ddpm", seed=3)[0], images)
    assert not torch.equal(refl_on_the_toy("ddpm", seed=4)[0], images)
    _, _, deterministic = refl_on_the_toy("ddim", seed=3)
    assert not torch.equal(rng.get_state(), deterministic.get_state())  # DDPM's steps drew their noise from it


@pytest.mark.parametrize("algo, refl_sampler", [("rwr", "ddpm"), ("ddpo", "ddpm"), ("refl", "ddpm"),
                                                ("refl", "ddim")])
def test_training_steps_leave_torchs_global_rng_alone(algo, refl_sampler):
    """Other threads draw from torch's global RNG: every draw of a step comes from the run's generator."""
    from tasks.finetune import _optimizer, _update

    diffusion = toy_diffusion()
    config = paper_config(algo, "tiny-clip", denoise_steps=4, batch_size=4, samples_per_iteration=8,
                          stats_min_count=4, refl_start=2, refl_end=3, refl_sampler=refl_sampler)
    data = PerPromptStats(config.ddpo.stats_buffer, config.ddpo.stats_min_count) if algo == "ddpo" else \
        {"latents": torch.zeros((4, *diffusion.latent_shape)), "texts": ["one"] * 4, "weights": torch.ones(4)}
    params = list(diffusion.unet.parameters())
    global_state = torch.get_rng_state()
    _update(diffusion, toy_reward, TOY_PROMPTS, config, data, torch.Generator().manual_seed(0), params,
            _optimizer(params, config))
    assert torch.equal(torch.get_rng_state(), global_state)


def test_refl_sampler_is_checked_and_part_of_the_run_key():
    from tasks.finetune import run_key

    ddpm, ddim = (paper_config("refl", "tiny-clip", refl_sampler=s) for s in ("ddpm", "ddim"))
    assert run_key(ddpm, "tiny-sd@x", ["p"], []) != run_key(ddim, "tiny-sd@x", ["p"], [])
    with pytest.raises(UserError, match="refl_sampler must be one of ddpm, ddim .got 'euler'."):
        paper_config("refl", "tiny-clip", refl_sampler="euler")


def test_run_keys_of_paper_configs_are_those_of_existing_stores():
    """A run key names its adapter folder and is how a re-run finds its checkpoints: it must not
    change when the code does. The keys below were computed with the flat FinetuneConfig, before
    its settings were split into per-algorithm sections."""
    from tasks.finetune import run_key

    expected = {"rwr": "4e0de5ed19ee", "ddpo": "4486fc1a9689", "refl": "89b7ef23e00a"}
    for algo, key in expected.items():
        config = paper_config(algo, "textnorm(clip, tau=0.5)")
        assert run_key(config, "tiny-sd@random-init:0", ["p1", "p2"], ["clip@sha256:abc"]) == key, algo
    config = paper_config("refl", "clip", denoise_steps=8, kl_beta=0.25, steps=3, mixed_precision="bf16")
    assert run_key(config, "tiny-sd@random-init:0", ["p1"], ["clip@x"]) == "00ad6c09698f"
    assert list(config.key())[:4] == ["algo", "reward", "seed", "denoise_steps"]  # config.json's order
    assert config.key()["kl_beta"] == 0.25 and config.key()["refl_start"] == 6


def test_settings_go_by_their_flat_names_to_their_section():
    from tasks.finetune import SETTING_NAMES

    config = paper_config("rwr", "tiny-clip", kl_beta=0.25, eta=0.5, refl_sampler="ddim", steps=7)
    assert (config.rwr.kl_beta, config.ddpo.eta, config.refl.refl_sampler, config.steps) == (0.25, 0.5, "ddim", 7)
    assert config.algorithm_settings is config.rwr
    assert config.with_settings(kl_beta=1.0).rwr.kl_beta == 1.0 and config.rwr.kl_beta == 0.25
    assert list(config.flat()) == ["algo", "reward", *SETTING_NAMES]
    with pytest.raises(UserError, match=r"^unknown setting\(s\) stepz \(known: steps, checkpoint_every, seed, "):
        paper_config("rwr", "tiny-clip", stepz=3)


def test_fp16_loss_scaling_leaves_the_clipped_gradients_and_update_unchanged():
    """The scaled loss's gradients are unscaled before clipping: the same step as without scaling."""
    from tasks.finetune import _optimizer, _update

    results = []
    for scaler in (torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        diffusion = toy_diffusion()
        diffusion.scaler = scaler
        config = paper_config("rwr", "tiny-clip", denoise_steps=4, batch_size=4, max_grad_norm=1e-3)
        data = {"latents": torch.ones((4, *diffusion.latent_shape)), "texts": ["one"] * 4, "weights": torch.ones(4)}
        params = list(diffusion.unet.parameters())
        _update(diffusion, None, TOY_PROMPTS, config, data, torch.Generator().manual_seed(0), params,
                _optimizer(params, config))
        results.append((diffusion.unet.bias.grad, diffusion.unet.bias.detach()))
    (plain_grad, plain), (scaled_grad, scaled) = results
    assert plain_grad.norm() == pytest.approx(1e-3, rel=1e-4)  # the clip bound
    torch.testing.assert_close(scaled_grad, plain_grad)
    torch.testing.assert_close(scaled, plain)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_adapter_and_bf16_trains(tmp_path):
    from safetensors.torch import load_file

    # 16 px and one evaluation image per prompt: bf16 on the CPU is about 15x slower, and no assertion reads
    # the evaluation (two steps: both LoRA matrices move, B from zero first)
    settings = dict(steps=2, checkpoint_every=2, learning_rate=1e-2, refl_lambda=100.0, eval_images_per_prompt=1,
                    size=16)
    plain = train(make_store(tmp_path / "plain"), "refl", **settings)
    checkpointed = train(make_store(tmp_path / "checkpointed"), "refl", gradient_checkpointing=True, **settings)
    assert checkpointed.run == plain.run  # an execution detail, not part of the run's identity
    a, b = load_file(plain.checkpoints[-1].path), load_file(checkpointed.checkpoints[-1].path)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    mixed = train(make_store(tmp_path / "bf16"), "refl", mixed_precision="bf16", **settings)
    assert mixed.run != plain.run and np.isfinite(mixed.checkpoints[-1].loss)
    weights = load_file(mixed.checkpoints[-1].path)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(weights[k], a[k]) for k in a)  # bf16 arithmetic: not the fp32 result
    with pytest.raises(UserError, match="mixed_precision"):
        paper_config("refl", "tiny-clip", mixed_precision="fp8")


@pytest.mark.slow
def test_fp16_autocasts_the_unet_and_trains_with_a_saved_loss_scale(tmp_path):
    """fp16 as the papers trained: the UNet computes in half precision, the LoRA weights stay fp32,
    the loss scale is part of the training state (an exact resume)."""
    from safetensors.torch import load_file

    from tasks.finetune import STATE_FILE

    diffusion = Diffusion(tiny_sd(16).pipeline, 2, 1.0, "fp16")
    with diffusion.autocast():
        output = diffusion.unet(torch.zeros((1, *diffusion.latent_shape)), 1,
                                encoder_hidden_states=diffusion.embed(["one"])[0]).sample
    assert output.dtype == torch.float16 and diffusion.scaler.is_enabled()
    # the smallest run (fp16 on the CPU is about 10x slower than fp32)
    result = train(make_store(tmp_path / "store"), "rwr", mixed_precision="fp16", steps=1, checkpoint_every=1,
                   learning_rate=1e-2, images_per_prompt=1, keep=1, batch_size=2, eval_images_per_prompt=1, size=16)
    final = result.checkpoints[-1]
    weights = load_file(final.path)
    assert np.isfinite(final.loss) and all(w.dtype == torch.float32 for w in weights.values())
    assert any(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k or "lora.up" in k)  # the step applied
    assert torch.load(final.path.parent / STATE_FILE, weights_only=False)["scaler"]["scale"] > 0


# --- checkpoints, resume, adapters ---------------------------------------------------------------
@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    # two steps, then two more: after two both LoRA matrices have moved (B from zero first) and AdamW's
    # moments, the run's generator and the step count are all in the state that the resume must restore
    settings = dict(checkpoint_every=1, images_per_prompt=4, keep=2, learning_rate=1e-2, size=16)
    resumed = make_store(tmp_path / "resumed")
    first = train(resumed, "rwr", steps=2, **settings)
    assert [c.step for c in first.checkpoints] == [1, 2]
    second = train(resumed, "rwr", steps=4, **settings)
    assert second.run == first.run and second.start_step == 2
    assert [c.step for c in second.checkpoints] == [3, 4]
    straight = train(make_store(tmp_path / "straight"), "rwr", steps=4, **settings)
    a, b = load_file(second.checkpoints[-1].path), load_file(straight.checkpoints[-1].path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    steps = resumed.connect().execute("SELECT list(step ORDER BY step) FROM finetune_checkpoints").fetchall()[0][0]
    assert steps == [1, 2, 3, 4]
    again = train(resumed, "rwr", steps=4, **settings)
    assert again.checkpoints == [] and again.start_step == 4 and again.selected_step in steps
    # selected from all four checkpoints, also those of earlier calls
    wins = [c.wins for c in first.checkpoints + second.checkpoints]
    assert again.selected_wins == max(wins) and again.selected_step == steps[wins.index(max(wins))]


@pytest.mark.slow
def test_adapter_loads_with_apply_lora_and_changes_the_images(tmp_path):
    store = make_store(tmp_path / "store")
    result = train(store, "refl", steps=4, checkpoint_every=4, learning_rate=5e-2, refl_lambda=10.0, size=16)
    generator = create_pipeline("tiny-sd")  # 64 px: the adapter is trained at 16, LoRA weights fit any size

    def image():
        return generator.pipeline(TEXTS[0], num_inference_steps=3, output_type="np",
                                  generator=torch.Generator().manual_seed(0)).images

    before = image()
    apply_lora(generator, result.checkpoints[-1].path.parent)
    assert generator.lora.startswith("pytorch_lora_weights.safetensors@sha256:")
    assert np.abs(image() - before).max() > 1e-3


@pytest.mark.slow
def test_record_finetune_logs_base_model_reward_and_steps(tmp_path):
    import mlflow

    store = make_store(tmp_path / "store")
    config = paper_config("refl", "textnorm(tiny-clip, tau=0.05)",
                          **{**TINY, "steps": 2, "checkpoint_every": 1, "learning_rate": 1e-2})
    result = record_finetune(store, "tiny-sd", config)
    run, = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["base_model"] == result.generator and result.generator.startswith("tiny-sd@random-init")
    assert run.data.params["reward"] == "textnorm(tiny-clip, tau=0.05)"
    assert run.data.tags["tia2.reward"] == "textnorm(tiny-clip, tau=0.05)" and run.data.tags["tia2.step"] == "2"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "mean_reward")
    assert [m.step for m in history] == [1, 2]
    artifacts = mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoints/step-000002")
    assert [a.path.rsplit("/", 1)[-1] for a in artifacts] == ["pytorch_lora_weights.safetensors"]


# --- CLI -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_trains_and_reports_bad_input_in_one_line(tmp_path, capsys):
    store = make_store(tmp_path / "store")
    base = ["--store", str(store.root), "finetune", "--model", "tiny-sd"]
    small = ["--steps", "1", "--checkpoint-every", "1", "--denoise-steps", "3", "--guidance", "1",
             "--batch-size", "2", "--eval-images-per-prompt", "1", "--learning-rate", "1e-3"]
    assert main(base + ["--algo", "refl", "--reward", "tiny-clip", "--refl-sampler", "ddim", *small]) == 0
    assert "selected checkpoint" in capsys.readouterr().out
    config, = (json.loads(p.read_text()) for p in store.adapters_dir.glob("refl-*/config.json"))
    assert config["refl_sampler"] == "ddim"
    for args, message in [
        (["--algo", "refl", "--reward", "textnorm(tiny-clip"], "bad reward spec"),
        (["--algo", "refl", "--reward", "tiny-clip", "--set", "nope"], "no prompts in set(s) nope"),
        (["--algo", "rwr", "--reward", "tiny-clip", "--keep", "20", "--images-per-prompt", "10"], "keep (20) exceeds"),
        (["--algo", "refl", "--reward", "no-such-model"], "unknown reward model"),
        (["--algo", "ppo", "--reward", "tiny-clip"], "invalid choice: 'ppo'"),
    ]:
        assert main(base + args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_cli_sweeps_the_kl_coefficient_and_picks_by_the_papers_rule(tmp_path, capsys):
    from tasks.finetune import KL_COEFFICIENTS

    store = make_store(tmp_path / "store")
    base = ["--store", str(store.root), "finetune", "--model", "tiny-sd", "--reward", "tiny-clip", "--steps", "2",
            "--checkpoint-every", "1", "--denoise-steps", "3", "--guidance", "1", "--batch-size", "2",
            "--eval-images-per-prompt", "2", "--learning-rate", "5e-2", "--images-per-prompt", "2", "--keep", "1"]
    assert main(base + ["--algo", "rwr", "--kl-beta", "sweep"]) == 0
    out = capsys.readouterr().out
    rows = store.connect().execute(
        "SELECT run, list(step ORDER BY step), list(wins ORDER BY step) FROM finetune_checkpoints GROUP BY run").fetchall()
    assert len(rows) == len(KL_COEFFICIENTS)  # a run per β, each with its own checkpoints
    assert len(list(store.adapters_dir.glob("rwr-data-*.pt"))) == 1  # and one set of top-K images for all
    betas = {}
    for run, steps, wins in rows:
        beta = json.loads((store.adapters_dir / f"rwr-{run}" / "config.json").read_text())["kl_beta"]
        betas[beta] = wins[steps.index(select_checkpoint(steps, wins))]
    assert sorted(betas) == list(KL_COEFFICIENTS)
    chosen = choose_kl_coefficient(betas)
    assert f"chosen KL coefficient (most wins; ties to the larger): {chosen} " in out
    for beta, wins in betas.items():
        assert re.search(rf"^\s+{beta}\s+\w+\s+\d+\s+{wins}$", out, re.M), (beta, wins, out)
    for args, message in [(["--algo", "refl", "--kl-beta", "sweep"], "the KL coefficient sweep is RWR's"),
                          (["--algo", "rwr", "--kl-beta", "-1"], "kl_beta must be >= 0"),
                          (["--algo", "rwr", "--kl-beta", "lots"], "must be a finite number or sweep (got 'lots')")]:
        assert main(base + args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
