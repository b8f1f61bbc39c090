"""
Flash-GRPO: one-step group relative policy optimization for flow-matching video models.

A single-file reference implementation of

    Flash-GRPO: Efficient Alignment for Video Diffusion via One-Step Policy Optimization
    He, Fu, Xue, Wang, He, Li, Yin, Dong, Huang, Wang, Duan, Zhuang (arXiv 2605.15980, ICML 2026)

for Wan2.1 text-to-video models (diffusers format). Every rollout is a deterministic ODE but for ONE SDE step
k*, the only one that trains; iso-temporal grouping gives the G rollouts of a prompt the same k*; temporal
gradient rectification scales each sample's loss by 1/lambda(t_k*), normalised to mean 1. Read it top to
bottom beside the paper: the configuration, the models, the method, the trainer and its loop, then the
plumbing. The baselines the paper compares with switch `exploration_plan` over the same sampler and loss.

    python flash_grpo.py --model micro --output-dir runs/micro  # the micro video model, CPU, ~4 minutes
    torchrun --nproc_per_node 8 flash_grpo.py --model wan14b   # one node; add --resume to continue a run
    python flash_grpo.py --help                                 # every flag

Where it departs from the paper's public release, it says so in a `# Note:` (the README lists them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils import export_to_video
from einops import rearrange
from peft import LoraConfig
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm.auto import tqdm
from transformers import AutoTokenizer, ByT5Tokenizer, UMT5Config, UMT5EncoderModel

import reward as reward_lib

HERE = Path(__file__).resolve().parent


# ---- Configuration: the model presets, and one dataclass of flags whose defaults are the release's recipe
# A preset is a JSON file: the architectures (the arguments of WanTransformer3DModel, UMT5's encoder and
# AutoencoderKLWan) that --init random and --dry-run build, the weights ('repo' on the hub, or 'weights', a
# folder beside the file), the prompt files, 'args' (defaults of Args; the command line still wins) and
# 'max_batch_size' (the cap of the default --batch-size).
# Note: the paper shows 14B results but publishes no recipe; wan14b keeps the 1.3B recipe.
MODEL_PRESETS = {"tiny": HERE / "tiny_config.json",   # random weights, the real classes, CPU-sized
                 "micro": HERE / "micro" / "config.json",  # build_micro.py's model, trained on moving shapes
                 "wan1.3b": HERE / "presets" / "wan1.3b.json", "wan14b": HERE / "presets" / "wan14b.json"}


def preset(model: str) -> dict:
    p = json.loads(MODEL_PRESETS[model].read_text())
    return {**p, "folder": MODEL_PRESETS[model].parent}


def arg(default, help: str, bounds: str | None = None, choices: tuple | None = None, fixed: bool = False):
    """A flag: its default, its --help, the values it accepts (an interval such as "[1, inf)", or choices),
    and fixed=True if a resumed run must keep it (`run_identity`)."""
    return field(default=default, metadata=dict(help=help, bounds=bounds, choices=choices, fixed=fixed))


@dataclass
class Args:
    # model and data
    model: str = arg("wan1.3b", "tiny (random, CPU), micro (trained on moving shapes, CPU), wan1.3b, wan14b",
                     choices=tuple(MODEL_PRESETS), fixed=True)
    model_path: str | None = arg(None, "local diffusers folder or hub id, instead of the preset's")
    init: str = arg("pretrained", "or random: the real-size architecture with random weights, no download",
                    choices=("pretrained", "random"), fixed=True)
    prompts: str | None = arg(None, "text file, one training prompt per line (default: built-in prompts)")
    eval_prompts: str | None = arg(None, "text file of held-out evaluation prompts (default: built-in)")
    num_eval_prompts: int = arg(4, "held-out prompts sampled at each evaluation", "[1, inf)")
    output_dir: str | None = arg(None, "metrics, videos, checkpoints (none without); one run at a time")
    embedding_cache: str | None = arg(None, "prompt-embedding cache, shared by runs, seen by every rank "
                                      "(default: OUTPUT_DIR/embeddings, or a temporary folder)")
    # video and sampler: Wan2.1's, and Flow-GRPO's SDE
    height: int = arg(480, "video height in pixels, a multiple of 16", "[16, inf)", fixed=True)
    width: int = arg(832, "video width in pixels, a multiple of 16", "[16, inf)", fixed=True)
    num_frames: int = arg(81, "frames per video, 4k+1", "[1, inf)", fixed=True)
    num_steps: int = arg(20, "rollout denoising steps N", "[1, 1000]", fixed=True)  # 1000: the timesteps
    eval_steps: int = arg(50, "deterministic ODE steps for evaluation videos", "[1, 1000]")
    shift: float = arg(3.0, "flow-grid shift (3 for 480p Wan2.1, 5 at 720p)", "(0, inf)", fixed=True)
    guidance_scale: float = arg(4.5, "CFG w, in rollouts and in training (1: none)", "[1, inf)", fixed=True)
    negative_prompt: str = arg("", "negative prompt for CFG", fixed=True)
    max_sequence_length: int = arg(512, "text tokens per prompt (Wan: 512)", "[1, inf)", fixed=True)
    noise_schedule: str = arg("linear", "the SDE's noise level: linear, g = g_max sigma (the release), or "
                              "flow_grpo, g = a sqrt(sigma / (1 - sigma))", choices=("linear", "flow_grpo"),
                              fixed=True)
    noise_level: float | None = arg(None, "g_max (default sigma_1), or a (default 0.7)", "(0, inf)",
                                    fixed=True)
    # which steps explore and train: Flash-GRPO, or the baselines of the paper's Figures 4 and 5 and ablations
    algo: str = arg("flash", "flash (one SDE step per rollout), flow_grpo (every step) or flow_grpo_fast (a "
                    "window)", choices=("flash", "flow_grpo", "flow_grpo_fast"), fixed=True)
    itg: bool = arg(True, "iso-temporal grouping: one k* per prompt; --no-itg: one per rollout", fixed=True)
    train_fraction: float = arg(1.0, "flow_grpo: the first int(F x N) steps train (at most N - 1)", "(0, 1]",
                                fixed=True)
    fast_window: int = arg(1, "flow_grpo_fast: SDE steps in the window (1: Fast1)", "[1, inf)", fixed=True)
    # iso-temporal grouping
    group_size: int = arg(8, "G: rollouts per prompt, compared with each other", "[2, inf)", fixed=True)
    prompts_per_epoch: int = arg(4, "prompts per epoch, each sampled G times", "[1, inf)", fixed=True)
    sde_window: int | None = arg(None, "k* is uniform over the first sde_window steps (default: N / 2)",
                                 "[1, inf)", fixed=True)
    # rewards to advantages
    reward: str = arg("hpsv3", "hpsv3 (release), pickscore, aesthetic, clip (NAME@FOLDER: local weights), a "
                      "training-free name, a weighted sum 'a=1,b=0.5', or file.py:function", fixed=True)
    reward_url: str | None = arg(None, "a reward server (reward.py serve), e.g. http://host:8000", fixed=True)
    reward_timeout: float = arg(120.0, "seconds a server's answer is awaited, per try (3 tries)", "(0, inf)")
    reward_frames: str = arg("top:0.3", "per-frame rewards to one: mean or top:FRACTION", fixed=True)
    global_std: bool = arg(True, "advantages over the std of the epoch's rewards (release), or per group",
                           fixed=True)
    adv_clip: float = arg(5.0, "advantages are clipped to [-adv_clip, adv_clip]", "(0, inf)", fixed=True)
    # loss: the clipped GRPO objective, temporal gradient rectification
    clip_range: float = arg(1e-3, "PPO clip range eps on the ratio", "(0, 1)", fixed=True)
    beta: float = arg(0.0, "weight of the KL term to the frozen reference (release: 0)", "[0, inf)",
                      fixed=True)
    tgr: bool | None = arg(None, "temporal gradient rectification (default: for flash only)", fixed=True)
    # optimisation
    learning_rate: float | None = arg(None, "AdamW learning rate (default: 1e-4 with LoRA, the release's; "
                                      "1e-5 for full fine-tuning)", "(0, inf)")
    weight_decay: float = arg(1e-4, "AdamW weight decay", "[0, inf)")
    adam_betas: tuple[float, float] = arg((0.9, 0.999), "AdamW betas", "[0, 1)")
    adam_eps: float = arg(1e-8, "AdamW epsilon", "(0, inf)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip", "(0, inf)", fixed=True)
    batch_size: int | None = arg(None, "videos per rank per forward pass (default: the largest that divides "
                                 "a rank's share of a step, up to 1 for Wan)", "[1, inf)")
    train_batch_size: int | None = arg(None, "rollouts per optimizer step, all ranks (default: an epoch / 2)",
                                       "[1, inf)", fixed=True)
    lora_rank: int = arg(16, "LoRA rank on attention q, k, v, out (0: full fine-tuning)", "[0, inf)",
                         fixed=True)
    lora_alpha: float = arg(32.0, "LoRA alpha", "(0, inf)", fixed=True)
    ema_decay: float = arg(0.9, "EMA decay of the trained weights (evaluated)", "[0, 1)", fixed=True)
    ema_every: int = arg(8, "optimizer steps between EMA updates", "[1, inf)", fixed=True)
    gradient_checkpointing: bool = arg(True, "recompute transformer activations in the backward pass")
    # run
    epochs: int = arg(1000, "RL epochs (sample, score, train)", "[1, inf)")
    seed: int = arg(0, "seed for prompts, k*, noise and initialisation", "[0, inf)", fixed=True)
    dry_run: int = arg(0, "print bench.py's memory plan for this many GPUs, and exit", "[0, inf)")
    eval_every: int = arg(50, "evaluate every this many epochs and at the end (0: at the end)", "[0, inf)")
    checkpoint_every: int = arg(1, "checkpoint every this many epochs, and at the end", "[1, inf)")
    keep_checkpoints: int = arg(2, "how many of the latest checkpoints to keep", "[1, inf)")
    resume: bool = arg(False, "continue from the latest checkpoint in --output-dir")
    report_to: str | None = arg(None, "also log to tensorboard (OUTPUT_DIR/tensorboard), or to wandb too",
                                choices=("tensorboard", "wandb"))
    max_bad_steps: int = arg(5, "stop after this many steps in a row with non-finite gradients", "[1, inf)")


# ---- Models: Wan2.1 = UMT5 text encoder + WanTransformer3DModel (the policy v_theta) + AutoencoderKLWan ----
@dataclass
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module


def weights_path(args: Args) -> Path | str | None:
    p = preset(args.model)
    if "weights" in p or (args.init == "pretrained" and "repo" in p):
        return args.model_path or (p["folder"] / p["weights"] if "weights" in p else p["repo"])
    return None


def fingerprint(args: Args, *parts: str):
    """What the named parts' weights are, without reading them: their files' names and sizes in the weights
    folder (Wan2.1 1.3B and 14B share UMT5-XXL's), the hub id, or the random architecture and seed."""
    path = weights_path(args)
    if path is None:
        return [args.model, args.seed, *(preset(args.model).get(part) for part in parts)]
    files = [f for part in parts for f in (Path(path) / part).rglob("*") if f.is_file()]
    return sorted([str(f.relative_to(path)), f.stat().st_size] for f in files) or str(path)


def load_models(args: Args, master: bool = True, text_encoder: bool = True, device: str = "cpu") -> Models:
    """The preset's models, pretrained (`weights_path`) or random. Only rank 0 (master) materialises the
    transformer; the others build it on the meta device and receive their shards (`build_policy`). Without
    text_encoder, no tokenizer nor text encoder (11 GB): only ranks with prompts to encode load them."""
    p, path = preset(args.model), weights_path(args)
    text_dtype = torch.bfloat16 if "repo" in p else torch.float32  # UMT5-XXL as WanPipeline runs it
    tokenizer = encoder = None
    if path is not None:  # diffusers format
        try:
            if text_encoder:
                tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
                encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=text_dtype)
            vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
            config = WanTransformer3DModel.load_config(path, subfolder="transformer")
            with torch.device("meta"):
                transformer = None if master else WanTransformer3DModel.from_config(config)
            transformer = transformer or WanTransformer3DModel.from_pretrained(path, subfolder="transformer",
                                                                               torch_dtype=torch.float32)
        except (OSError, ValueError) as e:  # the preset says how to get them
            raise RunError(f"could not load the {args.model} weights from {path!r} ({type(e).__name__}); "
                           f"{p['missing']}") from None
        return Models(tokenizer, encoder, transformer, vae)
    # Random weights, each part from its own seed: a part is the same whether or not the others are built.
    # Note: a byte-level tokenizer stands in for UMT5's (which needs a download); the shapes are the same.
    with torch.device(device):
        if text_encoder:  # built in its dtype: no fp32 copy of UMT5-XXL (22 GB)
            tokenizer = ByT5Tokenizer()
            torch.manual_seed(seed_for(args.seed, "text_encoder"))
            config = UMT5Config(**{"vocab_size": len(tokenizer), **p["text_encoder"]}, pad_token_id=0,
                                eos_token_id=1, decoder_start_token_id=0)
            encoder = UMT5EncoderModel._from_config(config, dtype=text_dtype)
        torch.manual_seed(seed_for(args.seed, "vae"))
        vae = AutoencoderKLWan(**p["vae"])
    with torch.device(device if master else "meta"):
        torch.manual_seed(seed_for(args.seed, "transformer"))
        transformer = WanTransformer3DModel(**p["transformer"])
    return Models(tokenizer, encoder, transformer, vae)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the release's: attention q, k, v, out


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float) -> None:
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS))


