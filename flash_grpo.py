"""
Flash-GRPO: one-step group relative policy optimization for flow-matching video models.

A single-file reference implementation of

    Flash-GRPO: Efficient Alignment for Video Diffusion via One-Step Policy Optimization
    He, Fu, Xue, Wang, He, Li, Yin, Dong, Huang, Wang, Duan, Zhuang (arXiv 2605.15980, ICML 2026)

for Wan2.1 text-to-video models (diffusers format). Read it top to bottom beside the paper:
models -> flow-matching SDE sampler -> iso-temporal grouping -> rewards to advantages ->
lambda(t) and the GRPO loss -> distributed (FSDP2) -> checkpoints -> training loop -> main().
The baselines the paper compares with (Flow-GRPO, Flow-GRPO-Fast, the ablations) are `--algo` and
`--no-itg` / `--no-tgr` switches over the same sampler and loss (`exploration_plan`); bench.py
re-runs the paper's comparisons.

The method in four lines (the paper's abstract and Section 1):
  * every rollout is a deterministic ODE except ONE stochastic SDE step k*, and only that step trains;
  * iso-temporal grouping (ITG): all G rollouts of a prompt share k*, so advantages compare
    samples that explored at the same timestep;
  * temporal gradient rectification (TGR): each sample's loss is scaled by 1/lambda(t_k*),
    normalised to mean 1, so every timestep contributes on the same scale;
  * the usual clipped GRPO objective on the per-element-mean log-probability of that step.

Run it:
    python flash_grpo.py --model tiny --output-dir runs/tiny   # random tiny Wan stack, CPU, ~1.5 minutes
    torchrun --nproc_per_node 2 flash_grpo.py --model tiny     # the same, 2 processes
    python flash_grpo.py --model wan1.3b --output-dir runs/a  # one GPU
    torchrun --nproc_per_node 8 flash_grpo.py --model wan14b  # one node; add --resume to continue a run
    python flash_grpo.py --help                                # every flag

Where this code departs from the paper's public release (each also marked `# Note:` in place):
  1. The sigma grid is computed here from its formula instead of being taken from the installed diffusers
     scheduler, and lambda(t) (temporal gradient rectification) is computed from the grid instead of the
     release's hard-coded table, so any step count, shift and noise level work.
  2. k* is derived from a seed shared by all ranks (no broadcast), and every noise tensor comes from a
     generator seeded by (seed, epoch, global sample index): the same seed gives the same run whatever
     the number of ranks or the batch size.
  3. Groups whose rewards are all equal are kept in the batch with advantage 0 (they add no gradient)
     instead of being dropped, so that every rank runs the same number of forward/backward passes.
  4. The per-epoch prompt order is a deterministic stream of shuffled passes over the prompt list, so an
     epoch's data depends only on (seed, epoch).
  5. Training micro-batches are the rollout micro-batches in rollout order (no reshuffle): with the same
     batch shapes the recomputed log-probability is bit-identical to the one recorded while sampling,
     so the ratio is exactly 1 before the first update.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from einops import rearrange
from tqdm.auto import tqdm

import reward as reward_lib

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass, every default is the release's recipe (its config/dgx.py, wan2_1_flash)
# ----------------------------------------------------------------------------------------------

def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # model and data
    model: str = arg("wan1.3b", "model preset: tiny (random weights, CPU), wan1.3b or wan14b")
    model_path: str | None = arg(None, "local diffusers folder or hub id, instead of the preset's")
    prompts: str | None = arg(None, "text file with one training prompt per line (default: built-in prompts)")
    eval_prompts: str | None = arg(None, "text file of held-out evaluation prompts (default: built-in)")
    num_eval_prompts: int = arg(4, "how many held-out prompts each evaluation samples")
    output_dir: str | None = arg(None, "where metrics.jsonl and sample videos go (nothing is written without it)")
    embedding_cache: str | None = arg(None, "folder of the prompt-embedding cache, reusable across runs (default: "
                                            "OUTPUT_DIR/embeddings, or a temporary folder); every rank must see it")
    # video and sampler: Wan2.1's, and Flow-GRPO's SDE
    height: int = arg(480, "video height in pixels, a multiple of 16")
    width: int = arg(832, "video width in pixels, a multiple of 16")
    num_frames: int = arg(81, "frames per video, 4k+1")
    num_steps: int = arg(20, "rollout denoising steps N")
    eval_steps: int = arg(50, "deterministic ODE steps for evaluation videos")
    shift: float = arg(3.0, "flow-grid shift (3 for 480p Wan2.1, 5 recommended at 720p)")
    guidance_scale: float = arg(4.5, "classifier-free guidance w, in rollouts and in training")
    negative_prompt: str = arg("", "negative prompt for CFG")
    max_sequence_length: int = arg(512, "text tokens per prompt (Wan uses 512)")
    noise_schedule: str = arg("linear", "the SDE's noise level g(sigma): linear, g = g_max sigma (the release), or "
                                        "flow_grpo, g = a sqrt(sigma / (1 - sigma)) (Flow-GRPO)")
    noise_level: float | None = arg(None, "g_max of the linear schedule (default: sigma_1, the release), or a of "
                                          "flow_grpo's (default: 0.7)")
    # which steps explore and train: Flash-GRPO, or the baselines of the paper's Figures 4 and 5 and ablations
    algo: str = arg("flash", "flash (one SDE step per rollout), flow_grpo (every step) or flow_grpo_fast (a window)")
    itg: bool = arg(True, "iso-temporal grouping: one k* per prompt; --no-itg draws k* per rollout (ablation)")
    train_fraction: float = arg(1.0, "flow_grpo: the first int(F x num_steps) steps train (Flow-GRPO's timestep "
                                     "fraction; at most all but the last, an ODE step)")
    fast_window: int = arg(1, "flow_grpo_fast: consecutive SDE steps in the window (1 = Flow-GRPO-Fast1)")
    # iso-temporal grouping
    group_size: int = arg(8, "G: rollouts per prompt, compared with each other")
    prompts_per_epoch: int = arg(4, "unique prompts per epoch; an epoch samples prompts_per_epoch * group_size videos")
    sde_window: int | None = arg(None, "k* is drawn uniformly from the first sde_window steps (default: half of num_steps)")
    # rewards to advantages
    reward: str = arg("hpsv3", "reward: hpsv3 (release), pickscore, aesthetic, clip (learned; NAME@FOLDER for local weights), "
                               "a training-free name, a weighted sum 'a=1,b=0.5', or file.py:function")
    reward_url: str | None = arg(None, "score with a reward server instead (python reward.py serve ...), e.g. "
                                       "http://host:8000; --reward is then only a label")
    reward_frames: str = arg("top:0.3", "frame aggregation for per-frame rewards: mean or top:FRACTION (release: top 30%)")
    global_std: bool = arg(True, "normalise advantages by the std of all rewards of the epoch (release); else per group")
    adv_clip: float = arg(5.0, "advantages are clipped to [-adv_clip, adv_clip]")
    # loss: the clipped GRPO objective, temporal gradient rectification
    clip_range: float = arg(1e-3, "PPO clip range eps on the ratio")
    beta: float = arg(0.0, "weight of the KL term to the frozen reference policy (release: 0)")
    tgr: bool | None = arg(None, "temporal gradient rectification: weight each sample by 1/lambda(t), mean 1 "
                                 "(default: on for flash, off for the baselines, as in the paper)")
    # optimisation
    learning_rate: float = arg(1e-4, "AdamW learning rate")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    adam_betas: tuple[float, float] = arg((0.9, 0.999), "AdamW betas")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    batch_size: int | None = arg(None, "videos per rank per forward pass, for rollouts and training (micro-batch; "
                                       "default: the largest that divides a rank's share of --train-batch-size, "
                                       "up to the preset's: 1 for Wan, 32 for tiny)")
    train_batch_size: int | None = arg(None, "samples per optimizer step over all ranks (default: half an epoch)")
    lora_rank: int = arg(16, "LoRA rank on attention q, k, v, out (0: full fine-tuning)")
    lora_alpha: float = arg(32.0, "LoRA alpha")
    ema_decay: float = arg(0.9, "EMA decay of the trained weights (used for evaluation)")
    ema_every: int = arg(8, "optimizer steps between EMA updates")
    gradient_checkpointing: bool = arg(True, "recompute transformer activations in the backward pass")
    # run
    epochs: int = arg(1000, "RL epochs (sample, score, train)")
    seed: int = arg(0, "seed for prompts, k*, noise and initialisation")
    init: str = arg("pretrained", "pretrained weights, or random: the real-size architecture with random weights "
                                  "and no download (benchmarks, smoke runs)")
    dry_run: int = arg(0, "build the models on the meta device, print parameter counts and the memory plan per "
                          "rank for this many GPUs, and exit")
    eval_every: int = arg(50, "evaluate (and write videos) every this many epochs, and at the end; 0: only at the end")
    checkpoint_every: int = arg(10, "save a checkpoint every this many epochs, and at the end (needs --output-dir)")
    keep_checkpoints: int = arg(2, "how many of the latest checkpoints to keep")
    resume: bool = arg(False, "continue from the latest checkpoint in --output-dir")
    report_to: str | None = arg(None, "also log metrics and evaluation videos to tensorboard (OUTPUT_DIR/tensorboard) "
                                      "or wandb (optional: pip install tensorboard, or wandb)")
    max_bad_steps: int = arg(5, "stop after this many optimizer steps in a row with non-finite gradients")


# Presets: the tiny one reads tiny_config.json; the real ones load diffusers-format Wan2.1 weights.
# The published Wan2.1 architectures (diffusers' WanTransformer3DModel arguments), used by --init random
# and --dry-run; the text encoder is UMT5-XXL's encoder.
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
MODEL_PRESETS = {
    "tiny": {"config": HERE / "tiny_config.json"},
    # pretrained here on a procedurally generated world of moving shapes (build_micro.py): rewards mean something
    "micro": {"config": HERE / "micro" / "config.json", "weights": HERE / "micro"},
    "wan1.3b": {"repo": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "args": {}, "max_batch_size": 1,
                "transformer": dict(WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30)},
    # Note: the paper shows 14B results but publishes no recipe; we keep the 1.3B recipe.
    "wan14b": {"repo": "Wan-AI/Wan2.1-T2V-14B-Diffusers", "args": {}, "max_batch_size": 1,
               "transformer": dict(WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40)},
}

TRAIN_PROMPTS = [
    "a red fox running through fresh snow at sunrise", "a paper boat drifting down a rainy street",
    "a hummingbird hovering over a purple flower", "waves crashing against a lighthouse in a storm",
    "a chef flipping pancakes in a busy kitchen", "a time-lapse of clouds over a mountain lake",
    "a cat chasing a ball of yarn across a wooden floor", "a neon-lit city street at night in the rain",
    "a hot air balloon rising over green hills", "a child blowing bubbles in a sunny park",
    "a sailboat gliding across a calm blue sea", "autumn leaves falling in a quiet forest",
    "a steam train crossing a stone bridge", "a jellyfish pulsing in deep blue water",
    "a potter shaping clay on a spinning wheel", "fireworks bursting over a harbour",
    "a horse galloping along a beach at sunset", "a candle flickering on a dark table",
    "a robot watering plants in a greenhouse", "snow falling on a cabin in the woods",
    "a dancer spinning on an empty stage", "a bee collecting pollen from a sunflower",
    "a waterfall in a tropical jungle", "a skateboarder doing a trick in a skate park",
    "an astronaut floating inside a space station", "a field of lavender swaying in the wind",
    "a dog catching a frisbee in mid-air", "rain drops rippling on a pond",
    "a busy market street in the morning", "a golden retriever puppy playing in leaves",
    "northern lights over a frozen lake", "a cup of coffee with steam rising slowly",
]
EVAL_PROMPTS = [
    "a panda eating bamboo in a misty forest", "a vintage car driving along a coastal road",
    "a lantern festival on a river at night", "an eagle soaring above snowy peaks",
]


def exit_once(message: str, status: int):
    """Stop with a message every rank would repeat: rank 0 (or a plain launch) prints it; the other ranks wait a
    moment first, because torchrun stops every worker as soon as one has exited."""
    if os.environ.get("RANK", "0") == "0":  # a stop asked for by a signal (status 128 + n) is not an error
        print(f"flash_grpo.py: {'' if status >= 128 else 'error: '}{message}", file=sys.stderr)
    else:
        time.sleep(2)
    raise SystemExit(status)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, no usage dump or traceback
        exit_once(message, 2)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="flash_grpo.py", argument_default=argparse.SUPPRESS,  # only flags given
                            description="Flash-GRPO training of Wan2.1 video models. Defaults are the paper's "
                                        "recipe; --model tiny overrides some (tiny_config.json).")
    for f in dataclasses.fields(Args):
        help = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" (default: {f.default})")
        help = help.replace("%", "%%")
        flag, kwargs = "--" + f.name.replace("_", "-"), {"help": help, "dest": f.name}
        if f.type.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "adam_betas":
            parser.add_argument(flag, type=float, nargs=2, metavar=("B1", "B2"), **kwargs)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), **kwargs)
    return parser


def preset_config(model: str) -> dict:
    """The preset's flag overrides ('args') and the cap of its default --batch-size ('max_batch_size')."""
    preset = MODEL_PRESETS[model]
    return json.loads(preset["config"].read_text()) if "config" in preset else preset


