"""Tests for flash_grpo.py and reward.py, on CPU with the tiny random Wan stack.

The method's math is checked against independent references (torch.distributions, autograd, diffusers'
scheduler, hand computations); the command line is checked by running it in a subprocess.
Run: pytest -q
"""

import base64
import contextlib
import dataclasses
import fcntl
import http.client
import io
import json
import math
import os
import pickle
import re
import select
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402  (after HF_HUB_OFFLINE: huggingface_hub reads it on import)
import flash_grpo as fg  # noqa: E402
import reward as R  # noqa: E402
from reward import RewardError, aggregate_frames, build_reward  # noqa: E402

HERE = Path(__file__).resolve().parent
# we never modify the transformer's output in place (flash_grpo.build_policy silences this outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
SIGMAS = fg.flow_sigmas(20, 3.0)


def tiny_stack(seed: int = 0) -> fg.Models:
    """The tiny preset's models, as the trainer builds them with --seed seed."""
    return fg.load_models(fg.parse_args(["--model", "tiny", "--seed", str(seed)]))


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------

def test_flow_sigmas_reproduce_release_grid():
    assert SIGMAS.shape == (21,) and SIGMAS[-1] == 0
    assert torch.all(SIGMAS[1:] < SIGMAS[:-1])
    assert fg.model_timesteps(SIGMAS[:10]).tolist() == [999, 982, 963, 944, 922, 899, 874, 847, 817, 785]
    assert abs(SIGMAS[0].item() - 0.99967) < 1e-5 and abs(SIGMAS[1].item() - 0.98242) < 1e-5
    # shift 1 is the plain uniform grid 0.999 (N - k) / N
    assert torch.allclose(fg.flow_sigmas(4, 1.0), torch.tensor([0.999, 0.74925, 0.4995, 0.24975, 0.0]))


def test_ode_step_matches_diffusers_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # our sigmas are already shifted
    scheduler.set_timesteps(sigmas=SIGMAS[:-1].tolist())
    assert torch.allclose(scheduler.sigmas, SIGMAS)
    x = torch.randn(2, 4, 2, 4, 4)
    for k, t in enumerate(scheduler.timesteps):  # the scheduler keeps its own step index: walk the grid
        v = torch.randn_like(x)
        ref = scheduler.step(v, t, x, return_dict=False)[0]
        assert torch.allclose(fg.ode_step(x, v, SIGMAS, k), ref, atol=1e-6), k
        x = ref


def sde_mean_by_hand(x, v, sigma, sigma_next, g):
    dt = sigma_next - sigma
    return x + dt * (v + g**2 / (2 * sigma) * (x + (1 - sigma) * v)), g * abs(dt) ** 0.5


@pytest.mark.parametrize("k", [0, 4, 9, 15])
def test_sde_step_log_prob_equals_normal(k):
    g = torch.Generator().manual_seed(k)
    x, v = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 4, 2, 4, 4, generator=g)
    prev, log_prob, mean, std = fg.sde_step(x, v, SIGMAS, k, noise=torch.randn(x.shape, generator=g))
    sigma, sigma_next = SIGMAS[k].item(), SIGMAS[k + 1].item()
    ref_mean, ref_std = sde_mean_by_hand(x, v, sigma, sigma_next, SIGMAS[1].item() * sigma)
    assert torch.allclose(mean, ref_mean, atol=1e-6) and abs(std.item() - ref_std) < 1e-6
    ref = torch.distributions.Normal(ref_mean, ref_std).log_prob(prev).flatten(1).mean(1)
    assert log_prob.shape == (3,) and torch.allclose(log_prob, ref, atol=1e-5)
    # scoring a given sample gives the same number
    assert torch.allclose(fg.sde_step(x, v, SIGMAS, k, prev_sample=prev)[1], log_prob)


def test_sde_step_with_per_sample_steps_matches_scalar_steps():
    x, v = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    ks = torch.tensor([0, 5, 12])
    prev = torch.randn_like(x)
    _, batched, _, _ = fg.sde_step(x, v, SIGMAS, ks, prev_sample=prev)
    for i, k in enumerate(ks.tolist()):
        _, single, _, _ = fg.sde_step(x[i:i + 1], v[i:i + 1], SIGMAS, k, prev_sample=prev[i:i + 1])
        assert torch.allclose(batched[i], single[0])


def test_sde_with_zero_noise_is_the_ode():
    x, v = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    for k in (0, 9):
        prev, _, mean, std = fg.sde_step(x, v, SIGMAS, k, fg.NoiseLevel(level=0.0))
        assert float(std) == 0
        assert torch.equal(prev, fg.ode_step(x, v, SIGMAS, k)) and torch.equal(mean, prev)


# ----------------------------------------------------------------------------------------------
# lambda(t) and temporal gradient rectification
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift,num_steps", [(1.0, 10), (3.0, 20), (5.0, 30)])
@pytest.mark.parametrize("schedule", ["linear", "flow_grpo"])
def test_lambda_t_is_the_gradient_scale_autograd_measures(shift, num_steps, schedule):
    sigmas = fg.flow_sigmas(num_steps, shift).double()  # float64: the last steps' tiny dt cost fp32 digits
    x = torch.randn(1, 4, 2, 4, 4, dtype=torch.float64)
    for k in (0, num_steps // 3, num_steps // 2, num_steps - 1):
        v = torch.randn_like(x, requires_grad=True)
        eps = torch.randn_like(x)
        with torch.no_grad():
            _, _, mean, std = fg.sde_step(x, v, sigmas, k, fg.NoiseLevel(schedule))
        prev = mean + std * eps                                    # x_{k+1} drawn at the current v
        _, log_prob, _, _ = fg.sde_step(x, v, sigmas, k, fg.NoiseLevel(schedule), prev_sample=prev)
        (grad,) = torch.autograd.grad(log_prob.sum(), v)
        expected = -(eps / eps.numel()) * fg.lambda_t(sigmas, k, fg.NoiseLevel(schedule))  # -(eps / D) lambda
        assert torch.allclose(grad, expected, rtol=1e-9, atol=0), (shift, k)


def test_flow_grpo_noise_schedule_is_flow_grpos_formula():
    # Flow-GRPO's sde_step_with_logprob: std_dev_t = sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))) *
    # noise_level, sigma_max = sigmas[1]; its grid starts at 1, ours at 0.99967: the first step takes that branch
    sigmas = fg.flow_sigmas(20, 3.0).double()
    for k, a in ((0, 0.7), (1, 0.7), (9, 0.7), (19, 1.3)):
        sigma = sigmas[k].item()
        denominator = 1 - (sigmas[1].item() if k == 0 else sigma)
        assert fg.NoiseLevel("flow_grpo", a if a != 0.7 else None)(sigmas, sigmas[k]).item() == pytest.approx(
            a * math.sqrt(sigma / denominator), rel=1e-12)
    assert fg.NoiseLevel()(sigmas, sigmas[5]).item() == pytest.approx(sigmas[1].item() * sigmas[5].item())


def test_inverse_lambda_matches_release_table():
    table = [7.4770, 7.0414, 6.6112, 6.1867, 5.7682, 5.3559, 4.9502, 4.5513, 4.1596, 3.7754]
    inv = 1 / fg.lambda_t(SIGMAS, torch.arange(10))
    assert torch.allclose(inv, torch.tensor(table), atol=1e-3)


def test_tgr_makes_per_timestep_gradient_norms_uniform():
    """Same noise eps at every step in the window: the gradient norm of the loss w.r.t. v differs between
    steps only through lambda. Without TGR the spread (max/min) is lambda's; with TGR it is 1."""
    window = torch.arange(10)
    x, eps = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)

    def grad_norms(weights):
        norms = []
        for k, w in zip(window.tolist(), weights):
            v = torch.zeros_like(x, requires_grad=True)
            with torch.no_grad():
                _, _, mean, std = fg.sde_step(x, v, SIGMAS, k)
            _, log_prob, _, _ = fg.sde_step(x, v, SIGMAS, k, prev_sample=mean + std * eps)
            loss, _ = fg.grpo_loss(log_prob, log_prob.detach(), torch.ones(1), w.view(1), clip_range=1e-3)
            norms.append(torch.autograd.grad(loss, v)[0].norm())
        return torch.stack(norms)

    plain = grad_norms(torch.ones(10))
    rectified = grad_norms(fg.tgr_weights(SIGMAS, window))
    lam = fg.lambda_t(SIGMAS, window)
    assert torch.allclose(plain.max() / plain.min(), lam.max() / lam.min(), rtol=1e-4)
    assert plain.max() / plain.min() > 1.9                  # 1.98x over the release's window
    assert (rectified.max() / rectified.min() - 1).abs() < 1e-5
    assert torch.allclose(fg.tgr_weights(SIGMAS, window).mean(), torch.tensor(1.0))


def test_policy_gradient_is_unbiased_for_the_pathwise_gradient():
    """An independent check of sign and scale: for a linear reward r = <a, x_{k+1}>, the score-function
    gradient E[r * d log p / d v] (log p averaged over D elements) equals (d E[r] / d v) / D."""
    torch.manual_seed(0)
    k, n = 3, 20000
    x, a = torch.randn(1, 2, 1, 2, 2), torch.randn(1, 2, 1, 2, 2)
    v = torch.zeros(n, 2, 1, 2, 2, requires_grad=True)
    prev, log_prob, mean, std = fg.sde_step(x.expand(n, -1, -1, -1, -1), v, SIGMAS, k)
    rewards = (a * prev.detach()).flatten(1).sum(1)
    (score_grad,) = torch.autograd.grad(((rewards - rewards.mean()) * log_prob).mean(), v, retain_graph=True)
    (path_grad,) = torch.autograd.grad((a * mean).sum(), v)
    D = x.numel()
    assert torch.allclose(score_grad.sum(0), path_grad.mean(0) / D, rtol=0.05, atol=0.02 * path_grad.abs().max() / D)


# ----------------------------------------------------------------------------------------------
# Iso-temporal grouping
# ----------------------------------------------------------------------------------------------

def test_iso_temporal_plan_shares_k_star_within_groups_and_stays_in_window():
    seen = set()
    for epoch in range(50):
        group_ids, k_star, sde_steps = fg.iso_temporal_plan(6, 4, 10, 20, seed=1, epoch=epoch)
        per_prompt = k_star.view(6, 4)
        assert torch.all(per_prompt == per_prompt[:, :1])               # one k* per prompt
        assert k_star.min() >= 0 and k_star.max() < 10                  # inside the window
        assert torch.equal(sde_steps.sum(1), torch.ones(24, dtype=torch.long))  # exactly one SDE step
        assert torch.equal(sde_steps.float().argmax(1), k_star)
        seen.update(k_star.tolist())
    assert seen == set(range(10))                                       # the whole window is used
    a = fg.iso_temporal_plan(6, 4, 10, 20, seed=1, epoch=3)[1]
    assert torch.equal(a, fg.iso_temporal_plan(6, 4, 10, 20, seed=1, epoch=3)[1])
    assert not torch.equal(a, fg.iso_temporal_plan(6, 4, 10, 20, seed=2, epoch=3)[1])


def test_initial_noise_differs_within_a_group_and_is_reproducible():
    noise = fg.initial_noise((4, 2, 4, 4), seed=0, epoch=1, sample_ids=range(8))
    assert all(not torch.equal(noise[i], noise[j]) for i in range(8) for j in range(i))
    assert torch.equal(noise, fg.initial_noise((4, 2, 4, 4), seed=0, epoch=1, sample_ids=range(8)))
    # a sample's noise does not depend on which batch it is drawn in
    assert torch.equal(noise[5], fg.initial_noise((4, 2, 4, 4), seed=0, epoch=1, sample_ids=[5])[0])


def test_epoch_prompts_cover_the_list_before_repeating():
    seen = torch.cat([fg.epoch_prompt_indices(10, 4, seed=0, epoch=e) for e in range(5)])  # 20 = 2 passes
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))


# ----------------------------------------------------------------------------------------------
# Advantages and the clipped loss
# ----------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # global std: population std of all six rewards
    m = sum(rewards.tolist()) / 6
    std = math.sqrt(sum((r - m) ** 2 for r in rewards.tolist()) / 6)
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (std + 1e-4)
    assert torch.allclose(fg.group_advantages(rewards, groups), expected)
    # per-group std: sqrt(2/3) in group 0, 0 in group 1 (whose advantages are exactly zero)
    per_group = fg.group_advantages(rewards, groups, global_std=False)
    assert torch.allclose(per_group[:3], torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + 1e-4))
    assert torch.equal(per_group[3:], torch.zeros(3))
    # clipping to [-5, 5]; groups need not be contiguous
    # clipping: a group (0, 1) among 198 zero rewards has |A| = 0.5 / 0.0705 = 7.1 before the clip
    r = torch.cat([torch.tensor([0.0, 1.0]), torch.zeros(198)])
    adv = fg.group_advantages(r, torch.tensor([0, 0] + [1] * 198), clip=5.0)
    assert adv[0] == -5.0 and adv[1] == 5.0 and torch.equal(adv[2:], torch.zeros(198))
    shuffled = fg.group_advantages(rewards[[3, 0, 4, 1, 5, 2]], groups[[3, 0, 4, 1, 5, 2]])
    assert torch.allclose(shuffled, expected[[3, 0, 4, 1, 5, 2]])