def latent_shape(args: Args, vae) -> tuple[int, int, int, int]:
    """(C, F', H', W') of a video's latent: Wan2.1's VAE compresses time by 4 and space by 8."""
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    return (vae.config.z_dim, (args.num_frames - 1) // t + 1, args.height // s, args.width // s)


def prepare_vae(vae, device: torch.device):
    """The frozen decoder in fp32, as WanPipeline runs it: the reward judges the frames inference shows. On
    GPUs, tiled (diffusers' 256-pixel tiles): bounded activations for 1.7x the work at 480x832."""
    vae.requires_grad_(False).eval().to(device)
    if device.type == "cuda":
        vae.enable_tiling()
    return vae


@torch.no_grad()
def decode_videos(vae, latents: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Latents (B, C, F', H', W') -> videos (B, F, 3, H, W) in [0, 1], fp32, one video at a time by default (a
    decoded 480x832 video of 81 frames is 388 MB)."""
    config = vae.config
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (config.latents_mean, config.latents_std))
    videos = []
    for chunk in latents.split(batch_size):
        z = chunk.float() * std.to(chunk.device) + mean.to(chunk.device)  # undo the normalisation, fp32
        video = vae.decode(z.to(vae.dtype), return_dict=False)[0]          # (b, 3, F, H, W) in [-1, 1]
        videos.append(rearrange((video.float() + 1) / 2, "b c f h w -> b f c h w").clamp(0, 1))
    return torch.cat(videos)


# ---- Flow-matching SDE sampler (Flow-GRPO's SDE, as the paper uses it; README: The method in one page) ---
#   paper          code                 meaning
#   sigma_k        sigmas[k]            flow time, 1 = noise, 0 = data; x = (1 - sigma) x0 + sigma eps
#   dt_k           dt                   sigma_{k+1} - sigma_k < 0
#   v              v                    velocity prediction (after CFG)
#   g_k            std_dev_t            SDE noise level, g_max * sigma_k (`NoiseLevel`)
#   g_k sqrt|dt_k| std                  std of the Gaussian transition x_k -> x_{k+1}
#   mean_k         prev_sample_mean     mean of that Gaussian
#   log p          log_prob             per-element MEAN log-density of x_{k+1} (not the sum)

def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The release's shifted flow grid: num_steps + 1 sigmas from ~1 down to 0 (Wan2.1's sampling grid).

    s_k = 0.999 (N - k) / N, sigma_k = shift s_k / (1 + (shift - 1) s_k) for k < N, sigma_N = 0.
    # Note: computed from the formula, not taken from the installed diffusers scheduler.
    """
    s = 0.999 * (num_steps - torch.arange(num_steps, dtype=torch.float64)) / num_steps
    sigmas = shift * s / (1 + (shift - 1) * s)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def model_timesteps(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input: int(1000 sigma), as the release (999, 982, 963, ...)."""
    return (sigma.double() * 1000).long()


def _at(sigmas: torch.Tensor, k, x: torch.Tensor) -> torch.Tensor:
    """sigmas[k] broadcastable against x: a CPU 0-dim tensor for an int k (no copy; works with x on any
    device), (B, 1, 1, 1, 1) on x's device for a (B,) tensor k."""
    if isinstance(k, int):
        return sigmas[k]
    return sigmas.to(x.device)[k.to(x.device)].view(-1, *([1] * (x.dim() - 1)))


def ode_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k) -> torch.Tensor:
    """Euler step of the probability-flow ODE: x_{k+1} = x_k + dt_k v."""
    dt = _at(sigmas, k + 1, x) - _at(sigmas, k, x)
    return x + dt * v


@dataclass(frozen=True)
class NoiseLevel:
    """The SDE's noise level g(sigma), chosen once by --noise-schedule and --noise-level:
      linear     g = g_min + (g_max - g_min) sigma, g_min = 0, g_max = level or sigma_1 (the release, Wan);
      flow_grpo  g = a sqrt(sigma / (1 - sigma)), a = level or 0.7 (Flow-GRPO), very large near sigma = 1; as
                 in Flow-GRPO's code, the grid's first sigma (1 on its grid) is sigma_1 under the root.
    Any g works in the sampler, lambda(t) and the loss below."""
    schedule: str = "linear"
    level: float | None = None

    def __call__(self, sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.schedule == "flow_grpo":
            a = 0.7 if self.level is None else self.level
            return a * (sigma / (1 - torch.where(sigma >= sigmas[0], sigmas[1], sigma))).sqrt()
        return (sigmas[1] if self.level is None else self.level) * sigma  # a tensor, not float(): no sync


def sde_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k, g: NoiseLevel = NoiseLevel(),
             prev_sample=None, noise=None):
    """One step of the marginal-preserving SDE and the log-probability of its outcome (Flow-GRPO's).

    x, v: (B, C, F, H, W), fp32. k: an int or a (B,) tensor of step indices (a training batch mixes k*).
    g: the noise level (default: the release's). With prev_sample given, scores it instead of drawing one;
    noise (like x; default: drawn here) is eps.
    Returns (prev_sample, log_prob (B,), prev_sample_mean, std = g_k sqrt|dt_k|).
    """
    sigma, sigma_next = _at(sigmas, k, x), _at(sigmas, k + 1, x)
    dt = sigma_next - sigma                                                  # < 0
    std_dev_t = g(sigmas, sigma)                                             # g_k
    # 1. mean_k = x_k + dt [v + g^2 / (2 sigma) (x_k + (1 - sigma) v)]
    prev_sample_mean = x + dt * (v + std_dev_t**2 / (2 * sigma) * (x + (1 - sigma) * v))
    std = std_dev_t * (-dt).sqrt()                                           # g_k sqrt|dt_k|
    # 2. x_{k+1} = mean_k + g_k sqrt|dt_k| eps
    if prev_sample is None:
        prev_sample = prev_sample_mean + std * (torch.randn_like(x) if noise is None else noise)
    # 3. log N(x_{k+1}; mean_k, std^2), averaged over the D latent elements (keeps ratios near 1)
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std**2)
                - torch.log(std) - 0.5 * math.log(2 * math.pi))
    return prev_sample, log_prob.flatten(1).mean(1), prev_sample_mean, std