def parse_args(argv: list[str] | None = None) -> Args:
    """Flags > preset overrides (tiny_config.json's 'args') > the paper's defaults; then validate."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    model = given.get("model", Args.model)
    if model not in MODEL_PRESETS:
        parser.error(f"argument --model: unknown preset {model!r} (choose from {', '.join(MODEL_PRESETS)})")
    args = Args(**{**preset_config(model)["args"], **given})
    if "adam_betas" in given:
        args.adam_betas = tuple(args.adam_betas)
    problem = validate_args(args, args.dry_run if args.dry_run > 0 else int(os.environ.get("WORLD_SIZE", 1)))
    if problem:
        parser.error(problem)
    return args


# The range of every numeric flag, checked where it is parsed (with finiteness): one line naming the flag, exit 2.
AT_LEAST_1 = ("num_eval_prompts", "num_steps", "eval_steps", "max_sequence_length", "prompts_per_epoch",
              "batch_size", "train_batch_size", "ema_every", "epochs", "checkpoint_every", "keep_checkpoints",
              "max_bad_steps")
POSITIVE = ("shift", "noise_level", "adv_clip", "learning_rate", "adam_eps", "max_grad_norm", "lora_alpha")
NON_NEGATIVE = ("beta", "weight_decay", "lora_rank", "seed", "dry_run", "eval_every")


def validate_args(args: Args, world_size: int = 1) -> str | None:
    """Derived values are filled in here, once; the first problem found is returned as one line. Every number
    must be finite and in its range, and the batch shapes must split over `world_size` ranks."""
    if args.sde_window is None:
        args.sde_window = max(args.num_steps // 2, 1)
    if args.tgr is None:
        args.tgr = args.algo == "flash"
    for name, value in dataclasses.asdict(args).items():
        flag = "--" + name.replace("_", "-")
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
            return f"argument {flag}: must be a finite number, not {value}"
        for names, bad, what in ((AT_LEAST_1, lambda v: v < 1, "at least 1"), (POSITIVE, lambda v: v <= 0, "positive"),
                                 (NON_NEGATIVE, lambda v: v < 0, "non-negative")):
            if name in names and value is not None and bad(value):
                return f"argument {flag}: must be {what}, not {value}"
    checks = [
        ((args.num_frames - 1) % 4 != 0 or args.num_frames < 1, "--num-frames", "must be 4k+1 (1, 5, ..., 81)"),
        (args.height <= 0 or args.height % 16 != 0, "--height", "must be a positive multiple of 16"),
        (args.width <= 0 or args.width % 16 != 0, "--width", "must be a positive multiple of 16"),
        (args.group_size < 2, "--group-size", "must be at least 2 (advantages compare rollouts of a prompt)"),
        (not 1 <= args.sde_window <= args.num_steps, "--sde-window", f"must be between 1 and --num-steps ({args.num_steps})"),
        (not 1 <= args.fast_window <= args.sde_window, "--fast-window", "must be between 1 and --sde-window"),
        (args.algo == "flow_grpo" and args.num_steps < 2, "--num-steps", "must be at least 2 for flow_grpo"),
        (args.algo == "flow_grpo" and int(args.train_fraction * args.num_steps) < 1, "--train-fraction",
         "trains no step: int(F x --num-steps) must be at least 1"),
        (args.noise_schedule not in ("linear", "flow_grpo"), "--noise-schedule", "must be linear or flow_grpo"),
        (args.guidance_scale < 1, "--guidance-scale", "must be at least 1 (1: no classifier-free guidance)"),
        (not 0 < args.train_fraction <= 1, "--train-fraction", "must be in (0, 1]"),
        (not 0 < args.clip_range < 1, "--clip-range", "must be in (0, 1)"),
        (not 0 <= args.ema_decay < 1, "--ema-decay", "must be in [0, 1)"),
        (not all(0 <= b < 1 for b in args.adam_betas), "--adam-betas", "must both be in [0, 1)"),
        (args.init not in ("pretrained", "random"), "--init", "must be pretrained or random"),
        (args.algo not in ("flash", "flow_grpo", "flow_grpo_fast"), "--algo",
         f"unknown algorithm {args.algo!r} (choose from flash, flow_grpo, flow_grpo_fast)"),
    ]
    for bad, flag, what in checks:
        if bad:
            return f"argument {flag}: {what}"
    # batch shapes: an optimizer step trains --train-batch-size samples, split evenly over the ranks, in
    # micro-batches of --batch-size per rank
    epoch_samples = args.prompts_per_epoch * args.group_size
    if args.train_batch_size is None:
        args.train_batch_size = max(epoch_samples // 2, 1)
    if epoch_samples % args.train_batch_size != 0:
        return (f"argument --train-batch-size: {args.train_batch_size} must divide the epoch's "
                f"{epoch_samples} samples (--prompts-per-epoch x --group-size)")
    if args.train_batch_size % world_size != 0:
        return (f"argument --train-batch-size: {args.train_batch_size} samples per optimizer step do not split over "
                f"{world_size} ranks; choose a multiple of {world_size} (and --prompts-per-epoch to match)")
    per_rank = args.train_batch_size // world_size
    if args.batch_size is None:
        cap = min(per_rank, preset_config(args.model)["max_batch_size"])
        args.batch_size = max(b for b in range(1, cap + 1) if per_rank % b == 0)
    elif per_rank % args.batch_size != 0:
        return (f"argument --batch-size: {args.batch_size} must divide each rank's {per_rank} samples per optimizer "
                f"step (--train-batch-size {args.train_batch_size} over {world_size} ranks)")
    for flag, path in (("--prompts", args.prompts), ("--eval-prompts", args.eval_prompts)):
        try:
            if path is not None and not read_prompts(path):
                return f"argument {flag}: {path} holds no prompts"
        except (OSError, UnicodeDecodeError) as e:
            return f"argument {flag}: cannot read {path} as UTF-8 text ({type(e).__name__})"
    for flag, path in (("--output-dir", args.output_dir), ("--embedding-cache", args.embedding_cache)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            return f"argument {flag}: {path} exists and is not a folder"
    if args.resume and args.output_dir is None:
        return "argument --resume: needs --output-dir (where the checkpoints are)"
    if args.report_to not in (None, "tensorboard", "wandb"):
        return f"argument --report-to: {args.report_to!r} is not tensorboard or wandb"
    if args.report_to and importlib.util.find_spec(args.report_to) is None:
        return f"argument --report-to: {args.report_to} is not installed (pip install {args.report_to})"
    if args.report_to == "tensorboard" and args.output_dir is None:
        return "argument --report-to: tensorboard writes into --output-dir; give one"
    if not args.resume and args.output_dir is not None and not args.dry_run and run_started(Path(args.output_dir)):
        return (f"argument --output-dir: {args.output_dir} already holds a run; pass --resume to continue it, "
                f"or choose another folder")
    for flag, check in (  # the learned rewards' models load later, in Trainer
            ("--reward-frames", lambda: reward_lib.aggregate_frames(torch.zeros(1, 1), args.reward_frames)),
            ("--reward-url", lambda: args.reward_url and reward_lib.remote_reward(args.reward_url)),
            ("--reward", lambda: args.reward_url or reward_lib.build_reward(args.reward, args.reward_frames, load=False))):
        try:
            check()
        except ValueError as e:
            return f"argument {flag}: {e}"
    return None


def default_prompts(args: Args) -> tuple[list[str], list[str]]:
    """The training and evaluation prompts: --prompts and --eval-prompts, else the preset's files (micro: the
    captions of its training and held-out combinations), else the built-in lists."""
    preset, found = preset_config(args.model), []
    for given, key, builtin in ((args.prompts, "prompts", TRAIN_PROMPTS), (args.eval_prompts, "eval_prompts", EVAL_PROMPTS)):
        path = given or (MODEL_PRESETS[args.model]["config"].parent / preset[key] if key in preset else None)
        found.append(read_prompts(path) if path else builtin)
    return found[0], found[1]


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped. Raises UnicodeDecodeError for a file that is not UTF-8."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_started(out_dir: Path) -> bool:
    """Whether out_dir holds a run that --resume would continue (logged epochs or checkpoints)."""
    metrics = out_dir / "metrics.jsonl"
    return (metrics.exists() and metrics.stat().st_size > 0) or bool(checkpoint_dirs(out_dir))


# ----------------------------------------------------------------------------------------------
# Models: Wan2.1 = UMT5 text encoder + WanTransformer3DModel (the policy v_theta) + AutoencoderKLWan
# ----------------------------------------------------------------------------------------------

@dataclass
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module


def byte_level_tokenizer():
    """A 259-token byte-level tokenizer built in code: <pad>=0, </s>=1, <unk>=2, then the 256 bytes."""
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


def build_tiny_models(config_path: Path, seed: int) -> Models:
    """The real Wan2.1 classes with random weights, sized by tiny_config.json."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = json.loads(Path(config_path).read_text())
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)  # the same tiny "pretrained" model on every rank and every run
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0, **cfg["text_encoder"]))
    transformer = WanTransformer3DModel(**cfg["transformer"])
    vae = AutoencoderKLWan(**cfg["vae"])
    return Models(tokenizer, text_encoder, transformer, vae)