def test_grpo_loss_by_hand():
    eps = 0.1
    ratio = torch.tensor([1.0, 1.05, 1.2, 0.8, 0.95, 1.2])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0])
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 0.5])
    log_prob = torch.log(ratio).requires_grad_(True)
    loss, diag = fg.grpo_loss(log_prob, torch.zeros(6), adv, w, clip_range=eps)
    # per sample max(-w A r, -w A clip(r)):
    per = [-1.0, -2.1, -1.1, -0.8, 0.95, 0.6]
    assert abs(loss.item() - sum(per) / 6) < 1e-6
    assert abs(diag["clipfrac"].item() - 3 / 6) < 1e-6
    assert abs(diag["approx_kl"].item() - 0.5 * (torch.log(ratio) ** 2).mean().item()) < 1e-7
    (grad,) = torch.autograd.grad(loss, log_prob)
    # d(-w A rho)/d log rho = -w A rho where the unclipped term is the max. Only sample 2 (A > 0, rho above
    # 1 + eps) is clipped to no gradient; samples 3 and 5 are outside the range on the side the advantage
    # pulls away from, so the pessimistic max keeps the unclipped term and its gradient.
    expected = torch.tensor([-1.0, -2.1, 0.0, -0.8, 0.95, 0.6]) / 6
    assert torch.allclose(grad, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The trainer on the tiny model
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_epoch():
    args = fg.parse_args(["--model", "tiny", "--epochs", "1", "--reward", "colorfulness"])
    trainer = fg.Trainer(args, fg.setup_distributed())
    decoded, decode = [], fg.decode_videos  # the final latents of the rollouts, as the trainer decodes them
    fg.decode_videos = lambda vae, latents: decoded.append(latents) or decode(vae, latents)
    try:
        samples, rewards = trainer.sample(0)
    finally:
        fg.decode_videos = decode
    return args, trainer, samples, rewards, torch.cat(decoded)


def loss_calls(trainer, monkeypatch) -> list:
    """Records the diagnostics of every micro-batch's loss that trainer.train computes."""
    calls, loss = [], trainer.loss
    monkeypatch.setattr(trainer, "loss", lambda batch: calls.append((out := loss(batch))[1]) or out)
    return calls


def test_tiny_epoch_shapes_and_grouping(tiny_epoch):
    args, trainer, samples, rewards, latents = tiny_epoch
    n = args.prompts_per_epoch * args.group_size
    assert latents.shape == (n, *trainer.latent_shape) and latents.device.type == "cpu"
    videos = fg.decode_videos(trainer.models.vae, latents[:4])
    assert videos.shape == (4, args.num_frames, 3, args.height, args.width)
    assert videos.min() >= 0 and videos.max() <= 1 and rewards.shape == (n,)
    assert samples["x_t"].shape == (n, *trainer.latent_shape) and samples["log_prob"].shape == (n,)
    for g in samples["group"].unique():
        members = samples["group"] == g
        assert samples["k"][members].unique().numel() == 1                 # shared k*
        assert samples["x_t"][members].flatten(1).unique(dim=0).shape[0] == members.sum()  # distinct samples
    assert samples["k"].max() < args.sde_window
    # the advantages sum to zero within each group
    for g in samples["group"].unique():
        assert abs(samples["advantages"][samples["group"] == g].sum().item()) < 1e-4
    # each stored transition is x_{k*} -> x_{k*+1}: rerunning the ODE to k* reproduces x_{k*}
    i, k = 0, int(samples["k"][0])
    x = fg.initial_noise(trainer.latent_shape, args.seed, 0, [int(samples["sample"][0])])
    embeds = trainer.prompt_embeds(samples["prompt"][:1])
    for step in range(k):
        v = fg.predict_velocity(trainer.policy, x, trainer.sigmas[step].expand(1), embeds,
                                trainer.neg_embeds, args.guidance_scale)
        x = fg.ode_step(x, v, trainer.sigmas, step)
    assert torch.allclose(x[0], samples["x_t"][i], atol=1e-5)


def test_sampling_is_reproducible(tiny_epoch):
    args, trainer, samples, rewards, _ = tiny_epoch
    again, rewards_again = trainer.sample(0)
    assert torch.equal(samples["x_next"], again["x_next"]) and torch.equal(rewards, rewards_again)


def test_ratio_is_exactly_one_before_the_first_update(tiny_epoch, monkeypatch):
    args, trainer, samples, _, _ = tiny_epoch
    calls = loss_calls(trainer, monkeypatch)
    trainer.train(samples)
    first = calls[0]["ratio"]
    assert first.numel() == args.batch_size and torch.equal(first, torch.ones_like(first))



def test_the_hot_loops_never_read_the_device(tiny_epoch, monkeypatch):
    """Rollouts and training micro-batches run with every device tensor on the meta device, which holds no data:
    any .item(), .tolist(), bool() or copy to the host of a device tensor raises there. On a GPU each would be a
    host-device sync; the exploration plan is known on the host, and the one sync per optimizer step (the
    gradient norm and the step's statistics, together) is outside the loop."""
    args, trainer, samples, _, _ = tiny_epoch
    meta = torch.device("meta")
    policy = tiny_stack().transformer.to(meta)
    b = args.batch_size
    embeds = torch.zeros(b, args.max_sequence_length, 32, device=meta)
    sde = torch.zeros(b, args.num_steps, dtype=torch.bool)
    sde[::2, 1] = sde[1::2, 2] = True                                              # two k* in one batch
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    x, tr = fg.rollout(policy, torch.zeros(b, *trainer.latent_shape, device=meta), embeds, embeds, trainer.sigmas,
                       sde, args.guidance_scale, gens)
    assert x.device == meta and tr["x_t"].device == meta and tr["k"].tolist() == [1, 2] * (b // 2)
    monkeypatch.setattr(trainer, "policy", policy)
    monkeypatch.setattr(trainer, "d", fg.Dist(device=meta))
    monkeypatch.setattr(trainer, "neg_embeds", trainer.neg_embeds.to(meta))
    monkeypatch.setattr(trainer, "optimizer_step", lambda stats: (1.0, [0.0] * len(stats)))
    on_meta = {k: v if k in ("sample", "group", "prompt") else v.to(meta) for k, v in samples.items()}
    calls = loss_calls(trainer, monkeypatch)
    trainer.train(on_meta)
    assert len(calls) == len(samples["k"]) // b and calls[0]["ratio"].device == meta


# ----------------------------------------------------------------------------------------------
# Baselines over the same sampler and loss (the paper's Figures 4 and 5) and ablations of its two parts
# ----------------------------------------------------------------------------------------------

def plan(*flags, epoch=0):
    args = fg.parse_args(["--model", "tiny", "--num-steps", "8", "--prompts-per-epoch", "4", "--group-size", "4",
                          "--train-batch-size", "16", *flags])
    return args, fg.exploration_plan(args, epoch)


def test_ablation_switches_change_only_what_they_name():
    args, (groups, sde, train) = plan()
    _, (groups_no_itg, sde_no_itg, train_no_itg) = plan("--no-itg")
    assert torch.equal(groups, groups_no_itg) and torch.equal(sde, train) and torch.equal(sde_no_itg, train_no_itg)
    assert torch.equal(sde.sum(1), torch.ones(16, dtype=torch.long)) and torch.equal(sde_no_itg.sum(1), sde.sum(1))
    k_itg, k_no_itg = sde.float().argmax(1).view(4, 4), sde_no_itg.float().argmax(1).view(4, 4)
    assert torch.all(k_itg == k_itg[:, :1]) and not torch.all(k_no_itg == k_no_itg[:, :1])  # per prompt vs rollout
    assert k_no_itg.max() < args.sde_window
    # --no-tgr changes the weights and nothing else; the baselines default to no TGR
    assert args.tgr and not plan("--no-tgr")[0].tgr and torch.equal(plan("--no-tgr")[1][1], sde)
    assert not plan("--algo", "flow_grpo")[0].tgr and plan("--algo", "flow_grpo", "--tgr")[0].tgr


def test_flow_grpo_fast_windows_differ_within_a_group_and_stay_in_the_range():
    """Flow-GRPO-Fast draws its window per sampling call, so a group's rollouts explore at different steps: each
    rollout draws its own start, uniform over the starts that keep the window inside the first --sde-window."""
    starts = set()
    for epoch in range(10):
        args, (groups, sde, train) = plan("--algo", "flow_grpo_fast", "--fast-window", "2", epoch=epoch)
        assert torch.equal(sde, train) and torch.all(sde.sum(1) == 2)
        first = sde.float().argmax(1)                                            # (P*G,) window starts
        assert torch.all(sde[torch.arange(len(first)), first + 1]) and first.max() + 2 <= args.sde_window
        assert any(first[groups == g].unique().numel() > 1 for g in groups.unique())  # not shared by a group
        starts.update(first.tolist())
    assert starts == set(range(args.sde_window - 1))                               # every start occurs


@pytest.mark.parametrize("fraction,trained", [(1.0, 7), (0.99, 7), (0.5, 4), (0.3, 2), (0.01, 0)])
def test_flow_grpo_trains_the_first_steps_as_its_script(fraction, trained):
    """Flow-GRPO's train_sd3.py trains the first int(num_steps x timestep_fraction) steps (train_sd3_fast.py: all
    but the last, its sampler's only ODE step); every step but the last is stochastic."""
    flags = ("--algo", "flow_grpo", "--train-fraction", str(fraction))
    if trained == 0:
        with pytest.raises(SystemExit):
            plan(*flags)
        return
    args, (_, sde, train) = plan(*flags)
    assert torch.all(sde[:, :7]) and not sde[:, 7].any()                            # 8 steps: the last is ODE
    assert torch.all(train.sum(1) == trained) and torch.all(train[:, :trained])


def test_flow_grpo_stores_the_whole_stochastic_trajectory(monkeypatch):
    args = fg.parse_args(["--model", "tiny", "--algo", "flow_grpo", "--num-steps", "4", "--prompts-per-epoch", "2",
                          "--group-size", "4", "--batch-size", "4", "--train-batch-size", "8"])
    trainer = fg.Trainer(args, fg.setup_distributed())
    samples, _ = trainer.sample(0)
    assert samples["k"].shape == (8 * 3,)                             # every step but the last (ODE) of every rollout
    for i in range(8):
        rows = (samples["sample"] == i).nonzero().flatten()
        assert samples["k"][rows].tolist() == [0, 1, 2]
        # a chain of SDE steps: each stored step starts where the previous one ended
        assert torch.equal(samples["x_t"][rows[1:]], samples["x_next"][rows[:-1]])
        # and each stored x_{k+1} is a draw that the recorded log-probability scores
        x, k = samples["x_t"][rows], samples["k"][rows]
        v = fg.predict_velocity(trainer.policy, x, trainer.sigmas[k], trainer.prompt_embeds(samples["prompt"][rows]),
                                trainer.neg_embeds.expand(3, -1, -1), args.guidance_scale)
        _, log_prob, _, _ = fg.sde_step(x, v, trainer.sigmas, k, prev_sample=samples["x_next"][rows])
        assert torch.allclose(log_prob, samples["log_prob"][rows], atol=1e-4)
    assert torch.allclose(samples["weights"], torch.ones(24))                # no TGR in the baseline
    calls = loss_calls(trainer, monkeypatch)
    stats = trainer.train(samples)
    assert len(stats["grad_norm"]) == 1 and len(calls) == 6                   # 24 transitions in batches of 4


@pytest.mark.parametrize("algo", ["flash", "flow_grpo", "flow_grpo_fast"])
def test_each_algo_runs_two_epochs(algo, tmp_path):
    fg.train(fg.parse_args(["--model", "tiny", "--algo", algo, "--epochs", "2", "--num-steps", "4", "--prompts-per-epoch",
                            "2", "--group-size", "4", "--batch-size", "4", "--train-batch-size", "4", "--output-dir",
                            str(tmp_path)]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["optimizer_steps"] == 4

@pytest.mark.parametrize("algo,beta,lora_rank", [("flash", 0, 0), ("flow_grpo", 0, 0), ("flow_grpo_fast", 0, 0),
                                                ("flash", 0.1, 4), ("flash", 0.1, 0)])
def test_forward_equivalents_equal_the_counted_transformer_calls(algo, beta, lora_rank):
    """The one count of compute (metrics' forward_equivalents, the race's budgets): videos through the
    transformer, a forward with autograd on counted as three (its backward as two), the reference's as one."""
    args = fg.parse_args(["--model", "tiny", "--algo", algo, "--num-steps", "4", "--prompts-per-epoch", "2",
                          "--group-size", "4", "--batch-size", "4", "--train-batch-size", "4", "--beta", str(beta),
                          "--lora-rank", str(lora_rank), "--fast-window", "2"])
    trainer = fg.Trainer(args, fg.setup_distributed())
    counted = []
    for module in {trainer.policy, trainer.reference} - {None}:
        module.register_forward_pre_hook(
            lambda m, inputs: counted.append(inputs[0].shape[0] * (3 if torch.is_grad_enabled() else 1)))
    samples, _ = trainer.sample(0)
    trainer.train(samples)
    assert sum(counted) == fg.forward_equivalents(args) > 0


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def cli_env(threads: int) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}


def run_cli(*flags, timeout=600):
    return subprocess.run([sys.executable, str(HERE / "flash_grpo.py"), *flags], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(2), cwd=HERE)


def run_main(capsys, *flags) -> tuple[int, str]:
    """The command line's main() in this process, for a run that must stop: its exit status and its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fg.main(list(flags))
    return e.value.code, capsys.readouterr().err


# The probe's command lines: every one is refused where it is parsed, in one line naming the flag, exit 2.
BAD_COMMAND_LINES = [
    (["--max-grad-norm", "-1"], "--max-grad-norm"), (["--max-grad-norm", "0"], "--max-grad-norm"),
    (["--adv-clip", "-1"], "--adv-clip"), (["--clip-range", "nan"], "--clip-range"), (["--clip-range", "0"], "--clip-range"),
    (["--clip-range", "1.5"], "--clip-range"), (["--noise-level", "0"], "--noise-level"),
    (["--noise-level", "-0.1"], "--noise-level"), (["--num-eval-prompts", "-1"], "--num-eval-prompts"),
    (["--num-eval-prompts", "0"], "--num-eval-prompts"), (["--learning-rate", "nan"], "--learning-rate"),
    (["--learning-rate", "inf"], "--learning-rate"), (["--learning-rate", "0"], "--learning-rate"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--adam-betas", "1.5", "0.9"], "--adam-betas"),
    (["--adam-betas", "0.9", "nan"], "--adam-betas"), (["--adam-eps", "-1"], "--adam-eps"),
    (["--max-sequence-length", "0"], "--max-sequence-length"), (["--train-batch-size", "0"], "--train-batch-size"),
    (["--train-batch-size", "7"], "--train-batch-size"), (["--batch-size", "3"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"), (["--shift", "nan"], "--shift"), (["--shift", "0"], "--shift"),
    (["--guidance-scale", "nan"], "--guidance-scale"), (["--guidance-scale", "0.5"], "--guidance-scale"),
    (["--lora-alpha", "nan"], "--lora-alpha"), (["--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-rank", "-1"], "--lora-rank"), (["--beta", "-0.1"], "--beta"), (["--beta", "inf"], "--beta"),
    (["--ema-decay", "1"], "--ema-decay"), (["--ema-every", "0"], "--ema-every"), (["--epochs", "0"], "--epochs"),
    (["--seed", "-1"], "--seed"), (["--eval-every", "-1"], "--eval-every"), (["--eval-steps", "0"], "--eval-steps"),
    (["--num-steps", "0"], "--num-steps"), (["--train-fraction", "0"], "--train-fraction"),
    (["--fast-window", "0"], "--fast-window"), (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"), (["--max-bad-steps", "0"], "--max-bad-steps"),
    (["--prompts-per-epoch", "0"], "--prompts-per-epoch"), (["--dry-run", "-1"], "--dry-run"),
    (["--group-size", "1"], "--group-size"), (["--num-frames", "6"], "--num-frames"), (["--height", "20"], "--height"),
    (["--width", "0"], "--width"), (["--sde-window", "21"], "--sde-window"), (["--algo", "ppo"], "--algo"),
    (["--init", "zeros"], "--init"), (["--reward", "no_such_reward"], "--reward"),
    (["--reward", "colorfulness=nan"], "--reward"), (["--reward-frames", "top:2"], "--reward-frames"),
    (["--reward-url", "ftp://x"], "--reward-url"), (["--prompts", "/no/such/file.txt"], "--prompts"),
    (["--prompts", "EMPTY"], "--prompts"), (["--prompts", "LATIN1"], "--prompts"),
    (["--eval-prompts", "LATIN1"], "--eval-prompts"), (["--output-dir", "A_FILE"], "--output-dir"),
    (["--embedding-cache", "A_FILE"], "--embedding-cache"), (["--resume"], "--resume"),
    (["--output-dir", "A_RUN"], "--output-dir"), (["--learning-rate", "x"], "--learning-rate"),
    (["--no-such-flag"], "--no-such-flag"), (["--model", "wan7b"], "--model"),
    # inputs bounded before anything is allocated or written: prompt files, sizes the memory cannot hold, steps
    # no timestep grid has, folders that cannot be written
    (["--prompts", "LONG"], "--prompts"), (["--prompts", "NUL"], "--prompts"), (["--prompts", "/dev/zero"], "--prompts"),
    (["--eval-prompts", "A_RUN"], "--eval-prompts"), (["--height", "1600000"], "--height"),
    (["--num-frames", "400001"], "--num-frames"), (["--prompts-per-epoch", "100000000"], "--prompts-per-epoch"),
    (["--group-size", "10000000", "--train-batch-size", "40000000"], "--group-size"),
    (["--eval-steps", "1000000000"], "--eval-steps"), (["--num-steps", "100000000"], "--num-steps"),
    (["--prompts-per-epoch", "1e9"], "--prompts-per-epoch"), (["--output-dir", "A_FILE/run"], "--output-dir"),
    (["--algo", "flow_grpo_fast", "--fast-window", "3", "--sde-window", "2"], "--fast-window"),
    (["--model", "micro", "--model-path", "/no/such/folder"], "build_micro.py"),  # the memory plan reads them
    # a setting that would be ignored in silence: random weights read no folder, micro is only its weights
    (["--model-path", "A_RUN"], "--model-path"), (["--model", "wan1.3b", "--init", "random", "--model-path", "A_RUN"],
                                                  "--model-path"), (["--model", "micro", "--init", "random"], "--init"),
]


@pytest.mark.parametrize("flags,flag", BAD_COMMAND_LINES)
def test_a_bad_command_line_is_one_line_naming_the_flag_and_exit_status_2(flags, flag, tmp_path, capsys):
    files = {"EMPTY": "\n  \n", "LATIN1": "caf\xe9 au lait\n", "A_FILE": "x", "LONG": "a" * 5000 + "\n",
             "NUL": "a red\0square\n"}
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode("latin-1"))
    (tmp_path / "A_RUN").mkdir()
    (tmp_path / "A_RUN" / "metrics.jsonl").write_text('{"epoch": 0}\n')
    flags = [str(tmp_path / f) if f.split("/")[0] in (*files, "A_RUN") else f for f in flags]
    with pytest.raises(SystemExit) as e:
        fg.parse_args(["--model", "tiny", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and flag in err[0] and err[0].startswith("flash_grpo.py: error:"), err


def test_the_default_embedding_cache_is_checked_like_a_given_one(tmp_path, monkeypatch, capsys):
    import tempfile

    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a_file"))  # no --output-dir: the system's temp folder
    with pytest.raises(SystemExit) as e:
        fg.parse_args(["--model", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--embedding-cache" in err[0] and "lies under a file" in err[0], err
    assert fg.parse_args(["--model", "tiny", "--output-dir", str(tmp_path / "run")]).embedding_cache == str(
        tmp_path / "run" / "embeddings")


def test_the_cli_refuses_bad_input_in_one_line_and_exit_status_2(tmp_path):
    result = run_cli("--model", "tiny", "--max-grad-norm", "-1", timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        "flash_grpo.py: error: argument --max-grad-norm: must be positive, not -1.0"), result.stderr


MISBEHAVING = [
    ("raise ZeroDivisionError('division by zero')", "raised ZeroDivisionError: division by zero"),
    ("return [0.0] * len(prompts)", "returned list"),
    ("return videos.mean((1, 2, 3, 4)).numpy()", "returned ndarray"),
    ("return None", "returned NoneType"),
    ("return videos.mean((2, 3, 4))", "returned shape (2, 3)"),
    ("return videos.mean((1, 2, 3, 4))[:1]", "returned shape (1,)"),
    ("return torch.full((len(prompts),), float('nan'))", "NaN or inf for 2 of 2"),
    ("return torch.tensor([1.0, float('inf')])", "NaN or inf for 1 of 2"),
    ("return torch.zeros(len(prompts), dtype=torch.complex64)", "complex"),
]


@pytest.mark.parametrize("body,message", MISBEHAVING)
def test_a_misbehaving_reward_stops_the_run_with_one_line_naming_it(body, message, tmp_path):
    path = write_reward_file(tmp_path, f"def score(videos, prompts):\n    {body}\n")
    for spec in (f"{path}:score", f"brightness=0.5,{path}:score"):
        with pytest.raises(SystemExit) as e:
            fg.score_videos(build_reward(spec), torch.rand(2, 3, 3, 8, 8), ["a", "b"])
        assert f"reward '{path}:score'" in str(e.value) and message in str(e.value), e.value
        assert str(e.value).startswith("flash_grpo.py: error:") and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="temporal_consistency=1e39' returned NaN or inf"):  # the total
        fg.score_videos(build_reward("temporal_consistency=1e39"), torch.rand(2, 3, 3, 8, 8), ["a", "b"])


def test_a_run_that_stops_at_start_up_writes_nothing(tmp_path):
    path = write_reward_file(tmp_path, "def score(videos, prompts):\n    raise RuntimeError('no GPU')\n")
    out = tmp_path / "run"
    args = fg.parse_args([*SMALL, "--epochs", "1", "--reward", f"{path}:score", "--output-dir", str(out)])
    with pytest.raises(SystemExit, match="no GPU"):
        fg.train(args)
    assert not fg.run_started(out) and not (out / "metrics.jsonl").exists() and not (out / "args.json").exists()
    fg.parse_args([*SMALL, "--output-dir", str(out)])                        # the same folder is not refused


def test_logs_drop_a_torn_last_line_and_refuse_a_damaged_one(tmp_path):
    log, d = tmp_path / "metrics.jsonl", fg.Dist()
    rows = "".join(json.dumps({"epoch": e, "loss": 0.1}) + "\n" for e in range(3))
    log.write_text(rows + '{"epoch": 3, "lo')                                 # killed while appending
    with pytest.warns(UserWarning, match="torn last line"):
        assert fg.read_log(log, 2, d) == rows.split("\n", 2)[0] + "\n" + rows.split("\n", 2)[1] + "\n"
    log.write_text(rows.replace('"loss": 0.1}\n', "garbage\n", 1) + rows)
    with pytest.raises(fg.RunError, match="line 1 is damaged"):
        fg.read_log(log, 2, d)


def test_sigterm_stops_after_the_epoch_with_a_checkpoint_and_one_line(tmp_path):
    import signal

    proc = launch(tmp_path, 1, "--epochs", "100", "--checkpoint-every", "50")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    epoch = int(re.search(r"after epoch (\d+)", last).group(1))
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert last.startswith("flash_grpo.py: stopped by SIGTERM") and "--resume" in last, last
    assert fg.checkpoint_dirs(tmp_path)[-1].name == f"epoch_{epoch:06d}" and epoch < 99
    assert [json.loads(r)["epoch"] for r in metrics.read_text().splitlines()] == list(range(epoch + 1))


@pytest.mark.parametrize("model", ["wan1.3b", "wan14b"])
def test_missing_wan_weights_stop_at_once_with_what_to_download(model, tmp_path, monkeypatch, capsys):
    import bench

    monkeypatch.setattr(bench, "fits", lambda args, world: None)  # this host's memory is not the question here
    status, err = run_main(capsys, "--model", model, "--model-path", str(tmp_path / "nothing_here"))
    assert status == 1 and "Traceback" not in err, err[-2000:]
    assert "huggingface-cli download" in err and "--model-path" in err


def test_missing_micro_weights_are_named_in_one_line_also_by_the_dry_run(tmp_path, capsys):
    """The memory plan reads the micro preset's weights: missing, they are named, not a silent exit 1."""
    for flags, expected in (((), 2), (("--dry-run", "1"), 1)):
        status, err = run_main(capsys, "--model", "micro", "--model-path", str(tmp_path / "none"), *flags)
        assert status == expected and "build_micro.py" in err and len(err.strip().splitlines()) == 1, err

@pytest.mark.parametrize("model,heads,ffn,layers", [("wan1.3b", 12, 8960, 30), ("wan14b", 40, 13824, 40)])
def test_dry_run_counts_match_diffusers_for_the_published_configs(model, heads, ffn, layers):
    with torch.device("meta"):  # Wan2.1's published transformer configuration, written out independently
        reference = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128,
                                          in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn,
                                          num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                          eps=1e-6, rope_max_seq_len=1024)
    expected = sum(p.numel() for p in reference.parameters())
    result = run_cli("--model", model, "--init", "random", "--dry-run", "8", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(rf"transformer\s+{expected:,} parameters", result.stdout), result.stdout
    assert "memory per GPU" in result.stdout and "GB" in result.stdout

def test_a_reward_returning_nan_stops_the_run_naming_it(tmp_path, capsys):
    bad = write_reward_file(tmp_path, "def score(videos, prompts):\n    return torch.full((videos.shape[0],), float('nan'))\n")
    status, err = run_main(capsys, "--model", "tiny", "--epochs", "1", "--reward", f"{bad}:score")
    assert status == 1 and f"{bad}:score" in err and "Traceback" not in err, err[-2000:]



# ----------------------------------------------------------------------------------------------
# VAE decode
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_vae():
    """The tiny Wan VAE with its residual branches and mid-block attention zeroed (zero-init: each block
    is its shortcut), so that an output pixel sees only 2 latent pixels (16 px) around it. A random decoder
    with its full receptive field sees further than any small tile, a trained one mostly does not; this one
    lets the test tell tiling's plumbing (placement, blending, cropping) from receptive-field effects."""
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**json.loads((HERE / "tiny_config.json").read_text())["vae"]).eval()
    with torch.no_grad():
        for module in vae.decoder.modules():
            last = {WanResidualBlock: "conv2", WanAttentionBlock: "proj"}.get(type(module))
            if last:
                getattr(module, last).weight.zero_(), getattr(module, last).bias.zero_()
    return vae


def test_tiled_decode_matches_untiled_away_from_the_seams(local_vae):
    vae, (H, W, tile, stride) = local_vae, (64, 96, 48, 32)                # 2 x 3 tiles, 16-px blended seams
    z = torch.randn(2, 16, 2, H // 8, W // 8, generator=torch.Generator().manual_seed(1))
    assert fg.prepare_vae(vae, torch.device("cpu")) is vae and not vae.use_tiling and vae.dtype == torch.float32
    whole = fg.decode_videos(vae, z)
    assert whole.shape == (2, 5, 3, H, W) and whole.dtype == torch.float32 and whole.min() >= 0 and whole.max() <= 1
    vae.enable_tiling(tile, tile, stride, stride)
    try:
        tiled = fg.decode_videos(vae, z[1:])                                # one video: tiling costs ~5x here
    finally:
        vae.disable_tiling()
    assert tiled.shape == (1, 5, 3, H, W) and tiled.min() >= 0 and tiled.max() <= 1
    diff = (whole[1:] - tiled).abs()
    seam = lambda n: torch.tensor([i >= stride and i % stride < tile - stride for i in range(n)])  # noqa: E731
    in_seam = seam(H)[:, None] | seam(W)[None, :]                          # (H, W): the blended overlaps, half
    # Away from the seams each tile computes exactly what the whole frame does (measured 3e-7: float
    # reassociation). In the seams the blend mixes in each tile's zero-padded edge: measured mean 0.010,
    # max 0.12 for this random decoder (a trained one differs less); the bounds leave 2x room.
    assert diff[..., ~in_seam].max() < 1e-5
    assert 0 < diff[..., in_seam].mean() < 0.02 and diff[..., in_seam].max() < 0.25


def test_bf16_decode_denormalises_in_fp32_and_returns_fp32(local_vae):
    """The GPU path's dtypes on a CPU: a bf16 VAE decodes to fp32 frames close to the fp32 decode."""
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    reference = fg.decode_videos(local_vae, z)
    bf16 = fg.decode_videos(local_vae.to(torch.bfloat16), z)
    local_vae.float()
    assert bf16.dtype == torch.float32 and bf16.shape == reference.shape == (1, 5, 3, 32, 32)
    assert (bf16 - reference).abs().max() < 0.02                            # bf16 rounding, measured 0.004


# ----------------------------------------------------------------------------------------------
# --dry-run activation estimate, checked against what autograd really saves
# ----------------------------------------------------------------------------------------------

class FusedRMSNorm(torch.autograd.Function):
    """What CUDA's fused RMSNorm kernel keeps for the backward (derivatives.yaml: the input and rstd);
    on CPUs torch decomposes it and keeps an fp32 copy instead, so the CPU would not measure the GPU."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = x.float().pow(2).mean(-1, keepdim=True).add(eps).rsqrt()
        ctx.save_for_backward(x, rstd, weight)
        return (x.float() * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):  # only the forward's saved tensors are measured
        raise NotImplementedError


def saved_bytes(lora_rank: int, checkpointing: bool, monkeypatch) -> tuple[int, int, dict]:
    """Build the policy as training does (build_policy: LoRA, checkpointing, FSDP2, with bf16 compute as on
    GPUs), run predict_velocity's CFG-batched forward, and count the bytes autograd still holds after it
    (unique storages; FSDP2 frees its gathered weights, which then count 0). Returns (total, bytes first
    saved inside block 1: what the backward recomputes for one block, transformer config)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    monkeypatch.setattr(torch.nn.RMSNorm, "forward", lambda self, x: FusedRMSNorm.apply(x, self.weight, self.eps))
    monkeypatch.setattr(fg, "MixedPrecisionPolicy",  # build_policy's GPU policy, on a CPU
                        lambda **kw: MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    torch.manual_seed(0)
    source = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                   out_channels=16, text_dim=64, freq_dim=32, ffn_dim=640, num_layers=3,
                                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    args = types.SimpleNamespace(lora_rank=lora_rank, lora_alpha=32.0, seed=0, gradient_checkpointing=checkpointing)
    policy = fg.build_policy(source, args, fg.setup_distributed()).train()
    saved, where, rope = {}, ["outside"], []

    def pack(t):  # keyed by the storage itself: FSDP2 frees block 0's gathered weights, and block 1's may be
        saved.setdefault(t.untyped_storage()._cdata, (t.untyped_storage(), where[0]))  # allocated at their address
        return t

    policy.blocks[1].register_forward_pre_hook(lambda *_: where.__setitem__(0, "block"))
    policy.blocks[1].register_forward_hook(lambda *_: where.__setitem__(0, "outside"))
    policy.rope.register_forward_hook(lambda m, i, out: rope.extend(weakref.ref(t) for t in out))
    x = torch.randn(1, 16, 2, 32, 32)                                       # 2 x 16 x 16 = 512 tokens
    embeds, neg = torch.randn(1, 32, 64), torch.zeros(1, 32, 64)           # 32 text tokens
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v = fg.predict_velocity(policy, x, torch.tensor([0.9]), embeds, neg, 4.5)
    fg.reshard(policy)
    # the checkpoints keep the rotary tuple by reference (a non-tensor argument), out of the hooks' sight
    held = {s._cdata: s for t in (r() for r in rope) if t is not None for s in [t.untyped_storage()]}
    total = sum(s.nbytes() for s, _ in saved.values()) + sum(s.nbytes() for p, s in held.items() if p not in saved)
    block = sum(s.nbytes() for s, w in saved.values() if w == "block")
    assert v.requires_grad
    return total, block, policy.config


@pytest.mark.parametrize("lora_rank", [16, 0])
def test_activation_estimate_matches_the_bytes_autograd_saves(lora_rank, monkeypatch):
    tokens, text_len, batch = 512, 32, 2                                    # batch 1, both CFG branches
    full, block, config = saved_bytes(lora_rank, False, monkeypatch)
    stored, _, _ = saved_bytes(lora_rank, True, monkeypatch)
    estimate = lambda ckpt, **c: bench.activation_bytes(types.SimpleNamespace(**{**config, **c}), tokens, text_len,  # noqa: E731
                                                     batch, lora_rank, ckpt)
    one_block = estimate(False) - estimate(False, num_layers=config.num_layers - 1)
    # Measured, LoRA / full fine-tuning, 3 layers, 512 + 32 tokens x 2: not checkpointed 32.56 / 51.36 MB
    # (estimate +3.2% / -0.5%: block 0's input needs no gradient under LoRA, so it keeps one LayerNorm input
    # fewer); checkpointed 3.19 / 4.98 MB stored (-0.5% / -4.5%: the embedders' inputs, left out, weigh here
    # but are ~40 MB at 14B) plus 10.86 / 16.16 MB for the recomputed block (-0.2% / -0.1%).
    assert estimate(False) == pytest.approx(full, rel=0.1)
    assert one_block == pytest.approx(block, rel=0.1)
    assert estimate(True) - one_block == pytest.approx(stored, rel=0.1)
    assert estimate(True) == pytest.approx(stored + block, rel=0.1)        # the peak during the backward


def test_dry_run_prints_activations_and_the_total():
    result = run_cli("--model", "wan1.3b", "--dry-run", "1", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "VAE, fp32" in out and "21 x 30 x 52 = 32,760 tokens per video" in out, out
    assert "host memory per rank:" in out and "rank 0 at start-up" in out, out
    gb = lambda name: float(out.split(name)[1].split()[0])  # noqa: E731
    checkpointed = gb("activations, batch 1 x 2 (CFG), checkpointed")
    assert 0 < checkpointed < gb("activations, batch 1 x 2 (CFG), not checkpointed")
    assert gb("total per GPU, checkpointed") == pytest.approx(gb("total before activations") + checkpointed, abs=0.02)


# ----------------------------------------------------------------------------------------------
# Evaluation videos
# ----------------------------------------------------------------------------------------------

FRAMES = torch.rand(5, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # (F, 3, H, W)
uint8 = lambda x: (x * 255).round().byte()  # noqa: E731  (the trainer hands its videos over as uint8)


def test_save_video_writes_h264_mp4(tmp_path):
    import imageio.v3 as iio

    colours = torch.tensor([[0.1 + 0.2 * i, 0.9 - 0.2 * i, 0.5] for i in range(5)])  # (F, 3): one per frame
    path = tmp_path / "eval_reward0.123.mp4"
    fg.save_video(uint8(colours[:, :, None, None].expand(5, 3, 32, 48)), path)
    assert iio.immeta(path)["codec"] == "h264"
    video = iio.imread(path).astype(np.float32) / 255                      # (F, H, W, 3)
    assert video.shape == (5, 32, 48, 3)
    # frame order and RGB order survive; H.264 keeps flat frames to a few levels (measured 0.0098)
    assert np.abs(video - colours[:, None, None, :].numpy()).max() < 0.03


# ----------------------------------------------------------------------------------------------
# Ranks, checkpoints, resume, export (runs shared between tests: each costs 10-20 s)
# ----------------------------------------------------------------------------------------------

SMALL = ["--model", "tiny", "--epochs", "4", "--prompts-per-epoch", "2", "--group-size", "4", "--batch-size", "2",
         "--train-batch-size", "4", "--checkpoint-every", "1", "--ema-every", "1"]


def launch(out_dir, ranks, *extra):
    """The real entry point, plain for one rank and under torchrun for several, in its own session."""
    script = [str(HERE / "flash_grpo.py"), *SMALL, "--output-dir", str(out_dir), *extra]
    cmd = [sys.executable, *script] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *script]
    return subprocess.Popen(cmd, cwd=HERE, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def kill_after_two_epochs(proc, out_dir, timeout=300):
    """SIGKILL the whole run (torchrun and its workers) once two epochs are logged and checkpointed."""
    import signal

    deadline = time.time() + timeout
    metrics = out_dir / "metrics.jsonl"
    while time.time() < deadline:
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        if len(rows) >= 2 and (out_dir / "checkpoints" / "epoch_000001").exists():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("the run did not reach epoch 2 in time")


def logged(out_dir, name="metrics.jsonl"):
    rows = [json.loads(line) for line in (out_dir / name).read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("time_s")} for row in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted and killed-then-resumed runs with 1 and 2 ranks (two at a time on 2 cores)."""
    root = tmp_path_factory.mktemp("runs")
    import shutil

    dirs = {name: root / name for name in ("one", "one_killed", "two", "two_killed", "two_then_one")}
    one, two = launch(dirs["one"], 1), launch(dirs["two"], 2)
    finish(one), finish(two)
    killed = launch(dirs["one_killed"], 1)
    kill_after_two_epochs(killed, dirs["one_killed"])
    resumed, killed2 = launch(dirs["one_killed"], 1, "--resume"), launch(dirs["two_killed"], 2)
    kill_after_two_epochs(killed2, dirs["two_killed"])
    finish(resumed)
    shutil.copytree(dirs["two_killed"], dirs["two_then_one"])  # a 2-rank checkpoint, resumed by 1 rank
    resumed2, resumed1 = launch(dirs["two_killed"], 2, "--resume"), launch(dirs["two_then_one"], 1, "--resume")
    finish(resumed2), finish(resumed1)
    return dirs


def test_torchrun_two_ranks_trains_and_exports(runs):
    rows = logged(runs["two"])
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and "eval_reward" in rows[-1]
    assert (runs["two"] / "export" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(fg.checkpoint_dirs(runs["two"])) == 2  # --keep-checkpoints 2


def test_one_and_two_ranks_agree(runs):
    one, two = logged(runs["one"], "rollouts.jsonl"), logged(runs["two"], "rollouts.jsonl")
    for a, b in zip(one, two):
        assert a["prompts"] == b["prompts"] and a["train_steps"] == b["train_steps"]
    # epoch 0 starts from the same weights: identical rewards and advantages
    assert one[0] == two[0]
    # later epochs follow different (equally valid) floating-point summation orders of the gradients
    for a, b in zip(one[1:], two[1:]):
        assert max(abs(x - y) for x, y in zip(a["advantages"], b["advantages"])) < 1e-3


def test_a_checkpoint_of_two_ranks_resumes_on_one(runs):
    # the shards are read back into another sharding; the data stream is the same, the gradient sums follow
    # another order, so later rewards agree to rounding (as between 1 and 2 ranks from the start)
    two, resumed = logged(runs["two"], "rollouts.jsonl"), logged(runs["two_then_one"], "rollouts.jsonl")
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3] and resumed[:2] == two[:2]
    for a, b in zip(two[2:], resumed[2:]):
        assert a["prompts"] == b["prompts"] and a["train_steps"] == b["train_steps"]
        assert max(abs(x - y) for x, y in zip(a["rewards"], b["rewards"])) < 1e-3


@pytest.mark.parametrize("ranks", [1, 2])
def test_killed_and_resumed_run_equals_uninterrupted_run(runs, ranks):
    name = {1: "one", 2: "two"}[ranks]
    assert logged(runs[name + "_killed"]) == logged(runs[name])
    assert logged(runs[name + "_killed"], "rollouts.jsonl") == logged(runs[name], "rollouts.jsonl")


def test_an_existing_run_is_refused_without_resume_and_a_damaged_checkpoint_stops_the_cli(runs, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["one"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}  # .lock: who last ran
    status, err = run_main(capsys, *SMALL, "--output-dir", str(out))
    assert status == 2 and "already holds a run" in err and len(err.strip().splitlines()) == 1, err
    status, err = run_main(capsys, *SMALL, "--output-dir", str(out), "--resume", "--epochs", "2")  # it holds 4
    assert status == 2 and err.strip().splitlines()[-1] == (
        f"flash_grpo.py: error: argument --epochs: {out} already holds 4 epochs, more than that"), err
    # one flipped bit in a weight: the digest catches it before anything is read or written
    shard = sorted(fg.checkpoint_dirs(out)[-1].glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    before[shard] = shard.read_bytes()
    status, err = run_main(capsys, *SMALL, "--output-dir", str(out), "--resume")
    assert status == 1 and "sha256 differs" in err and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("flash_grpo.py: error: --resume: checkpoint"), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


# ----------------------------------------------------------------------------------------------
# Checkpoints in this process: what a checkpoint must prove before it is loaded
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-epoch run with a checkpoint per epoch, and its trainer."""
    out = tmp_path_factory.mktemp("saved")
    trainer = fg.train(fg.parse_args([*SMALL, "--epochs", "2", "--output-dir", str(out)]))
    return out, trainer


def fresh(args, *flags):
    """A new trainer for the same run, or with flags changed."""
    if flags:
        given = [*SMALL, "--epochs", "2", *flags]
        args = fg.parse_args(given)
    return fg.Trainer(dataclasses.replace(args, output_dir=None), fg.setup_distributed())


def refusal(trainer, path) -> str:
    before = {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()}
    with pytest.raises(fg.RunError) as e:
        fg.load_checkpoint(trainer, path)
    assert {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()} == before  # nothing written
    return e.value.message


def damaged_copy(saved, tmp_path, edit_tensors=None, edit_meta=None, reseal=None, rename=None):
    """A copy of the last checkpoint with its tensors or meta.json edited. reseal "files": the digests match the
    files again; "all": meta.json also lists the tensors the files hold (a consistent checkpoint of the wrong
    content, not a damaged file)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "checkpoints" / "epoch_000001"
    shutil.copytree(fg.checkpoint_dirs(saved[0])[-1], path)
    meta = json.loads((path / "meta.json").read_text())
    if edit_tensors or rename:
        for shard in path.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
            if rename:  # the tensors and DCP's record of the slices each file holds
                tensors = {rename(k): v for k, v in tensors.items()}
                info = json.loads(header["DCP_SHARDING_INFO"])
                header["DCP_SHARDING_INFO"] = json.dumps({rename(k): v for k, v in info.items()})
            save_file(edit_tensors(tensors) if edit_tensors else tensors, shard, metadata=header)
    if edit_meta:
        meta = edit_meta(meta)
    if reseal:
        meta["files"] = {p.name: fg.file_sha256(p) for p in path.glob("*.safetensors")}
    if reseal == "all":
        names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
        meta["tensors"] = {}
        for shard in path.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                for k in f.keys():
                    meta["tensors"][k] = [f.get_slice(k).get_shape(), names[f.get_slice(k).get_dtype()]]
    if reseal:
        meta["sha256"] = fg.digest(meta)
    (path / "meta.json").write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return path


def test_a_checkpoint_holds_only_safetensors_and_json_and_loads_exactly_without_unpickling(saved, monkeypatch):
    out, trainer = saved
    path = fg.checkpoint_dirs(out)[-1]
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["epoch"] == 1 and set(meta["files"]) == {p.name for p in path.glob("*.safetensors")}

    def unpickle(*a, **k):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", unpickle)
    monkeypatch.setattr(pickle, "Unpickler", unpickle)
    monkeypatch.setattr(torch, "load", unpickle)
    new = fresh(trainer.args)
    assert fg.load_checkpoint(new, path) == 1 and new.optimizer_steps == trainer.optimizer_steps
    for p, q, e, f in zip(new.params, trainer.params, new.ema.shadow, trainer.ema.shadow):
        assert torch.equal(p, q) and torch.equal(e, f)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(new.optimizer.state[p][key], trainer.optimizer.state[q][key])


def flip_a_bit(tensors):
    name = next(k for k in tensors if k.startswith("model."))
    t = tensors[name].clone()
    t.view(torch.int32).view(-1)[0] ^= 1 << 30
    return {**tensors, name: t}


@pytest.mark.parametrize("case,expected", [
    ("flipped bit", "sha256 differs"),
    ("truncated shard", "corrupt"),
    ("missing shard", "incomplete"),
    ("meta.json format 1", "format 1"),
    ("meta.json is a list", "corrupt"),
    ("meta.json is not JSON", "unreadable"),
    ("meta.json lacks files", "lacks a valid files"),
    ("another seed", "seed (1 -> 0)"),
    ("no optimizer state", "holds other tensors"),
    ("fp16 weights", "holds other tensors"),
    ("NaN weights", "non-finite"),
    ("renamed tensor", "hold other tensors than meta.json describes"),
])
def test_a_damaged_or_foreign_checkpoint_is_refused_before_anything_changes(saved, tmp_path, case, expected):
    out, trainer = saved
    flip = lambda m: {**m, "settings": {**m["settings"], "seed": 1}}  # noqa: E731
    make = {
        "flipped bit": lambda: damaged_copy(saved, tmp_path, flip_a_bit),
        "truncated shard": lambda: damaged_copy(saved, tmp_path),
        "missing shard": lambda: damaged_copy(saved, tmp_path),
        "meta.json format 1": lambda: damaged_copy(saved, tmp_path, edit_meta=lambda m: {"format": 1}),
        "meta.json is a list": lambda: damaged_copy(saved, tmp_path, edit_meta=lambda m: []),
        "meta.json is not JSON": lambda: damaged_copy(saved, tmp_path, edit_meta=lambda m: "{not json"),
        "meta.json lacks files": lambda: damaged_copy(saved, tmp_path, edit_meta=lambda m: {
            k: v for k, v in m.items() if k != "files"}),
        "another seed": lambda: damaged_copy(saved, tmp_path, edit_meta=flip),
        "no optimizer state": lambda: damaged_copy(saved, tmp_path, lambda t: {
            k: v for k, v in t.items() if not k.startswith("optimizer.")}, reseal="all"),
        "fp16 weights": lambda: damaged_copy(saved, tmp_path, lambda t: {
            k: v.half() if k.startswith("model.") else v for k, v in t.items()}, reseal="all"),
        "NaN weights": lambda: damaged_copy(saved, tmp_path, lambda t: {
            k: v * float("nan") if k.startswith("model.") else v for k, v in t.items()}, reseal="all"),
        "renamed tensor": lambda: damaged_copy(saved, tmp_path, rename=lambda k: k.replace("ema.", "emb."),
                                               reseal="files"),
    }
    path = make[case]()
    shard = sorted(path.glob("*.safetensors"))[0]
    if case == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    if case == "missing shard":
        shard.unlink()
    message = refusal(fresh(trainer.args), path)
    assert expected in message and "nothing was changed" in message, message


@pytest.mark.parametrize("flags", [
    ["--height", "48"], ["--width", "48"], ["--num-frames", "9"], ["--guidance-scale", "3"],
    ["--negative-prompt", "blurry"], ["--max-sequence-length", "16"], ["--noise-level", "0.5"],
    ["--reward-frames", "top:0.5"], ["--lora-rank", "4"], ["--prompts", "PROMPTS"],
    # the objective and the reward's server may not change either
    ["--clip-range", "0.002"], ["--beta", "0.1"], ["--no-tgr"], ["--no-global-std"], ["--adv-clip", "3"],
    ["--ema-decay", "0.5"], ["--ema-every", "2"], ["--max-grad-norm", "2"], ["--reward-url", "http://127.0.0.1:9"],
])
def test_resume_refuses_a_changed_setting_that_defines_the_data(saved, tmp_path, flags):
    out, trainer = saved
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(trainer.train_prompts[:-1] + ["another prompt"]))
    flags = [str(prompts) if f == "PROMPTS" else f for f in flags]
    message = refusal(fresh(trainer.args, *flags), fg.checkpoint_dirs(out)[-1])
    name = flags[0][2:].removeprefix("no-").replace("-", "_")
    assert "other settings" in message and f" {name} (" in message, message


# ----------------------------------------------------------------------------------------------
# Prompt embeddings: the cache
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models():
    m = tiny_stack()
    m.text_encoder.eval()  # no dropout, as the trainer and the pipeline run it
    return m


def test_prompt_embeddings_equal_wanpipelines_own(tiny_models, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    m = tiny_models
    pipe = WanPipeline(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae, transformer=m.transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    prompts = ["a  cat   with  spaces ", "a red fox &amp; a hen", "Ã©clair on a plate", "", "short"]
    args = fg.parse_args(["--model", "tiny"])
    cache = fg.PromptCache(prompts, args, fg.setup_distributed(), tmp_path, lambda: (m.tokenizer, m.text_encoder))
    ours = fg.pad_embeds(cache.get(range(len(prompts))), args.max_sequence_length)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                       max_sequence_length=args.max_sequence_length, device="cpu")
    assert ours.dtype == theirs.dtype and torch.allclose(ours, theirs, atol=1e-6)
    # the pipeline cleans prompts (whitespace, HTML entities, and ftfy's mojibake fixes when ftfy is installed)
    cleaned = fg.pad_embeds(fg.encode_prompts(m.tokenizer, m.text_encoder, ["a cat with spaces"], 32), 32)
    assert torch.allclose(ours[0], cleaned[0], atol=1e-6) and (ours[3][1:] == 0).all()
    with torch.no_grad():
        raw = m.text_encoder(m.tokenizer(prompts[:1], padding="max_length", max_length=32, return_tensors="pt").input_ids)
    assert not torch.allclose(raw.last_hidden_state[0], ours[0], atol=1e-3)     # what training saw before


def test_prompt_cache_is_chunked_reused_repaired_and_read_by_rows(tiny_models, tmp_path, monkeypatch):
    m = tiny_models
    monkeypatch.setattr(fg, "CACHE_CHUNK", 3)
    prompts = [f"prompt number {i} " + "word " * (i % 4) for i in range(10)]
    args, d = fg.parse_args(["--model", "tiny"]), fg.setup_distributed()
    calls = []

    def encoder():
        calls.append(1)
        return m.tokenizer, m.text_encoder

    cache = fg.PromptCache(prompts, args, d, tmp_path, encoder)
    assert len(calls) == 1 and len(list(cache.folder.glob("chunk_*.safetensors"))) == 4
    direct = fg.encode_prompts(m.tokenizer, m.text_encoder, prompts, args.max_sequence_length)
    got = cache.get([7, 2, 9, 2])                                         # any order, repeats, across chunks
    assert all(torch.equal(a, direct[i]) for a, i in zip(got, [7, 2, 9, 2]))
    assert [len(e) for e in got] == [int(cache.lengths[i]) for i in [7, 2, 9, 2]]  # trimmed to the real length
    # a later run reuses the cache without loading the text encoder
    again = fg.PromptCache(prompts, args, d, tmp_path, lambda: pytest.fail("the text encoder was loaded"))
    assert torch.equal(again.get([5])[0], direct[5])
    # a damaged chunk fails its digest and is encoded again; other prompts or lengths use another folder
    chunk = cache.path(1)
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\0\0\0\0")
    repaired = fg.PromptCache(prompts, args, d, tmp_path, encoder)
    assert len(calls) == 2 and torch.equal(repaired.get([4])[0], direct[4])
    other = fg.PromptCache(prompts, dataclasses.replace(args, max_sequence_length=16), d, tmp_path, encoder)
    assert other.folder != cache.folder and len(calls) == 3


def test_a_prompt_file_trains_and_only_the_cache_holds_its_embeddings(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a {c} square moving {w}" for c in ("red", "green", "blue") * 100
                                 for w in ("left", "right")[:1]) + "\n\xa0\n")
    flags = ["--model", "tiny", "--prompts", str(prompts), "--epochs", "1", "--prompts-per-epoch", "2",
             "--group-size", "2", "--train-batch-size", "4", "--output-dir", str(tmp_path / "run")]
    trainer = fg.train(fg.parse_args(flags))
    assert len(trainer.train_prompts) == 300 and not hasattr(trainer, "train_embeds")
    assert trainer.train_cache.folder.parent == tmp_path / "run" / "embeddings"
    assert trainer.models.text_encoder is None                                # freed after encoding


# ----------------------------------------------------------------------------------------------
# Distributed: collectives only in the helpers, batch shapes for any world size
# ----------------------------------------------------------------------------------------------

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list",
               "send", "recv", "isend", "irecv", "batch_isend_irecv"}
HELPERS = {"barrier", "all_gather_cat", "all_reduce_mean", "broadcast_", "all_gather_object"}


def test_collectives_are_called_only_in_the_distributed_helpers():
    import ast

    tree = ast.parse((HERE / "flash_grpo.py").read_text())
    for node in ast.walk(tree):  # torch.distributed is reached only as `dist`, and no collective is imported
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch.distributed"):
            assert not {a.name for a in node.names} & COLLECTIVES, ast.unparse(node)
        if isinstance(node, ast.Import):
            assert all(a.name != "torch.distributed" or a.asname == "dist" for a in node.names), ast.unparse(node)
    outside = []

    def visit(node, function=None):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in (
                "dist", "torch.distributed") and function not in HELPERS:
            outside.append(f"line {node.lineno}: {ast.unparse(node)} in {function}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree)
    assert not outside, outside


def test_the_collective_helpers_hand_only_device_tensors_to_the_backend(monkeypatch):
    seen = []

    def backend(*args, **kwargs):  # NCCL's rule: a tensor in a collective lives on the rank's device
        for a in [*args, *kwargs.values()]:
            for t in (a if isinstance(a, list) else [a]):
                if isinstance(t, torch.Tensor):
                    seen.append(t.device.type)

    for name in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object"):
        monkeypatch.setattr(fg.dist, name, backend)
    d = fg.Dist(rank=0, world_size=2, device=torch.device("meta"))
    cpu = torch.ones(3)
    assert d.all_reduce_mean(cpu).device.type == "meta" and d.all_gather_cat(cpu).shape == (6,)
    d.broadcast_(torch.ones(3, device="meta")), d.barrier(), d.all_gather_object({"a": 1})
    assert seen and set(seen) == {"meta"}, seen


@pytest.mark.parametrize("world,flags,batch", [
    (1, [], 32), (2, [], 16), (8, [], 4), (3, ["--prompts-per-epoch", "3", "--train-batch-size", "24"], 8),
    (2, ["--model", "wan1.3b"], 1), (8, ["--model", "wan14b"], 1),
])
def test_the_default_micro_batch_divides_each_ranks_share(world, flags, batch):
    args = fg.parse_args(["--model", "tiny", *flags, "--dry-run", "1"])
    args.batch_size = None
    assert fg.finish_args(args, world) is None and args.batch_size == batch
    assert (args.train_batch_size // world) % args.batch_size == 0


def test_bad_batch_shapes_for_the_world_size_exit_2_once(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(HERE / "flash_grpo.py"), "--model", "tiny", "--train-batch-size", "7"],
                            capture_output=True, text=True, timeout=120, env=cli_env(1), cwd=HERE)
    errors = [line for line in result.stderr.splitlines() if line.startswith("flash_grpo.py: error")]
    assert len(errors) == 1 and "--train-batch-size" in errors[0], result.stderr[-3000:]
    # the workers exit 2; the one traceback is torchrun's own report of a failed worker
    assert "exitcode  : 2" in result.stderr and result.stderr.count("Traceback") == 1, result.stderr


# ----------------------------------------------------------------------------------------------
# A run of days on many GPUs: a failing rank, one run per folder, precision, settings, two nodes
# ----------------------------------------------------------------------------------------------

def test_a_failure_on_one_rank_is_said_once_with_its_rank_and_stops_the_job(tmp_path):
    bad = write_reward_file(tmp_path, "import os\ndef score(videos, prompts):\n    if os.environ['RANK'] == '1':\n"
                                      "        raise RuntimeError('only rank 1 fails')\n    return videos.mean((1, 2, 3, 4))\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(HERE / "flash_grpo.py"), *SMALL, "--reward", f"{bad}:score"],
                            capture_output=True, text=True, timeout=120, env=cli_env(1), cwd=HERE)
    errors = [line for line in result.stderr.splitlines() if line.startswith("flash_grpo.py: error")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "(rank 1)" in errors[0] and "only rank 1 fails" in errors[0], errors


def test_a_rank_waiting_for_one_that_failed_ends_within_a_second(tmp_path):
    """What `fail` publishes ends every other rank through its watcher, even one blocked in a collective
    (here: a process that does nothing but watch)."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    code = (f"import torch.distributed as dist, flash_grpo as fg; s = dist.PrefixStore('x', dist.TCPStore("
            f"'127.0.0.1', {store.port}, is_master=False)); print('watching', flush=True); fg.watch_for_failures(s)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, env=cli_env(1), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "watching\n" and proc.poll() is None  # once imported
    t0 = time.time()
    torch.distributed.PrefixStore("x", store).set("failed", "rank 3: out of memory")
    assert proc.wait(timeout=10) == 1 and time.time() - t0 < 2


def test_fail_says_why_in_one_line_and_keeps_the_exit_status(capsys):
    for error, status, text in ((fg.RunError("a bad checkpoint"), 1, "error: a bad checkpoint"),
                                (OSError(28, "No space left on device", "/data/run/metrics.jsonl"), 1,
                                 "no space left on the disk of /data/run/metrics.jsonl"),
                                (fg.RunError("stopped by SIGTERM after epoch 3", 143), 143, "stopped by SIGTERM")):
        with pytest.raises(SystemExit) as e:
            fg.fail(error, fg.Dist())
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == status and len(err) == 1 and text in err[0], err
    stopped = fg.RunError  # a reward server awaited when SIGTERM came: the run stops as asked, not failed
    with pytest.raises(stopped) as e:
        fg.score_videos(lambda v, p: (_ for _ in ()).throw(R.RewardStopped("stopped while awaiting x")),
                        torch.rand(1, 2, 3, 8, 8), ["a"])
    assert e.value.code == 143 and "stands" in e.value.message


def test_the_modules_diffusers_keeps_in_fp32_stay_fp32_under_bf16_sharding():
    """As WanPipeline runs Wan2.1: the time embedder, the norms and the scale-shift tables in fp32; the rest in
    bf16. Under LoRA the frozen base is stored in bf16 and the adapters in fp32."""
    args = types.SimpleNamespace(lora_rank=4, lora_alpha=32.0, seed=0, gradient_checkpointing=False)
    policy = fg.build_policy(tiny_stack().transformer, args, fg.setup_distributed(), bf16=True)
    seen = {}
    for name in ("condition_embedder.time_embedder.linear_1", "blocks.0.norm2", "blocks.0.attn1.to_q.base_layer",
                 "blocks.0.attn1.to_q.lora_A.default", "proj_out"):
        policy.get_submodule(name).register_forward_pre_hook(
            lambda m, inputs, name=name: seen.setdefault(name, (m.weight.dtype, inputs[0].dtype)) and None)
    x, embeds = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 32, 32)
    with torch.no_grad():
        fg.predict_velocity(policy, x, torch.tensor([0.9]), embeds, torch.zeros_like(embeds), 4.5)
    assert seen["condition_embedder.time_embedder.linear_1"] == (torch.float32, torch.float32), seen
    assert seen["blocks.0.norm2"][0] == torch.float32 and seen["proj_out"][0] == torch.bfloat16, seen
    assert seen["blocks.0.attn1.to_q.base_layer"] == (torch.bfloat16, torch.bfloat16), seen
    stored = dict(policy.named_parameters())
    assert stored["blocks.0.attn1.to_q.base_layer.weight"].dtype == torch.bfloat16
    assert stored["blocks.0.attn1.to_q.lora_A.default.weight"].dtype == torch.float32
    assert stored["blocks.0.scale_shift_table"].dtype == torch.float32 and not hasattr(
        stored["blocks.0.scale_shift_table"], "full_tensor")                      # replicated, not cast


def test_settings_a_user_would_not_expect_to_share():
    wan = lambda *flags: fg.parse_args(["--model", "wan1.3b", "--dry-run", "8", *flags])  # noqa: E731
    assert wan().learning_rate == 1e-4                                          # LoRA: the release's
    assert wan("--lora-rank", "0").learning_rate == 1e-5                        # full: the peers'
    assert wan("--lora-rank", "0", "--learning-rate", "3e-5").learning_rate == 3e-5
    assert wan().checkpoint_every == 1                                          # preemption loses an epoch at most
    # --fast-window is checked against --sde-window only where it is used
    assert fg.parse_args(["--model", "tiny", "--fast-window", "3", "--sde-window", "2"]).fast_window == 3


def test_a_lora_checkpoint_refuses_another_base_model(saved, tmp_path, monkeypatch):
    out, trainer = saved
    new = fresh(trainer.args)
    monkeypatch.setattr(fg, "fingerprint", lambda args, *parts: [["transformer/model.safetensors", 123]])
    message = refusal(new, fg.checkpoint_dirs(out)[-1])
    assert "other settings" in message and " transformer (" in message, message


@pytest.mark.parametrize("model", ["tiny", "micro", "wan1.3b", "wan14b"])
def test_what_resume_compares_survives_the_trip_through_meta_json(model):
    """run_identity is saved in meta.json and compared on --resume: it must equal itself read back (a tuple
    in a random Wan architecture once made every such resume a 'changed setting')."""
    args = fg.parse_args(["--model", model, "--dry-run", "8", *(["--init", "random"] if "wan" in model else [])])
    identity = fg.run_identity(types.SimpleNamespace(args=args, train_prompts=fg.default_prompts(args)[0]))
    assert json.loads(json.dumps(identity)) == identity


def test_one_run_per_output_folder(tmp_path, capsys):
    """A second run on a folder in use is refused at once, in one line; the lock of a killed run does not stop
    its --resume."""
    import signal

    out = tmp_path / "run"
    first = launch(out, 1, "--epochs", "100")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.1)
    status, err = run_main(capsys, *SMALL, "--output-dir", str(out), "--resume")
    assert status == 2 and "is in use by the run of pid" in err and len(err.strip().splitlines()) == 1, err
    os.killpg(first.pid, signal.SIGKILL)                                    # its lock stays behind
    first.communicate()
    assert (out / ".lock").exists()
    fg.train(fg.parse_args([*SMALL, "--output-dir", str(out), "--resume", "--epochs", "2"]))  # taken over
    with open(out / ".lock") as f:                                          # and the run released it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_resume_refuses_a_history_that_is_not_one_run(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (0, 0, 1, 1, 2)))  # two runs, one folder
    with pytest.raises(fg.RunError, match="line 2 is epoch 0, not 1"):
        fg.read_log(log, 2, fg.Dist())


def test_a_symlinked_old_checkpoint_does_not_stop_the_cleanup(saved, tmp_path):
    import shutil

    out, trainer = saved
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    old = fg.checkpoint_dirs(run)[0]
    target = tmp_path / "elsewhere"
    old.rename(target)
    old.symlink_to(target, target_is_directory=True)
    fg.save_checkpoint(trainer, 2, run)                                      # keeps the last 2
    assert not old.is_symlink() and target.is_dir() and len(fg.checkpoint_dirs(run)) == 2


def test_an_epoch_whose_rewards_overflow_in_total_stops_the_run(tmp_path):
    path = write_reward_file(tmp_path, "def score(videos, prompts):\n    return torch.full((len(prompts),), 3e38)\n")
    with pytest.raises(fg.RunError, match="overflow"):
        fg.train(fg.parse_args([*SMALL, "--epochs", "1", "--reward", f"{path}:score"]))


def test_two_nodes_shard_within_a_node_and_equal_the_flat_run(runs, tmp_path):
    """2 nodes of 1 rank each (two torchrun agents): the mesh replicates across nodes and shards within one
    (HSDP); the run equals the flat 2-rank one. --num-eval-prompts 1 is sized up to the world: 2."""
    port = closed_port()
    script = [str(HERE / "flash_grpo.py"), *SMALL, "--output-dir", str(tmp_path / "hsdp"), "--num-eval-prompts", "1"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                               f"127.0.0.1:{port}", *script], cwd=HERE, env=cli_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for i in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [o[1][-2000:] for o in outputs]
    assert "HSDP: 2 nodes x 1" in outputs[0][0] + outputs[1][0], outputs
    hsdp, flat = logged(tmp_path / "hsdp"), logged(runs["two"])
    assert [len(r["eval_rewards"]) for r in hsdp if "eval_rewards" in r] == [2]
    for a, b in zip(hsdp, flat):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7) for k in a), (a, b)


# ----------------------------------------------------------------------------------------------
# Gradients between micro-batches, and the streamed export
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradients_held_between_micro_batches_are_the_plans(lora_rank, monkeypatch):
    """FSDP2 reduce-scatters after every micro-batch: a rank only ever holds sharded gradients, as --dry-run counts
    them (1/N of what trains). Skipping the sync would leave whole, unsharded fp32 gradients behind."""
    from torch.distributed.fsdp import FSDPModule

    args = fg.parse_args([*SMALL, "--epochs", "1", "--lora-rank", str(lora_rank), "--batch-size", "1"])
    trainer = fg.Trainer(args, fg.setup_distributed())
    samples, _ = trainer.sample(0)
    held, backward = [], torch.Tensor.backward

    def counting_backward(self, *a, **k):
        backward(self, *a, **k)
        unsharded = sharded = 0
        for module in trainer.policy.modules():
            if isinstance(module, FSDPModule) and module._get_fsdp_state()._fsdp_param_group:
                for fp in module._get_fsdp_state()._fsdp_param_group.fsdp_params:
                    whole = [fp.unsharded_accumulated_grad, getattr(getattr(fp, "_unsharded_param", None), "grad", None)]
                    unsharded += sum(g.numel() * g.element_size() for g in whole if g is not None)
                    if fp.sharded_param.grad is not None:
                        sharded += fp.sharded_param.grad.to_local().numel() * fp.sharded_param.grad.element_size()
        held.append((unsharded, sharded))

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    trainer.train(samples)
    trainable = sum(p.numel() for p in trainer.params if hasattr(p, "full_tensor"))  # FSDP2's (the fp32 modules
    # are replicated: their gradients are whole on every rank, and the plan counts them apart)
    plan = bench.dry_run(dataclasses.replace(args, dry_run=1))
    planned = float(plan.split("gradients of what trains")[1].split("GB")[0].split()[-1]) * 2**30
    assert len(held) == 8 and all(h == (0, 4 * trainable) for h in held), held   # 2 steps of 4 micro-batches
    assert planned == pytest.approx(4 * trainable, abs=0.006 * 2**30)


def test_a_full_export_streams_into_shards_that_diffusers_loads(saved, tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    out, trainer = saved
    path = fg.export_model(trainer, tmp_path, shard_bytes=40_000)               # several files and an index
    files = sorted((path / "transformer").glob("*.safetensors"))
    assert len(files) > 1 and (path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ema = {n: fg.full_tensor(s) for n, s in zip(trainer.trainable, trainer.ema.shadow)}
    written = {k: v for f in files for k, v in load_file(f).items()}
    assert written.keys() == ema.keys() and all(torch.equal(written[k], ema[k]) for k in ema)
    loaded = WanTransformer3DModel.from_pretrained(path / "transformer")
    assert all(torch.equal(p, ema[n]) for n, p in loaded.named_parameters())


def test_report_to_tensorboard_logs_metrics_and_videos_and_wandb_gets_the_same(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    fg.train(fg.parse_args([*SMALL, "--epochs", "2", "--output-dir", str(out), "--report-to", "tensorboard"]))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1]
    assert {"loss", "grad_norm", "eval_reward", "eval_reward_before", "forward_equivalents"} <= set(events.Tags()["scalars"])
    assert any(tag.startswith("eval/prompt0_") for tag in events.Tags()["images"])
    assert (out / "reward_curve.png").stat().st_size > 1000 and list(out.glob("eval_before_prompt0_*"))
    calls = []  # wandb itself is not installed here: a stand-in records what the trainer hands it
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw)))
    monkeypatch.setattr(fg.importlib.util, "find_spec", lambda name: object())
    fg.train(fg.parse_args([*SMALL, "--epochs", "1", "--output-dir", str(tmp_path / "wb"), "--report-to", "wandb"]))
    assert calls[0]["project"] == "flash-grpo" and calls[0]["sync_tensorboard"]  # wandb mirrors the events
    events = EventAccumulator(str(tmp_path / "wb" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [0]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_export_round_trip_reproduces_the_trained_model(tmp_path, lora_rank):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    args = fg.parse_args([*SMALL, "--epochs", "2", "--output-dir", str(tmp_path), "--lora-rank", str(lora_rank),
                          "--learning-rate", "1e-2", "--ema-decay", "0.5"])
    trainer = fg.train(args)
    x = torch.randn(2, *trainer.latent_shape)
    t = torch.tensor([999, 500])
    embeds = trainer.prompt_embeds([0, 1])
    with torch.no_grad(), trainer.ema.swapped_in(trainer.policy):
        trained = trainer.policy(x, t, embeds, return_dict=False)[0]
    base = tiny_stack(args.seed)
    if lora_rank == 0:
        loaded = WanTransformer3DModel.from_pretrained(tmp_path / "export" / "transformer")
    else:
        pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                           transformer=base.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        pipe.load_lora_weights(tmp_path / "export")
        loaded = pipe.transformer
    with torch.no_grad():
        reloaded = loaded(x, t, embeds, return_dict=False)[0]
        untrained = base.transformer(x, t, embeds, return_dict=False)[0] if lora_rank == 0 else None
    assert torch.allclose(reloaded, trained, atol=1e-5)
    if untrained is not None:
        assert not torch.allclose(untrained, trained, atol=1e-3)  # training changed the model


def test_lora_trains_only_adapters_and_the_reference_is_the_adapter_switched_off():
    args = fg.parse_args([*SMALL, "--epochs", "1", "--lora-rank", "4", "--learning-rate", "5e-2", "--beta", "0.1"])
    trainer = fg.Trainer(args, fg.setup_distributed())
    assert trainer.trainable and all("lora_" in name for name in trainer.trainable)
    frozen = {n: fg.full_tensor(p.detach()).clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    samples, _ = trainer.sample(0)
    stats = trainer.train(samples)
    assert stats["kl"][0] == 0 and stats["kl"][-1] > 0   # B = 0 at the start: the policy is the reference
    after = {n: fg.full_tensor(p.detach()) for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)                  # base weights untouched
    base = tiny_stack(args.seed).transformer
    x, sigma = torch.randn(2, *trainer.latent_shape), fg.flow_sigmas(20, 3.0)[[0, 5]]
    embeds = trainer.prompt_embeds([0, 1])
    neg = trainer.neg_embeds.expand_as(embeds)
    with torch.no_grad():
        expected = fg.predict_velocity(base, x, sigma, embeds, neg, args.guidance_scale)
        policy = fg.predict_velocity(trainer.policy, x, sigma, embeds, neg, args.guidance_scale)
    assert torch.allclose(trainer.reference_velocity(x, sigma, embeds, neg), expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-4)                       # the adapters did learn

def test_non_finite_gradients_skip_steps_then_abort(tiny_epoch):
    args, trainer, _, _, _ = tiny_epoch
    before = [p.detach().clone() for p in trainer.params]
    steps = trainer.optimizer_steps
    for i in range(args.max_bad_steps - 1):
        for p in trainer.params:
            p.grad = torch.full_like(p, float("nan"))
        assert trainer.optimizer_step()[0] is None and trainer.bad_steps_in_row == i + 1
    assert trainer.optimizer_steps == steps and all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    for p in trainer.params:
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(SystemExit, match="non-finite"):
        trainer.optimizer_step()
    trainer.bad_steps_in_row = 0

# ----------------------------------------------------------------------------------------------
# Rewards (reward.py): expected values computed by hand
# ----------------------------------------------------------------------------------------------

def const_video(value, B=2, F=3, H=16, W=16):
    """Videos whose every pixel is `value` (a grey level or an RGB triple)."""
    v = torch.as_tensor(value, dtype=torch.float32).reshape(-1, 1, 1).expand(3, H, W)
    return v.expand(B, F, 3, H, W).clone()


def checkerboard(H=8, W=8, lo=0.0, hi=1.0):
    ij = torch.arange(H)[:, None] + torch.arange(W)[None, :]
    return torch.where(ij % 2 == 0, hi, lo).float()


def prompts(n):
    return ["a cat"] * n


# ---------------------------------------------------------------- individual rewards
def test_colorfulness_grey_is_zero():
    assert torch.allclose(R.colorfulness(const_video(0.4)), torch.zeros(2, 3), atol=1e-6)


def test_colorfulness_pure_red_by_hand():
    # rg = 255, yb = 127.5, no variance: 0.3 * sqrt(255^2 + 127.5^2) / 100
    expected = 0.3 * math.sqrt(255 ** 2 + 127.5 ** 2) / 100
    out = R.colorfulness(const_video([1.0, 0.0, 0.0]))
    assert torch.allclose(out, torch.full((2, 3), expected), rtol=1e-5)
    assert abs(expected - 0.855296) < 1e-5


def test_colorfulness_half_red_half_green_by_hand():
    # half the pixels (255,0,0): rg=255, yb=127.5; half (0,255,0): rg=-255, yb=127.5
    # std_rg = 255, std_yb = 0, mean_rg = 0, mean_yb = 127.5
    v = torch.zeros(1, 1, 3, 4, 4)
    v[0, 0, 0, :2] = 1.0
    v[0, 0, 1, 2:] = 1.0
    expected = (255 + 0.3 * 127.5) / 100
    assert torch.allclose(R.colorfulness(v), torch.tensor([[expected]]), rtol=1e-5)


def test_temporal_consistency():
    assert torch.equal(R.temporal_consistency(const_video(0.7)), torch.zeros(2))
    flicker = torch.zeros(2, 4, 3, 8, 8)
    flicker[:, 1::2] = 1.0  # black, white, black, white
    assert torch.allclose(R.temporal_consistency(flicker), torch.full((2,), -1.0))
    assert torch.equal(R.temporal_consistency(torch.rand(3, 1, 3, 8, 8)), torch.zeros(3))
    # frames 0, 0.5, 0.5: diffs 0.5 and 0 -> mean 0.25
    ramp = torch.zeros(1, 3, 3, 4, 4)
    ramp[:, 1:] = 0.5
    assert torch.allclose(R.temporal_consistency(ramp), torch.tensor([-0.25]))


def test_brightness_and_exposure():
    v = torch.stack([const_video(0.2, B=1)[0], const_video(0.5, B=1)[0]])
    assert torch.allclose(R.brightness(v), torch.tensor([[0.2] * 3, [0.5] * 3]))
    # pure green: luma 0.587
    assert torch.allclose(R.brightness(const_video([0, 1, 0], B=1, F=1)), torch.tensor([[0.587]]))
    assert torch.allclose(R.exposure(const_video(0.5)), torch.ones(2, 3))
    assert torch.allclose(R.exposure(const_video(0.0)), torch.zeros(2, 3))
    assert torch.allclose(R.exposure(const_video(1.0)), torch.zeros(2, 3))
    assert torch.allclose(R.exposure(const_video(0.25)), torch.full((2, 3), 0.5))


def test_sharpness_by_hand():
    assert torch.allclose(R.sharpness(const_video(0.3)), torch.zeros(2, 3), atol=1e-6)
    # 1-pixel checkerboard of 0/1: Laplacian is +-4 everywhere (balanced on the 6x6
    # valid region), variance 16, times the documented scale 100 -> 1600.
    sharp = checkerboard().expand(1, 1, 3, 8, 8)
    # same pattern at half contrast (0.25/0.75): Laplacian +-2, variance 4 -> 400
    blurred = checkerboard(lo=0.25, hi=0.75).expand(1, 1, 3, 8, 8)
    assert torch.allclose(R.sharpness(sharp), torch.tensor([[1600.0]]), rtol=1e-5)
    assert torch.allclose(R.sharpness(blurred), torch.tensor([[400.0]]), rtol=1e-5)
    # and an actual 3x3 box blur of the checkerboard is less sharp still
    box = torch.nn.functional.avg_pool2d(checkerboard(16, 16)[None, None], 3, 1, 1)
    assert R.sharpness(box.expand(1, 1, 3, 16, 16)).item() < 400


def test_jpeg_noise_less_compressible_than_flat():
    torch.manual_seed(0)
    v = torch.cat([const_video(0.5, B=1, F=2, H=64, W=64), torch.rand(1, 2, 3, 64, 64)])
    inc = R.jpeg_incompressibility(v)
    assert inc.shape == (2, 2) and (inc > 0).all()
    assert (inc[1] > 5 * inc[0]).all()  # noise is many times bigger than flat grey
    assert torch.equal(R.jpeg_compressibility(v), -inc)


def test_registry():
    assert set(R.REWARDS) == {"jpeg_compressibility", "jpeg_incompressibility", "colorfulness",
                              "sharpness", "temporal_consistency", "brightness", "exposure", "micro_adherence",
                              "micro_sharpness"}
    assert R.REWARDS["temporal_consistency"].per_frame is False
    assert R.REWARDS["colorfulness"].per_frame is True


# ------------------------------------------------------------------ frame aggregation
def test_aggregate_mean_and_top():
    s = torch.tensor([[5.0, 1.0, 9.0, 2.0, 7.0, 3.0, 0.0, 8.0, 4.0, 6.0]])
    assert torch.allclose(aggregate_frames(s, "mean"), torch.tensor([4.5]))
    # F = 10, top:0.3 -> best 3 frames: 9, 8, 7
    assert torch.allclose(aggregate_frames(s, "top:0.3"), torch.tensor([8.0]))
    # F = 10, top:0.25 -> ceil(2.5) = 3 frames as well; top:1 is the mean
    assert torch.allclose(aggregate_frames(s, "top:0.25"), torch.tensor([8.0]))
    assert torch.allclose(aggregate_frames(s, "top:1"), torch.tensor([4.5]))
    # F = 1: always that frame
    assert torch.allclose(aggregate_frames(torch.tensor([[3.0], [-2.0]]), "top:0.3"),
                          torch.tensor([3.0, -2.0]))
    # float noise: 0.07 * 100 = 7.000000000000001 must still pick 7 frames
    s100 = torch.arange(100.0)[None]
    assert torch.allclose(aggregate_frames(s100, "top:0.07"), torch.tensor([96.0]))


@pytest.mark.parametrize("how", ["max", "top:0", "top:1.5", "top:x", "top:", ""])
def test_aggregate_bad(how):
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_frames(torch.zeros(1, 3), how)
    with pytest.raises(ValueError, match="aggregation"):
        build_reward("colorfulness", how)


# ---------------------------------------------------------------------- build_reward
def test_single_and_top_aggregation():
    v = torch.zeros(1, 10, 3, 8, 8)
    for f in range(10):
        v[0, f] = f / 10  # brightness of frame f is f/10
    assert torch.allclose(build_reward("brightness")(v, prompts(1)), torch.tensor([0.45]))
    top = build_reward("brightness", "top:0.3")
    assert torch.allclose(top(v, prompts(1)), torch.tensor([0.8]))  # (0.9+0.8+0.7)/3
    assert top.__name__ == top.name == "brightness"


def test_weighted_sum():
    torch.manual_seed(1)
    v = torch.rand(3, 4, 3, 8, 8)
    r = build_reward(" temporal_consistency = 1 , colorfulness=0.5,brightness=-2 ")
    expected = (R.temporal_consistency(v) + 0.5 * R.colorfulness(v).mean(1)
                - 2 * R.brightness(v).mean(1))
    assert torch.allclose(r(v, prompts(3)), expected, atol=1e-6)
    assert r.name == "temporal_consistency = 1 , colorfulness=0.5,brightness=-2"
    # a name without '=w' has weight 1
    r2 = build_reward("exposure,brightness")
    assert torch.allclose(r2(v, prompts(3)), (R.exposure(v) + R.brightness(v)).mean(1), atol=1e-6)


def test_output_dtype_device_shape():
    for name in R.REWARDS:
        captions = ["a red square moving left on a blue background"] * 2 if name.startswith("micro") else prompts(2)
        out = build_reward(name, "top:0.5")(torch.rand(2, 3, 3, 8, 8, dtype=torch.float64), captions)
        assert out.shape == (2,) and out.dtype == torch.float32 and out.device.type == "cpu", name


USER_FILE = """
import torch
def score(videos, prompts):
    return torch.tensor([float(len(p)) for p in prompts], dtype=torch.float64)
def wrong_shape(videos, prompts):
    return torch.zeros(2, 3)
def nan(videos, prompts):
    out = torch.zeros(len(prompts)); out[0] = float('nan'); return out
def not_tensor(videos, prompts):
    return [0.0] * len(prompts)
not_a_function = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_file.py"
    path.write_text(USER_FILE)
    return path


def test_user_function_from_file(user_file):
    r = build_reward(f"{user_file}:score")
    out = r(torch.rand(2, 3, 3, 8, 8), ["ab", "abcd"])
    assert torch.equal(out, torch.tensor([2.0, 4.0])) and out.dtype == torch.float32
    # user functions can be mixed with built-ins (and are not frame-aggregated)
    r2 = build_reward(f"{user_file}:score=0.5,exposure", "top:0.3")
    v = const_video(0.5, B=2)
    assert torch.allclose(r2(v, ["ab", "abcd"]), torch.tensor([2.0, 3.0]))


def test_user_function_from_module(tmp_path, monkeypatch):
    (tmp_path / "reward_test_pkg_x").mkdir()
    (tmp_path / "reward_test_pkg_x" / "__init__.py").write_text("")
    (tmp_path / "reward_test_pkg_x" / "rewards.py").write_text(
        "def minus_b(videos, prompts):\n    return -videos.mean(dim=(1, 3, 4))[:, 2]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    v = const_video([0.1, 0.2, 0.3])
    out = build_reward("reward_test_pkg_x.rewards:minus_b")(v, prompts(2))
    assert torch.allclose(out, torch.full((2,), -0.3))
    sys.modules.pop("reward_test_pkg_x.rewards", None)
    sys.modules.pop("reward_test_pkg_x", None)


# ---------------------------------------------------------------------------- errors
def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown reward 'colourfulness'.*colorfulness"):
        build_reward("temporal_consistency,colourfulness")


@pytest.mark.parametrize("spec", ["colorfulness=abc", "colorfulness=nan", "colorfulness=inf"])
def test_bad_weight(spec):
    with pytest.raises(ValueError, match="bad weight"):
        build_reward(spec)


def test_empty_component():
    with pytest.raises(ValueError, match="empty reward name"):
        build_reward("colorfulness,")


def test_missing_file_and_module(tmp_path):
    with pytest.raises(ValueError, match="not found.*nope.py"):
        build_reward(f"{tmp_path}/nope.py:score")
    with pytest.raises(ValueError, match="could not import.*no_such_module_zz"):
        build_reward("no_such_module_zz.sub:score")


def test_missing_or_uncallable_function(user_file):
    with pytest.raises(ValueError, match="'missing' not found"):
        build_reward(f"{user_file}:missing")
    with pytest.raises(ValueError, match="not callable"):
        build_reward(f"{user_file}:not_a_function")


def test_bad_outputs_raise_reward_error(user_file):
    v = torch.rand(4, 2, 3, 8, 8)
    spec = f"{user_file}:wrong_shape"
    with pytest.raises(RewardError, match=r"my_file.py:wrong_shape' returned shape \(2, 3\), expected \(4,\)"):
        build_reward(spec)(v, prompts(4))
    with pytest.raises(RewardError, match="my_file.py:nan' returned NaN or inf for 1 of 4 videos"):
        build_reward(f"colorfulness,{user_file}:nan")(v, prompts(4))
    with pytest.raises(RewardError, match="not_tensor' returned list"):
        build_reward(f"{user_file}:not_tensor")(v, prompts(4))
    assert issubclass(RewardError, ValueError)


# ----------------------------------------------------------------------------------------------
# The micro world's rewards: judged from pixels
# ----------------------------------------------------------------------------------------------

def test_the_pixel_judge_reads_every_rendered_combination():
    import build_micro

    combos = build_micro.all_combinations()
    assert len(combos) == 240 and len(build_micro.split_combinations()[1]) == 48
    gen = torch.Generator().manual_seed(0)
    for c in combos:
        video = build_micro.render(*c, gen)
        assert R.judge_micro(video) == dict(zip(("colour", "shape", "direction", "background"), c)), c


def test_micro_adherence_counts_the_attributes_a_clip_shows():
    import build_micro

    video = build_micro.render("red", "square", "left", "blue", torch.Generator().manual_seed(1))[None]
    captions = ["a red square moving left on a blue background", "a red circle moving left on a blue background",
                "a green circle moving up on a blue background", "a cyan circle moving up on a yellow background"]
    scores = build_reward("micro_adherence")(video.expand(4, -1, -1, -1, -1), captions)
    assert scores.tolist() == [1.0, 0.75, 0.25, 0.0]
    still = video[:, :1].expand(1, 5, -1, -1, -1)                                    # nothing moves: no direction
    assert R.micro_adherence(still, captions[:1]).item() == 0.75
    with pytest.raises(RewardError, match="not a micro-world caption"):
        R.micro_adherence(video, ["a cat on a mat"])


def test_micro_sharpness_is_one_for_clean_frames_and_lower_for_blur():
    import build_micro

    video = build_micro.render("yellow", "circle", "down", "magenta", torch.Generator().manual_seed(2))[None]
    blurred = F.avg_pool2d(video[0], 3, stride=1, padding=1, count_include_pad=False)[None]
    noisy = (video + 0.2 * torch.randn(video.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    clean, soft, grainy = (R.micro_sharpness(v).mean().item() for v in (video, blurred, noisy))
    assert clean == pytest.approx(1.0) and soft < clean - 0.01 and grainy < soft
    assert build_reward("micro_sharpness", "mean")(video, ["x"]).item() == pytest.approx(1.0)


def test_the_micro_build_is_seeded():
    """build_micro.py reproduces its weights: two short builds (every stage, a few steps) are equal bit for bit."""
    import build_micro

    train, _ = build_micro.split_combinations()

    def build():
        vae = build_micro.train_vae(train, 2, 0, print, batch=2)
        latents, captions = build_micro.encode_dataset(vae, train, 8, 1)
        tokenizer, encoder = build_micro.text_encoder(0)
        transformer = build_micro.train_transformer(latents, captions, tokenizer, encoder, 2, 0, print)
        return {**vae.state_dict(), **{f"t.{k}": v for k, v in transformer.state_dict().items()}}

    first, second = build(), build()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_committed_micro_model_follows_its_captions():
    """micro/ holds the built weights, and they follow their captions as check.json records: its "test" sample
    (48 seeded clips of held-out captions) measured again gives the recorded rates, give or take one clip
    (another thread count may flip a borderline pixel), and a clear majority of every attribute."""
    import build_micro

    recorded = json.loads((HERE / "micro" / "check.json").read_text())["test"]
    _, held = build_micro.split_combinations()
    rates = build_micro.check(HERE / "micro", held, recorded["clips"], recorded["seed"], recorded["steps"],
                              recorded["guidance"])
    for k in build_micro.RATES:
        assert abs(rates[k] - recorded[k]) <= 1 / recorded["clips"] + 1e-9, (k, rates, recorded)
    assert min(rates[k] for k in build_micro.ATTRIBUTES) > 0.75, rates


# four training captions the micro model gets wrong most often at the preset's sampler (CFG 4.5, 5 steps)
HARD_MICRO_CAPTIONS = ["a blue square moving right on a cyan background",
                       "a yellow square moving right on a red background",
                       "a cyan square moving down on a red background",
                       "a blue circle moving down on a cyan background"]


def test_a_short_micro_run_raises_the_adherence_reward(tmp_path):
    """Flash-GRPO on the micro model through the CLI, seeded, one thread: 10 epochs of 4 hard captions x 8
    rollouts. The adherence reward of the last 3 epochs' rollouts beats the first 3 epochs' by more than twice
    its standard error, and the evaluation of the same captions (4 seeded videos each, the EMA weights) rises
    (measured: rollouts 0.52 -> 0.71, evaluation 0.48 -> 0.59)."""
    prompts, eval_prompts = tmp_path / "hard.txt", tmp_path / "hard_x4.txt"
    prompts.write_text("\n".join(HARD_MICRO_CAPTIONS) + "\n")
    eval_prompts.write_text("\n".join(HARD_MICRO_CAPTIONS * 4) + "\n")
    flags = ["--model", "micro", "--output-dir", str(tmp_path / "run"), "--epochs", "10",
             "--prompts-per-epoch", "4", "--prompts", str(prompts), "--eval-prompts", str(eval_prompts),
             "--num-eval-prompts", "16", "--eval-every", "0"]
    result = subprocess.run([sys.executable, str(HERE / "flash_grpo.py"), *flags], capture_output=True,
                            text=True, timeout=300, env=cli_env(1), cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward_mean"] for row in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    spread = sum(row["reward_std"] for row in rows[:3]) / 3                  # within an epoch of 32 rollouts
    assert last > first + 2 * spread / math.sqrt(3 * 32), rewards
    assert rows[-1]["eval_reward"] > rows[0]["eval_reward_before"], (rows[0]["eval_rewards_before"],
                                                                      rows[-1]["eval_rewards"])
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert len(rows) == args["epochs"]
    for key in ("epoch", "reward_mean", "reward_std", "loss", "clipfrac", "approx_kl", "grad_norm", "time_s"):
        assert all(key in row for row in rows), key
    for tag in ("before", f"epoch{len(rows) - 1:04d}"):  # the held-out videos before training and after it
        assert len(list((tmp_path / "run").glob(f"eval_{tag}_*.mp4"))) == args["num_eval_prompts"], tag
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 0


def test_nan_in_builtin_is_named():
    v = torch.rand(4, 3, 3, 8, 8)
    v[1, 2, 0, 0, 0] = float("nan")
    v[3, 0, 1, 2, 2] = float("inf")
    # top-k would happily pick or drop a NaN frame; the frame-level check catches it first
    with pytest.raises(RewardError, match="'colorfulness' returned NaN or inf for 2 of 4 videos"):
        build_reward("colorfulness", "top:0.3")(v, prompts(4))


def test_input_validation():
    r = build_reward("brightness")
    with pytest.raises(ValueError, match="prompts"):
        r(torch.rand(2, 1, 3, 4, 4), prompts(3))
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        r(torch.rand(2, 3, 4, 4), prompts(2))


# ----------------------------------------------------------------------------------------------
# Learned rewards on tiny random backbones of the real classes (saved to a folder, loaded by name@folder)
# ----------------------------------------------------------------------------------------------

def smooth_frames(n, h, w, seed=0):
    """uint8 frames (n, h, w, 3) with structure at several scales (resizing must matter, not just noise)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, h // 4 + 1, w // 4 + 1, generator=g), size=(h, w), mode="bilinear")
    x = (x + 0.15 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round().byte().permute(0, 2, 3, 1).numpy()


def as_videos(frames_u8, B):
    """(B * F, H, W, 3) uint8 -> (B, F, 3, H, W) in [0, 1]."""
    x = torch.from_numpy(frames_u8).permute(0, 3, 1, 2).float() / 255
    return x.view(B, -1, *x.shape[1:])


# The processors resample 8-bit images: PIL filters in two passes and rounds to 0..255 after each, which
# puts its result up to 3.9 / 255 from PIL's own float resize (measured on these frames); we resample floats
# with PIL's filter (next test).  So: at most 4 / 255 apart (0.06 in normalised units), 0.5 / 255 on average.
EIGHT_BIT = 4 / 255 / min(R.OPENAI_CLIP_STD)


def assert_close_to_8_bit(ours, ref, exact):
    diff = (ours - ref).abs()
    assert diff.max() < (1e-5 if exact else EIGHT_BIT) and diff.mean() < EIGHT_BIT / 8, (diff.max(), diff.mean())


def test_resize_is_pils_bicubic_filter():
    frame = smooth_frames(1, 48, 64)[0]
    for h, w in [(30, 40), (17, 90)]:
        pil = np.stack([np.asarray(Image.fromarray(frame[..., c].astype(np.float32) / 255, mode="F")
                                   .resize((w, h), Image.BICUBIC)) for c in range(3)])
        ours = R._resize(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255, h, w)[0]
        assert np.abs(ours.numpy() - pil.clip(0, 1)).max() < 1e-5


@pytest.mark.parametrize("h, w", [(30, 40), (48, 64), (61, 37), (480, 832)])
def test_clip_pixels_match_clip_image_processor(h, w):
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    frames = smooth_frames(3, h, w)
    ref = torch.from_numpy(np.asarray(proc(list(frames), return_tensors="np").pixel_values))
    ours = R.clip_pixels(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, 30, 30)
    assert ours.shape == ref.shape
    assert_close_to_8_bit(ours, ref, exact=min(h, w) == 30)  # 30 x 40 needs no resize: the crop alone


@pytest.mark.parametrize("h, w", [(56, 84), (100, 70), (480, 832)])
def test_qwen2vl_pixels_match_qwen2vl_image_processor(h, w):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = {(56, 84): 56 * 84, (100, 70): 4 * 28 * 28, (480, 832): R.HPSV3_PIXELS}[h, w]
    proc = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    frames = smooth_frames(2, h, w)
    ref = proc(list(frames), return_tensors="np")
    ours, grid = R.qwen2vl_pixels(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, pixels, pixels)
    assert grid.tolist() == ref.image_grid_thw.tolist()
    ref_pixels = torch.from_numpy(np.asarray(ref.pixel_values))
    assert ours.shape == ref_pixels.shape
    assert_close_to_8_bit(ours, ref_pixels, exact=(h, w) == (56, 84))  # 56 x 84: the patch layout alone


def byte_level_tokenizer():
    """A 259-token byte-level fast tokenizer built in code (<pad>=0, </s>=1, <unk>=2, then the 256 bytes): the
    stand-in for the learned rewards' tokenizers in their tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_clip_folder(path, seed=0):
    """A random CLIPModel (real class, tiny sizes), the byte-level tokenizer and a 30-pixel preprocessor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=30, patch_size=6)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    proc.save_pretrained(path)
    return model, tokenizer, proc


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    model, tokenizer, proc = tiny_clip_folder(path)
    head = R.aesthetic_head(16).eval()
    torch.nn.init.normal_(head[-1].weight, std=3.0)  # spread the scores so that a wrong input would show
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path / "aesthetic-model.pth")
    return path, model, tokenizer, proc, head


@pytest.mark.parametrize("kind", ["clip", "pickscore", "aesthetic"])
def test_clip_rewards_equal_the_model_run_through_its_processor(clip_folder, kind):
    path, model, tokenizer, proc, head = clip_folder
    frames = smooth_frames(6, 30, 40, seed=1)  # 2 videos x 3 frames; 30 x 40 needs no resize
    texts = ["a red fox in the snow", "a lighthouse in a storm"]
    reward = build_reward(f"{kind}@{path}", "mean")
    ours = reward(as_videos(frames, 2), texts)
    with torch.no_grad():  # the reference: the processor class and the model's own feature functions
        pixels = torch.from_numpy(np.asarray(proc(list(frames), return_tensors="np").pixel_values))
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        tokens = tokenizer([t for t in texts for _ in range(3)], padding=True, return_tensors="pt")
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        ref = {"clip": (image * text).sum(-1), "pickscore": model.logit_scale.exp() * (image * text).sum(-1),
               "aesthetic": head(image).squeeze(-1)}[kind].view(2, 3).mean(1)
    assert ours.shape == (2,) and ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert torch.allclose(ours, ref, atol=1e-4), (ours, ref)
    if kind == "clip":
        assert (ours.abs() <= 1).all()  # a cosine


def test_clip_reward_prompts_matter_and_frames_are_scored_one_by_one(clip_folder):
    path = clip_folder[0]
    reward = build_reward(f"clip@{path}", "mean")
    per_frame = R.LEARNED["clip"](str(path))
    videos = as_videos(smooth_frames(4, 48, 64, seed=2), 2)
    a, b = reward(videos, ["a cat", "a dog"]), reward(videos, ["a dog", "a cat"])
    assert not torch.allclose(a, b)
    frames = per_frame(videos, ["a cat", "a dog"])
    assert frames.shape == (2, 2) and torch.allclose(frames.mean(1), a, atol=1e-6)
    top = build_reward(f"clip@{path}", "top:0.5")(videos, ["a cat", "a dog"])
    assert torch.allclose(top, frames.max(1).values, atol=1e-6)


def test_missing_learned_reward_weights_say_what_to_download(tmp_path):
    for name in ["hpsv3", "pickscore", "aesthetic", "clip"]:
        with pytest.raises(ValueError) as e:
            build_reward(f"{name}@{tmp_path / 'nothing'}")
        assert "huggingface-cli download" in str(e.value) and f"{name}@DIR" in str(e.value)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError) as e:  # the default hub ids: not in the cache, and HF_HUB_OFFLINE=1
            build_reward(name)
        assert "huggingface-cli download" in str(e.value), str(e.value)
    assert build_reward("hpsv3", load=False).components[0][2] is None  # --reward is checked without loading
    (tmp_path / "clip").mkdir()
    with pytest.raises(ValueError, match="aesthetic-model.pth"):  # CLIP is there, the head is not
        tiny_clip_folder(tmp_path / "clip")
        build_reward(f"aesthetic@{tmp_path / 'clip'}")


# Qwen2-VL-Instruct's chat template, abridged to what HPSv3 uses (system prompt, images, text)
QWEN2VL_CHAT = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hpsv3_folder(tmp_path_factory):
    """A tiny HPSv3 as released: Qwen2-VL config + tokenizer files, and HPSv3.safetensors saved from a
    Qwen2VLForConditionalGeneration of the old layout ("model.*" = language model, "visual.*", "rm_head.*")."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = tmp_path_factory.mktemp("hpsv3")
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                          "<|video_pad|>"], special_tokens=True)
    tokenizer.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2VL_CHAT}))  # where Qwen2-VL keeps it
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"))
    config.save_pretrained(path)
    torch.manual_seed(0)
    config.text_config.vocab_size += 1  # HPSv3 adds <|Reward|> and grows the embedding to fit
    model = Qwen2VLForConditionalGeneration(config).eval()
    head = {"0.weight": torch.randn(1024, 32) / 32**0.5, "0.bias": torch.randn(1024) * 0.1,
            "3.weight": torch.randn(16, 1024) / 32, "3.bias": torch.randn(16) * 0.1,
            "5.weight": torch.randn(2, 16), "5.bias": torch.randn(2)}
    old_layout = {"rm_head." + k: v for k, v in head.items()}
    for k, v in model.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        old_layout[k] = v.clone().contiguous()
    save_file(old_layout, str(path / "HPSv3.safetensors"))
    return path, model, tokenizer, head


def test_training_with_a_learned_reward_and_without_its_weights(clip_folder, tmp_path, capsys):
    flags = ["--model", "tiny", "--epochs", "1", "--prompts-per-epoch", "2", "--group-size", "2", "--batch-size", "4",
             "--train-batch-size", "4", "--num-eval-prompts", "1", "--output-dir"]
    fg.train(fg.parse_args([*flags, str(tmp_path / "run"), "--reward", f"aesthetic@{clip_folder[0]}"]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["reward_std"] > 0 and len(rows[0]["eval_rewards"]) == 1
    status, err = run_main(capsys, *flags, str(tmp_path / "run2"), "--reward", f"aesthetic@{tmp_path / 'nothing'}")
    assert status == 1 and "Traceback" not in err, err[-3000:]
    assert "huggingface-cli download" in err and len(err.strip().splitlines()) == 1, err


def test_hpsv3_equals_the_model_run_through_qwen2vl_processor(hpsv3_folder, monkeypatch):
    from transformers import ProcessorMixin, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path, model, tokenizer, head = hpsv3_folder
    reward = build_reward(f"hpsv3@{path}", "mean")
    frames = smooth_frames(4, 448, 448, seed=3)  # 448 x 448 is HPSv3's pixel budget: no resize
    texts = ["a fox {in} the snow", "a lighthouse"]  # braces: the prompt is not a format string
    ours = reward(as_videos(frames, 2), texts)

    tokenizer = type(tokenizer).from_pretrained(path)
    tokenizer.add_tokens(["<|Reward|>"], special_tokens=True)
    # Its argument check imports the torchvision image classes, which this CPU-only machine lacks.
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
    processor = Qwen2VLProcessor(Qwen2VLImageProcessorPil(min_pixels=R.HPSV3_PIXELS, max_pixels=R.HPSV3_PIXELS),
                                 tokenizer, chat_template=QWEN2VL_CHAT)
    chats = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": R.HPSV3_PROMPT.format(prompt=t)}]}], add_generation_prompt=True)
        for t in texts for _ in range(2)]
    tokenizer.padding_side = "right"
    inputs = processor(text=chats, images=list(frames), padding=True, return_tensors="pt", return_mm_token_type_ids=True)
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        at = inputs.input_ids == tokenizer.convert_tokens_to_ids("<|Reward|>")
        x = hidden[at]
        for i in ("0", "3"):
            x = F.relu(F.linear(x, head[i + ".weight"], head[i + ".bias"]))
        mu = F.linear(x, head["5.weight"], head["5.bias"])[:, 0]
    assert at.sum() == 4 and ours.shape == (2,) and torch.isfinite(ours).all()
    assert torch.allclose(ours, mu.view(2, 2).mean(1), atol=1e-4), (ours, mu)


def gpu_bytes(scorer) -> int:
    """The bytes a loaded learned reward would hold on a GPU, from its real parameters: backbone bf16, head fp32."""
    head = sum(p.numel() for p in scorer.head.parameters()) if scorer.head is not None else 0
    return (sum(p.numel() for p in scorer.parameters()) - head) * 2 + head * 4


def test_reward_bytes_count_the_models_the_loaders_build(clip_folder, hpsv3_folder, user_file):
    clip, hpsv3 = clip_folder[0], hpsv3_folder[0]
    for name, source in [("clip", clip), ("pickscore", clip), ("aesthetic", clip), ("hpsv3", hpsv3)]:
        assert R.reward_bytes(f"{name}@{source}") == gpu_bytes(R.LEARNED[name](str(source))) > 0, name
    assert R.reward_bytes(f"clip@{clip}=0.5, colorfulness, hpsv3@{hpsv3}=-2") == (  # a sum adds its parts
        R.reward_bytes(f"clip@{clip}") + R.reward_bytes(f"hpsv3@{hpsv3}"))
    assert R.reward_bytes("temporal_consistency=1, colorfulness=0.5") == 0      # training-free
    assert R.reward_bytes(f"{user_file}:score, brightness") == 0                 # a user function: not known
    assert R.reward_bytes("hpsv3", url="http://127.0.0.1:8000") == 0            # served: on the server's GPU
    assert R.reward_bytes("hpsv3") == 7_746_378_240 * 2 + 3_687_474 * 4         # 15.5 GB: backbone and head


def test_default_learned_rewards_count_their_published_architectures():
    """DEFAULT_PARAMETERS against the models built on the meta device with the values of the published
    config.json files (Qwen/Qwen2-VL-7B-Instruct, laion/CLIP-ViT-H-14-laion2B-s32B-b79K, openai/clip-vit-large-
    patch14), and the heads' widths against those models."""
    from transformers import CLIPConfig, CLIPModel, Qwen2VLConfig, Qwen2VLModel

    qwen2vl_7b = Qwen2VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3))

    def clip(text_width, text_layers, text_heads, width, layers, heads, projection):
        return CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=text_width, intermediate_size=4 * text_width,
                                           num_hidden_layers=text_layers, num_attention_heads=text_heads,
                                           max_position_embeddings=77),
                          vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                             num_attention_heads=heads, image_size=224, patch_size=14),
                          projection_dim=projection)
    with torch.device("meta"):
        models = {"hpsv3": Qwen2VLModel(qwen2vl_7b), "pickscore": CLIPModel(clip(1024, 24, 16, 1280, 32, 16, 1024)),
                  "clip": CLIPModel(clip(768, 12, 12, 1024, 24, 16, 768))}
    models["aesthetic"] = models["clip"]
    for name, model in models.items():
        assert R.DEFAULT_PARAMETERS[name] == sum(p.numel() for p in model.parameters()), name
    assert R.HEAD_WIDTHS == {"hpsv3": qwen2vl_7b.text_config.hidden_size,
                             "aesthetic": models["clip"].config.projection_dim}