def predict_velocity(transformer, x, sigma, embeds, neg_embeds, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance, v = v_uncond + w (v_cond - v_uncond), both branches in one batched forward.

    x: (B, C, F, H, W); sigma: (B,); embeds, neg_embeds: (B, L, D). Returns fp32 (B, C, F, H, W).
    """
    dtype = next(transformer.parameters()).dtype
    t = model_timesteps(sigma).to(x.device)
    if guidance_scale == 1.0:
        return transformer(x.to(dtype), t, embeds.to(dtype), return_dict=False)[0].float()
    out = transformer(torch.cat([x, x]).to(dtype), torch.cat([t, t]),
                      torch.cat([embeds, neg_embeds]).to(dtype), return_dict=False)[0].float()
    v_cond, v_uncond = out.chunk(2)                                          # (B, C, F, H, W) each
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def cfg_branches(guidance_scale: float) -> int:
    """How many videos `predict_velocity` runs through the transformer per input video."""
    return 1 if guidance_scale == 1.0 else 2


@torch.no_grad()
def rollout(transformer, noise, embeds, neg_embeds, sigmas, sde_steps, guidance_scale, sde_generators=None,
            g: NoiseLevel = NoiseLevel(), train_steps=None):
    """Sample videos' latents: ODE steps everywhere, SDE steps where sde_steps[i, k] is True.

    noise: (B, C, F, H, W) x_0 on the device; sde_steps, train_steps (default: sde_steps): (B, N) bool on the
    CPU, so the loop never asks the device which rows explore (no sync). sde_generators[i] draws row i's SDE
    noise on the CPU, whatever its batch-mates or device. Returns the final latents and the transitions that
    train, in row order: x_k, x_{k+1}, log_prob on the device; k and row index on the CPU.
    """
    train_steps = sde_steps if train_steps is None else train_steps
    x, num_steps, device = noise.float(), len(sigmas) - 1, noise.device
    sigmas_dev, explore = sigmas.to(device), to_device(sde_steps, device)    # once per call: (N + 1,), (B, N)
    transitions = {"x_t": [], "x_next": [], "log_prob": [], "k": [], "index": []}
    for k in range(num_steps):
        v = predict_velocity(transformer, x, sigmas_dev[k].expand(len(x)), embeds, neg_embeds, guidance_scale)
        x_next = ode_step(x, v, sigmas, k)                                   # (B, C, F, H, W)
        rows = sde_steps[:, k].nonzero().flatten().tolist()                  # a CPU tensor: no sync
        if rows:
            eps = torch.zeros(x.shape)  # noise for the rows that explore here, each from its own generator
            eps[rows] = torch.stack([torch.randn(x.shape[1:], generator=sde_generators[i]) for i in rows])
            x_sde, log_prob, _, _ = sde_step(x, v, sigmas, k, g, noise=to_device(eps, device))
            trained = train_steps[:, k].nonzero().flatten()                  # of those, the ones that train
            at = to_device(trained, device)
            for name, value in (("x_t", x), ("x_next", x_sde), ("log_prob", log_prob)):
                transitions[name].append(value[at])
            transitions["k"].append(torch.full((len(trained),), k, dtype=torch.long))
            transitions["index"].append(trained)
            x_next = torch.where(explore[:, k].view(-1, 1, 1, 1, 1), x_sde, x_next)
        x = x_next
    transitions = {name: torch.cat(values) for name, values in transitions.items() if values}
    if transitions:  # in row order (then step order), whatever step each row explored at
        order = torch.argsort(transitions["index"] * num_steps + transitions["k"])
        transitions = {name: value[order if value.device == order.device else to_device(order, value.device)]
                       for name, value in transitions.items()}
    return x, transitions


@torch.no_grad()
def sample_ode(transformer, noise, embeds, neg_embeds, sigmas, guidance_scale):
    """Deterministic evaluation sampling: Euler on the probability-flow ODE."""
    no_sde = torch.zeros(noise.shape[0], len(sigmas) - 1, dtype=torch.bool)
    return rollout(transformer, noise, embeds, neg_embeds, sigmas, no_sde, guidance_scale)[0]


# ---- The paper's iso-temporal grouping (README: The method in one page, 6) ---------------------------------
def seed_for(*parts) -> int:
    """A 63-bit seed from any tuple, e.g. (seed, "noise", epoch, sample): independent streams by name."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator_for(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*parts))


def epoch_prompt_indices(num_prompts: int, per_epoch: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's unique prompts: the next per_epoch entries of an endless stream of shuffled passes.
    # Note: depends only on (seed, epoch), so a resumed run sees the same data."""
    start, out = epoch * per_epoch, []
    while len(out) < per_epoch:
        which_pass, offset = divmod(start + len(out), num_prompts)
        perm = torch.randperm(num_prompts, generator=generator_for(seed, "prompts", which_pass))
        out.extend(perm[offset: offset + per_epoch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def iso_temporal_plan(num_prompts: int, group_size: int, window: int, num_steps: int, seed: int, epoch: int):
    """ITG: one k* per prompt, uniform over the first `window` steps, shared by the prompt's G rollouts.
    # Note: from the shared seed, so the same on every rank: no broadcast.
    Sample j of the epoch's global table belongs to prompt j // G. Returns group_ids (P*G,), k_star (P*G,) and
    sde_steps (P*G, N) bool: a single True per row, at k*."""
    k_prompt = torch.randint(0, window, (num_prompts,), generator=generator_for(seed, "k_star", epoch))
    group_ids = torch.arange(num_prompts).repeat_interleave(group_size)     # (P*G,)
    k_star = k_prompt[group_ids]                                            # (P*G,)
    sde_steps = torch.nn.functional.one_hot(k_star, num_steps).bool()      # (P*G, N)
    return group_ids, k_star, sde_steps


def trained_steps(args: Args) -> int:
    """Transitions that train per rollout: flash 1, flow_grpo its fraction of the steps, flow_grpo_fast its
    window (`exploration_plan`)."""
    return {"flash": 1, "flow_grpo": min(int(args.train_fraction * args.num_steps), args.num_steps - 1),
            "flow_grpo_fast": args.fast_window}[args.algo]


def exploration_plan(args: Args, epoch: int):
    """Which steps of each rollout are stochastic and which train: the one place where Flash-GRPO and the
    baselines of the paper's Figures 4 and 5 differ. Same sampler, same loss for all.

      flash           one SDE step k* per rollout, drawn per prompt (ITG) or, with --no-itg, per rollout
      flow_grpo       as Flow-GRPO's scripts: SDE at every step but the last (too sharp a Gaussian to train),
                      and the first int(--train-fraction x N) of them train
      flow_grpo_fast  --fast-window consecutive SDE steps inside the first --sde-window, which train.
                      # Note: Flow-GRPO-Fast draws the window per sampling call (a GPU's batch); here each
                      rollout draws its own: the same in distribution, whatever the world size and batches.
    Returns group_ids (P*G,), sde_steps (P*G, N) bool, train_steps (P*G, N) bool.
    """
    P, G, N = args.prompts_per_epoch, args.group_size, args.num_steps
    group_ids, _, sde_steps = iso_temporal_plan(P, G, args.sde_window, N, args.seed, epoch)
    gen = generator_for(args.seed, "plan", args.algo, epoch)
    if args.algo == "flash":
        if not args.itg:  # ablation: each rollout explores at its own step
            k = torch.randint(0, args.sde_window, (P * G,), generator=gen)
            sde_steps = torch.nn.functional.one_hot(k, N).bool()
        return group_ids, sde_steps, sde_steps
    sde_steps, step = torch.zeros(P * G, N, dtype=torch.bool), torch.arange(N)
    if args.algo == "flow_grpo":
        sde_steps[:, : N - 1] = True
        return group_ids, sde_steps, (step < trained_steps(args)).expand(P * G, N)
    start = torch.randint(0, args.sde_window - args.fast_window + 1, (P * G, 1), generator=gen)  # per rollout
    sde_steps = (step >= start) & (step < start + args.fast_window)                             # (P*G, N)
    return group_ids, sde_steps, sde_steps


def initial_noise(shape, seed: int, epoch: int, sample_ids) -> torch.Tensor:
    """x_0 per sample from its own generator: rollouts of a group differ in their initial noise.
    # Note: seeded by (seed, epoch, global sample index), not by rank, so ranks and batches do not matter."""
    return torch.stack([torch.randn(shape, generator=generator_for(seed, "x0", epoch, int(j)))
                        for j in sample_ids])


# ---- Rewards to advantages (README: The method in one page, 7) ---------------------------------------------
def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, global_std: bool = True,
                     clip: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean of r over i's group) / (std + 1e-4), clipped to [-clip, clip].

    std is the population std of ALL rewards of the epoch (the release's "global std") or, with
    global_std=False, of i's group. rewards, group_ids: (N,). Returns (N,) fp32.
    """
    rewards = rewards.float()
    _, group = torch.unique(group_ids, return_inverse=True)                # 0..num_groups-1
    num_groups = int(group.max()) + 1
    count = torch.zeros(num_groups).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros(num_groups).index_add_(0, group, rewards) / count    # (num_groups,)
    centred = rewards - mean[group]
    if global_std:
        std = rewards.std(unbiased=False)
    else:
        std = (torch.zeros(num_groups).index_add_(0, group, centred**2) / count).sqrt()[group]
    return (centred / (std + eps)).clamp(-clip, clip)


# ---- lambda(t) and the paper's temporal gradient rectification; the clipped GRPO loss (Flow-GRPO's) --------
def lambda_t(sigmas: torch.Tensor, k, g: NoiseLevel = NoiseLevel()) -> torch.Tensor:
    """Gradient scale of the SDE log-probability w.r.t. the velocity: d log_prob / d v = -(eps / D) lambda_k.

    lambda_k = sqrt|dt_k| / g_k + g_k sqrt|dt_k| (1 - sigma_k) / (2 sigma_k), from the grid: the paper's
    lambda(t). # Note: computed, not a table, so any step count, shift and noise level work.
    """
    k = torch.as_tensor(k)
    sigma, dt = sigmas[k], sigmas[k + 1] - sigmas[k]
    std_dev_t = g(sigmas, sigma)
    return dt.abs().sqrt() / std_dev_t + std_dev_t * dt.abs().sqrt() * (1 - sigma) / (2 * sigma)


def tgr_weights(sigmas: torch.Tensor, k: torch.Tensor, batch_k: torch.Tensor | None = None,
                g: NoiseLevel = NoiseLevel()) -> torch.Tensor:
    """TGR: w_i = (1 / lambda(t_i)) / mean_j (1 / lambda(t_j)), the mean over the global batch batch_k
    (default: k itself). k: (N,) steps of the samples to weight."""
    inv = 1.0 / lambda_t(sigmas, k, g)
    return inv / (inv if batch_k is None else 1.0 / lambda_t(sigmas, batch_k, g)).mean()


def grpo_loss(log_prob, old_log_prob, advantages, weights, clip_range: float):
    """L = mean_i max(-w_i A_i rho_i, -w_i A_i clip(rho_i, 1 - eps, 1 + eps)), rho = exp(log p - log p_old).

    All inputs (B,). Returns the loss and diagnostics: the ratios (B,), clipfrac (the share of clipped ratios)
    and approx_kl (0.5 mean (log rho)^2, as DDPO and Flow-GRPO report it).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    pg_loss1 = -weights * advantages * ratio
    pg_loss2 = -weights * advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        diagnostics = {"ratio": ratio.detach(), "clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
                       "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean()}
    return loss, diagnostics


def forward_equivalents(args: Args) -> int:
    """An epoch's compute in transformer forward-equivalents, machine-independent: videos through the
    transformer (CFG's branches count apart) in rollouts and training, a backward counted as two forwards, the
    reference's forward (--beta > 0) as one; evaluation is not counted. A test counts the calls against it."""
    videos, cfg = args.prompts_per_epoch * args.group_size, cfg_branches(args.guidance_scale)
    return videos * cfg * (args.num_steps + trained_steps(args) * (3 + (args.beta > 0)))


# ---- The trainer: the paper's Section 4 algorithm, one epoch at a time; the loop around it ----------------
class Trainer:
    """The models, the optimizer and the sampler state; one `sample()` + `train()` is one RL epoch."""

    def __init__(self, args: Args, d: Dist, stop_requests: list | None = None):
        self.args, self.d = args, d
        self.models = m = load_models(args, d.master, text_encoder=False)
        try:  # a reward server is awaited --reward-timeout at most, and not past a stop request
            self.reward_fn = (reward_lib.build_reward(args.reward, args.reward_frames, device=d.device)
                              if not args.reward_url else reward_lib.remote_reward(
                                  args.reward_url, args.reward_timeout, stop=lambda: bool(stop_requests)))
        except ValueError as e:  # a learned reward's weights are missing: say what to download
            raise RunError(f"--reward {args.reward}: {e}") from None
        prepare_vae(m.vae, d.device)                                # frozen, unsharded, one copy per rank
        # Prompts go through the text encoder once, into the embedding cache; the encoder is loaded only where
        # chunks are missing and freed right after, so it holds no memory while training.
        self.train_prompts, eval_prompts = default_prompts(args)
        self.eval_prompts = eval_prompts[: math.ceil(args.num_eval_prompts / d.world_size) * d.world_size]
        root = Path(args.embedding_cache)

        @functools.cache
        def text_encoder():  # the tokenizer and the encoder, for PromptCache
            e = load_models(args, master=False, text_encoder=True)
            return e.tokenizer, e.text_encoder.requires_grad_(False).eval().to(d.device)

        self.train_cache, self.eval_cache, neg_cache = (
            PromptCache(prompts, args, d, root, text_encoder)
            for prompts in (self.train_prompts, self.eval_prompts, [args.negative_prompt]))
        text_encoder.cache_clear()
        self.neg_embeds = self.prompt_embeds([0], neg_cache)                # (1, L, D), kept on the device
        # The policy: LoRA adapters (release) or every transformer weight, sharded with FSDP2. With LoRA the
        # reference of the KL term is the policy with its adapters switched off.
        frozen_copy = args.beta > 0 and args.lora_rank == 0
        self.reference = build_policy(m.transformer, args, d, trainable=False) if frozen_copy else None
        self.policy = build_policy(m.transformer, args, d)
        m.transformer = None  # rank 0's full copy is no longer needed
        self.trainable = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        self.params = list(self.trainable.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, betas=args.adam_betas,
                                           eps=args.adam_eps, weight_decay=args.weight_decay)
        self.ema = EMA(self.params, args.ema_decay)
        self.sigmas = flow_sigmas(args.num_steps, args.shift)
        self.g = NoiseLevel(args.noise_schedule, args.noise_level)
        self.latent_shape = latent_shape(args, m.vae)
        self.optimizer_steps = self.bad_steps_in_row = 0

    def prompt_embeds(self, ids, cache: PromptCache | None = None) -> torch.Tensor:
        cache = self.train_cache if cache is None else cache
        return to_device(pad_embeds(cache.get(ids), self.args.max_sequence_length), self.d.device)

    def sample(self, epoch: int):
        """Steps 1-3 of an epoch on this rank's share: the plan (ITG), rollouts, rewards (each micro-batch
        decoded and scored at once), advantages over all ranks' rewards, TGR weights. Returns the transitions
        that train and the epoch's rewards."""
        a, d = self.args, self.d
        prompt_ids = epoch_prompt_indices(len(self.train_prompts), a.prompts_per_epoch, a.seed, epoch)  # (P,)
        group_ids, sde_steps, train_steps = exploration_plan(a, epoch)     # (P*G,), (P*G, N), (P*G, N)
        local = local_sample_ids(len(group_ids), a.train_batch_size, d)   # this rank's global sample ids
        parts, rewards = [], []
        for ids in tqdm(local.split(a.batch_size), desc=f"epoch {epoch} rollouts", leave=False,
                        disable=not d.master):
            embeds = self.prompt_embeds(prompt_ids[group_ids[ids]])         # (b, L, D)
            noise = to_device(initial_noise(self.latent_shape, a.seed, epoch, ids), d.device)
            gens = [generator_for(a.seed, "sde", epoch, int(j)) for j in ids]
            latents, tr = rollout(self.policy, noise, embeds, self.neg_embeds.expand_as(embeds), self.sigmas,
                                  sde_steps[ids], a.guidance_scale, gens, self.g, train_steps[ids])
            index = tr.pop("index")
            parts.append({**tr, "sample": ids[index]})
            videos = decode_videos(self.models.vae, latents)                 # (b, F, 3, H, W), freed below
            if videos.shape[1:] != (a.num_frames, 3, a.height, a.width):  # the VAE config's scale factors lie
                raise RunError(f"the VAE decodes {tuple(videos.shape[1:])} from latents {self.latent_shape}, "
                               f"not {(a.num_frames, 3, a.height, a.width)}: check its scale factors")
            prompts = [self.train_prompts[int(p)] for p in prompt_ids[group_ids[ids]]]
            rewards.append(score_videos(self.reward_fn, videos, prompts))
        samples = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        order = d.all_gather_cat(local).cpu()                              # which global sample each row is
        gathered = d.all_gather_cat(torch.cat(rewards)).cpu()
        rewards = torch.empty(len(group_ids)).index_copy_(0, order, gathered)           # (P*G,)
        if not torch.isfinite(torch.stack([rewards.mean(), rewards.std()])).all():  # finite parts, inf sums
            raise RunError(f"--reward {a.reward}: the epoch's rewards overflow (mean or std not finite)")
        # Note: groups with equal rewards keep advantage 0 instead of being dropped (no gradient, same work
        # on every rank)
        advantages = group_advantages(rewards, group_ids, a.global_std, a.adv_clip)
        j, k = samples["sample"], samples["k"]                              # per trained transition
        # Note: the TGR mean is over every trained transition of the epoch, on all ranks (the release: over
        # each optimizer micro-step's batch, reduced over the ranks)
        trained_k = train_steps.nonzero()[:, 1]                            # every trained transition's step
        weights = tgr_weights(self.sigmas, k, trained_k, self.g) if a.tgr else torch.ones(len(k))
        samples.update({name: to_device(t, d.device) for name, t in (("advantages", advantages[j]),
                                                                     ("weights", weights), ("k", k))})
        samples.update(group=group_ids[j], prompt=prompt_ids[group_ids[j]])  # embeddings are read per batch
        self.plan = {"epoch": epoch, "prompts": prompt_ids.tolist(),  # the global table, for rollouts.jsonl
                     "train_steps": [row.nonzero().flatten().tolist() for row in train_steps],
                     "rewards": [round(r, 6) for r in rewards.tolist()],
                     "advantages": [round(x, 6) for x in advantages.tolist()]}
        return samples, rewards

    def loss(self, batch: dict):
        """Step 4 for one micro-batch: the velocity at the stored x_{k*} (both CFG branches carry gradients),
        the log-probability of the stored x_{k*+1}, the clipped TGR-weighted loss, the optional KL."""
        a, sigmas, k, x = self.args, self.sigmas.to(self.d.device), batch["k"], batch["x_t"]
        embeds = self.prompt_embeds(batch["prompt"])                        # (b, L, D)
        neg = self.neg_embeds.expand_as(embeds)
        v = predict_velocity(self.policy, x, sigmas[k], embeds, neg, a.guidance_scale)
        _, log_prob, mean, std = sde_step(x, v, sigmas, k, self.g, prev_sample=batch["x_next"])
        loss, diag = grpo_loss(log_prob, batch["log_prob"], batch["advantages"], batch["weights"],
                               a.clip_range)
        diag["kl"] = torch.zeros((), device=self.d.device)
        if a.beta > 0:
            ref_v = self.reference_velocity(x, sigmas[k], embeds, neg)
            ref_mean = sde_step(x, ref_v, sigmas, k, self.g, prev_sample=batch["x_next"])[2]
            diag["kl"] = ((mean - ref_mean) ** 2 / (2 * std**2)).mean()  # KL of the two Gaussians
            loss = loss + a.beta * diag["kl"]
        return loss, diag

    @torch.no_grad()
    def reference_velocity(self, x, sigma, embeds, neg):
        """The frozen copy's velocity (full fine-tuning), or the policy's with its adapters off (LoRA)."""
        if self.reference is not None:
            return predict_velocity(self.reference, x, sigma, embeds, neg, self.args.guidance_scale)
        self.policy.disable_adapters()
        try:
            return predict_velocity(self.policy, x, sigma, embeds, neg, self.args.guidance_scale)
        finally:
            self.policy.enable_adapters()

    def train(self, samples: dict) -> dict:
        """Step 4: optimizer steps of --train-batch-size rollouts each, accumulated over micro-batches.
        Statistics stay on the device and reach the host with the gradient norm: one sync per step."""
        a, d, n = self.args, self.d, len(samples["k"])
        per_step = a.train_batch_size // d.world_size * trained_steps(a)   # this rank's transitions per step
        stats = {"loss": [], "kl": [], "clipfrac": [], "approx_kl": [], "grad_norm": [], "skipped_steps": 0}
        self.policy.train()
        # Note: no reshuffle: micro-batches are the rollout batches, so the first ratio is exactly 1
        for step_start in range(0, n, per_step):
            step_sums = torch.zeros(4, device=d.device)                     # loss, kl, clipfrac, approx_kl
            starts = range(step_start, min(step_start + per_step, n), a.batch_size)
            for start in starts:
                loss, diag = self.loss({name: t[start: start + a.batch_size] for name, t in samples.items()})
                # the micro-batch mean, rescaled so that the step sees the mean over its samples; FSDP
                # averages over ranks: the mean over the step's global batch. FSDP2 reduce-scatters after
                # every micro-batch, so only sharded gradients are ever held (1/N of them per rank).
                (loss * len(diag["ratio"]) / per_step).backward()
                step_sums += torch.stack([loss, diag["kl"], diag["clipfrac"], diag["approx_kl"]]).detach()
            grad_norm, step_means = self.optimizer_step(step_sums / len(starts))
            for name, value in zip(("loss", "kl", "clipfrac", "approx_kl"), step_means):
                stats[name].append(value)
            stats["skipped_steps"] += grad_norm is None
            stats["grad_norm"] += [] if grad_norm is None else [grad_norm]
        self.policy.eval()
        return stats

    def optimizer_step(self, step_stats: torch.Tensor | None = None) -> tuple[float | None, list[float]]:
        """Clip and step; a non-finite gradient skips the step (counted), and too many in a row abort. The
        gradient norm and the step's statistics reach the host together: the one device sync of the step."""
        # FSDP2 averages the sharded gradients over the ranks; the replicated ones (kept in fp32) are averaged
        # here, in one collective
        sharded = [p for p in self.params if hasattr(p, "full_tensor") and p.grad is not None]
        replicated = [p for p in self.params if not hasattr(p, "full_tensor") and p.grad is not None]
        if replicated:
            mean = self.d.all_reduce_mean(torch.cat([p.grad.flatten() for p in replicated]))
            for p, g in zip(replicated, mean.split([p.numel() for p in replicated])):
                p.grad = g.view_as(p)
        grad_norm = torch.stack([full_tensor(torch.nn.utils.get_total_norm([p.grad for p in group]))
                                 for group in (sharded, replicated) if group]).norm()
        for group in (sharded, replicated):
            torch.nn.utils.clip_grads_with_norm_(group, self.args.max_grad_norm, grad_norm)
        step_stats = torch.zeros(0) if step_stats is None else step_stats.to(grad_norm.device)
        grad_norm, *step_stats = torch.cat([grad_norm.reshape(1).float(), step_stats]).tolist()
        if not math.isfinite(grad_norm):  # every rank sees the same global norm, so all skip together
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_row += 1
            if self.bad_steps_in_row >= self.args.max_bad_steps:
                raise RunError(f"{self.bad_steps_in_row} optimizer steps in a row had non-finite gradients; "
                               f"stopping (see --max-bad-steps, try a lower --learning-rate)")
            return None, step_stats
        self.bad_steps_in_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reshard(self.policy)  # no stale gathered weights in the next forward
        self.optimizer_steps += 1
        if self.optimizer_steps % self.args.ema_every == 0:
            self.ema.update()
        return grad_norm, step_stats

    @torch.no_grad()
    def evaluate(self, tag: str, log: Reporter, step: int = 0) -> list[float]:
        """Deterministic ODE samples of the held-out prompts with the EMA weights, and each prompt's reward.
        Each rank samples a block of prompts (the last one repeated where they do not divide); the videos, as
        uint8, are gathered for rank 0's log."""
        a, d, n = self.args, self.d, len(self.eval_prompts)
        per_rank = math.ceil(n / d.world_size)
        ids = [min(i, n - 1) for i in range(d.rank * per_rank, (d.rank + 1) * per_rank)]
        sigmas, videos, rewards = flow_sigmas(a.eval_steps, a.shift), [], []
        with self.ema.swapped_in(self.policy):
            for batch in (ids[i: i + a.batch_size] for i in range(0, per_rank, a.batch_size)):
                noise = torch.stack([torch.randn(self.latent_shape, generator=generator_for(
                    a.seed, "eval", i)) for i in batch])
                embeds = self.prompt_embeds(batch, self.eval_cache)
                latents = sample_ode(self.policy, to_device(noise, d.device), embeds,
                                     self.neg_embeds.expand_as(embeds), sigmas, a.guidance_scale)
                decoded = decode_videos(self.models.vae, latents)           # (b, F, 3, H, W) in [0, 1]
                rewards.append(score_videos(self.reward_fn, decoded, [self.eval_prompts[i] for i in batch]))
                videos.append((decoded * 255).round().byte())               # a quarter of the memory
        rewards = d.all_gather_cat(torch.cat(rewards))[:n].tolist()          # in prompt order
        log.videos(tag, step, self.eval_prompts, d.all_gather_cat(torch.cat(videos))[:n], rewards)
        return rewards


def score_videos(reward_fn, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward that returns NaN, inf or the wrong shape stops the run, named."""
    try:
        return reward_fn(videos, prompts).float().to(videos.device)
    except reward_lib.RewardStopped as e:  # SIGTERM while a reward server was awaited
        raise RunError(f"stopped: {e}; the last checkpoint in --output-dir stands",
                       128 + signal.SIGTERM) from None
    except reward_lib.RewardError as e:
        raise SystemExit(f"flash_grpo.py: error: {e}") from None


def train(args: Args) -> Trainer:
    """The whole run: resume if asked, then epochs of sample -> score -> train, logging, checkpoints,
    evaluation, and the export of the EMA weights at the end. Ctrl-C or SIGTERM stop it after the epoch."""
    d, out_dir = setup_distributed(), Path(args.output_dir) if args.output_dir else None
    torch.manual_seed(args.seed)
    with stop_requests() as received, folder_lock(out_dir, d):
        trainer, log = Trainer(args, d, received), Reporter(args, out_dir, d)
        start = resume(trainer, out_dir) if args.resume else 0
        hsdp = f" (HSDP: {d.mesh.shape[0]} nodes x {d.mesh.shape[1]})" if d.mesh is not None else ""
        d.print0(f"{args.model}: {sum(p.numel() for p in trainer.params):,} trainable parameters, "
                 f"{d.world_size} rank(s){hsdp}, {args.prompts_per_epoch} x {args.group_size} rollouts/epoch")
        before = trainer.evaluate("before", log) if start == 0 else None  # the "before" of before and after
        for epoch in tqdm(range(start, args.epochs), desc="epochs", disable=not d.master, initial=start,
                          total=args.epochs):
            t0 = time.time()
            samples, rewards = trainer.sample(epoch)
            t_sample, stats = time.time() - t0, trainer.train(samples)
            mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
            names = ("loss", "clipfrac", "approx_kl", "kl")
            means = d.all_reduce_mean(torch.tensor([mean(stats[k]) for k in names])).tolist()
            row = {"epoch": epoch, "reward_mean": rewards.mean().item(),
                   "reward_std": rewards.std(unbiased=False).item(), **dict(zip(names, means)),
                   "grad_norm": mean(stats["grad_norm"]), "skipped_steps": stats["skipped_steps"],
                   "optimizer_steps": trainer.optimizer_steps,
                   "forward_equivalents": (epoch + 1) * forward_equivalents(args),  # the compute so far
                   "sample_time_s": t_sample, "time_s": time.time() - t0}
            if epoch == start and before is not None:
                row.update(eval_rewards_before=before, eval_reward_before=mean(before))
            last = epoch == args.epochs - 1
            if last or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0):
                row["eval_rewards"] = trainer.evaluate(f"epoch{epoch:04d}", log, epoch)
                row["eval_reward"] = mean(row["eval_rewards"])
            log.epoch(row, trainer.plan, first=epoch == start)
            stop = d.all_reduce_mean(torch.tensor([float(bool(received))])).item() > 0  # all ranks together
            if out_dir is not None and (last or stop or (epoch + 1) % args.checkpoint_every == 0):
                save_checkpoint(trainer, epoch, out_dir)
            if stop and not last:
                saved = (f"; checkpoint {checkpoint_dirs(out_dir)[-1]} saved: run the same command with "
                         f"--resume to continue" if out_dir else " (nothing saved: no --output-dir)")
                name = signal.Signals(received[0]).name if received else "a signal to another rank"
                raise RunError(f"stopped by {name} after epoch {epoch}{saved}",
                               128 + (received[0] if received else signal.SIGTERM))
        if out_dir is not None:
            d.print0(f"exported the EMA weights to {export_model(trainer, out_dir)}")
    return trainer


def resume(trainer: Trainer, out_dir: Path) -> int:
    d, start = trainer.d, 0
    if checkpoint_dirs(out_dir):
        start = load_checkpoint(trainer, checkpoint_dirs(out_dir)[-1]) + 1
        if start > trainer.args.epochs:  # nothing to train, and a longer history than asked for
            raise RunError(f"argument --epochs: {out_dir} already holds {start} epochs, more than that", 2)
        d.print0(f"resumed from {checkpoint_dirs(out_dir)[-1]}: continuing at epoch {start}")
    else:
        d.print0(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; starting from scratch")
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        rows = read_log(out_dir / name, start, d)
        d.barrier()
        if d.master and (out_dir / name).exists():
            write_atomic(out_dir / name, rows)
    return start


# ---- Prompt embeddings: encoded once, in chunks, into a cache on disk that later runs and resumes reuse ----
CACHE_CHUNK = 256   # prompts per cache file
MAX_PROMPT_FILE, MAX_PROMPT_CHARS = 2**28, 4096  # 256 MB; a prompt's 512 tokens are far fewer characters
ENCODE_BATCH = 16   # prompts per text-encoder forward (UMT5-XXL: 64 heads x 512 x 512 attention scores each)


def default_prompts(args: Args) -> list[list[str]]:
    """--prompts and --eval-prompts, else the preset's files."""
    p = preset(args.model)
    return [read_prompts(given or p["folder"] / p[key])
            for given, key in ((args.prompts, "prompts"), (args.eval_prompts, "eval_prompts"))]


def read_prompts(path: str) -> list[str]:
    """One prompt per line, blank lines skipped, from a regular UTF-8 file of at most MAX_PROMPT_FILE bytes;
    anything else, no prompt, or one longer than MAX_PROMPT_CHARS or holding a NUL raise ValueError."""
    path = Path(path)
    if not path.is_file():  # /dev/zero, a folder, a pipe
        raise ValueError(f"{path} is not a regular file")
    if path.stat().st_size > MAX_PROMPT_FILE:
        raise ValueError(f"{path} is larger than {MAX_PROMPT_FILE >> 20} MB")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} as UTF-8 text ({type(e).__name__})") from None
    for i, p in enumerate(prompts):
        if len(p) > MAX_PROMPT_CHARS or "\0" in p:
            raise ValueError(f"{path}: prompt {i + 1} is over {MAX_PROMPT_CHARS} characters or holds a NUL")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_len: int) -> list[torch.Tensor]:
    """UMT5 embeddings as WanPipeline computes them (prompt_clean, tokens padded to max_len, the attention
    mask, the encoder's dtype): one (length_i, D) tensor per prompt on the CPU, trimmed to its real tokens."""
    tokens = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_len,
                       truncation=True, add_special_tokens=True, return_attention_mask=True,
                       return_tensors="pt")
    ids, mask = tokens.input_ids.to(text_encoder.device), tokens.attention_mask.to(text_encoder.device)
    hidden = text_encoder(ids, mask).last_hidden_state.cpu()                  # (P, L, D)
    return [h[:n].clone() for h, n in zip(hidden, tokens.attention_mask.sum(1).tolist())]  # not views


def pad_embeds(embeds: list[torch.Tensor], max_len: int) -> torch.Tensor:
    """Zero rows after each prompt's real tokens, as WanPipeline pads: (length_i, D) -> (b, L, D)."""
    return torch.stack([torch.cat([e, e.new_zeros(max_len - len(e), e.shape[1])]) for e in embeds])


class PromptCache:
    """The embeddings of one prompt list, encoded once into ROOT/<hash of the prompts, token count and text
    encoder>: safetensors chunks of CACHE_CHUNK prompts (real tokens end to end, and lengths), each beside its
    sha256. `get` reads only the rows asked for: no rank holds the table (20,000 prompts: 156 GB). Collective:
    each rank encodes its share of the missing chunks, then checks another rank's, so a folder that not every
    node sees stops the run at start-up."""

    def __init__(self, prompts: list[str], args: Args, d: Dist, root: Path, text_encoder):
        key = json.dumps([fingerprint(args, "tokenizer", "text_encoder"), args.max_sequence_length, prompts])
        self.folder = root / hashlib.sha256(key.encode()).hexdigest()[:16]
        chunks = list(range(math.ceil(len(prompts) / CACHE_CHUNK)))
        mine = [c for c in chunks[d.rank:: d.world_size] if not self.valid(c)]
        if mine:
            tokenizer, encoder = text_encoder()
            self.folder.mkdir(parents=True, exist_ok=True)
        bar = dict(desc=f"encoding {len(prompts)} prompts", disable=not (d.master and mine), leave=False)
        for c in tqdm(mine, **bar):
            part = prompts[c * CACHE_CHUNK: (c + 1) * CACHE_CHUNK]
            embeds = [e for i in range(0, len(part), ENCODE_BATCH) for e in encode_prompts(
                tokenizer, encoder, part[i: i + ENCODE_BATCH], args.max_sequence_length)]
            with atomic(self.path(c)) as tmp:                               # runs may share a cache
                save_file({"embeds": torch.cat(embeds), "lengths": torch.tensor([len(e) for e in embeds])},
                          tmp)
            write_atomic(self.path(c).with_suffix(".sha256"), file_sha256(self.path(c)))  # last: it is whole
        d.barrier()
        bad = d.failing_share(chunks, self.valid)
        if bad:
            raise RunError(f"the prompt-embedding cache {self.folder} is missing or damaged on some rank "
                           f"(chunks {bad}); keep --embedding-cache (or --output-dir) where all ranks see it")
        lengths = []  # each prompt's token count and first row in its chunk: 16 bytes per prompt
        for c in chunks:
            with safe_open(self.path(c), framework="pt") as f:
                lengths.append(f.get_tensor("lengths"))
        self.lengths, self.starts = torch.cat(lengths), torch.cat([n.cumsum(0) - n for n in lengths])

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk_{chunk:06d}.safetensors"

    def valid(self, chunk: int) -> bool:
        digest, path = self.path(chunk).with_suffix(".sha256"), self.path(chunk)
        return digest.is_file() and path.is_file() and digest.read_text() == file_sha256(path)

    def get(self, ids) -> list[torch.Tensor]:
        out = []
        for i in map(int, ids):
            with safe_open(self.path(i // CACHE_CHUNK), framework="pt") as f:
                start = int(self.starts[i])
                out.append(f.get_slice("embeds")[start: start + int(self.lengths[i])])
        return out


# ---- Distributed: this rank, the collectives (all in `Dist`), FSDP2 and the failure watch ------------------
@dataclass
class Dist:
    """This rank, and the only place that calls collectives. Each method puts its input on the rank's device:
    NCCL refuses the CPU tensors gloo takes, so a CPU tensor in a collective would pass every CPU test and
    fail on GPUs. A test checks that nothing else here calls one (FSDP2 and DCP run their own)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    store: object = None  # the launcher's key-value store, through which a failing rank stops the others
    mesh: object = None   # with several nodes: shard within a node, replicate across nodes (HSDP)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def all_gather_cat(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's (n, ...) tensor, concatenated in rank order: the global batch."""
        x = x.to(self.device).contiguous()
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, copy=True)
        if self.world_size > 1:
            dist.all_reduce(x)
            x /= self.world_size
        return x

    def broadcast_(self, t: torch.Tensor) -> None:
        if self.world_size > 1:
            on_device = t.to(self.device)
            dist.broadcast(on_device, src=0)
            t.copy_(on_device)

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def failing_share(self, items: list, ok) -> list:
        """The items for which ok(item) is false, on every rank; each rank checks items[rank + 1::world_size],
        so where rank r wrote items[r::world_size] (the prompt cache) another rank checks them."""
        mine = items[(self.rank + 1) % self.world_size:: self.world_size]
        return sorted(sum(self.all_gather_object([i for i in mine if not ok(i)]), []))

    def print0(self, *a):
        if self.master:
            tqdm.write(" ".join(str(x) for x in a))


@functools.cache
def setup_distributed() -> Dist:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain launch is a group of one.
    Collectives wait up to COLLECTIVE_TIMEOUT, but never for a rank that failed (`watch_for_failures`)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return Dist(rank, world_size, device)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    store = dist.PrefixStore(f"flash_grpo/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False))
    threading.Thread(target=watch_for_failures, args=(store,), daemon=True).start()
    nodes = world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    mesh = None if nodes == 1 else init_device_mesh(device.type, (nodes, world_size // nodes),
                                                    mesh_dim_names=("replicate", "shard"))
    return Dist(rank, world_size, device, store, mesh)


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)  # rank 0 reads 57 GB alone; each rank hashes 27 GB


def watch_for_failures(store) -> None:
    """Ends this process within a second of another rank's failure (`fail`), even while it waits in a
    collective for the rank that is gone (NCCL would wait until COLLECTIVE_TIMEOUT)."""
    while not store.check(["failed"]):
        time.sleep(0.5)
    os._exit(1)


def build_policy(source: torch.nn.Module, args: Args, d: Dist, trainable: bool = True,
                 bf16: bool | None = None) -> torch.nn.Module:
    """The transformer as FSDP2 trains it (torchtitan's recipe): the architecture on the meta device, LoRA,
    activation checkpointing, fully_shard on each block and then the root, then the weights streamed from rank
    0's copy (`source`, meta on the other ranks), so that each rank only ever holds its shards."""
    # FSDP2 warns when a wrapped module returns a view; we never modify the transformer's output in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    with torch.device("meta"):
        policy = type(source).from_config(source.config)
    lora = trainable and args.lora_rank > 0
    if lora:
        add_lora(policy, args.lora_rank, args.lora_alpha)
        if d.master:
            torch.manual_seed(args.seed)  # the adapters' initial weights, taken from rank 0
            add_lora(source, args.lora_rank, args.lora_alpha)
    cuda, keep = d.device.type == "cuda" if bf16 is None else bf16, set(policy._keep_in_fp32_modules)
    for name, p in policy.named_parameters():
        p.requires_grad_(trainable and (not lora or "lora_" in name))
        if cuda and not p.requires_grad and not keep & set(name.split(".")):
            p.data = p.data.bfloat16()  # a frozen base is only ever used in bf16: half the memory
    if trainable and args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    # bf16 compute with fp32 gradient reduction on GPUs; fp32 throughout on CPUs. As WanPipeline does, the
    # modules diffusers keeps in fp32 (the time embedder, the norms, the scale-shift tables) stay fp32: FSDP2
    # leaves them out (replicated on every rank: 0.1 GB at 14B) rather than cast them with the rest.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else
          MixedPrecisionPolicy())
    fp32 = {p for name, p in policy.named_parameters() if keep & set(name.split("."))}
    for module in [*policy.blocks, policy]:
        fully_shard(module, mesh=d.mesh, mp_policy=mp, ignored_params=fp32)
    policy.to_empty(device=d.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, source.state_dict() if d.master else {}, options=options)
    with torch.no_grad():  # buffers that are not in the state dict (rotary tables) come from rank 0 too
        for name, buf in policy.named_buffers():
            if d.master:
                buf.copy_(source.get_buffer(name))
            d.broadcast_(buf)
    return policy.eval()


def local_sample_ids(num_samples: int, train_batch_size: int, d: Dist) -> torch.Tensor:
    """This rank's share of the epoch's global samples: each optimizer step trains one slice of
    train_batch_size global samples, and rank r holds part r of every slice, so a step sees the same samples
    with 1 rank or N. (Rank 0 of 2, slices of 4: samples 0, 1, 4, 5, ...)"""
    ids = torch.arange(num_samples).view(-1, d.world_size, train_batch_size // d.world_size)  # (step, W, T/W)
    return ids[:, d.rank].flatten()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for the device (a copy from pageable memory syncs the stream)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def reshard(module: torch.nn.Module) -> None:
    """Drop FSDP2's gathered weights, so the next forward sees weights changed outside the optimizer."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---- EMA of the trained weights (the release: decay 0.9 every 8 optimizer steps) ---------------------------
class EMA:
    """An exponential moving average of the trained weights, sharded like them."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """The EMA weights in the module for a while, swapped with the live ones in place, a tensor at a time:
        no second copy of the weights (a backup would cost 7 GB per GPU at 14B, full fine-tuning, 8 GPUs)."""
        def exchange():
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params):
                    live = p.detach().clone()
                    p.copy_(s)
                    s.copy_(live)
            reshard(module)

        exchange()
        try:
            yield
        finally:
            exchange()


# ---- Checkpoints and export: every rank writes its own shards in parallel (torch.distributed.checkpoint
# into safetensors files: nothing is pickled), and a checkpoint proves it is whole before anything is read

CHECKPOINT_FORMAT = 2
FILE_BYTES = 2**30  # whole-tensor bytes per checkpoint file; a rank stages its 1/N of one file at a time
META_FIELDS = {"epoch": int, "optimizer_steps": int, "bad_steps_in_row": int, "settings": dict,
               "tensors": dict, "files": dict}


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("epoch_[0-9][0-9][0-9][0-9][0-9][0-9]"))


def checkpoint_tensors(trainer: Trainer, with_optimizer: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name, as this rank holds them: trained weights, EMA, AdamW's state."""
    state = {}
    for (name, p), ema in zip(trainer.trainable.items(), trainer.ema.shadow):
        state[f"model.{name}"], state[f"ema.{name}"] = p, ema
        if with_optimizer:
            adam = trainer.optimizer.state[p]
            if not adam:  # AdamW's own lazy initial state: a CPU step counter and two zero moments
                adam.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                            exp_avg_sq=torch.zeros_like(p))
            for key in ("step", "exp_avg", "exp_avg_sq"):
                state[f"optimizer.{name}.{key}"] = adam[key]
    return state


def file_index(tensors: dict, limit: int) -> dict[str, int]:
    """Each tensor's file, from 1: at most `limit` whole-tensor bytes a file (a rank stages 1/N of one)."""
    index, used, i = {}, 0, 1
    for n, t in tensors.items():
        size = t.numel() * t.element_size()
        if used and used + size > limit:
            i, used = i + 1, 0
        index[n], used = i, used + size
    return index


def digest(meta: dict) -> str:
    """meta.json's own sha256, of every field but itself."""
    fields = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(fields.encode()).hexdigest()


def describe(tensors: dict) -> dict[str, list]:
    return {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in tensors.items()}


def run_identity(trainer: Trainer) -> dict:
    """What a checkpoint must agree with: the flags declared fixed, the training prompts, the base model."""
    fixed = {f.name: getattr(trainer.args, f.name) for f in dataclasses.fields(Args) if f.metadata["fixed"]}
    return {**fixed, "prompts": hashlib.sha256("\n".join(trainer.train_prompts).encode()).hexdigest(),
            "transformer": fingerprint(trainer.args, "transformer")}  # a LoRA's base model


def save_checkpoint(trainer: Trainer, epoch: int, out_dir: Path) -> None:
    """Everything needed to continue bit-for-bit, in OUTPUT_DIR/checkpoints/epoch_NNNNNN (collective).

    The trained weights (the LoRA adapters, or every weight), their EMA and AdamW's state, in safetensors
    files of torch.distributed.checkpoint (`shard-RRRRR-model-IIIII-of-NNNNN.safetensors`: nothing is
    pickled) of at most FILE_BYTES of whole tensors. Each rank writes and hashes its own shards: no rank
    gathers anything, and a rank stages at most two files' 1/N on the host (14B, full fine-tuning: 213 GB on 8
    ranks, 27 GB each, in files of 1/8 GB). Rank 0 adds meta.json: the format, the epoch (the data position:
    an epoch's data depends only on (seed, epoch)), the counters, `run_identity`, each tensor's name, shape
    and dtype, and each file's sha256. Every random draw of training has its own generator, so no RNG state is
    saved. All of it goes into a hidden folder, renamed when whole: a crash leaves the previous checkpoint
    whole. The last --keep-checkpoints are kept."""
    d = trainer.d
    with atomic(out_dir / "checkpoints" / f"epoch_{epoch:06d}", d) as tmp:
        state = checkpoint_tensors(trainer, with_optimizer=trainer.optimizer_steps > 0)
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(
            str(tmp), fqn_to_index_mapping=file_index(state, FILE_BYTES), save_distributed=True))
        mine = {f.name: file_sha256(f, sync=True) for f in tmp.glob(f"shard-{d.rank + 1:05d}-*.safetensors")}
        files = {name: digest for part in d.all_gather_object(mine) for name, digest in part.items()}
        if d.master:
            meta = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "optimizer_steps": trainer.optimizer_steps,
                    "bad_steps_in_row": trainer.bad_steps_in_row, "settings": run_identity(trainer),
                    "tensors": describe(state), "files": files}
            write_atomic(tmp / "meta.json", json.dumps({**meta, "sha256": digest(meta)}, indent=1))
    if d.master:
        for old in checkpoint_dirs(out_dir)[: -trainer.args.keep_checkpoints]:
            old.unlink() if old.is_symlink() else shutil.rmtree(old)
    d.barrier()


def check_checkpoint(trainer: Trainer, path: Path, state: dict, meta) -> str | None:
    """Why the checkpoint cannot be used by this run, or None: from meta.json and the safetensors headers."""
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        return f"is corrupt or of another format (meta.json format {found!r}, expected {CHECKPOINT_FORMAT})"
    a, e = trainer.args, meta.get("epoch")
    bad = [k for k, kind in META_FIELDS.items() if type(meta.get(k)) is not kind]
    changed = [] if bad else [f"{k} ({meta['settings'].get(k)!r} -> {v!r})" for k, v in
                              run_identity(trainer).items() if meta["settings"].get(k) != v]
    if changed:
        return f"was made with other settings (checkpoint -> this run): {', '.join(changed)}"
    steps = (e + 1) * a.prompts_per_epoch * a.group_size // a.train_batch_size if not bad else 0  # so far
    bad = bad or [k for k, ok in (("epoch", e == int(path.name.removeprefix("epoch_"))),
                                  ("optimizer_steps", 0 <= meta["optimizer_steps"] <= steps),
                                  ("bad_steps_in_row", 0 <= meta["bad_steps_in_row"] <= steps)) if not ok]
    if bad:
        return f"is corrupt (meta.json lacks a valid {', '.join(bad)})"
    if meta["tensors"] != describe(state):
        return ("holds other tensors than this run trains (another model or LoRA rank, another dtype, or a "
                "missing optimizer state)")
    on_disk = {f.name for f in path.glob("*.safetensors")}
    if on_disk != set(meta["files"]):
        return f"is incomplete (files on disk differ from meta.json: {sorted(on_disk ^ set(meta['files']))})"
    try:  # the safetensors headers: which slices of which tensors the files hold
        held = dcp.HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any failure to parse a header means a corrupt file
        return f"is corrupt ({type(e).__name__}: {e})"
    held = {n: torch.empty(m.size, dtype=m.properties.dtype, device="meta") for n, m in held.items()}
    if describe(held) != meta["tensors"]:
        return "is corrupt (its files hold other tensors than meta.json describes)"
    return None if meta.get("sha256") == digest(meta) else "is corrupt (meta.json differs from its sha256)"


def load_checkpoint(trainer: Trainer, path: Path) -> int:
    """Restore a checkpoint (collective) once it has proved whole: meta.json describes this run, every file is
    there with its sha256, and they hold exactly the tensors this run expects; after loading, every value must
    be finite. Each rank reads the parts of the shards it holds, whatever the world size that wrote them.
    Returns the checkpoint's epoch."""
    d = trainer.d
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        meta = {"format": f"unreadable: {type(e).__name__}"}
    steps = meta.get("optimizer_steps") if isinstance(meta, dict) else None
    state = checkpoint_tensors(trainer, with_optimizer=isinstance(steps, int) and steps > 0)
    problems = [p for p in d.all_gather_object(check_checkpoint(trainer, path, state, meta)) if p is not None]
    if not problems:  # every file's sha256, the files split over the ranks
        damaged = d.failing_share(sorted(meta["files"]), lambda n: file_sha256(path / n) == meta["files"][n])
        problems = [f"is corrupt (sha256 differs in {', '.join(damaged)})"] if damaged else []
    if problems:
        raise RunError(f"--resume: checkpoint {path} {problems[0]}; nothing was changed")
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    local = [t.to_local() if hasattr(t, "to_local") else t for t in state.values()]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).all().float() if local else torch.ones(())
    if d.all_reduce_mean(finite).item() < 1:
        raise RunError(f"--resume: checkpoint {path} holds non-finite values; nothing was changed")
    reshard(trainer.policy)
    trainer.optimizer_steps, trainer.bad_steps_in_row = meta["optimizer_steps"], meta["bad_steps_in_row"]
    return meta["epoch"]


def export_model(trainer: Trainer, out_dir: Path, shard_bytes: int = 5 * 2**30) -> Path:
    """The EMA weights in diffusers format in OUTPUT_DIR/export (collective): the LoRA adapters (0.2 GB at
    14B, for WanPipeline.load_lora_weights), or the transformer in files of shard_bytes, which rank 0 joins
    from every rank's shards file by file (DCP's consolidation): no rank gathers the model."""
    a, d, policy = trainer.args, trainer.d, trainer.policy
    ema = dict(zip(trainer.trainable, trainer.ema.shadow))
    with atomic(out_dir / "export", d) as tmp:
        if a.lora_rank > 0:
            layers = {name.replace(".default", ""): full_tensor(t.detach()).cpu() for name, t in ema.items()}
            if d.master:
                metadata = {"r": a.lora_rank, "lora_alpha": a.lora_alpha, "target_modules": LORA_TARGETS}
                WanPipeline.save_lora_weights(tmp, transformer_lora_layers=layers,
                                              transformer_lora_adapter_metadata=metadata)
        else:  # every weight trains, so every weight has an EMA (the transformer's buffers are not saved)
            tensors, folder = {n: ema.get(n, p) for n, p in policy.named_parameters()}, tmp / "transformer"
            dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), file_index(
                tensors, shard_bytes), save_distributed=True, enable_consolidation=True))
            if d.master:  # diffusers finds the files (model-00001-of-00002.safetensors, ...) by its index
                shutil.rmtree(folder / "sharded")
                os.replace(folder / "model.safetensors.index.json",
                           folder / "diffusion_pytorch_model.safetensors.index.json")
                policy.save_config(folder)
    return out_dir / "export"