def load_micro_model(path: Path) -> Models:
    """The micro model built by build_micro.py (its weights are committed): the Wan2.1 classes, fp32."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    try:
        return Models(AutoTokenizer.from_pretrained(path / "tokenizer"), UMT5EncoderModel.from_pretrained(path / "text_encoder"),
                      WanTransformer3DModel.from_pretrained(path / "transformer"),
                      AutoencoderKLWan.from_pretrained(path / "vae"))
    except (OSError, ValueError) as e:
        raise RunError(f"could not load the micro model from {path} ({type(e).__name__}); build it with "
                       f"python build_micro.py") from None


def load_wan_models(path: str, repo: str, with_transformer: bool = True, with_text_encoder: bool = True) -> Models:
    """Wan2.1 in diffusers format: a local folder, or a hub id already in the local cache. Without
    with_transformer the transformer is only its architecture, on the meta device (no memory); without
    with_text_encoder there is no tokenizer and no text encoder (the prompt cache is complete)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = text_encoder = None
    try:
        if with_text_encoder:
            tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch.bfloat16)
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        if with_transformer:
            transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32)
        else:
            with torch.device("meta"):
                transformer = WanTransformer3DModel.from_config(
                    WanTransformer3DModel.load_config(path, subfolder="transformer"))
    except (OSError, ValueError) as e:
        raise RunError(
            f"could not load Wan2.1 weights from {path!r} ({type(e).__name__}).\n"
            f"  Download them on a machine with network access, e.g.\n"
            f"    huggingface-cli download {repo} --local-dir ./weights/{repo.split('/')[-1]}\n"
            f"  then pass --model-path ./weights/{repo.split('/')[-1]}") from None
    return Models(tokenizer, text_encoder, transformer, vae)


def load_models(args: Args, master: bool = True, text_encoder: bool = True) -> Models:
    """Only rank 0 loads the transformer's weights; the others get its architecture on the meta device
    and receive their shards from rank 0 (`build_policy`), so no host holds a full copy per rank. The text
    encoder (11 GB) is loaded only where prompts still have to be encoded (`prompt_cache`)."""
    preset = MODEL_PRESETS[args.model]
    if "config" in preset:  # tiny and micro: cheap to build or load everywhere
        m = load_micro_model(preset["weights"]) if "weights" in preset else build_tiny_models(preset["config"], args.seed)
        return m if text_encoder else dataclasses.replace(m, tokenizer=None, text_encoder=None)
    if args.init == "random":
        return random_wan_models(preset, master, seed=args.seed, text_encoder=text_encoder)
    return load_wan_models(args.model_path or preset["repo"], preset["repo"], master, text_encoder)