def test_reward_bytes_read_only_local_files(tmp_path):
    for spec in [f"hpsv3@{tmp_path / 'nothing'}", f"clip@{tmp_path / 'nothing'}", "pickscore@no-such/hub-id"]:
        with pytest.raises(ValueError, match="cannot count the parameters of reward .* from local files") as e:
            R.reward_bytes(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        R.reward_bytes("colorfulness, nope")


def test_learned_rewards_load_onto_the_device_they_are_given(clip_folder, hpsv3_folder):
    """build_reward(device=...) reaches the loaders: on the meta device (shapes, no weights) every parameter is
    there, the CLIP backbone's and the aesthetic head's; on the CPU they are fp32 at once, as they run there."""
    for kind in ["clip", "aesthetic"]:
        scorer = build_reward(f"{kind}@{clip_folder[0]}", device="meta").components[0][2]
        assert {p.device.type for p in scorer.parameters()} == {"meta"}, kind
    scorer = build_reward(f"hpsv3@{hpsv3_folder[0]}", device="cpu").components[0][2]
    assert {(p.device.type, p.dtype) for p in scorer.parameters()} == {("cpu", torch.float32)}


LOAD_PROBE = """
import json, sys, threading, time
import reward as R
from transformers import AutoConfig, AutoTokenizer, Qwen2VLModel  # imported before the baseline

def anon():  # resident anonymous memory: what copies cost (the checkpoint's mapped file pages are not in it)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) * 1024

peak, done = [anon()], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
base, sampler = anon(), threading.Thread(target=sample)
sampler.start()
scorer = R.load_hpsv3(sys.argv[1], sys.argv[2])
done.set()
sampler.join()
params = list(scorer.backbone.parameters())
print(json.dumps({"growth": max(peak[0], anon()) - base, "bytes": sum(p.numel() * p.element_size() for p in params),
                  "placed": sorted({(str(p.device), str(p.dtype)) for p in params})}))
"""


def test_hpsv3_is_read_onto_its_device_without_a_second_copy_in_host_memory(hpsv3_folder, tmp_path):
    """A 100 MB bf16 HPSv3 checkpoint (a large embedding) loaded on the CPU, where it runs in fp32: the model is
    205 MB, and host memory grows by that much and not more (reading the whole checkpoint first and casting it
    after would peak at 1.5 times that). The tensors are read one by one straight onto the device."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hpsv3"
    folder.mkdir()
    for f in hpsv3_folder[0].iterdir():  # the config, tokenizer and chat template
        if f.name != "HPSv3.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    state = {k: v.bfloat16() for k, v in load_file(str(hpsv3_folder[0] / "HPSv3.safetensors")).items()}
    state["model.embed_tokens.weight"] = torch.randn(1_600_000, 32, dtype=torch.bfloat16)
    save_file(state, str(folder / "HPSv3.safetensors"))
    del state
    result = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(folder), "cpu"], cwd=HERE, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["placed"] == [["cpu", "torch.float32"]] and got["bytes"] > 200e6
    assert got["growth"] < 1.25 * got["bytes"], got


# ----------------------------------------------------------------------------------------------
# The reward server and client (reward.py serve, --reward-url): loopback only
# ----------------------------------------------------------------------------------------------

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def serving(reward_fn, spec="test", **kw):
    """make_server on a free loopback port, served from a thread; yields the URL."""
    server = R.make_server(reward_fn, spec, "127.0.0.1", 0, **kw)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantised(videos: torch.Tensor) -> np.ndarray:
    """What the server sees, computed with numpy: uint8 (B, F, 3, H, W)."""
    return np.rint(np.clip(videos.numpy(), 0, 1) * np.float32(255)).astype(np.uint8)


def call(url, body=None):
    """(status, JSON answer) of one request; errors are answers too."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with NO_PROXY.open(urllib.request.Request(url, data=data), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(array: np.ndarray, fmt="PNG", mode=None) -> str:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def write_reward_file(tmp_path, source: str) -> Path:
    path = tmp_path / "user_reward.py"
    path.write_text("import torch\n" + source)
    return path


VIDEOS = torch.rand(3, 4, 3, 9, 11, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a cat", "a red car on a road", ""]


# ------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("spec, frames", [("colorfulness", "mean"),
                                          ("temporal_consistency=1, colorfulness=0.5, sharpness=-0.01", "top:0.3")])