# ---- Files, logs and reporting -----------------------------------------------------------------------------
def file_sha256(path: Path, sync: bool = False) -> str:
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic(path: Path, d: Dist | None = None):
    """Write `path`, a file or a folder, under a hidden temporary name, flush it to disk and rename it into
    place: a crash leaves the previous version whole. Yields the temporary path. With d (collective) it is a
    folder all ranks write into (each syncs its own files): rank 0 makes it and renames it at the end."""
    tmp = path.with_name(f".{path.name}.{'ranks' if d else os.getpid()}.tmp")  # processes may share a file
    if d is not None:
        if d.master:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        d.barrier()
    try:
        yield tmp
    except BaseException:
        if d is None:
            tmp.unlink(missing_ok=True)
        raise
    if d is not None:
        d.barrier()
    if d is None or d.master:
        fsync(tmp)  # a file's data, or a folder's entries
        if d is not None:
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        fsync(path.parent)
    if d is not None:
        d.barrier()


@contextlib.contextmanager
def folder_lock(out_dir: Path | None, d: Dist):
    """One run per output folder: rank 0 holds an exclusive flock on OUTPUT_DIR/.lock while the run lasts, and
    a second run is refused before it touches anything. The kernel (or the file server) releases it however
    the process ends, so a killed run's lock does not block its --resume."""
    f, problem = None, None
    if d.master and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {os.uname().nodename}")
            f.flush()
        except BlockingIOError:
            f.seek(0)
            problem = f"argument --output-dir: {out_dir} is in use by the run of {f.read() or 'another pid'}"
    problem = d.all_gather_object(problem)[0]
    if problem:
        raise RunError(problem, 2)
    with f or contextlib.nullcontext():  # closing the file releases the lock
        yield