def random_wan_models(preset: dict, master: bool = True, device: str | None = None, seed: int = 0,
                      text_encoder: bool = True) -> Models:
    """The published Wan2.1 architecture with random weights, no download: for benchmarks and smoke runs.
    # Note: the byte-level tokenizer stands in for UMT5's (which needs a download); shapes are the same.
    The text encoder is built in bf16 (11 GB at full size), the transformer in fp32 on rank 0 only. Each part
    has its own seed, so the transformer is the same whether or not the text encoder is built."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = encoder = None
    meta = device == "meta"
    default_dtype = torch.get_default_dtype()
    with torch.device(device or "cpu"):
        if text_encoder:
            tokenizer = byte_level_tokenizer()
            torch.manual_seed(seed_for(seed, "text_encoder"))
            torch.set_default_dtype(torch.bfloat16)
            try:
                encoder = UMT5EncoderModel(UMT5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                                      **UMT5_XXL))
            finally:
                torch.set_default_dtype(default_dtype)
        torch.manual_seed(seed_for(seed, "vae"))
        vae = AutoencoderKLWan()  # diffusers' defaults are Wan2.1's VAE
    with torch.device("cpu" if master and not meta else "meta"):
        torch.manual_seed(seed_for(seed, "transformer"))
        transformer = WanTransformer3DModel(**preset["transformer"])
    return Models(tokenizer, encoder, transformer, vae)


def activation_bytes(config, tokens: int, text_len: int, batch: int, lora_rank: int, checkpointing: bool) -> int:
    """Peak bytes autograd holds for the backward of one training forward of WanTransformer3DModel, in bf16
    on GPUs under FSDP2 (the gathered weights it also holds are counted apart). batch counts both CFG branches.

    What one block saves per video token (d = model dim, f = ffn dim, h = heads; diffusers' WanTransformerBlock):
      3 fp32 LayerNorm inputs 12d; the bf16 inputs of the q/k/v and cross-q projections 4d; the RMSNorm
      inputs of q, k and cross q 6d (CUDA's fused kernel keeps the bf16 input and the rstd); attention's
      q, k, v, out and cross q, out 12d (flash/cuDNN attention keeps no T x T matrix); the GELU input 2f;
      norm statistics and log-sum-exps 36 + 8h; LoRA: the rank-r intermediates of 6 projections 12r.
      Full fine-tuning adds what the weights' gradients need: the fp32 modulated norms 8d, the attention and fp32 FFN outputs before their gates 6d, and the
      FFN's inputs 2d + 2f. Per text token: cross-attention k before and after its RMSNorm, and v 6d (+4r).
      Per block, shared by the batch: FSDP2's bf16 copy of the fp32 rotary table 4 head_dim per token.
    Once: the projected text 2d per text token, the output head's fp32 LayerNorm input 4d per video token
    (full: + the modulated norm and the projection input 6d); the embedders' inputs (tens of MB) are left out.
    With checkpointing a block keeps only its bf16 input 2d (plus the fp32 rotary table, kept once) and
    the backward recomputes one block at a time: the peak is the stored inputs plus one block's set.
    A test checks this against the bytes a small model really saves, with and without checkpointing.
    """
    h, hd, f, r = config.num_attention_heads, config.attention_head_dim, config.ffn_dim, lora_rank
    d = h * hd
    per_token = 34 * d + 2 * f + 36 + 8 * h + (12 * r if r else 16 * d + 2 * f)  # bytes per video token, block
    block = batch * (tokens * per_token + text_len * (6 * d + 4 * r)) + tokens * 4 * hd  # one block's set
    once = batch * (text_len * 2 * d + tokens * (4 * d if r else 10 * d))               # text and output head
    if not checkpointing:
        return config.num_layers * block + once
    return config.num_layers * batch * tokens * 2 * d + tokens * 8 * hd + once + block


def dry_run(args: Args) -> str:
    """Parameter counts and the memory each of `args.dry_run` GPUs, and each rank's host, needs: from models built
    on the meta device. Every row is something the code holds; the comments in the code say where."""
    preset, world = MODEL_PRESETS[args.model], args.dry_run
    m = load_models(args) if "config" in preset else random_wan_models(preset, device="meta")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total, block = count(m.transformer), count(m.transformer.blocks[0])
    largest = max(p.numel() for p in m.transformer.parameters())
    if args.lora_rank > 0:
        add_lora(m.transformer, args.lora_rank, args.lora_alpha)
    weights = count(m.transformer)                                          # with the adapters, if any
    trainable = weights - total if args.lora_rank > 0 else total
    shape = latent_shape(args, m.vae)
    grid = token_grid(shape, m.transformer.config.patch_size)
    cfg = cfg_branches(args.guidance_scale)                                # both CFG branches carry gradients
    acts = {ckpt: activation_bytes(m.transformer.config, math.prod(grid), args.max_sequence_length,
                                   cfg * args.batch_size, args.lora_rank, ckpt) for ckpt in (True, False)}
    steps = {"flash": 1, "flow_grpo": min(int(args.train_fraction * args.num_steps), args.num_steps - 1),
             "flow_grpo_fast": args.fast_window}[args.algo]                # trained transitions per rollout
    samples = args.prompts_per_epoch * args.group_size / world            # rollouts per rank per epoch
    text_dim = m.transformer.config.text_dim
    gpu = [
        ("transformer weights, fp32, 1/N each", 4 * weights / world),
        ("gradients of what trains, fp32, 1/N (reduced every micro-batch)", 4 * trainable / world),
        ("AdamW state (2 moments), fp32, 1/N", 8 * trainable / world),
        ("EMA of what trains, fp32, 1/N", 4 * trainable / world),
        ("gathered weights: 2 blocks + root, bf16", 2 * (2 * block + total - block * len(m.transformer.blocks))),
        ("VAE, fp32, one copy per rank", 4 * count(m.vae)),
        (f"transitions kept for training: {samples:g} x {steps} x (x_k, x_k+1), fp32", samples * steps * 8 * math.prod(shape)),
        ("prompt embeddings of a micro-batch and the negative, padded", (cfg * args.batch_size + 1) * args.max_sequence_length * text_dim * 4),
    ]
    before = sum(n for _, n in gpu)
    micro = f"activations, batch {args.batch_size}" + (" x 2 (CFG)" if cfg == 2 else "")
    gpu += [("total before activations", before), (f"{micro}, checkpointed", acts[True]),
            (f"{micro}, not checkpointed", acts[False]),
            ("total per GPU, " + ("checkpointed" if args.gradient_checkpointing else "not checkpointed"),
             before + acts[args.gradient_checkpointing])]
    saved = 16 * trainable                                                 # weights, EMA, AdamW's 2 moments, fp32
    num_prompts = len(default_prompts(args)[0])
    host = [
        ("rank 0 at start-up: the whole transformer, fp32, until sharded", 4 * total),
        ("text encoder, bf16, while prompts are encoded (first run only)", 2 * count(m.text_encoder)),
        ("a checkpoint's shards staged to the host, at most (GPUs)", 2 * min(FILE_BYTES, saved) / world),
        ("rank 0 exporting: " + ("the adapters, whole" if args.lora_rank else "the largest whole tensor"),
         4 * (trainable if args.lora_rank else largest)),
    ]
    gb = lambda n: f"{n / 2**30:7.2f} GB"  # noqa: E731
    lines = [f"{args.model} on {world} GPU(s), {'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full fine-tuning'}",
             f"  transformer      {total:>15,} parameters ({trainable:,} trainable)",
             f"  text encoder     {count(m.text_encoder):>15,} parameters (loaded only to fill the prompt cache)",
             f"  VAE              {count(m.vae):>15,} parameters",
             "  memory per GPU:"]
    lines += [f"    {name:66} {gb(n)}" for name, n in gpu]
    lines += [f"    (activations at {args.height}x{args.width}, {args.num_frames} frames: {' x '.join(map(str, grid))} = "
              f"{math.prod(grid):,} tokens per video and {args.max_sequence_length} text tokens, bf16;",
              "     the backward's transient gradients come on top; while scoring, one decoded micro-batch adds "
              f"{gb(args.batch_size * args.num_frames * 3 * args.height * args.width * 4).strip()})",
              "  host memory per rank:"]
    lines += [f"    {name:66} {gb(n)}" for name, n in host]
    lines += [f"  disk: checkpoints {gb(saved).strip()} each (1/N written by each rank); prompt cache of {num_prompts:,} "
              f"prompts at most {gb(num_prompts * args.max_sequence_length * text_dim * 2).strip()} (bf16, "
              f"{text_dim * 2 // 1024} kB per real token)"]
    return "\n".join(lines)


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float) -> None:
    """LoRA on the attention projections, as the release (rank 16, alpha 32 on q, k, v, out)."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def latent_shape(args: Args, vae) -> tuple[int, int, int, int]:
    """(C, F', H', W') of a video's latent: the VAE compresses time by 4 and space by 8."""
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    return (vae.config.z_dim, (args.num_frames - 1) // t + 1, args.height // s, args.width // s)


def token_grid(latent_shape: tuple, patch_size: tuple) -> tuple[int, int, int]:
    """The transformer's tokens per video, (F', H'/2, W'/2) for Wan's 1 x 2 x 2 patches; their product is T."""
    return tuple(n // p for n, p in zip(latent_shape[1:], patch_size))


def prepare_vae(vae, device: torch.device):
    """The frozen decoder, in fp32 as WanPipeline runs it, so that the reward judges the frames inference will
    show. On GPUs with diffusers' spatial tiling (overlapping 256x256-pixel tiles at a 192-pixel stride, seams
    blended; a 480x832 frame is 3 x 5 tiles), which bounds the decoder's activations at the price of decoding the
    overlaps twice (1.7x the work at 480x832); frames no larger than a tile decode whole. Untiled on CPUs."""
    vae.requires_grad_(False).eval().to(device)  # fp32: built or loaded so
    if device.type == "cuda":
        vae.enable_tiling()  # diffusers' default tile and stride
    return vae


@torch.no_grad()
def decode_videos(vae, latents: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Latents (B, C, F', H', W') -> videos (B, F, 3, H, W) in [0, 1], fp32, one video at a time by default
    to bound memory (a decoded 480x832 video of 81 frames is 388 MB)."""
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)
    videos = []
    for chunk in latents.split(batch_size):
        z = chunk.float() * std.to(chunk.device) + mean.to(chunk.device)  # undo the latent normalisation, fp32
        video = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # (b, 3, F, H, W) in [-1, 1]
        videos.append(rearrange((video.float() + 1) / 2, "b c f h w -> b f c h w").clamp(0, 1))
    return torch.cat(videos)


# ----------------------------------------------------------------------------------------------
# Prompt embeddings: encoded once, in chunks, into a cache on disk that later runs and resumes reuse
# ----------------------------------------------------------------------------------------------

CACHE_CHUNK = 256   # prompts per cache file
ENCODE_BATCH = 16   # prompts per text-encoder forward (UMT5-XXL: 64 heads x 512 x 512 attention scores each)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_len: int) -> list[torch.Tensor]:
    """UMT5 embeddings exactly as WanPipeline computes them: its prompt_clean (ftfy's fixes, whitespace collapsed),
    tokens padded to max_len, the encoder under the attention mask, in the encoder's dtype. Returns one
    (length_i, D) tensor per prompt on the CPU, trimmed to the prompt's real token count."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tokens = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_len, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tokens.input_ids.to(text_encoder.device), tokens.attention_mask.to(text_encoder.device)
    hidden = text_encoder(ids, mask).last_hidden_state.cpu()                  # (P, L, D)
    return [h[:n].clone() for h, n in zip(hidden, tokens.attention_mask.sum(1).tolist())]  # not views of hidden


def pad_embeds(embeds: list[torch.Tensor], max_len: int) -> torch.Tensor:
    """Zero rows after each prompt's real tokens, as WanPipeline pads: a list of (length_i, D) -> (b, max_len, D)."""
    return torch.stack([torch.cat([e, e.new_zeros(max_len - len(e), e.shape[1])]) for e in embeds])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """A small file written in full or not at all: a temporary file, flushed to disk, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # several processes may write the same file
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PromptCache:
    """The embeddings of one prompt list (filled by `prompt_cache`): safetensors files of CACHE_CHUNK prompts, the
    embeddings trimmed to their real token count end to end ("embeds", (tokens, D)) with their "lengths", each
    file beside its sha256. `get` copies out only the rows asked for: a rank holds the prompts of its
    micro-batch, never the table (20,000 prompts padded to 512 tokens would be 156 GB in fp32)."""

    def __init__(self, folder: Path, num_prompts: int):
        self.folder, self.num_chunks = folder, math.ceil(num_prompts / CACHE_CHUNK)

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk_{chunk:06d}.safetensors"

    def valid(self, chunk: int) -> bool:
        digest = self.path(chunk).with_suffix(".sha256")
        return digest.is_file() and self.path(chunk).is_file() and digest.read_text() == file_sha256(self.path(chunk))

    def write(self, chunk: int, embeds: list[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.folder / f".{self.path(chunk).name}.{os.getpid()}.tmp"  # runs may share a cache
        save_file({"embeds": torch.cat(embeds), "lengths": torch.tensor([len(e) for e in embeds])}, tmp)
        os.replace(tmp, self.path(chunk))
        write_atomic(self.path(chunk).with_suffix(".sha256"), file_sha256(self.path(chunk)))  # last: it is whole

    def index(self) -> None:
        """Each prompt's length and first row in its chunk (16 bytes per prompt)."""
        from safetensors import safe_open

        lengths = []
        for chunk in range(self.num_chunks):
            with safe_open(self.path(chunk), framework="pt") as f:
                lengths.append(f.get_tensor("lengths"))
        self.lengths, self.starts = torch.cat(lengths), torch.cat([n.cumsum(0) - n for n in lengths])

    def get(self, ids) -> list[torch.Tensor]:
        """The trimmed embeddings of prompts `ids`, in that order: a list of (length_i, D) on the CPU."""
        from safetensors import safe_open

        out = []
        for i in map(int, ids):
            with safe_open(self.path(i // CACHE_CHUNK), framework="pt") as f:
                start = int(self.starts[i])
                out.append(f.get_slice("embeds")[start: start + int(self.lengths[i])])
        return out


def encoder_fingerprint(args: Args) -> str:
    """What the embeddings depend on besides the prompts: a Wan folder's tokenizer and text-encoder files (names
    and sizes: Wan2.1 1.3B and 14B share one UMT5-XXL, hence one cache) or hub id; a random encoder's seed."""
    preset = MODEL_PRESETS[args.model]
    if "weights" in preset or (args.init == "pretrained" and "repo" in preset):
        path = Path(args.model_path or preset.get("weights") or preset["repo"])
        files = sorted([str(f.relative_to(path)), f.stat().st_size] for sub in ("tokenizer", "text_encoder")
                       if (path / sub).is_dir() for f in (path / sub).rglob("*") if f.is_file())
        return json.dumps(files or str(path))
    return json.dumps([args.model, args.init, args.seed, preset_config(args.model).get("text_encoder")])


def prompt_cache(prompts: list[str], args: Args, d: "Dist", root: Path, text_encoder) -> PromptCache:
    """The cache of `prompts` under root (collective): the chunks are split over the ranks, and a rank with some
    missing calls text_encoder() for (tokenizer, encoder). Every rank then checks the chunks another rank wrote,
    so a folder that not every node sees stops the run at start-up."""
    key = json.dumps([encoder_fingerprint(args), args.max_sequence_length, prompts])
    cache = PromptCache(root / hashlib.sha256(key.encode()).hexdigest()[:16], len(prompts))
    mine = [c for c in range(cache.num_chunks) if c % d.world_size == d.rank and not cache.valid(c)]
    if mine:
        tokenizer, encoder = text_encoder()
        cache.folder.mkdir(parents=True, exist_ok=True)
        for c in tqdm(mine, desc=f"encoding {len(prompts)} prompts", disable=not d.master, leave=False):
            chunk = prompts[c * CACHE_CHUNK: (c + 1) * CACHE_CHUNK]
            cache.write(c, [e for i in range(0, len(chunk), ENCODE_BATCH)
                            for e in encode_prompts(tokenizer, encoder, chunk[i: i + ENCODE_BATCH],
                                                    args.max_sequence_length)])
    barrier(d)
    other = (d.rank + 1) % d.world_size
    bad = [c for c in range(cache.num_chunks) if c % d.world_size == other and not cache.valid(c)]
    bad = sorted(sum(all_gather_object(bad, d), []))
    if bad:
        raise RunError(f"the prompt-embedding cache {cache.folder} is missing or damaged on some rank (chunks {bad}); "
                       f"keep --embedding-cache (or --output-dir) on a file system every rank sees")
    cache.index()
    return cache


# ----------------------------------------------------------------------------------------------
# Flow-matching SDE sampler (Flow-GRPO's SDE, as the paper uses it; README: The method in one page, 1-4)
#
#   paper          code                 meaning
#   sigma_k        sigmas[k]            flow time, 1 = noise, 0 = data; x = (1 - sigma) x0 + sigma eps
#   dt_k           dt                   sigma_{k+1} - sigma_k < 0
#   v              v                    velocity prediction (after CFG)
#   g_k            std_dev_t            SDE noise level, g_max * sigma_k
#   g_k sqrt|dt_k| std                  std of the Gaussian transition x_k -> x_{k+1}
#   mean_k         prev_sample_mean     mean of that Gaussian
#   log p          log_prob             per-element MEAN log-density of x_{k+1} (not the sum)
# ----------------------------------------------------------------------------------------------

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
    """sigmas[k] broadcastable against x: a 0-dim tensor for an int k (a CPU one works with x on any device,
    without a copy), (B, 1, 1, 1, 1) on x's device for a (B,) tensor k."""
    if isinstance(k, int):
        return sigmas[k]
    return sigmas.to(x.device)[k.to(x.device)].view(-1, *([1] * (x.dim() - 1)))


def ode_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k) -> torch.Tensor:
    """Euler step of the probability-flow ODE: x_{k+1} = x_k + dt_k v."""
    dt = _at(sigmas, k + 1, x) - _at(sigmas, k, x)
    return x + dt * v


def noise_std(sigmas: torch.Tensor, sigma: torch.Tensor, noise_level: float | None = None,
              schedule: str = "linear") -> torch.Tensor:
    """The SDE's noise level g(sigma), by `schedule`:
      linear     g = g_min + (g_max - g_min) sigma, g_min = 0, g_max = noise_level or sigma_1 (the release, Wan);
      flow_grpo  g = a sqrt(sigma / (1 - sigma)), a = noise_level or 0.7 (Flow-GRPO), very large near sigma = 1.
                 As Flow-GRPO's code, the grid's first sigma (1 on its grid) is replaced by sigma_1 under the root's
                 denominator. Any g works in the sampler, lambda(t) and the loss below."""
    if schedule == "flow_grpo":
        a = 0.7 if noise_level is None else noise_level
        return a * (sigma / (1 - torch.where(sigma >= sigmas[0], sigmas[1], sigma))).sqrt()
    g_max = sigmas[1] if noise_level is None else noise_level  # a tensor, not float(): no device sync
    return g_max * sigma


def sde_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k, prev_sample=None, noise=None,
             noise_level: float | None = None, schedule: str = "linear"):
    """One step of the marginal-preserving SDE and the log-probability of its outcome (Flow-GRPO's).

    x, v: (B, C, F, H, W), fp32. k: an int or a (B,) tensor of step indices (a training batch mixes k*).
    With prev_sample given, scores it instead of drawing one; noise (like x, default: drawn here) is eps.
    noise_level and schedule choose g (`noise_std`; default: the release's, g = sigma_1 sigma).
    Returns (prev_sample, log_prob (B,), prev_sample_mean, std), std = g_k sqrt|dt_k| broadcastable to x.
    """
    sigma, sigma_next = _at(sigmas, k, x), _at(sigmas, k + 1, x)
    dt = sigma_next - sigma                                                  # < 0
    std_dev_t = noise_std(sigmas, sigma, noise_level, schedule)              # g_k
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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without making the host wait for the device: on GPUs through pinned memory and an
    asynchronous copy (a plain copy from pageable memory synchronises the stream)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def rollout(transformer, noise, embeds, neg_embeds, sigmas, sde_steps, guidance_scale, sde_generators=None,
            noise_level=None, train_steps=None, schedule="linear"):
    """Sample videos' latents: ODE steps everywhere, SDE steps where sde_steps[i, k] is True.

    noise: (B, C, F, H, W) initial latents x_0 on the sampling device; sde_steps, train_steps: (B, N) bool on the
    CPU (train_steps defaults to sde_steps). The plan is known before sampling, so the loop never asks the device
    which rows explore: no host-device sync per step. sde_generators[i] draws row i's SDE noise, on the CPU, so
    that a sample's noise never depends on its batch-mates or the device. Returns the final latents and the
    transitions that train: (x_k, x_{k+1}, log_prob on the device; k, row index on the CPU).
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
            eps = torch.zeros(x.shape)  # noise only for the rows that explore here, each from its own generator
            eps[rows] = torch.stack([torch.randn(x.shape[1:], generator=sde_generators[i]) for i in rows])
            x_sde, log_prob, _, _ = sde_step(x, v, sigmas, k, noise=to_device(eps, device), noise_level=noise_level,
                                             schedule=schedule)
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


# ----------------------------------------------------------------------------------------------
# The paper's iso-temporal grouping (README: The method in one page, 6)
# ----------------------------------------------------------------------------------------------

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


def draw_sde_steps(num_prompts: int, window: int, seed: int, epoch: int) -> torch.Tensor:
    """ITG: one k* per prompt, uniform over the first `window` steps; the same on every rank because it
    comes from the shared seed. # Note: no broadcast needed. Returns (num_prompts,)."""
    return torch.randint(0, window, (num_prompts,), generator=generator_for(seed, "k_star", epoch))


def iso_temporal_plan(num_prompts: int, group_size: int, window: int, num_steps: int, seed: int, epoch: int):
    """The epoch's global sample table. Sample j belongs to prompt j // G; its SDE step is its prompt's k*.
    Returns group_ids (P*G,), k_star (P*G,), sde_steps (P*G, N) bool: a single True per row, at k*."""
    k_prompt = draw_sde_steps(num_prompts, window, seed, epoch)              # (P,)
    group_ids = torch.arange(num_prompts).repeat_interleave(group_size)     # (P*G,)
    k_star = k_prompt[group_ids]                                            # (P*G,)
    sde_steps = torch.nn.functional.one_hot(k_star, num_steps).bool()      # (P*G, N)
    return group_ids, k_star, sde_steps


def exploration_plan(args: Args, epoch: int):
    """Which steps of each rollout are stochastic and which train: the one place where Flash-GRPO and the
    baselines it is compared with differ (the paper's Figures 4 and 5). Same sampler, same loss for all.

      flash           one SDE step k* per rollout, drawn per prompt (ITG) or, with --no-itg, per rollout
      flow_grpo       as Flow-GRPO's scripts: SDE at every step but the last (an ODE step: its Gaussian is too
                      sharp to train), and the first int(--train-fraction x N) of them train
      flow_grpo_fast  a window of --fast-window consecutive SDE steps inside the first --sde-window steps; only the
                      window trains. # Note: Flow-GRPO-Fast draws the window once per sampling call (a GPU's
                      batch), so the rollouts of a group, spread over GPUs and batches, explore at different
                      steps; here each rollout draws its own: the same in distribution, and independent of the
                      world size and batch shapes.
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
        return group_ids, sde_steps, (step < min(int(args.train_fraction * N), N - 1)).expand(P * G, N)
    start = torch.randint(0, args.sde_window - args.fast_window + 1, (P * G, 1), generator=gen)  # per rollout
    sde_steps = (step >= start) & (step < start + args.fast_window)                             # (P*G, N)
    return group_ids, sde_steps, sde_steps


def initial_noise(shape, seed: int, epoch: int, sample_ids) -> torch.Tensor:
    """x_0 per sample from its own generator: rollouts of a group differ in their initial noise.
    # Note: seeded by (seed, epoch, global sample index), not by rank, so ranks and batches do not matter."""
    return torch.stack([torch.randn(shape, generator=generator_for(seed, "x0", epoch, int(j))) for j in sample_ids])


# ----------------------------------------------------------------------------------------------
# Rewards to advantages (README: The method in one page, 7)
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# lambda(t) and the paper's temporal gradient rectification; the clipped GRPO loss (Flow-GRPO's)
# ----------------------------------------------------------------------------------------------

def lambda_t(sigmas: torch.Tensor, k, noise_level: float | None = None, schedule: str = "linear") -> torch.Tensor:
    """Gradient scale of the SDE log-probability w.r.t. the velocity: d log_prob / d v = -(eps / D) lambda_k.

    lambda_k = sqrt|dt_k| / g_k + g_k sqrt|dt_k| (1 - sigma_k) / (2 sigma_k), from the grid: the paper's lambda(t).
    # Note: computed, not a table, so any step count, shift and noise level work.
    """
    k = torch.as_tensor(k)
    sigma, dt = sigmas[k], sigmas[k + 1] - sigmas[k]
    g = noise_std(sigmas, sigma, noise_level, schedule)
    return dt.abs().sqrt() / g + g * dt.abs().sqrt() * (1 - sigma) / (2 * sigma)


def tgr_weights(sigmas: torch.Tensor, k: torch.Tensor, noise_level: float | None = None,
                batch_k: torch.Tensor | None = None, schedule: str = "linear") -> torch.Tensor:
    """TGR: w_i = (1 / lambda(t_i)) / mean_j (1 / lambda(t_j)), the mean over the global batch batch_k
    (default: k itself). k: (N,) steps of the samples to weight."""
    inv = 1.0 / lambda_t(sigmas, k, noise_level, schedule)
    return inv / (inv if batch_k is None else 1.0 / lambda_t(sigmas, batch_k, noise_level, schedule)).mean()


def grpo_loss(log_prob, old_log_prob, advantages, weights, clip_range: float):
    """L = mean_i max(-w_i A_i rho_i, -w_i A_i clip(rho_i, 1 - eps, 1 + eps)), rho = exp(log p - log p_old).

    All inputs (B,). Returns the loss and diagnostics: clipfrac (share of clipped ratios) and approx_kl
    (0.5 mean (log rho)^2, as DDPO and Flow-GRPO report it).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    pg_loss1 = -weights * advantages * ratio
    pg_loss2 = -weights * advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        diagnostics = {
            "clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            "ratio": ratio.mean(),
        }
    return loss, diagnostics


def kl_to_reference(prev_sample_mean, ref_prev_sample_mean, std) -> torch.Tensor:
    """Optional KL(pi_theta || pi_ref) of the step's Gaussians: ||mean - mean_ref||^2 / (2 std^2), per-element
    mean, (B,)."""
    return ((prev_sample_mean - ref_prev_sample_mean) ** 2 / (2 * std**2)).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------
# Distributed: FSDP2 over 1..N ranks, plain launch or torchrun; the same code path everywhere
# ----------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


class RunError(SystemExit):
    """A problem every rank finds alike (a bad checkpoint, missing weights): printed once, by `exit_once`."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


def setup_distributed() -> Dist:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain launch becomes a group of one, so that FSDP2
    and the collectives below run unchanged. NCCL on GPUs, gloo on CPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world_size, device)


# Every collective goes through these helpers, which put their input on the rank's device: NCCL refuses the CPU
# tensors gloo takes, so a CPU tensor in a collective would pass every CPU test and fail on GPUs. A test checks
# that no other function of this file calls one (FSDP2 and torch.distributed.checkpoint run their own).

def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier(device_ids=[d.device.index]) if d.device.type == "cuda" else dist.barrier()


def all_gather_cat(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate every rank's (n, ...) tensor in rank order, on this rank's device: the global batch."""
    x = x.to(d.device).contiguous()
    if d.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean over ranks of a tensor of the same shape on every rank, on this rank's device."""
    x = x.to(d.device, copy=True)
    if d.world_size > 1:
        dist.all_reduce(x)
        x /= d.world_size
    return x


def broadcast_(t: torch.Tensor, d: Dist) -> None:
    """Rank 0's values of t, copied in place into t on every rank."""
    if d.world_size > 1:
        on_device = t.to(d.device)
        dist.broadcast(on_device, src=0)
        t.copy_(on_device)


def all_gather_object(obj, d: Dist) -> list:
    """Every rank's picklable `obj`, in rank order (small things: digests, RNG states, problems found)."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def build_policy(source: torch.nn.Module, args: Args, d: Dist, trainable: bool = True) -> torch.nn.Module:
    """The transformer as FSDP2 trains it (torchtitan's recipe): the architecture on the meta device, LoRA,
    activation checkpointing, fully_shard on each block and then the root, then the weights streamed from
    rank 0's copy (`source`, meta on the other ranks) so that each rank only ever holds its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
    policy.requires_grad_(False)
    for name, p in policy.named_parameters():
        p.requires_grad_(trainable and (not lora or "lora_" in name))
    if trainable and args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    # bf16 compute with fp32 gradient reduction on GPUs; fp32 throughout on CPUs
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if d.device.type == "cuda" else MixedPrecisionPolicy())
    for block in policy.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    policy.to_empty(device=d.device)
    full = source.state_dict() if d.master else {}
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():  # buffers that are not in the state dict (rotary tables) come from rank 0 too
        source_buffers = dict(source.named_buffers()) if d.master else {}
        for name, buf in policy.named_buffers():
            if d.master:
                buf.copy_(source_buffers[name])
            broadcast_(buf, d)
    return policy.eval()


def local_sample_ids(num_samples: int, train_batch_size: int, d: Dist) -> torch.Tensor:
    """This rank's share of the epoch's global samples. Each optimizer step trains one contiguous slice of
    train_batch_size global samples, split evenly over the ranks, so a step sees the same samples with
    1 rank or N: rank r holds part r of every slice. (rank 0 of 2, slices of 4: samples 0, 1, 4, 5, ...)"""
    ids = torch.arange(num_samples).view(-1, d.world_size, train_batch_size // d.world_size)  # (steps, W, T/W)
    return ids[:, d.rank].flatten()


def reshard(module: torch.nn.Module) -> None:
    """Drop FSDP2's gathered copies of the weights, so the next forward sees weights changed outside the
    optimizer (EMA swaps, checkpoint loads). The root module keeps them after a forward otherwise."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def print0(*a, d: Dist | None = None):
    if d is None or d.master:
        tqdm.write(" ".join(str(x) for x in a))


# ----------------------------------------------------------------------------------------------
# EMA of the trained weights (the release: decay 0.9 every 8 optimizer steps)
# ----------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of the trainable parameters (sharded like them); swapped in for
    evaluation, saved in checkpoints, exported."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def exchange(self):
        """Swap the EMA and the live weights in place, one tensor at a time: no second copy of the weights (a
        backup would cost 7 GB per GPU at 14B with full fine-tuning on 8 GPUs)."""
        for s, p in zip(self.shadow, self.params):
            live = p.detach().clone()
            p.copy_(s)
            s.copy_(live)

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        self.exchange()
        reshard(module)
        try:
            yield
        finally:
            self.exchange()
            reshard(module)


# ----------------------------------------------------------------------------------------------
# Checkpoints and export: every rank writes its own shards in parallel (torch.distributed.checkpoint into
# safetensors files: nothing is pickled), and a checkpoint proves it is whole before anything is read
# ----------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 2
FILE_BYTES = 2**30  # whole-tensor bytes per checkpoint file; a rank stages its 1/N of one file at a time
# settings that must not change across a resume: they define the model, the data and noise stream, the rewards
RESUME_KEYS = ("model", "init", "lora_rank", "lora_alpha", "algo", "itg", "seed", "prompts_per_epoch", "group_size",
               "train_batch_size", "num_steps", "shift", "sde_window", "train_fraction", "fast_window", "height",
               "width", "num_frames", "guidance_scale", "negative_prompt", "max_sequence_length", "noise_schedule", "noise_level",
               "reward", "reward_frames")


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is a hidden .tmp folder and never listed)."""
    return sorted((out_dir / "checkpoints").glob("epoch_[0-9][0-9][0-9][0-9][0-9][0-9]"))


def checkpoint_tensors(trainer: "Trainer", with_optimizer: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by name, as this rank holds it (DTensor shards): the trained weights, their
    EMA and AdamW's state (created empty here when a checkpoint is to be loaded into it)."""
    state = {}
    for (name, p), ema in zip(trainer.trainable.items(), trainer.ema.shadow):
        state[f"model.{name}"], state[f"ema.{name}"] = p, ema
        if with_optimizer:
            adam = trainer.optimizer.state[p]
            if not adam:  # AdamW's own lazy initial state: a CPU step counter and two zero moments
                adam.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            for key in ("step", "exp_avg", "exp_avg_sq"):
                state[f"optimizer.{name}.{key}"] = adam[key]
    return state


def split_by_bytes(tensors: dict, limit: int) -> list[list[str]]:
    """Consecutive tensor names in groups of at most `limit` whole-tensor bytes (a larger tensor is alone)."""
    groups, used = [[]], 0
    for n, t in tensors.items():
        size = t.numel() * t.element_size()
        if groups[-1] and used + size > limit:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += size
    return groups


def describe(tensors: dict) -> dict[str, list]:
    """{name: [global shape, dtype]}: what meta.json promises and a loader checks."""
    return {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in tensors.items()}


def run_identity(trainer: "Trainer") -> dict:
    """The settings a checkpoint must agree with, and the training prompts' digest (a moved file is fine)."""
    return {**{k: getattr(trainer.args, k) for k in RESUME_KEYS},
            "prompts": hashlib.sha256("\n".join(trainer.train_prompts).encode()).hexdigest()}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(trainer: "Trainer", epoch: int, out_dir: Path) -> None:
    """Everything needed to continue bit-for-bit (collective). Every rank writes its own shards into a hidden
    temporary folder, in parallel, and hashes them; rank 0 then writes meta.json (settings, counters, RNG states,
    every tensor's name, shape and dtype, every file's sha256) and renames the folder, so a crash leaves the
    previous checkpoint whole. No rank gathers anything: saving the 14B model's weights, EMA and AdamW state (213
    GB) on 8 ranks, each writes its 27 GB in files of 1/8 GB, staging at most two such on the host at a time."""
    import shutil

    import torch.distributed.checkpoint as dcp

    d = trainer.d
    final = out_dir / "checkpoints" / f"epoch_{epoch:06d}"
    tmp = final.parent / f".{final.name}.tmp"
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    state = checkpoint_tensors(trainer, with_optimizer=trainer.optimizer_steps > 0)
    index = {n: i + 1 for i, names in enumerate(split_by_bytes(state, FILE_BYTES)) for n in names}
    dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), fqn_to_index_mapping=index,
                                                                save_distributed=True))
    mine = {f.name: file_sha256(f) for f in tmp.glob(f"shard-{d.rank + 1:05d}-*.safetensors")}  # what I wrote
    files = {name: digest for part in all_gather_object(mine, d) for name, digest in part.items()}
    rng = all_gather_object(base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(), d)
    if d.master:
        meta = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "optimizer_steps": trainer.optimizer_steps,
                "bad_steps_in_row": trainer.bad_steps_in_row, "forward_equivalents": trainer.forward_equivalents,
                "world_size": d.world_size,
                "settings": run_identity(trainer), "rng": rng, "tensors": describe(state), "files": files}
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        for old in checkpoint_dirs(out_dir)[: -trainer.args.keep_checkpoints]:
            shutil.rmtree(old)
    barrier(d)


def check_checkpoint(trainer: "Trainer", path: Path, state: dict, meta) -> str | None:
    """Why the checkpoint at path cannot be used by this run, or None, from meta.json and the safetensors
    headers (never a tensor; the digests are checked apart, split over the ranks)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    fields = {"epoch": int, "optimizer_steps": int, "bad_steps_in_row": int, "forward_equivalents": int,
              "world_size": int, "settings": dict,
              "rng": list, "tensors": dict, "files": dict}
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        return f"is corrupt or of another format (meta.json format {found!r}, expected {CHECKPOINT_FORMAT})"
    bad = [k for k, kind in fields.items() if not isinstance(meta.get(k), kind) or isinstance(meta.get(k), bool)]
    if bad:
        return f"is corrupt (meta.json lacks a valid {', '.join(bad)})"
    ours = run_identity(trainer)
    changed = [f"{k} ({meta['settings'].get(k)!r} -> {v!r})" for k, v in ours.items() if meta["settings"].get(k) != v]
    if changed:
        return f"was made with other settings (checkpoint -> this run): {', '.join(changed)}"
    if meta["tensors"] != describe(state):
        return ("holds other tensors than this run trains (another model or LoRA rank, another dtype, or a missing "
                "optimizer state)")
    on_disk = sorted(f.name for f in path.glob("*.safetensors"))
    if on_disk != sorted(meta["files"]):
        return f"is incomplete (files on disk differ from meta.json: {sorted(set(on_disk) ^ set(meta['files']))})"
    try:  # the safetensors headers: which slices of which tensors the files hold
        held = HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any failure to parse a header means a corrupt file
        return f"is corrupt ({type(e).__name__}: {e})"
    if {n: [list(m.size), str(m.properties.dtype).removeprefix("torch.")] for n, m in held.items()} != meta["tensors"]:
        return "is corrupt (its files hold other tensors than meta.json describes)"
    return None


def load_checkpoint(trainer: "Trainer", path: Path) -> int:
    """Restore a checkpoint (collective) once it has proved whole: meta.json describes this run, every file is
    there with its sha256, and they hold exactly the tensors this run expects. Each rank reads the parts of the
    shards it holds, whatever the world size that wrote them. Returns the checkpoint's epoch."""
    import torch.distributed.checkpoint as dcp

    d = trainer.d
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        meta = {"format": f"unreadable: {type(e).__name__}"}
    optimizer_steps = meta.get("optimizer_steps") if isinstance(meta, dict) else None
    state = checkpoint_tensors(trainer, with_optimizer=isinstance(optimizer_steps, int) and optimizer_steps > 0)
    problems = [p for p in all_gather_object(check_checkpoint(trainer, path, state, meta), d) if p is not None]
    if not problems:  # every file's sha256, the files split over the ranks
        mine = sorted(meta["files"])[d.rank:: d.world_size]
        damaged = sum(all_gather_object([n for n in mine if file_sha256(path / n) != meta["files"][n]], d), [])
        problems = [f"is corrupt (sha256 differs in {', '.join(damaged)})"] if damaged else []
    if problems:
        raise RunError(f"--resume: checkpoint {path} {problems[0]}; nothing was changed")
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    local = [t.to_local() if hasattr(t, "to_local") else t for t in state.values()]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).all().float() if local else torch.ones(())
    if all_reduce_mean(finite, d).item() < 1:
        raise RunError(f"--resume: checkpoint {path} holds non-finite values; nothing was changed")
    reshard(trainer.policy)
    trainer.optimizer_steps, trainer.bad_steps_in_row = meta["optimizer_steps"], meta["bad_steps_in_row"]
    trainer.forward_equivalents = meta["forward_equivalents"]
    if len(meta["rng"]) == d.world_size:  # the data and noise never depend on it; it only matters for user code
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(meta["rng"][d.rank])), dtype=torch.uint8))
    return meta["epoch"]


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@torch.no_grad()
def save_streamed(tensors: dict, folder: Path, d: Dist, shard_bytes: int = 5 * 2**30,
                  name: str = "diffusion_pytorch_model") -> None:
    """Whole tensors from FSDP2 shards into diffusers' safetensors files (with an index past shard_bytes), one
    tensor at a time (collective): rank 0 writes each file's header from the shapes, then appends every tensor as
    it is gathered and lets it go, so no rank holds more than its shards and one whole tensor (0.6 GB at 14B)."""
    files, weight_map = split_by_bytes(tensors, shard_bytes), {}
    for i, names in enumerate(files):
        file = f"{name}.safetensors" if len(files) == 1 else f"{name}-{i + 1:05d}-of-{len(files):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            t = tensors[n]
            size = t.numel() * t.element_size()
            header[n] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
            offset, weight_map[n] = offset + size, file
        with open(folder / file, "wb") if d.master else contextlib.nullcontext() as f:
            if d.master:
                raw = json.dumps(header).encode()
                raw += b" " * (-len(raw) % 8)                                   # the data starts 8-byte aligned
                f.write(len(raw).to_bytes(8, "little") + raw)
            for n in names:
                whole = full_tensor(tensors[n].detach())                        # collective
                if d.master:
                    f.write(whole.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del whole
    if d.master and len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_atomic(folder / f"{name}.safetensors.index.json",
                     json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def export_model(trainer: "Trainer", out_dir: Path, shard_bytes: int = 5 * 2**30) -> Path:
    """The EMA weights in diffusers format, in a hidden folder renamed to OUTPUT_DIR/export (collective): with
    LoRA the adapters alone (WanPipeline.load_lora_weights), else the whole transformer, streamed."""
    import shutil

    a, d, policy = trainer.args, trainer.d, trainer.policy
    ema = dict(zip(trainer.trainable, trainer.ema.shadow))
    path, tmp = out_dir / "export", out_dir / ".export.tmp"
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "transformer").mkdir(parents=True)
    barrier(d)
    if a.lora_rank > 0:
        from diffusers import WanPipeline

        layers = {}
        for name, t in ema.items():  # the adapters only: 200 MB at 14B, rank 16
            whole = full_tensor(t.detach())
            layers[name.replace(".default", "")] = whole.cpu() if d.master else None
        if d.master:
            shutil.rmtree(tmp / "transformer")
            WanPipeline.save_lora_weights(tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata={
                "r": a.lora_rank, "lora_alpha": a.lora_alpha, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    else:  # every weight trains, so every weight has an EMA (WanTransformer3DModel's buffers are not saved)
        if d.master:
            policy.save_config(tmp / "transformer")
        save_streamed({n: ema.get(n, p) for n, p in policy.named_parameters()}, tmp / "transformer", d, shard_bytes)
    if d.master:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier(d)
    return path


# ----------------------------------------------------------------------------------------------
# Training loop: sample with ITG -> score -> advantages -> one-step clipped, TGR-weighted loss
# ----------------------------------------------------------------------------------------------

def save_video(frames: torch.Tensor, path: Path, fps: int = 8) -> Path:
    """(F, 3, H, W) in [0, 1] -> `path`.mp4 (H.264, through diffusers' export_to_video) when imageio and
    imageio-ffmpeg are installed, else `path`.gif (Pillow). path has no suffix; returns the file written."""
    from PIL import Image

    arrays = (rearrange(frames, "f c h w -> f h w c") * 255).round().byte().cpu().numpy()
    images = [Image.fromarray(a) for a in arrays]  # export_to_video would truncate float frames; we round
    try:
        import imageio  # noqa: F401  (export_to_video falls back to OpenCV's mp4v without it)
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary)
        from diffusers.utils import export_to_video
    except ImportError:
        path = Path(f"{path}.gif")  # not with_suffix: the name holds a reward such as 0.123
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    return Path(export_to_video(images, f"{path}.mp4", fps=fps))


def save_sheet(videos: torch.Tensor, path: Path) -> None:
    """(B, F, 3, H, W) in [0, 1] -> one PNG: a row per video, 8 of its frames at most left to right, small
    videos scaled up to 128 pixels high."""
    from PIL import Image

    frames = torch.linspace(0, videos.shape[1] - 1, min(8, videos.shape[1])).round().long()
    scale = max(1, 128 // videos.shape[-2])
    grid = rearrange(videos[:, frames], "b f c h w -> (b h) (f w) c").repeat_interleave(scale, 0)
    grid = grid.repeat_interleave(scale, 1)
    Image.fromarray((grid * 255).round().byte().cpu().numpy()).save(path)


def score_videos(reward_fn, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(B, F, 3, H, W) -> (B,). A reward that returns NaN, inf or the wrong shape stops the run, named."""
    try:
        return reward_fn(videos, prompts).float()
    except reward_lib.RewardError as e:
        raise SystemExit(f"flash_grpo.py: error: {e}") from None


class Trainer:
    """Holds the models, the optimizer and the sampler state; one `sample()` + `train()` is one RL epoch."""

    def __init__(self, args: Args, d: Dist):
        self.args, self.d = args, d
        self.models = m = load_models(args, d.master, text_encoder=False)
        try:
            self.reward_fn = (reward_lib.remote_reward(args.reward_url) if args.reward_url else
                              reward_lib.build_reward(args.reward, args.reward_frames))
        except ValueError as e:  # a learned reward's weights are missing: say what to download
            raise RunError(f"--reward {args.reward}: {e}") from None
        prepare_vae(m.vae, d.device)                                # frozen, unsharded, one copy per rank
        # Prompts go through the text encoder once, into the embedding cache; the encoder is loaded only where
        # chunks are missing and freed right after, so it holds no memory while training.
        self.train_prompts, eval_prompts = default_prompts(args)
        self.eval_prompts = eval_prompts[: args.num_eval_prompts]
        root = Path(args.embedding_cache or (Path(args.output_dir) / "embeddings" if args.output_dir else
                                             Path(tempfile.gettempdir()) / "flash_grpo_embeddings"))

        @functools.cache
        def text_encoder():
            e = load_models(args, master=False, text_encoder=True)
            return e.tokenizer, e.text_encoder.requires_grad_(False).eval().to(d.device)

        self.train_cache, self.eval_cache, neg_cache = (
            prompt_cache(prompts, args, d, root, text_encoder)
            for prompts in (self.train_prompts, self.eval_prompts, [args.negative_prompt]))
        text_encoder.cache_clear()
        self.neg_embeds = self.prompt_embeds([0], neg_cache)                # (1, L, D), kept on the device
        # The policy: LoRA adapters (release) or every transformer weight, sharded with FSDP2.
        self.reference = None
        if args.beta > 0 and args.lora_rank == 0:  # with LoRA the reference is the adapter switched off
            self.reference = build_policy(m.transformer, args, d, trainable=False)
        self.policy = build_policy(m.transformer, args, d)
        m.transformer = None  # rank 0's full copy is no longer needed
        self.trainable = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        self.params = list(self.trainable.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, betas=args.adam_betas,
                                           eps=args.adam_eps, weight_decay=args.weight_decay)
        self.ema = EMA(self.params, args.ema_decay)
        self.sigmas = flow_sigmas(args.num_steps, args.shift)
        self.latent_shape = latent_shape(args, m.vae)
        self.optimizer_steps = self.bad_steps_in_row = 0
        # compute spent, machine-independent: videos through the transformer (CFG's branches count apart), a
        # backward counted as two forwards; rollouts and training, not evaluation
        self.forward_equivalents = 0

    def prompt_embeds(self, ids, cache: PromptCache | None = None) -> torch.Tensor:
        """Padded embeddings (b, L, D) of prompts `ids` (of the training list by default) on this rank's device."""
        cache = self.train_cache if cache is None else cache
        return to_device(pad_embeds(cache.get(ids), self.args.max_sequence_length), self.d.device)

    def reference_velocity(self, x, sigma, embeds, neg):
        transformer = self.policy if self.reference is None else self.reference
        ctx = adapters_disabled(transformer) if self.reference is None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            return predict_velocity(transformer, x, sigma, embeds, neg, self.args.guidance_scale)

    def sample(self, epoch: int):
        """Sample with ITG, score, advantages, on this rank's share of the epoch's global batch. Each micro-batch is decoded
        and scored as soon as it is sampled, so at most one micro-batch of videos exists at a time. Returns the
        transitions that train (latents on the device), the epoch's rewards (every rank's) and this rank's final
        latents (on the CPU)."""
        a, d, m = self.args, self.d, self.models
        num_samples = a.prompts_per_epoch * a.group_size
        prompt_ids = epoch_prompt_indices(len(self.train_prompts), a.prompts_per_epoch, a.seed, epoch)  # (P,)
        group_ids, sde_steps, train_steps = exploration_plan(a, epoch)     # (P*G,), (P*G, N), (P*G, N)
        local = local_sample_ids(num_samples, a.train_batch_size, d)      # this rank's global sample ids
        samples = {"x_t": [], "x_next": [], "k": [], "log_prob": [], "sample": []}
        rewards, finals = [], []
        for start in tqdm(range(0, len(local), a.batch_size), desc=f"epoch {epoch} rollouts", leave=False,
                          disable=not d.master):
            ids = local[start: start + a.batch_size]                        # global sample ids of this batch
            embeds = self.prompt_embeds(prompt_ids[group_ids[ids]])         # (b, L, D)
            neg = self.neg_embeds.expand_as(embeds)
            noise = to_device(initial_noise(self.latent_shape, a.seed, epoch, ids), d.device)  # (b, C, F, H, W)
            gens = [generator_for(a.seed, "sde", epoch, int(j)) for j in ids]
            latents, tr = rollout(self.policy, noise, embeds, neg, self.sigmas, sde_steps[ids],
                                  a.guidance_scale, gens, a.noise_level, train_steps[ids], a.noise_schedule)
            self.forward_equivalents += len(ids) * a.num_steps * cfg_branches(a.guidance_scale) * d.world_size
            for name in ("x_t", "x_next", "k", "log_prob"):
                samples[name].append(tr[name])
            samples["sample"].append(ids[tr["index"]])
            videos = decode_videos(m.vae, latents)                           # (b, F, 3, H, W), freed below
            if videos.shape[1:] != (a.num_frames, 3, a.height, a.width):  # the VAE config's scale factors lie
                raise RunError(f"the VAE decodes {tuple(videos.shape[1:])} from latents {self.latent_shape}, not "
                               f"{(a.num_frames, 3, a.height, a.width)}: check its scale_factor_temporal and _spatial")
            prompts = [self.train_prompts[int(p)] for p in prompt_ids[group_ids[ids]]]
            rewards.append(score_videos(self.reward_fn, videos, prompts).to(d.device))
            finals.append(latents.cpu())
            del videos
        samples = {name: torch.cat(v) for name, v in samples.items()}
        order = all_gather_cat(local, d).cpu()                             # which global sample each row is
        rewards = torch.empty(num_samples).index_copy_(0, order, all_gather_cat(torch.cat(rewards), d).cpu())
        # Note: groups with equal rewards keep advantage 0 instead of being dropped (no gradient, same work
        # on every rank)
        advantages = group_advantages(rewards, group_ids, a.global_std, a.adv_clip)
        j, k = samples["sample"], samples["k"]                              # per trained transition
        trained_k = train_steps.nonzero()[:, 1]                            # every trained step, global batch
        weights = (tgr_weights(self.sigmas, k, a.noise_level, trained_k, a.noise_schedule) if a.tgr else
                   torch.ones(len(k)))
        samples.update(advantages=advantages[j], weights=weights, group=group_ids[j],
                       prompt=prompt_ids[group_ids[j]])                    # embeddings are looked up when training
        self.plan = {"epoch": epoch, "prompts": prompt_ids.tolist(),
                     "train_steps": [row.nonzero().flatten().tolist() for row in train_steps],
                     "rewards": [round(r, 6) for r in rewards.tolist()],
                     "advantages": [round(x, 6) for x in advantages.tolist()]}  # the epoch's global table
        return samples, rewards, torch.cat(finals)

    def train(self, samples: dict) -> dict:
        """Train: recompute the one explored step per sample, the clipped TGR-weighted loss, optimizer steps.
        Statistics stay on the device and come to the host with the gradient norm: one sync per optimizer step."""
        a, d = self.args, self.d
        n = samples["k"].shape[0]
        per_sample = n // len(samples["sample"].unique())                   # trained steps per rollout
        per_step = a.train_batch_size // d.world_size * per_sample          # local transitions per optimizer step
        on_device = {name: to_device(samples[name], d.device) for name in ("k", "advantages", "weights")}
        sigmas = self.sigmas.to(d.device)
        stats = {"loss": [], "kl": [], "clipfrac": [], "approx_kl": [], "grad_norm": [], "skipped_steps": 0,
                 "micro_batches": 0}
        ratio_first = None
        self.policy.train()
        # Note: no reshuffle: micro-batches are the rollout batches, so the first ratio is exactly 1
        for step_start in range(0, n, per_step):
            step_sums = torch.zeros(4, device=d.device)                     # loss, kl, clipfrac, approx_kl
            starts = range(step_start, min(step_start + per_step, n), a.batch_size)
            for start in starts:
                mb = slice(start, start + a.batch_size)
                x, x_next, old_log_prob = samples["x_t"][mb], samples["x_next"][mb], samples["log_prob"][mb]
                k = on_device["k"][mb]
                embeds = self.prompt_embeds(samples["prompt"][mb])          # (b, L, D)
                neg = self.neg_embeds.expand_as(embeds)
                v = predict_velocity(self.policy, x, sigmas[k], embeds, neg, a.guidance_scale)
                _, log_prob, mean, std = sde_step(x, v, sigmas, k, prev_sample=x_next, noise_level=a.noise_level,
                                                  schedule=a.noise_schedule)
                loss, diag = grpo_loss(log_prob, old_log_prob, on_device["advantages"][mb], on_device["weights"][mb],
                                       a.clip_range)
                if ratio_first is None:
                    ratio_first = torch.exp(log_prob - old_log_prob).detach()
                kl = torch.zeros((), device=d.device)
                if a.beta > 0:
                    ref_v = self.reference_velocity(x, sigmas[k], embeds, neg)
                    ref_mean = sde_step(x, ref_v, sigmas, k, prev_sample=x_next, noise_level=a.noise_level,
                                        schedule=a.noise_schedule)[2]
                    kl = kl_to_reference(mean, ref_mean, std).mean()
                    loss = loss + a.beta * kl
                # the micro-batch mean, rescaled so that the step sees the mean over its samples; FSDP averages
                # over ranks, which makes it the mean over the global batch of the step. FSDP2 reduce-scatters
                # after every micro-batch, so only sharded gradients are ever held (1/N of them per rank).
                (loss * len(x) / per_step).backward()
                self.forward_equivalents += len(x) * cfg_branches(a.guidance_scale) * (3 + (a.beta > 0)) * d.world_size
                step_sums += torch.stack([loss, kl, diag["clipfrac"], diag["approx_kl"]]).detach()
                stats["micro_batches"] += 1
            grad_norm, step_means = self.optimizer_step(step_sums / len(starts))
            for name, value in zip(("loss", "kl", "clipfrac", "approx_kl"), step_means):
                stats[name].append(value)
            if grad_norm is None:
                stats["skipped_steps"] += 1
            else:
                stats["grad_norm"].append(grad_norm)
        self.policy.eval()
        stats["ratio_first"] = ratio_first                                  # (b,), on the device
        return stats

    def optimizer_step(self, step_stats: torch.Tensor | None = None) -> tuple[float | None, list[float]]:
        """Clip and step; a non-finite gradient skips the step (counted), and too many in a row abort. The
        gradient norm and the step's statistics reach the host together: the one device sync of the step."""
        a = self.args
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, a.max_grad_norm))
        step_stats = torch.zeros(0) if step_stats is None else step_stats
        grad_norm, *step_stats = torch.cat([grad_norm.reshape(1).float(), step_stats.to(grad_norm.device)]).tolist()
        if not math.isfinite(grad_norm):  # every rank sees the same global norm, so all skip together
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_row += 1
            if self.bad_steps_in_row >= a.max_bad_steps:
                raise RunError(f"{self.bad_steps_in_row} optimizer steps in a row had non-finite gradients; "
                               f"stopping (see --max-bad-steps, try a lower --learning-rate)")
            return None, step_stats
        self.bad_steps_in_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reshard(self.policy)  # no stale gathered weights in the next forward
        self.optimizer_steps += 1
        if self.optimizer_steps % a.ema_every == 0:
            self.ema.update()
        return grad_norm, step_stats

    @torch.no_grad()
    def evaluate(self, tag: str, out_dir: Path | None, report=None) -> list[float]:
        """Deterministic ODE samples of the held-out prompts with the EMA weights; each prompt's reward. The
        prompts are split over the ranks (each rank takes a block; every rank runs the same number of forwards,
        the last prompt repeated), and each rank writes its own videos, named eval_TAG_promptI_..., and hands
        them to report(name, video). Rank 0 also writes eval_TAG.png, its first 8 videos frame by frame."""
        a, d, m = self.args, self.d, self.models
        sigmas, n = flow_sigmas(a.eval_steps, a.shift), len(self.eval_prompts)
        per_rank = math.ceil(n / d.world_size)
        block = range(d.rank * per_rank, (d.rank + 1) * per_rank)      # this rank's prompts; past n: padding
        rewards = []
        with self.ema.swapped_in(self.policy):
            for start in range(0, per_rank, a.batch_size):
                ids = [min(i, n - 1) for i in block[start: start + a.batch_size]]
                noise = torch.stack([torch.randn(self.latent_shape, generator=generator_for(a.seed, "eval", i))
                                     for i in ids])
                embeds = self.prompt_embeds(ids, self.eval_cache)
                latents = sample_ode(self.policy, to_device(noise, d.device), embeds,
                                     self.neg_embeds.expand_as(embeds), sigmas, a.guidance_scale)
                videos = decode_videos(m.vae, latents)
                rewards.append(score_videos(self.reward_fn, videos, [self.eval_prompts[i] for i in ids]).to(d.device))
                for i, video, r in zip(block[start: start + a.batch_size], videos, rewards[-1].tolist()):
                    slug = "".join(c if c.isalnum() else "_" for c in self.eval_prompts[i][:40]).strip("_")
                    if out_dir is not None and i < n:
                        save_video(video, out_dir / f"eval_{tag}_prompt{i}_{slug}_reward{r:.3f}")
                    if report is not None and i < n:
                        report(f"eval/prompt{i}_{slug}", video)
                if out_dir is not None and d.rank == 0 and start == 0:
                    save_sheet(videos[:8], out_dir / f"eval_{tag}.png")
        return all_gather_cat(torch.cat(rewards), d)[:n].tolist()                 # in prompt order


@contextlib.contextmanager
def adapters_disabled(transformer):
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def read_log(path: Path, before_epoch: int, d: Dist) -> str:
    """The rows of a JSONL log (metrics, rollouts) of the epochs before `before_epoch`. A torn last line (a kill
    while appending) is dropped with a warning; a damaged line elsewhere stops the run (every rank reads)."""
    lines, rows = path.read_text().splitlines() if path.exists() else [], []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            rows += [line + "\n"] if row["epoch"] < before_epoch else []
        except (ValueError, TypeError, KeyError):
            if i < len(lines) - 1:
                raise RunError(f"--resume: {path} line {i + 1} is damaged; repair or remove that line") from None
            if d.master:
                warnings.warn(f"{path}: dropped a torn last line (the run was killed while writing it)")
    return "".join(rows)


class Reporter:
    """Metrics and evaluation videos also where people already look (diffusers' --report-to), from rank 0:
    TensorBoard (OUTPUT_DIR/tensorboard) or Weights & Biases. Both are optional extras."""

    def __init__(self, args: Args, out_dir: Path | None):
        self.kind, self.epoch = args.report_to, 0
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.run = SummaryWriter(str(out_dir / "tensorboard"))
        else:
            import wandb

            self.run = wandb.init(project="flash-grpo", config=dataclasses.asdict(args),
                                  dir=str(out_dir) if out_dir is not None else None)

    def metrics(self, row: dict) -> None:
        self.epoch = row["epoch"]
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.kind == "tensorboard":
            for name, value in numbers.items():
                self.run.add_scalar(name, value, self.epoch)
            self.run.flush()
        else:
            self.run.log(numbers, step=self.epoch)

    def video(self, name: str, video: torch.Tensor) -> None:  # (F, 3, H, W) in [0, 1]
        if self.kind == "tensorboard":
            self.run.add_images(name, video.cpu(), self.epoch)                   # the frames, side by side
        else:
            import wandb

            self.run.log({name: wandb.Video((video * 255).round().byte().cpu().numpy(), fps=8)}, step=self.epoch)


def plot_rewards(metrics: Path, path: Path) -> None:
    """reward_curve.png: the rollouts' mean reward (and std) per epoch, and the evaluations, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs, mean = [r["epoch"] for r in rows], torch.tensor([r["reward_mean"] for r in rows])
    std = torch.tensor([r["reward_std"] for r in rows])
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


def stop_requests() -> tuple[list, dict]:
    """SIGINT and SIGTERM (sent by schedulers and torchrun before they kill) ask the run to stop after the epoch,
    the unit a checkpoint resumes exactly; a second one stops at once. Returns the list of signals received
    and the handlers to restore."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    return received, {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def train(args: Args) -> "Trainer":
    """The whole run: resume if asked, then epochs of sample -> score -> train, logging, checkpoints,
    evaluation, and the export of the EMA weights at the end."""
    received, handlers = stop_requests()
    try:
        return run_epochs(args, received)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def run_epochs(args: Args, received: list) -> "Trainer":
    d = setup_distributed()
    out_dir = Path(args.output_dir) if args.output_dir else None
    torch.manual_seed(args.seed)
    trainer = Trainer(args, d)
    start = 0
    if args.resume and checkpoint_dirs(out_dir):
        latest = checkpoint_dirs(out_dir)[-1]
        start = load_checkpoint(trainer, latest) + 1
        print0(f"resumed from {latest}: continuing at epoch {start}", d=d)
    elif args.resume:
        print0(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; starting from scratch", d=d)
    for name in ("metrics.jsonl", "rollouts.jsonl") if out_dir is not None else ():
        rows = read_log(out_dir / name, start, d)           # rows logged after the checkpoint are dropped, atomically
        barrier(d)
        if d.master and (out_dir / name).exists():
            write_atomic(out_dir / name, rows)
    print0(f"{args.model}: {sum(p.numel() for p in trainer.params):,} trainable parameters, "
           f"{args.prompts_per_epoch} prompts x {args.group_size} rollouts per epoch, world size {d.world_size}", d=d)
    trainer.history, report = [], Reporter(args, out_dir) if args.report_to and d.master else None
    # before any update: the "before" of the before-and-after videos and reward curve
    before = trainer.evaluate("before", out_dir, report and report.video) if start == 0 else None
    for epoch in tqdm(range(start, args.epochs), desc="epochs", disable=not d.master, initial=start,
                      total=args.epochs):
        t0 = time.time()
        samples, rewards, _ = trainer.sample(epoch)
        t_sample = time.time() - t0
        stats = trainer.train(samples)
        del samples
        means = all_reduce_mean(torch.tensor([sum(stats[k]) / max(len(stats[k]), 1)
                                              for k in ("loss", "clipfrac", "approx_kl", "kl")]), d).tolist()
        row = {"epoch": epoch, "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
               **dict(zip(("loss", "clipfrac", "approx_kl", "kl"), means)),
               "grad_norm": sum(stats["grad_norm"]) / max(len(stats["grad_norm"]), 1),
               "skipped_steps": stats["skipped_steps"], "optimizer_steps": trainer.optimizer_steps,
               "forward_equivalents": trainer.forward_equivalents,
               "sample_time_s": t_sample, "time_s": time.time() - t0}
        if epoch == start and before is not None:
            row.update(eval_rewards_before=before, eval_reward_before=sum(before) / len(before))
        last = epoch == args.epochs - 1
        evaluated = last or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0)
        if evaluated:
            row["eval_rewards"] = trainer.evaluate(f"epoch{epoch:04d}", out_dir, report and report.video)
            row["eval_reward"] = sum(row["eval_rewards"]) / len(row["eval_rewards"])
        trainer.history.append(row)
        if report is not None:
            report.metrics(row)
        if d.master:
            if out_dir is not None:
                if not (out_dir / "args.json").exists() or epoch == start:
                    write_atomic(out_dir / "args.json", json.dumps(dataclasses.asdict(args), indent=2))
                with open(out_dir / "rollouts.jsonl", "a") as f:
                    f.write(json.dumps(trainer.plan) + "\n")
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if evaluated:
                    plot_rewards(out_dir / "metrics.jsonl", out_dir / "reward_curve.png")
            print0(f"epoch {epoch:4d} | reward {row['reward_mean']:.4f} +- {row['reward_std']:.4f} | "
                   f"loss {row['loss']:+.2e} | clipfrac {row['clipfrac']:.3f} | kl {row['approx_kl']:.1e} | "
                   f"grad {row['grad_norm']:.2e} | {row['time_s']:.1f}s"
                   + (f" | eval reward {row['eval_reward']:.4f}" if "eval_reward" in row else ""))
        stop = all_reduce_mean(torch.tensor([float(bool(received))]), d).item() > 0  # all ranks stop together
        if out_dir is not None and (last or stop or (epoch + 1) % args.checkpoint_every == 0):
            save_checkpoint(trainer, epoch, out_dir)
        if stop and not last:
            name = signal.Signals(received[0]).name if received else "a signal to another rank"
            raise RunError(f"stopped by {name} after epoch {epoch}" + (
                f"; checkpoint {out_dir / 'checkpoints' / f'epoch_{epoch:06d}'} saved: run the same command with "
                f"--resume to continue" if out_dir is not None else " (nothing saved: no --output-dir)"),
                status=128 + (received[0] if received else signal.SIGTERM))
    if out_dir is not None:
        print0(f"exported the EMA weights to {export_model(trainer, out_dir)}", d=d)
    return trainer


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.dry_run:
        print(dry_run(args))
        return
    try:
        train(args)
    except RunError as e:
        exit_once(e.message, e.code)
    except KeyboardInterrupt:  # a second Ctrl-C
        exit_once("interrupted; the last checkpoint in --output-dir stands: run the same command with --resume "
                  "to continue from it", 130)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