def test_round_trip_equals_local_reward_on_quantised_videos(spec, frames):
    local = R.build_reward(spec, frames)
    q = torch.from_numpy(quantised(VIDEOS)).float() / 255
    expected = local(q, PROMPTS)
    with serving(local, spec) as url:
        got = R.remote_reward(url)(VIDEOS, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Sanity of the test itself: quantisation changes the scores, so matching is informative.
    assert not torch.equal(local(VIDEOS, PROMPTS), expected)


def test_round_trip_keeps_pixel_positions_and_prompt_order(tmp_path):
    # A reward that weights every pixel differently and adds the prompt length: any
    # transposition, channel swap or reordering on the way would change the answer.
    path = write_reward_file(tmp_path, (
        "def probe(videos, prompts):\n"
        "    w = torch.arange(videos[0].numel(), dtype=torch.float64).reshape(videos.shape[1:])\n"
        "    return (videos.double() * w).sum((1, 2, 3, 4)).float() / 1e4 + "
        "torch.tensor([float(len(p)) for p in prompts])\n"))
    q = quantised(VIDEOS).astype(np.float64) / 255
    w = np.arange(q[0].size, dtype=np.float64).reshape(q.shape[1:])
    expected = (q * w).sum((1, 2, 3, 4)) / 1e4 + np.array([len(p) for p in PROMPTS])
    with serving(R.build_reward(f"{path}:probe"), "probe") as url:
        got = R.remote_reward(url + "/")(VIDEOS, PROMPTS)  # a trailing slash is fine
    np.testing.assert_allclose(got.numpy(), expected.astype(np.float32), rtol=1e-6)


def test_jpeg_frames_are_close_and_the_callable_looks_like_a_reward():
    videos = torch.full((2, 2, 3, 16, 16), 0.25)
    videos[1] = 0.75
    with serving(R.build_reward("brightness"), "brightness") as url:
        fn = R.remote_reward(url, image_format="jpeg")
        got = fn(videos, ["a", "b"])
    assert fn.name == fn.__name__ == url
    torch.testing.assert_close(got, torch.tensor([64 / 255, 191 / 255]), rtol=0, atol=2 / 255)
    assert pickle.loads(pickle.dumps(fn)).name == url  # a class, not a closure: it pickles


IDLE = {"slots": 2, "busy": 0, "waiting": 0, "saturated": False}


def test_health():
    with serving(R.build_reward("colorfulness"), "colorfulness") as url:
        assert call(url + "/health") == (200, {"ok": True, "reward": "colorfulness", **IDLE})
        status, answer = call(url + "/nowhere")
        assert status == 404 and "error" in answer


def wait_for(condition, seconds=10.0):
    """Poll `condition()` until it returns something true; that value (an AssertionError after `seconds`)."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
    return value


def test_health_reports_busy_slots_and_saturation():
    release = threading.Event()
    with serving(lambda v, p: release.wait(10) and torch.zeros(len(p))) as url:
        health = lambda: call(url + "/health")[1]  # noqa: E731
        body = {"prompts": ["a"], "videos": [[b64(RED)]]}
        answers = []
        clients = [threading.Thread(target=lambda: answers.append(call(url + "/score", body))) for _ in range(3)]
        try:
            for client in clients:  # one scored, one decoded and waiting for the reward, one waiting for a slot
                client.start()
            state = wait_for(lambda: (h := health())["waiting"] == 1 and h)
            assert state == {"ok": True, "reward": "test", "slots": 2, "busy": 2, "waiting": 1, "saturated": True}
        finally:
            release.set()
            for client in clients:
                client.join(timeout=10)
        assert [status for status, _ in answers] == [200] * 3
        assert wait_for(lambda: health()["busy"] == 0) and health() == {"ok": True, "reward": "test", **IDLE}


# ---------------------------------------------------------------------- bad requests
RED = np.zeros((4, 5, 3), np.uint8)
RED[..., 0] = 255


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    ([1, 2], '"prompts"'),
    ({"prompts": ["a"]}, '"videos"'),
    ({"prompts": [1], "videos": [[b64(RED)]]}, '"prompts"'),
    ({"prompts": ["a"], "videos": [[]]}, '"videos"'),
    ({"prompts": ["a", "b"], "videos": [[b64(RED)]]}, "2 prompts for 1 videos"),
    ({"prompts": ["a"], "videos": [["%%%"]]}, "video 0 frame 0: cannot decode"),
    ({"prompts": ["a"], "videos": [[base64.b64encode(b"hello").decode()]]}, "cannot decode"),
    ({"prompts": ["a"], "videos": [[b64(RED), 7]]}, "video 0 frame 1: cannot decode"),
    ({"prompts": ["a"], "videos": [[b64(RED, "GIF")]]}, "cannot decode"),
    ({"prompts": ["a"], "videos": [[b64(np.zeros((4, 5, 4), np.uint8))]]}, "mode is RGBA"),
    ({"prompts": ["a", "b"], "videos": [[b64(RED)], [b64(RED[:3])]]}, "video 1 frame 0: cannot decode: 5x3, but video 0 frame 0 is 5x4"),
    ({"prompts": ["a", "b"], "videos": [[b64(RED)], [b64(RED), b64(RED)]]}, "different frame counts"),
])
def test_bad_requests_get_400_and_one_line(body, message):
    calls = []
    with serving(lambda v, p: calls.append(1) or torch.zeros(len(p))) as url:
        status, answer = call(url + "/score", body)
    assert status == 400 and message in answer["error"] and "\n" not in answer["error"]
    assert not calls


def png_header(width: int, height: int) -> str:
    """A PNG whose header claims width x height RGB pixels and holds no pixel data: base64."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's warning; the server refuses it
@pytest.mark.parametrize("body, message", [
    (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),                              # absurd nesting
    ({"prompts": ["a"], "videos": [[png_header(12000, 12000)]]}, "pixels a frame"),   # a decompression bomb
    ({"prompts": ["a", "b"], "videos": [[png_header(4000, 4000)] * 9] * 2}, "pixels a request"),
    ({"prompts": ["a"], "videos": [[b64(RED)] * 70000]}, "over the limit of 65536"),  # absurd frame count
])
def test_requests_too_large_to_decode_get_400_before_decoding(body, message, monkeypatch):
    decoded = []
    monkeypatch.setattr(np, "asarray", lambda *a, **k: decoded.append(1) or pytest.fail("a frame was decoded"))
    with serving(lambda v, p: torch.zeros(len(p))) as url:
        status, answer = call(url + "/score", body)
    assert status == 400 and message in answer["error"] and not decoded, answer


def test_content_length_must_be_there_and_not_negative():
    with serving(lambda v, p: torch.zeros(len(p))) as url:
        host, port = url.removeprefix("http://").split(":")
        for length, status in (("-1", 400), (None, 411)):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.putrequest("POST", "/score")
            if length is not None:
                conn.putheader("Content-Length", length)
            conn.endheaders()
            response = conn.getresponse()
            assert response.status == status, (length, response.status)
            conn.close()


def stalled_client(url, head=b"POST /score HTTP/1.0\r\nContent-Length: 100000\r\n\r\n", part=b'{"prompts": ['):
    """A client that sends `head` and `part` of its body, then nothing: its socket."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head + part)
    return sock


def test_stalled_clients_are_dropped_at_the_read_deadline_and_free_their_slots():
    with serving(lambda v, p: torch.ones(len(p)), read_timeout=1.0) as url:
        t0 = time.monotonic()
        stalled = [stalled_client(url) for _ in range(2)]  # both slots held, /health still answers
        try:
            assert wait_for(lambda: call(url + "/health")[1]["saturated"], 0.8)
            # The valid request waits for a slot until the stalled ones are dropped, one read deadline after
            # they connected (it used to wait for the 300 s socket timeout).
            assert R.remote_reward(url, timeout=10, retries=1)(VIDEOS, PROMPTS).tolist() == [1.0] * 3
            assert time.monotonic() - t0 < 1.0 + 1.0
            for sock in stalled:
                answer = sock.makefile("rb").read()
                assert answer.startswith(b"HTTP/1.0 408") and b"--read-timeout" in answer, answer
        finally:
            for sock in stalled:
                sock.close()
        assert wait_for(lambda: call(url + "/health")[1]["busy"] == 0)


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_client_that_drips_bytes_is_cut_off_at_the_read_deadline(part):
    """One byte every 0.1 s keeps every socket read short: only a deadline on the whole request ends it."""
    head = b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n"
    drip = (head[:-2] + b"X-Pad: " + b"a" * 1000) if part == "headers" else b"1" * 1000
    with serving(lambda v, p: torch.ones(len(p)), read_timeout=1.0) as url:
        sock = stalled_client(url, b"" if part == "headers" else head, b"")
        t0, answer = time.monotonic(), b""
        try:
            for i in range(len(drip)):
                if select.select([sock], [], [], 0.1)[0] or time.monotonic() - t0 > 5:
                    break  # an answer, or the end of the connection
                sock.send(drip[i:i + 1])
            elapsed = time.monotonic() - t0
            answer = sock.recv(1 << 16)  # 408 (body), or closed without an answer (headers)
        except (ConnectionResetError, BrokenPipeError):  # closed while bytes were still coming in
            elapsed = time.monotonic() - t0
        finally:
            sock.close()
    assert 0.9 < elapsed < 1.8, elapsed
    assert answer == b"" or (part == "body" and answer.startswith(b"HTTP/1.0 408")), answer


def test_waiting_for_a_slot_does_not_count_against_the_read_deadline():
    """Three requests, two slots, 0.6 s of scoring each, a 0.4 s read deadline: the third waits ~0.6 s for a
    slot with most of its body unread (64 kB: more than the server reads with the headers), and is still read."""
    videos = torch.rand(1, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # noise: large PNGs
    with serving(lambda v, p: time.sleep(0.6) or torch.ones(len(p)), read_timeout=0.4) as url:
        results = []
        fn = R.remote_reward(url, timeout=30, retries=1)
        clients = [threading.Thread(target=lambda: results.append(fn(videos, ["a"]).tolist())) for _ in range(3)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=30)
    assert results == [[1.0]] * 3


def test_fifty_clients_at_once_are_queued_not_reset():
    """50 clients connect while the server is not yet accepting: the listen backlog must hold them all (with
    the default backlog of 5 the kernel drops the others' connection requests, and they time out or reset)."""
    server = R.make_server(lambda v, p: torch.zeros(len(p)), "test", "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    clients = []
    try:
        for _ in range(50):
            clients.append(socket.create_connection(server.server_address, timeout=0.5))
        thread.start()
        for c in clients:
            c.settimeout(10)
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = [c.makefile("rb").readline() for c in clients]
        assert all(a.startswith(b"HTTP/1.0 200") or a.startswith(b"HTTP/1.1 200") for a in answers), answers
    finally:
        for c in clients:
            c.close()
        if thread.is_alive():
            server.shutdown()
        server.server_close()


def test_a_complex_or_infinite_total_reward_is_refused():
    with serving(lambda v, p: torch.zeros(len(p), dtype=torch.complex64)) as url:
        status, answer = call(url + "/score", {"prompts": ["a"], "videos": [[b64(RED)]]})
    assert status == 422 and "complex" in answer["error"]
    fn = build_reward("temporal_consistency=1e39,brightness")                          # finite parts, inf sum
    with pytest.raises(RewardError, match="temporal_consistency=1e39,brightness' returned NaN or inf"):
        fn(torch.rand(2, 3, 3, 8, 8), ["a", "b"])


def test_valid_jpeg_request_and_oversized_body():
    def fn(videos, prompts):
        return videos.mean((1, 2, 3, 4))
    body = {"prompts": ["a"], "videos": [[b64(RED, "JPEG")]]}
    with serving(fn) as url:
        status, answer = call(url + "/score", body)
        assert status == 200 and answer["rewards"][0] == pytest.approx(1 / 3, abs=0.02)
    with serving(fn, max_request_mb=1e-4) as url:  # 100 bytes
        status, answer = call(url + "/score", b"x" * 5000)
    assert status == 413 and "limit" in answer["error"]


# ------------------------------------------------------------------- reward failures
def test_nan_reward_is_a_reward_error_naming_the_reward(tmp_path):
    path = write_reward_file(tmp_path, "def nan_reward(videos, prompts):\n"
                                       "    return torch.full((videos.shape[0],), float('nan'))\n")
    spec = f"{path}:nan_reward"
    built, calls = R.build_reward(spec), []
    with serving(lambda v, p: calls.append(1) or built(v, p), spec) as url:
        with pytest.raises(R.RewardError, match=r"HTTP 422.*nan_reward.* NaN or inf for 3 of 3"):
            R.remote_reward(url, backoff=5)(VIDEOS, PROMPTS)  # a 4xx is not retried: no 5 s wait
    assert len(calls) == 1


@pytest.mark.parametrize("out, message", [
    (torch.tensor([1.0, float("inf"), 0.0]), "NaN or inf for 1 of 3"),
    (torch.zeros(2), "shape (2,), expected (3,)"),
    ([0.0, 1.0, 2.0], "returned list"),
])
def test_unchecked_reward_outputs_are_checked_by_the_server(out, message):
    with serving(lambda v, p: out, "raw") as url:
        status, answer = call(url + "/score", {"prompts": ["a"] * 3, "videos": [[b64(RED)]] * 3})
    assert status == 422 and "'raw'" in answer["error"] and message in answer["error"]


def test_5xx_is_retried_then_named():
    calls = []

    def flaky(videos, prompts):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory\n(details)")
        return torch.ones(len(prompts))
    with serving(flaky) as url:
        assert R.remote_reward(url, backoff=0.01)(VIDEOS, PROMPTS).tolist() == [1.0] * 3
        assert len(calls) == 2
        calls.clear()
        with serving(lambda v, p: 1 / 0) as url2:
            with pytest.raises(R.RewardError, match=re.escape(
                    f"reward server {url2} did not answer after 2 tries: HTTP 500: ZeroDivisionError: division by zero")):
                R.remote_reward(url2, retries=2, backoff=0.01)(VIDEOS, PROMPTS)


def test_server_down_is_a_reward_error_naming_the_url():
    url = f"http://127.0.0.1:{closed_port()}/"
    t0 = time.monotonic()
    with pytest.raises(R.RewardError, match=re.escape(f"reward server {url} did not answer after 3 tries: "
                                                      "Connection refused")):
        R.remote_reward(url, timeout=1, retries=3, backoff=0.05)(VIDEOS, PROMPTS)
    assert 0.15 <= time.monotonic() - t0 < 5  # waited 0.05 + 0.1 s between the tries


def test_timeout_is_retried_then_named():
    with serving(lambda v, p: time.sleep(0.4) or torch.zeros(len(p))) as url:
        with pytest.raises(R.RewardError, match=r"did not answer after 2 tries: timed out after 0.1 s"):
            R.remote_reward(url, timeout=0.1, retries=2, backoff=0.01)(VIDEOS, PROMPTS)


def test_reward_calls_are_serialised():
    active, peak = [0], [0]

    def slow(videos, prompts):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        active[0] -= 1
        return torch.zeros(len(prompts))
    with serving(slow) as url:
        fn = R.remote_reward(url)
        threads = [threading.Thread(target=fn, args=(VIDEOS, PROMPTS)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert peak[0] == 1


# ------------------------------------------------------------------ client checks
class _FakeServer(threading.Thread):
    """Answers every POST with a fixed body, to test what the client accepts."""

    def __init__(self, body: bytes):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        super().__init__(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)


@pytest.mark.parametrize("body, message", [
    (b'{"rewards": [1.0, 2.0]}', "shape (2,), expected (3,)"),
    (b'{"rewards": [1.0, NaN, 2.0]}', "NaN or inf for 1 of 3"),
    (b'{"rewards": [1.0, 1e39, 2.0]}', "NaN or inf for 1 of 3"),
    (b'{"rewards": [1.0, "2", 3.0]}', "expected"),
    (b'{"rewards": [1.0, true, 3.0]}', "expected"),
    (b'[1.0, 2.0, 3.0]', "expected"),
    (b"<html>", "answered <html>, expected"),
])
def test_client_checks_the_answer(body, message):
    fake = _FakeServer(body)
    fake.start()
    try:
        with pytest.raises(R.RewardError, match=re.escape(message)):
            R.remote_reward(fake.url, retries=1)(VIDEOS, PROMPTS)
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def test_client_checks_its_input_and_arguments():
    fn = R.remote_reward(f"http://127.0.0.1:{closed_port()}", retries=1)
    bad = VIDEOS.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(R.RewardError, match="NaN or inf"):  # before any connection
        fn(bad, PROMPTS)
    with pytest.raises(ValueError, match="2 prompts for 3 videos"):
        fn(VIDEOS, PROMPTS[:2])
    with pytest.raises(ValueError, match="http://"):
        R.remote_reward("127.0.0.1:8000")
    with pytest.raises(ValueError, match="image_format"):
        R.remote_reward("http://x", image_format="webp")
    with pytest.raises(ValueError, match="retries >= 1"):
        R.remote_reward("http://x", retries=0)
    for timeout in (0, -1, float("nan"), float("inf"), "10", True):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            R.remote_reward("http://x", timeout=timeout)
    with pytest.raises(ValueError, match="backoff"):
        R.remote_reward("http://x", backoff=float("nan"))
    with pytest.raises(ValueError, match="stop must be a callable"):
        R.remote_reward("http://x", stop=True)
    with pytest.raises(ValueError, match="bad reward server URL"):
        R.remote_reward("http://x:99999")


@contextlib.contextmanager
def raw_server(handle):
    """A TCP server on a free loopback port running handle(connection) in a thread per client, to play
    misbehaving reward servers; yields (URL, the list of connections accepted so far)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    done, accepted = threading.Event(), []

    def serve_one(conn):
        with conn, contextlib.suppress(OSError):
            handle(conn)

    def accept():
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                accepted.append(conn)
                threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()


def read_request(conn) -> bytes:
    """Read one HTTP request with a Content-Length from `conn`; its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(1 << 16)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)[1])
    while len(body) < length:
        body += conn.recv(1 << 16)
    return body


def test_the_client_deadline_bounds_a_whole_try():
    """A server that drips its answer one byte every 0.1 s: each socket read is short, the try is not."""
    def drip(conn):
        read_request(conn)
        for byte in b"HTTP/1.0 200 OK\r\n" + b"X-Pad: " + b"a" * 200:
            conn.sendall(bytes([byte]))
            time.sleep(0.1)
    with raw_server(drip) as (url, _):
        t0 = time.monotonic()
        with pytest.raises(R.RewardError, match=r"after 1 tries: timed out after 1 s"):
            R.remote_reward(url, timeout=1, retries=1)(VIDEOS, PROMPTS)
        assert time.monotonic() - t0 < 1.6


def test_a_stop_request_ends_the_call_within_a_deadline():
    silent = threading.Event()  # a server that reads the request and never answers
    with raw_server(lambda conn: read_request(conn) and silent.wait(30)) as (url, accepted):
        try:
            t0 = time.monotonic()
            stop = lambda: time.monotonic() > t0 + 0.5  # noqa: E731  (SIGTERM half a second in)
            with pytest.raises(R.RewardStopped) as e:  # while waiting for the answer to the first try
                R.remote_reward(url, timeout=3, retries=3, backoff=0.01, stop=stop)(VIDEOS, PROMPTS)
            assert 0.5 <= time.monotonic() - t0 < 1.5 and len(accepted) == 1  # not 3 x 3 s
            assert isinstance(e.value, R.RewardError) and str(e.value) == (
                f"stopped waiting for reward server {url}: the run was asked to stop")
            with pytest.raises(R.RewardStopped):  # asked before the call: no request is sent
                R.remote_reward(url, stop=lambda: True)(VIDEOS, PROMPTS)
            assert len(accepted) == 1
        finally:
            silent.set()
    t0 = time.monotonic()  # between tries: the server is down, the backoff would wait 5 s
    with pytest.raises(R.RewardStopped):
        R.remote_reward(f"http://127.0.0.1:{closed_port()}", retries=3, backoff=5,
                        stop=lambda: time.monotonic() > t0 + 0.3)(VIDEOS, PROMPTS)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("length", [True, False])
def test_the_client_refuses_an_answer_over_its_limit_without_reading_it(length):
    """300 MB announced (then nothing), or 64 MB streamed without a Content-Length: either way the client stops
    at its limit, 1 MB + 100 bytes a video, instead of reading it all into memory."""
    sent, finished = [0], threading.Event()

    def huge(conn):
        read_request(conn)
        try:
            conn.sendall(b"HTTP/1.0 200 OK\r\n" + b"Content-Length: 300000000\r\n" * length + b"\r\n")
            for _ in range(1024 if not length else 0):
                conn.sendall(b"1" * (1 << 16))
                sent[0] += 1 << 16
            time.sleep(5 if length else 0)
        finally:
            finished.set()
    with raw_server(huge) as (url, _):
        t0 = time.monotonic()
        limit = r"its answer \(HTTP 200, .*\) is over the client's limit of 1,000,300 bytes"  # 3 videos
        with pytest.raises(R.RewardError, match=limit):
            R.remote_reward(url, timeout=30, retries=3, backoff=0.01)(VIDEOS, PROMPTS)  # not retried either
        assert time.monotonic() - t0 < 3
        if not length:
            assert finished.wait(10) and sent[0] < 32 << 20  # the client hung up early: the rest was not sent


# ---------------------------------------------------------------------------- CLI
def test_cli_serves_a_reward():
    proc = subprocess.Popen([sys.executable, "reward.py", "serve", "--reward", "brightness", "--port", "0"],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline, line = time.monotonic() + 30, ""
        while not line.endswith("\n") and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                line += proc.stdout.readline()
        match = re.fullmatch(r"reward server listening on (http://127\.0\.0\.1:(\d+)) "
                             r"\(reward: brightness, frames: top:0\.3, device: cpu\)\n", line)
        assert match and int(match[2]) > 0, line
        url = match[1]
        assert call(url + "/health") == (200, {"ok": True, "reward": "brightness", **IDLE})
        got = R.remote_reward(url)(VIDEOS, PROMPTS)
        # Independently: mean BT.601 luma per frame, then the mean of the best ceil(0.3 * 4) = 2 frames.
        q = quantised(VIDEOS).astype(np.float64) / 255
        luma = (0.299 * q[:, :, 0] + 0.587 * q[:, :, 1] + 0.114 * q[:, :, 2]).mean((2, 3))
        expected = np.sort(luma, axis=1)[:, -2:].mean(1)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("argv, message", [
    (["serve", "--reward", "nope"], "reward.py serve: error: unknown reward 'nope'"),
    (["serve", "--reward", "brightness", "--reward-frames", "max"], "bad frame aggregation"),
    (["serve"], "--reward"),
    ([], "required"),
    (["serve", "--reward", "brightness", "--port", "70000"], "--port"),
    (["serve", "--reward", "brightness", "--port", "x"], "--port"),
    (["serve", "--reward", "brightness", "--device", "gpu"], "--device"),
    (["serve", "--reward", "hpsv3@/no/such/folder"], "huggingface-cli download"),
])
def test_cli_errors_exit_2(argv, message, capsys):
    try:
        status = R.main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err


@pytest.mark.parametrize("argv, message", [
    (["serve", "--reward", "brightness", "--max-request-mb", "0"], "--max-request-mb"),
    (["serve", "--reward", "brightness", "--max-request-mb", "nan"], "--max-request-mb"),
    (["serve", "--reward", "brightness", "--max-pixels", "-5"], "--max-pixels"),
    (["serve", "--reward", "brightness", "--read-timeout", "0"], "--read-timeout"),
    (["serve", "--reward", "brightness", "--read-timeout", "inf"], "--read-timeout"),
])
def test_server_limits_must_be_positive(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        R.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="read_timeout"):
        R.make_server(lambda v, p: torch.zeros(len(p)), "test", "127.0.0.1", 0, read_timeout=float("nan"))


def test_cli_port_in_use_is_one_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        status = R.main(["serve", "--reward", "brightness", "--port", str(s.getsockname()[1])])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "cannot listen on 127.0.0.1:" in err


def test_training_with_a_reward_server(tmp_path, capsys):
    local, remote = tmp_path / "local", tmp_path / "remote"
    flags = ["--model", "tiny", "--epochs", "1", "--prompts-per-epoch", "2", "--group-size", "4", "--batch-size", "4",
             "--train-batch-size", "8"]
    fg.train(fg.parse_args([*flags, "--reward", "temporal_consistency", "--output-dir", str(local)]))
    with serving(R.build_reward("temporal_consistency"), "temporal_consistency") as url:
        fg.train(fg.parse_args([*flags, "--reward-url", url, "--output-dir", str(remote)]))
    a, b = logged(local, "rollouts.jsonl")[0]["rewards"], logged(remote, "rollouts.jsonl")[0]["rewards"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 2 / 255   # the same videos, sent as 8-bit PNG frames
    down = f"http://127.0.0.1:{closed_port()}"
    status, err = run_main(capsys, *flags, "--reward-url", down)
    assert status != 0 and down in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------
# bench.py's GPU section: the FLOP count behind MFU, and the same path on CPU with the tiny model
# ----------------------------------------------------------------------------------------------
def counted_flops(model, x, text, train: bool) -> int:
    """FlopCounterMode's count for one forward (and backward) of a batch, per video. On a CPU it does not count
    the default SDPA kernel (its op is not in the registry), so attention runs on the math backend: two bmm in the
    forward, and in the backward their four gradient bmm, i.e. model FLOPs, with no recomputed scores."""
    t = torch.full((x.shape[0],), 500, device=x.device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        out = model(x, t, text, return_dict=False)[0]
        if train:
            out.sum().backward()
    return counter.get_total_flops() // x.shape[0]


@pytest.mark.parametrize("train, lora_rank", [(False, 0), (True, 0), (True, 16)])
def test_flop_formula_matches_flop_counter_on_a_small_model(train, lora_rank):
    # 2 layers, d = 32, 3 x 8 x 10 = 240 video tokens and 16 text tokens: the attention cores, the linear layers
    # and the text path all weigh, as at full size (T/d = 7.5 here, 21 for wan1.3b at 480x832x81)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**dict(fg.preset("wan1.3b")["transformer"], num_attention_heads=2, attention_head_dim=16, text_dim=64,
                                         freq_dim=32, ffn_dim=96, num_layers=2))
    if lora_rank:
        fg.add_lora(model, lora_rank, 32.0)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    x, text = torch.randn(2, 16, 3, 16, 20), torch.randn(2, 16, 64)        # batch 2, as CFG's two branches
    expected = bench.transformer_flops(model.config, 3 * 8 * 10, 16, train, lora_rank)
    # exact: both count the same matmuls, and neither counts elementwise work
    assert expected == counted_flops(model, x, text, train)


@pytest.mark.parametrize("model", ["wan1.3b", "wan14b"])
def test_flop_formula_matches_flop_counter_at_full_size_on_the_meta_device(model):
    """The published architectures at the paper's 480x832, 81 frames (21 x 30 x 52 tokens) and 512 text tokens:
    shapes only, no memory or compute."""
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**fg.preset(model)["transformer"])
        x, text = torch.randn(1, 16, 21, 60, 104), torch.randn(1, 512, 4096)
    counted = counted_flops(transformer, x, text, train=False)
    assert bench.transformer_flops(transformer.config, 21 * 30 * 52, 512) == counted
    assert counted == {"wan1.3b": 283_001_787_777_024, "wan14b": 1_678_370_283_192_320}[model]


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L4", None)])
def test_peak_table_by_device_name(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
    got, why = bench.peak_tflops(None)
    assert got == peak and (why is None) == (peak is not None)
    assert bench.peak_tflops(500.0) == (500.0, None)                       # --peak-tflops wins


def test_gpu_section_runs_on_cpu_with_the_tiny_model(tmp_path, capsys):
    bench.main(["--gpu-only", "--model", "tiny", "--num-steps", "2", "--out", str(tmp_path)])
    assert "MFU: n/a on CPU" in capsys.readouterr().out
    r = json.loads((tmp_path / "gpu_tiny.json").read_text())["gpu"]
    assert r["workload"] == {"frames": 5, "height": 32, "width": 32, "steps": 2, "tokens_per_video": 8,
                             "text_tokens": 32, "videos_per_epoch": 2, "batch_size": 1, "cfg_branches": 2,
                             "fine_tuning": "LoRA rank 16", "gradient_checkpointing": True, "weights": "random"}
    assert r["s_per_rollout_video"] > 0 and r["s_per_trained_sample"] > 0
    assert r["mfu_training"] is None and r["mfu_sampling"] is None and r["peak_memory"] is None
    assert r["train_flops_per_sample"] > 2 * r["forward_flops_per_video"] > 0   # both CFG branches train
    # the printout of what only a GPU measures
    memory = {"allocated_gb": 1.0, "reserved_gb": 2.0}
    bench.print_gpu({**r, "peak_memory": {"sampling": memory, "training": memory}, "peak_bf16_tflops": 989.4,
                     "mfu_sampling": 0.25, "mfu_training": 0.5, "mfu_note": "model FLOPs"})
    out = capsys.readouterr().out
    assert "MFU 25.0%" in out and "MFU 50.0%" in out and "1.00 GB allocated / 2.00 GB reserved" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_wan_models_on_cpu_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--gpu-only", "--model", "wan1.3b"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "too large for a CPU" in err


def test_race_summary_and_plots_from_runs(tmp_path):
    """Section 4's summary of its runs (as `bench.race` returns them): the held-out score nearest half the
    budget and at the end over the seeds, the best, the rollouts' last fifth; a figure of the paper's arms and
    one of Flash-GRPO beside the arms beyond them."""
    def run(evals):
        return {"group_spread": 0.1, "groups_all_equal": 0.5, "curve": [(100, 0.5), (200, 0.6)], "eval": evals}

    results = {"micro_adherence": {"flash": [run([(0, 0.5), (100, 0.6), (200, 0.7)]),
                                             run([(0, 0.5), (100, 0.8), (200, 0.9)])],
                                   "flow_grpo": [run([(0, 0.5), (200, 0.55)])],
                                   "flash, noise x2": [run([(0, 0.5), (90, 0.9), (200, 0.6)])]}}
    table = bench.race_table(results)["micro_adherence"]
    assert table["flash"]["half"] == pytest.approx(0.7) and table["flash"]["final"] == pytest.approx(0.8)
    assert table["flash"]["final_std"] == pytest.approx(0.2 / math.sqrt(2)) and table["flash"]["best"] == pytest.approx(0.8)
    assert table["flash, noise x2"]["half"] == pytest.approx(0.9) and table["flow_grpo"]["half_std"] == 0.0
    assert table["flash"]["late_rollouts"] == pytest.approx(0.6) and table["flash"]["seeds"] == 2
    written = bench.plot_race(results, tmp_path)
    assert written == ["race_micro_adherence.png", "race_more_micro_adherence.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)


def test_no_line_of_flash_grpo_is_longer_than_110_characters():
    """The single file is read side by side with the paper: its lines fit 110 characters."""
    long = [i for i, line in enumerate((HERE / "flash_grpo.py").read_text().splitlines(), 1) if len(line) > 110]
    assert not long, f"lines over 110 characters: {long}"