def write_atomic(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def read_log(path: Path, before_epoch: int, d: Dist) -> str:
    """The rows of a JSONL log (metrics, rollouts) of the epochs before `before_epoch`, which must be one run:
    epochs 0, 1, 2, ... A torn last line (a kill while appending) is dropped with a warning; a damaged line
    elsewhere, or another history (two runs in one folder), stops the run."""
    lines, rows = path.read_text().splitlines() if path.exists() else [], []
    for i, line in enumerate(lines):
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, TypeError, KeyError):
            if i < len(lines) - 1:
                raise RunError(f"--resume: {path} line {i + 1} is damaged; repair or remove it") from None
            if d.master:
                warnings.warn(f"{path}: dropped a torn last line (the run was killed while writing it)")
            continue
        if epoch != i:
            raise RunError(f"--resume: {path} line {i + 1} is epoch {epoch}, not {i}: not one run's history")
        rows += [line + "\n"] if epoch < before_epoch else []
    return "".join(rows)


class Reporter:
    """A run's records, kept by rank 0: args.json, metrics.jsonl and rollouts.jsonl (a row per epoch, appended
    when it ends), reward_curve.png, the evaluation videos (mp4, and eval_TAG.png contact sheets), a printed
    line per epoch; with --report-to, the metrics and videos in TensorBoard too (which wandb mirrors)."""

    def __init__(self, args: Args, out_dir: Path | None, d: Dist):
        self.args, self.out, self.on, self.tb = args, out_dir if d.master else None, d.master, None
        if d.master and args.report_to:
            if args.report_to == "wandb":
                import wandb

                wandb.init(project="flash-grpo", config=dataclasses.asdict(args), dir=str(out_dir),
                           sync_tensorboard=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def epoch(self, row: dict, plan: dict, first: bool) -> None:
        for name, value in row.items() if self.tb else []:
            if isinstance(value, (int, float)) and name != "epoch":
                self.tb.add_scalar(name, value, row["epoch"])
        if self.out is not None:
            if first or not (self.out / "args.json").exists():
                write_atomic(self.out / "args.json", json.dumps(dataclasses.asdict(self.args), indent=2))
            for name, line in (("rollouts.jsonl", plan), ("metrics.jsonl", row)):
                with open(self.out / name, "a") as f:
                    f.write(json.dumps(line) + "\n")
            if "eval_reward" in row:
                plot_rewards(self.out / "metrics.jsonl", self.out / "reward_curve.png")
        if self.on:
            r = row
            tqdm.write(f"epoch {r['epoch']:4d} | reward {r['reward_mean']:.4f} +- {r['reward_std']:.4f} | "
                       f"loss {r['loss']:+.2e} | clipfrac {r['clipfrac']:.3f} | kl {r['approx_kl']:.1e} | "
                       f"grad {r['grad_norm']:.2e} | {r['time_s']:.1f}s"
                       + (f" | eval reward {r['eval_reward']:.4f}" if "eval_reward" in r else ""))

    def videos(self, tag: str, step: int, prompts: list[str], videos: torch.Tensor, rewards: list[float]):
        for i, (video, r) in enumerate(zip(videos.cpu(), rewards) if self.on else []):
            slug = "".join(c if c.isalnum() else "_" for c in prompts[i][:40]).strip("_")
            if self.out is not None:
                save_video(video, self.out / f"eval_{tag}_prompt{i}_{slug}_reward{r:.3f}.mp4")
            if self.tb is not None:
                self.tb.add_images(f"eval/prompt{i}_{slug}", video, step)  # the frames, side by side
        if self.out is not None:
            save_sheet(videos[:8].cpu(), self.out / f"eval_{tag}.png")
        if self.tb is not None:
            self.tb.flush()


def plot_rewards(metrics: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs, mean, std = (torch.tensor([r[k] for r in rows]) for k in ("epoch", "reward_mean", "reward_std"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, mean, label="rollouts (mean +- std)")
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    evals = [(r["epoch"] + 1, r["eval_reward"]) for r in rows if "eval_reward" in r]
    evals = [(0, rows[0]["eval_reward_before"])] * ("eval_reward_before" in rows[0]) + evals
    ax.plot(*zip(*evals), "o-", label="evaluation (EMA, ODE), after the epoch") if evals else None
    ax.set(xlabel="epoch", ylabel="reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_video(frames: torch.Tensor, path: Path, fps: int = 8) -> None:
    """(F, 3, H, W) uint8 -> an H.264 mp4 (diffusers' export_to_video, through imageio-ffmpeg)."""
    export_to_video([Image.fromarray(a) for a in rearrange(frames, "f c h w -> f h w c").numpy()], str(path),
                    fps=fps)


def save_sheet(videos: torch.Tensor, path: Path) -> None:
    """(B, F, 3, H, W) uint8 -> a PNG: a row per video, 8 of its frames at most, at least 128 pixels high."""
    frames = torch.linspace(0, videos.shape[1] - 1, min(8, videos.shape[1])).round().long()
    scale = max(1, 128 // videos.shape[-2])
    grid = rearrange(videos[:, frames], "b f c h w -> (b h) (f w) c").repeat_interleave(scale, 0)
    Image.fromarray(grid.repeat_interleave(scale, 1).numpy()).save(path)


# ---- The command line: the flags as Args declares them, refusals in one line (exit 2), stopping, main() ----
class RunError(SystemExit):
    """A problem to stop the run with, in one line (`fail`): a bad checkpoint, missing weights, a stop."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line, exit status 2, no usage dump or traceback; printed by rank 0 only (every rank parses the
        same flags), while the others wait a moment: torchrun stops every worker once one has exited."""
        if os.environ.get("RANK", "0") == "0":
            print(f"flash_grpo.py: error: {message}", file=sys.stderr)
        else:
            time.sleep(2)
        raise SystemExit(2)


def interval(bounds: str) -> str:
    """An interval in words: "[1, inf)" is "at least 1", "(0, inf)" "positive", "(0, 1)" "in (0, 1)"."""
    lo, hi = (s.strip() for s in bounds[1:-1].split(","))
    if hi != "inf":
        return f"in {bounds}"
    return {"(0": "positive", "[0": "non-negative"}.get(bounds[0] + lo) or f"at least {lo}"


def parse_args(argv: list[str] | None = None) -> Args:
    """Flags > the preset's 'args' > the paper's defaults; then `finish_args` checks them all."""
    parser = ArgumentParser(prog="flash_grpo.py", description="Flash-GRPO training of Wan2.1 video models. "
                            "Defaults are the paper's recipe; --model tiny and micro override some.")
    for f in dataclasses.fields(Args):
        meta, pair = f.metadata, f.type.startswith("tuple")  # the one pair: adam_betas
        help = (meta["help"] + ("" if "default" in meta["help"] else f" (default: {f.default})")
                + (f"; {interval(meta['bounds'])}" if meta["bounds"] else "")).replace("%", "%%")
        kwargs = dict(help=help, dest=f.name, default=f.default, choices=meta["choices"])
        if f.type.startswith("bool"):
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            kwargs.update(type={"int": int, "float": float}.get(f.type.split(" ")[0], float if pair else str),
                          nargs=2 if pair else None, metavar=None if meta["choices"] else f.name.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser.set_defaults(**preset(parser.parse_known_args(argv)[0].model).get("args", {}))
    args = Args(**vars(parser.parse_args(argv)))
    args.adam_betas = tuple(args.adam_betas)
    problem = finish_args(args, args.dry_run if args.dry_run > 0 else int(os.environ.get("WORLD_SIZE", 1)))
    if problem:
        parser.error(problem)
    return args


def finish_args(args: Args, world_size: int = 1) -> str | None:
    """Checks every value (the bounds Args declares, the flags together, the batch shapes over `world_size`
    ranks, the files, the reward) and fills in the derived values. Returns the first problem, or None."""
    for f in dataclasses.fields(Args):
        bounds, value, flag = f.metadata["bounds"], getattr(args, f.name), "--" + f.name.replace("_", "-")
        for v in value if isinstance(value, tuple) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                return f"argument {flag}: must be a finite number, not {v}"
            lo, hi = [float(s) for s in bounds[1:-1].split(",")] if bounds else (0, 0)
            if bounds and v is not None and not ((lo <= v if bounds[0] == "[" else lo < v) and
                                                 (v <= hi if bounds[-1] == "]" else v < hi)):
                return f"argument {flag}: must be {interval(bounds)}, not {v}"
    args.sde_window = max(args.num_steps // 2, 1) if args.sde_window is None else args.sde_window
    args.tgr = args.algo == "flash" if args.tgr is None else args.tgr
    args.learning_rate = args.learning_rate or (1e-4 if args.lora_rank else 1e-5)  # full: the peers' 1e-5
    samples = args.prompts_per_epoch * args.group_size
    args.train_batch_size = args.train_batch_size or max(samples // 2, 1)
    per_rank = args.train_batch_size // world_size
    if args.batch_size is None:  # the largest micro-batch that divides a rank's share, up to the preset's cap
        cap = max(min(per_rank, preset(args.model)["max_batch_size"]), 1)
        args.batch_size = max(b for b in range(1, cap + 1) if per_rank % b == 0)
    output = Path(args.output_dir) if args.output_dir else None
    cache = Path(args.embedding_cache or (output / "embeddings" if output else
                                          Path(tempfile.gettempdir()) / "flash_grpo_embeddings"))
    args.embedding_cache = str(cache)  # the default is checked like a given folder
    checks = [  # (bad, flag, why), in order; an optimizer step's rollouts split evenly over the ranks
        (args.init == "random" and "weights" in preset(args.model), "--init",  # else ignored in silence
         f"random: --model {args.model} is its trained weights only"),
        (args.model_path and not weights_path(args), "--model-path", "is not read: the weights are random"),
        ((args.num_frames - 1) % 4, "--num-frames", "must be 4k+1 (1, 5, ..., 81)"),
        (args.height % 16, "--height", "must be a positive multiple of 16"),
        (args.width % 16, "--width", "must be a positive multiple of 16"),
        (args.sde_window > args.num_steps, "--sde-window", f"must be at most --num-steps ({args.num_steps})"),
        (args.algo == "flow_grpo_fast" and args.fast_window > args.sde_window, "--fast-window",
         "must be between 1 and --sde-window"),
        (args.algo == "flow_grpo" and args.num_steps < 2, "--num-steps", "must be at least 2 for flow_grpo"),
        (args.algo == "flow_grpo" and trained_steps(args) < 1, "--train-fraction", "trains no step"),
        (args.resume and not output, "--resume", "needs --output-dir (where the checkpoints are)"),
        (args.report_to and not output, "--report-to", "needs --output-dir (for OUTPUT_DIR/tensorboard)"),
        (samples % args.train_batch_size, "--train-batch-size", f"must divide the epoch's {samples} samples"),
        (args.train_batch_size % world_size, "--train-batch-size", f"must split over the {world_size} ranks"),
        (per_rank % args.batch_size, "--batch-size", f"must divide each rank's {per_rank} samples per step"),
        (args.report_to and not all(map(importlib.util.find_spec, {args.report_to, "tensorboard"})),
         "--report-to", f"needs {args.report_to} and tensorboard installed"),
        *((path and unwritable(path), flag, f"{path} {path and unwritable(path)}")
          for flag, path in (("--output-dir", output), ("--embedding-cache", cache))),
        (output and not args.resume and not args.dry_run and run_started(output), "--output-dir",
         f"{output} already holds a run; pass --resume to continue it, or choose another folder"),
    ]
    for bad, flag, why in checks:
        if bad:
            return f"argument {flag}: {why}"
    for flag, check in (  # the files, the reward (a learned reward's model loads later, in Trainer)
            ("--prompts", lambda: args.prompts and read_prompts(args.prompts)),
            ("--eval-prompts", lambda: args.eval_prompts and read_prompts(args.eval_prompts)),
            ("--reward-frames", lambda: reward_lib.aggregate_frames(torch.zeros(1, 1), args.reward_frames)),
            ("--reward-url", lambda: args.reward_url and reward_lib.remote_reward(args.reward_url,
                                                                                  args.reward_timeout)),
            ("--reward", lambda: args.reward_url or reward_lib.build_reward(args.reward, args.reward_frames,
                                                                            load=False))):
        try:
            check()
        except ValueError as e:
            return f"argument {flag}: {e}"
    import bench  # what cannot fit is refused before any weight is loaded

    try:
        return None if args.dry_run else bench.fits(args, world_size)
    except RunError as e:  # the plan reads the preset's weights (micro), and they are missing
        return str(e)


def unwritable(folder: Path) -> str | None:
    """Why a folder cannot be written: it is a file, lies under one, or its nearest ancestor is read-only."""
    path = folder
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return "is not a folder" if path == folder else f"lies under a file, {path}"
    return None if os.access(path, os.W_OK | os.X_OK) else f"cannot be written: {path} is read-only"


def run_started(out_dir: Path) -> bool:
    metrics = out_dir / "metrics.jsonl"
    return (metrics.exists() and metrics.stat().st_size > 0) or bool(checkpoint_dirs(out_dir))


@contextlib.contextmanager
def stop_requests():
    """SIGINT and SIGTERM (which schedulers, and torchrun, send before they kill) ask the run to stop after
    the epoch, the unit a checkpoint resumes exactly; a second one stops at once. Yields those received."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    d = Dist() if args.dry_run else setup_distributed()
    try:
        if args.dry_run:
            import bench

            return print(bench.dry_run(args))
        train(args)
    except BaseException as e:  # noqa: BLE001 - every way a rank can fail ends in one line
        fail(e, d)
    dist.destroy_process_group()


def fail(e: BaseException, d: Dist):
    """This rank stops and says why, once: a message that several ranks find alike is printed by the first,
    and an error that follows another rank's failure is not printed at all. A failure (not a requested stop)
    is published in the launcher's store, whose watcher on every other rank then ends it within a second."""
    if isinstance(e, SystemExit) and not isinstance(e, RunError) and not isinstance(e.code, str):
        raise e  # an exit asked for, not a failure
    status, message = e.code if isinstance(e, RunError) else 1, str(e)
    if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C
        status, message = 130, ("interrupted; the last checkpoint in --output-dir stands: run the same "
                                "command with --resume to continue from it")
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        message = f"no space left on the disk of {e.filename}; the checkpoints written before stand"
    elif not isinstance(e, SystemExit):  # a bug or an environment problem: its traceback says where
        traceback.print_exc()
        message = f"{type(e).__name__}: {e}"
    message = message.removeprefix("flash_grpo.py: error: ")
    if d.store is not None and d.store.check(["failed"]):
        raise SystemExit(1)  # another rank failed first, and this is the consequence
    first = d.store is None or d.store.add("said/" + hashlib.sha256(message.encode()).hexdigest(), 1) == 1
    if first:
        rank = f"(rank {d.rank}) " if d.world_size > 1 and status < 128 else ""
        print(f"flash_grpo.py: {'' if status >= 128 else 'error: '}{rank}{message}", file=sys.stderr,
              flush=True)
    if d.store is not None and status < 128:
        d.store.set("failed", message)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
