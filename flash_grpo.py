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

The method in four lines (paper section 1):
  * every rollout is a deterministic ODE except ONE stochastic SDE step k*, and only that step trains;
  * iso-temporal grouping (ITG): all G rollouts of a prompt share k*, so advantages compare
    samples that explored at the same timestep;
  * temporal gradient rectification (TGR): each sample's loss is scaled by 1/lambda(t_k*),
    normalised to mean 1, so every timestep contributes on the same scale;
  * the usual clipped GRPO objective on the per-element-mean log-probability of that step.

Run it:
    python flash_grpo.py --model tiny --output-dir runs/tiny   # random tiny Wan stack, CPU, ~1.5 minutes
    torchrun --nproc_per_node 2 flash_grpo.py --model tiny --batch-size 8   # the same, 2 processes
    python flash_grpo.py --model wan1.3b --output-dir runs/a  # one GPU
    torchrun --nproc_per_node 8 flash_grpo.py --model wan14b  # one node; add --resume to continue a run
    python flash_grpo.py --help                                # every flag

Where this code departs from the paper's public release (each also marked `# Note:` in place):
  1. The sigma grid is computed here from its formula (PAPER.md section 2) instead of being taken from
     the installed diffusers scheduler, and lambda(t) is computed from the grid instead of a hard-coded
     table, so any step count and shift work.
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
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
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
# Configuration: one dataclass, every default is the paper's recipe (PAPER.md section 5)
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
    # video and sampler (section 2)
    height: int = arg(480, "video height in pixels, a multiple of 16")
    width: int = arg(832, "video width in pixels, a multiple of 16")
    num_frames: int = arg(81, "frames per video, 4k+1")
    num_steps: int = arg(20, "rollout denoising steps N")
    eval_steps: int = arg(50, "deterministic ODE steps for evaluation videos")
    shift: float = arg(3.0, "flow-grid shift (3 for 480p Wan2.1, 5 recommended at 720p)")
    guidance_scale: float = arg(4.5, "classifier-free guidance w, in rollouts and in training")
    negative_prompt: str = arg("", "negative prompt for CFG")
    max_sequence_length: int = arg(512, "text tokens per prompt (Wan uses 512)")
    noise_level: float | None = arg(None, "g_max of the SDE noise g = g_max sigma (default: sigma_1, the release)")
    # which steps explore and train (section 8): Flash-GRPO or the baselines it is compared with
    algo: str = arg("flash", "flash (one SDE step per rollout), flow_grpo (every step) or flow_grpo_fast (a window)")
    itg: bool = arg(True, "iso-temporal grouping: one k* per prompt; --no-itg draws k* per rollout (ablation)")
    train_fraction: float = arg(1.0, "flow_grpo: the share of steps that train (Flow-GRPO's timestep fraction)")
    fast_window: int = arg(1, "flow_grpo_fast: consecutive SDE steps in the window (1 = Flow-GRPO-Fast1)")
    # iso-temporal grouping (section 1, 4)
    group_size: int = arg(8, "G: rollouts per prompt, compared with each other")
    prompts_per_epoch: int = arg(4, "unique prompts per epoch; an epoch samples prompts_per_epoch * group_size videos")
    sde_window: int | None = arg(None, "k* is drawn uniformly from the first sde_window steps (default: half of num_steps)")
    # rewards to advantages (section 3)
    reward: str = arg("hpsv3", "reward: hpsv3 (release), pickscore, aesthetic, clip (learned; NAME@FOLDER for local weights), "
                               "a training-free name, a weighted sum 'a=1,b=0.5', or file.py:function")
    reward_url: str | None = arg(None, "score with a reward server instead (python reward.py serve ...), e.g. "
                                       "http://host:8000; --reward is then only a label")
    reward_frames: str = arg("top:0.3", "frame aggregation for per-frame rewards: mean or top:FRACTION (release: top 30%)")
    global_std: bool = arg(True, "normalise advantages by the std of all rewards of the epoch (release); else per group")
    adv_clip: float = arg(5.0, "advantages are clipped to [-adv_clip, adv_clip]")
    # loss (section 3)
    clip_range: float = arg(1e-3, "PPO clip range eps on the ratio")
    beta: float = arg(0.0, "weight of the KL term to the frozen reference policy (release: 0)")
    tgr: bool | None = arg(None, "temporal gradient rectification: weight each sample by 1/lambda(t), mean 1 "
                                 "(default: on for flash, off for the baselines, as in the paper)")
    # optimisation (section 5)
    learning_rate: float = arg(1e-4, "AdamW learning rate")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    adam_betas: tuple[float, float] = arg((0.9, 0.999), "AdamW betas")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    batch_size: int = arg(1, "videos per rank per forward pass, for rollouts and training (micro-batch)")
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
    "wan1.3b": {"repo": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "args": {},
                "transformer": dict(WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30)},
    # Note: the paper shows 14B results but publishes no recipe; we keep the 1.3B recipe.
    "wan14b": {"repo": "Wan-AI/Wan2.1-T2V-14B-Diffusers", "args": {},
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


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, no usage dump or traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def parse_args(argv: list[str] | None = None) -> Args:
    """Flags > preset overrides (tiny_config.json's 'args') > the paper's defaults; then validate."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    model = given.get("model", Args.model)
    if model not in MODEL_PRESETS:
        parser.error(f"argument --model: unknown preset {model!r} (choose from {', '.join(MODEL_PRESETS)})")
    preset = MODEL_PRESETS[model]
    overrides = json.loads(preset["config"].read_text())["args"] if "config" in preset else preset["args"]
    args = Args(**{**overrides, **given})
    if "adam_betas" in given:
        args.adam_betas = tuple(args.adam_betas)
    problem = validate_args(args)
    if problem:
        parser.error(problem)
    return args


def validate_args(args: Args) -> str | None:
    """Derived values are filled in here, once; the first problem found is returned as one line."""
    if args.sde_window is None:
        args.sde_window = max(args.num_steps // 2, 1)
    if args.tgr is None:
        args.tgr = args.algo == "flash"
    checks = [
        (args.num_frames < 1 or (args.num_frames - 1) % 4 != 0, "--num-frames", "must be 4k+1 (1, 5, ..., 81)"),
        (args.height <= 0 or args.height % 16 != 0, "--height", "must be a positive multiple of 16"),
        (args.width <= 0 or args.width % 16 != 0, "--width", "must be a positive multiple of 16"),
        (args.group_size < 2, "--group-size", "must be at least 2 (advantages compare rollouts of a prompt)"),
        (args.num_steps < 1, "--num-steps", "must be at least 1"),
        (args.eval_steps < 1, "--eval-steps", "must be at least 1"),
        (not 1 <= args.sde_window <= args.num_steps, "--sde-window",
         f"must be between 1 and --num-steps ({args.num_steps})"),
        (args.shift <= 0, "--shift", "must be positive"),
        (args.init not in ("pretrained", "random"), "--init", "must be pretrained or random"),
        (args.dry_run < 0, "--dry-run", "must be a number of GPUs (0: off)"),
        (args.algo not in ("flash", "flow_grpo", "flow_grpo_fast"), "--algo",
         f"unknown algorithm {args.algo!r} (choose from flash, flow_grpo, flow_grpo_fast)"),
        (not 0 < args.train_fraction <= 1, "--train-fraction", "must be in (0, 1]"),
        (not 1 <= args.fast_window <= args.num_steps, "--fast-window", f"must be between 1 and --num-steps"),
        (args.prompts_per_epoch < 1, "--prompts-per-epoch", "must be at least 1"),
        (args.batch_size < 1, "--batch-size", "must be at least 1"),
        (args.clip_range <= 0, "--clip-range", "must be positive"),
        (args.learning_rate <= 0, "--learning-rate", "must be positive"),
        (args.epochs < 1, "--epochs", "must be at least 1"),
        (args.lora_rank < 0, "--lora-rank", "must be 0 (full fine-tuning) or positive"),
        (args.beta < 0, "--beta", "must be non-negative"),
        (not 0 <= args.ema_decay < 1, "--ema-decay", "must be in [0, 1)"),
        (args.ema_every < 1, "--ema-every", "must be at least 1"),
        (args.checkpoint_every < 1, "--checkpoint-every", "must be at least 1"),
        (args.keep_checkpoints < 1, "--keep-checkpoints", "must be at least 1"),
        (args.max_bad_steps < 1, "--max-bad-steps", "must be at least 1"),
    ]
    for bad, flag, what in checks:
        if bad:
            return f"argument {flag}: {what}"
    epoch_samples = args.prompts_per_epoch * args.group_size
    if args.train_batch_size is None:
        args.train_batch_size = max(epoch_samples // 2, 1)
    if epoch_samples % args.train_batch_size != 0:
        return (f"argument --train-batch-size: {args.train_batch_size} must divide the epoch's "
                f"{epoch_samples} samples (--prompts-per-epoch x --group-size)")
    for flag in ("prompts", "eval_prompts"):
        path = getattr(args, flag)
        if path is not None:
            if not Path(path).is_file():
                return f"argument --{flag.replace('_', '-')}: no such file: {path}"
            if not read_prompts(path):
                return f"argument --{flag.replace('_', '-')}: {path} holds no prompts"
    try:
        reward_lib.aggregate_frames(torch.zeros(1, 1), args.reward_frames)
    except ValueError as e:
        return f"argument --reward-frames: {e}"
    try:
        if args.reward_url is not None:
            reward_lib.remote_reward(args.reward_url)
    except ValueError as e:
        return f"argument --reward-url: {e}"
    try:
        if args.reward_url is None:
            reward_lib.build_reward(args.reward, args.reward_frames, load=False)  # the models load in Trainer
    except ValueError as e:
        return f"argument --reward: {e}"
    return None


def read_prompts(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


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


def load_wan_models(path: str, repo: str, with_transformer: bool = True) -> Models:
    """Wan2.1 in diffusers format: a local folder, or a hub id already in the local cache. Without
    with_transformer the transformer is only its architecture, on the meta device (no memory)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    try:
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
        raise SystemExit(
            f"flash_grpo.py: error: could not load Wan2.1 weights from {path!r} ({type(e).__name__}).\n"
            f"  Download them on a machine with network access, e.g.\n"
            f"    huggingface-cli download {repo} --local-dir ./weights/{repo.split('/')[-1]}\n"
            f"  then pass --model-path ./weights/{repo.split('/')[-1]}") from None
    return Models(tokenizer, text_encoder, transformer, vae)


def load_models(args: Args, master: bool = True) -> Models:
    """Only rank 0 loads the transformer's weights; the others get its architecture on the meta device
    and receive their shards from rank 0 (`build_policy`), so no host holds a full copy per rank."""
    preset = MODEL_PRESETS[args.model]
    if "config" in preset:
        return build_tiny_models(preset["config"], args.seed)  # tiny: cheap to build everywhere
    if args.init == "random":
        return random_wan_models(preset, master)
    return load_wan_models(args.model_path or preset["repo"], preset["repo"], with_transformer=master)


def random_wan_models(preset: dict, master: bool = True, device: str | None = None) -> Models:
    """The published Wan2.1 architecture with random weights, no download: for benchmarks and smoke runs.
    # Note: the byte-level tokenizer stands in for UMT5's (which needs a download); shapes are the same.
    The text encoder is built in bf16 (11 GB at full size), the transformer in fp32 on rank 0 only."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = byte_level_tokenizer()
    meta = device == "meta"
    default_dtype = torch.get_default_dtype()
    with torch.device(device or "cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            text_encoder = UMT5EncoderModel(UMT5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                                       **UMT5_XXL))
        finally:
            torch.set_default_dtype(default_dtype)
        vae = AutoencoderKLWan()  # diffusers' defaults are Wan2.1's VAE
    with torch.device("cpu" if master and not meta else "meta"):
        transformer = WanTransformer3DModel(**preset["transformer"])
    return Models(tokenizer, text_encoder, transformer, vae)


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
    """Parameter counts and the memory each of `args.dry_run` GPUs needs, from models built on the meta device."""
    preset, world = MODEL_PRESETS[args.model], args.dry_run
    if "config" in preset:
        m = build_tiny_models(preset["config"], args.seed)
    else:
        m = random_wan_models(preset, device="meta")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total, block = count(m.transformer), count(m.transformer.blocks[0])
    if args.lora_rank > 0:
        add_lora(m.transformer, args.lora_rank, args.lora_alpha)
    weights = count(m.transformer)                                          # with the adapters, if any
    trainable = weights - total if args.lora_rank > 0 else total
    gb = lambda n: f"{n / 2**30:7.2f} GB"  # noqa: E731
    rows = [
        ("transformer weights, fp32, 1/N each", 4 * weights / world),
        ("gradients of what trains, fp32, 1/N", 4 * trainable / world),
        ("AdamW state (2 moments), fp32, 1/N", 8 * trainable / world),
        ("EMA of what trains, fp32, 1/N", 4 * trainable / world),
        ("gathered weights: 2 blocks + root, bf16", 2 * (2 * block + total - block * len(m.transformer.blocks))),
        ("VAE, bf16, one copy per rank", 2 * count(m.vae)),
    ]
    grid = token_grid(latent_shape(args, m.vae), m.transformer.config.patch_size)
    cfg = cfg_branches(args.guidance_scale)                                # both CFG branches carry gradients
    acts = {ckpt: activation_bytes(m.transformer.config, math.prod(grid), args.max_sequence_length,
                                   cfg * args.batch_size, args.lora_rank, ckpt) for ckpt in (True, False)}
    micro = f"activations, batch {args.batch_size}" + (" x 2 (CFG)" if cfg == 2 else "")
    lines = [f"{args.model} on {world} GPU(s), {'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full fine-tuning'}",
             f"  transformer      {total:>15,} parameters ({trainable:,} trainable)",
             f"  text encoder     {count(m.text_encoder):>15,} parameters (on the GPU only while prompts are encoded)",
             f"  VAE              {count(m.vae):>15,} parameters",
             "  memory per GPU:"]
    before = sum(n for _, n in rows)
    rows += [("total before activations", before), (f"{micro}, checkpointed", acts[True]),
             (f"{micro}, not checkpointed", acts[False]),
             ("total per GPU, " + ("checkpointed" if args.gradient_checkpointing else "not checkpointed"),
              before + acts[args.gradient_checkpointing])]
    lines += [f"    {name:50} {gb(n)}" for name, n in rows]
    lines += [f"    (activations at {args.height}x{args.width}, {args.num_frames} frames: {' x '.join(map(str, grid))} = "
              f"{math.prod(grid):,} tokens per video and {args.max_sequence_length} text tokens, bf16;",
              "     the backward's transient gradients come on top)",
              f"    start-up: the text encoder adds {gb(2 * count(m.text_encoder)).strip()} while prompts are encoded"]
    return "\n".join(lines)


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float) -> None:
    """LoRA on the attention projections, as the release (rank 16, alpha 32 on q, k, v, out)."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


@torch.no_grad()
def encode_prompts(models: Models, prompts: list[str], max_len: int, device) -> torch.Tensor:
    """UMT5 embeddings, zeroed past each prompt's length (as WanPipeline does). Returns (P, L, D)."""
    tokens = models.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = models.text_encoder(ids, mask).last_hidden_state  # (P, L, D)
    return (hidden * mask.unsqueeze(-1).to(hidden.dtype)).float()


def latent_shape(args: Args, vae) -> tuple[int, int, int, int]:
    """(C, F', H', W') of a video's latent: the VAE compresses time by 4 and space by 8."""
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    return (vae.config.z_dim, (args.num_frames - 1) // t + 1, args.height // s, args.width // s)


def token_grid(latent_shape: tuple, patch_size: tuple) -> tuple[int, int, int]:
    """The transformer's tokens per video, (F', H'/2, W'/2) for Wan's 1 x 2 x 2 patches; their product is T."""
    return tuple(n // p for n, p in zip(latent_shape[1:], patch_size))


def prepare_vae(vae, device: torch.device):
    """The frozen decoder: on GPUs in bf16 and with diffusers' spatial tiling (overlapping 256x256-pixel
    tiles at a 192-pixel stride, seams blended; a 480x832 frame is 3 x 5 tiles), which bounds the decoder's
    activations at the price of decoding the overlaps twice (1.7x the work at 480x832); frames no larger
    than a tile decode whole.
    On CPUs it stays fp32 and untiled, so that outputs are exact and comparable."""
    vae.requires_grad_(False).eval().to(device)
    if device.type == "cuda":
        vae.to(torch.bfloat16).enable_tiling()  # diffusers' default tile and stride
    return vae


@torch.no_grad()
def decode_videos(vae, latents: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Latents (B, C, F', H', W') -> videos (B, F, 3, H, W) in [0, 1], fp32, one video at a time by default
    to bound memory."""
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
# Flow-matching SDE sampler (PAPER.md section 2)
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
    """The release's shifted flow grid: num_steps + 1 sigmas from ~1 down to 0 (PAPER.md section 2).

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
    """sigmas[k] broadcastable against x: a scalar for an int k, (B, 1, 1, 1, 1) for a (B,) tensor k."""
    if isinstance(k, int):
        return sigmas[k].to(x.device)
    return sigmas.to(x.device)[k.to(x.device)].view(-1, *([1] * (x.dim() - 1)))


def ode_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k) -> torch.Tensor:
    """Euler step of the probability-flow ODE: x_{k+1} = x_k + dt_k v."""
    dt = _at(sigmas, k + 1, x) - _at(sigmas, k, x)
    return x + dt * v


def noise_std(sigmas: torch.Tensor, sigma: torch.Tensor, noise_level: float | None = None) -> torch.Tensor:
    """The SDE's noise level g(sigma) = g_min + (g_max - g_min) sigma, g_min = 0, g_max = sigma_1 (the
    release's choice for Wan). noise_level overrides g_max: larger values explore more per step.
    # Note: Flow-GRPO's image models use g = 0.7 sqrt(sigma / (1 - sigma)) instead; any g works below."""
    g_max = float(sigmas[1]) if noise_level is None else noise_level
    return g_max * sigma


def sde_step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, k, prev_sample=None, generator=None,
             noise=None, noise_level: float | None = None):
    """One step of the marginal-preserving SDE and the log-probability of its outcome (section 2).

    x, v: (B, C, F, H, W), fp32. k: an int or a (B,) tensor of step indices (a training batch mixes k*).
    With prev_sample given, scores it instead of drawing one. noise (same shape as x) or generator
    (one torch.Generator, or a list of B) supplies eps. noise_level is g_max (default sigma_1).
    Returns (prev_sample, log_prob (B,), prev_sample_mean, std), std = g_k sqrt|dt_k| broadcastable to x.
    """
    sigma, sigma_next = _at(sigmas, k, x), _at(sigmas, k + 1, x)
    dt = sigma_next - sigma                                                  # < 0
    std_dev_t = noise_std(sigmas, sigma, noise_level)                        # g_k
    # 1. mean_k = x_k + dt [v + g^2 / (2 sigma) (x_k + (1 - sigma) v)]
    prev_sample_mean = x + dt * (v + std_dev_t**2 / (2 * sigma) * (x + (1 - sigma) * v))
    std = std_dev_t * (-dt).sqrt()                                           # g_k sqrt|dt_k|
    # 2. x_{k+1} = mean_k + g_k sqrt|dt_k| eps
    if prev_sample is None:
        if noise is None:
            noise = randn_like_per_sample(x, generator)
        prev_sample = prev_sample_mean + std * noise
    # 3. log N(x_{k+1}; mean_k, std^2), averaged over the D latent elements (keeps ratios near 1)
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std**2)
                - torch.log(std) - 0.5 * math.log(2 * math.pi))
    return prev_sample, log_prob.flatten(1).mean(1), prev_sample_mean, std


def randn_like_per_sample(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise like x; with a list of generators, row i comes from generator i (drawn on
    the CPU so that a seed gives the same noise on every device)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x)
    if generator is not None:
        return torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    return torch.randn_like(x)


def predict_velocity(transformer, x, sigma, embeds, neg_embeds, guidance_scale: float) -> torch.Tensor:
    """v = v_uncond + w (v_cond - v_uncond) (section 2), both branches in one batched forward.

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
            noise_level=None, train_steps=None):
    """Sample videos' latents: ODE steps everywhere, SDE steps where sde_steps[i, k] is True.

    noise: (B, C, F, H, W) initial latents x_0; sde_steps, train_steps: (B, N) bool (train_steps defaults
    to sde_steps). Returns the final latents and the transitions that train: (x_k, x_{k+1}, k, log_prob,
    row index).
    """
    train_steps = sde_steps if train_steps is None else train_steps
    x, num_steps = noise.float(), len(sigmas) - 1
    transitions = {"x_t": [], "x_next": [], "k": [], "log_prob": [], "index": []}
    for k in range(num_steps):
        sigma = sigmas[k].expand(x.shape[0])
        v = predict_velocity(transformer, x, sigma, embeds, neg_embeds, guidance_scale)
        x_next = ode_step(x, v, sigmas, k)                                   # (B, C, F, H, W)
        is_sde = sde_steps[:, k].to(x.device)                                # (B,)
        if is_sde.any():
            rows = is_sde.nonzero().flatten().tolist()
            eps = torch.zeros_like(x)  # draw noise only for the rows that explore here, so a sample's
            eps[rows] = randn_like_per_sample(x[rows], [sde_generators[i] for i in rows])  # noise never
            x_sde, log_prob, _, _ = sde_step(x, v, sigmas, k, noise=eps, noise_level=noise_level)  # depends
            # on its batch-mates
            train_rows = train_steps[:, k].nonzero().flatten().tolist()      # of those, the ones that train
            for name, value in (("x_t", x), ("x_next", x_sde), ("log_prob", log_prob)):
                transitions[name].append(value[train_rows])
            transitions["k"].append(torch.full((len(train_rows),), k, dtype=torch.long))
            transitions["index"].append(torch.tensor(train_rows, dtype=torch.long))
            x_next = torch.where(is_sde.view(-1, 1, 1, 1, 1), x_sde, x_next)
        x = x_next
    transitions = {name: torch.cat(values) for name, values in transitions.items() if values}
    if transitions:  # in row order (then step order), whatever step each row explored at
        order = torch.argsort(transitions["index"] * num_steps + transitions["k"])
        transitions = {name: value[order.to(value.device)] for name, value in transitions.items()}
    return x, transitions


@torch.no_grad()
def sample_ode(transformer, noise, embeds, neg_embeds, sigmas, guidance_scale):
    """Deterministic evaluation sampling: Euler on the probability-flow ODE."""
    no_sde = torch.zeros(noise.shape[0], len(sigmas) - 1, dtype=torch.bool)
    return rollout(transformer, noise, embeds, neg_embeds, sigmas, no_sde, guidance_scale)[0]


# ----------------------------------------------------------------------------------------------
# Iso-temporal grouping (paper section 1, step 1 of section 4)
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
    baselines it is compared with differ (PAPER.md section 8). Same sampler, same loss for all.

      flash           one SDE step k* per rollout, drawn per prompt (ITG) or, with --no-itg, per rollout
      flow_grpo       SDE at every step; train every step, or a random --train-fraction of them
      flow_grpo_fast  a window of --fast-window consecutive SDE steps from a random start in the first
                      --sde-window steps, shared by the whole batch; only the window trains
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
    sde_steps = torch.zeros(P * G, N, dtype=torch.bool)
    if args.algo == "flow_grpo":
        sde_steps[:] = True
        trained = torch.randperm(N, generator=gen)[: max(1, round(args.train_fraction * N))]
        train_steps = torch.zeros_like(sde_steps)
        train_steps[:, trained] = True
        return group_ids, sde_steps, train_steps
    start = int(torch.randint(0, args.sde_window, (), generator=gen))  # flow_grpo_fast
    sde_steps[:, start: start + args.fast_window] = True
    return group_ids, sde_steps, sde_steps


def initial_noise(shape, seed: int, epoch: int, sample_ids) -> torch.Tensor:
    """x_0 per sample from its own generator: rollouts of a group differ in their initial noise.
    # Note: seeded by (seed, epoch, global sample index), not by rank, so ranks and batches do not matter."""
    return torch.stack([torch.randn(shape, generator=generator_for(seed, "x0", epoch, int(j))) for j in sample_ids])


# ----------------------------------------------------------------------------------------------
# Rewards to advantages (section 3)
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
# lambda(t), temporal gradient rectification and the clipped GRPO loss (sections 2 and 3)
# ----------------------------------------------------------------------------------------------

def lambda_t(sigmas: torch.Tensor, k, noise_level: float | None = None) -> torch.Tensor:
    """Gradient scale of the SDE log-probability w.r.t. the velocity: d log_prob / d v = -(eps / D) lambda_k.

    lambda_k = sqrt|dt_k| / g_k + g_k sqrt|dt_k| (1 - sigma_k) / (2 sigma_k), from the grid (section 2).
    # Note: computed, not a table, so any step count, shift and noise level work.
    """
    k = torch.as_tensor(k)
    sigma, dt = sigmas[k], sigmas[k + 1] - sigmas[k]
    g = noise_std(sigmas, sigma, noise_level)
    return dt.abs().sqrt() / g + g * dt.abs().sqrt() * (1 - sigma) / (2 * sigma)


def tgr_weights(sigmas: torch.Tensor, k: torch.Tensor, noise_level: float | None = None,
                batch_k: torch.Tensor | None = None) -> torch.Tensor:
    """TGR: w_i = (1 / lambda(t_i)) / mean_j (1 / lambda(t_j)), the mean over the global batch batch_k
    (default: k itself). k: (N,) steps of the samples to weight."""
    inv = 1.0 / lambda_t(sigmas, k, noise_level)
    return inv / (inv if batch_k is None else 1.0 / lambda_t(sigmas, batch_k, noise_level)).mean()


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
            dist.broadcast(buf, src=0)
    return policy.eval()


def local_sample_ids(num_samples: int, train_batch_size: int, d: Dist) -> torch.Tensor:
    """This rank's share of the epoch's global samples. Each optimizer step trains one contiguous slice of
    train_batch_size global samples, split evenly over the ranks, so a step sees the same samples with
    1 rank or N: rank r holds part r of every slice. (rank 0 of 2, slices of 4: samples 0, 1, 4, 5, ...)"""
    ids = torch.arange(num_samples).view(-1, d.world_size, train_batch_size // d.world_size)  # (steps, W, T/W)
    return ids[:, d.rank].flatten()


def all_gather_cat(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate every rank's (n, ...) tensor in rank order: the global batch."""
    if d.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world_size
    return x


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


@torch.no_grad()
def gather_tensors(tensors: dict) -> dict:
    """{name: shard} -> {name: whole tensor, copied to the CPU}, one tensor at a time (collective). A copy even
    on a CPU with one rank, where the whole tensor would otherwise be the parameter itself."""
    return {name: full_tensor(t.detach()).to("cpu", copy=True) for name, t in tensors.items()}


@torch.no_grad()
def scatter_tensors(tensors: dict, whole: dict, d: Dist) -> None:
    """Copy whole tensors held by rank 0 into every rank's shards (collective)."""
    from torch.distributed.tensor import distribute_tensor

    for name, t in tensors.items():
        src = whole[name].to(d.device, t.dtype) if d.master else torch.empty(t.shape, dtype=t.dtype, device=d.device)
        t.copy_(distribute_tensor(src, t.device_mesh, t.placements) if hasattr(t, "device_mesh") else src)


def print0(*a, d: Dist | None = None):
    if d is None or d.master:
        tqdm.write(" ".join(str(x) for x in a))


# ----------------------------------------------------------------------------------------------
# EMA of the trained weights (section 4, step 5)
# ----------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of the trainable parameters (sharded like them); swapped in for
    evaluation and export."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, module: torch.nn.Module):
        backup = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)
        reshard(module)
        try:
            yield
        finally:
            for b, p in zip(backup, self.params):
                p.copy_(b)
            reshard(module)


# ----------------------------------------------------------------------------------------------
# Checkpoints and export: whole tensors gathered to rank 0, written atomically, loaded weights-only
# ----------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1
# settings that must not change across a resume: they define the model and the data/noise stream
RESUME_KEYS = ("model", "algo", "itg", "lora_rank", "seed", "prompts_per_epoch", "group_size", "num_steps", "shift",
               "sde_window", "train_batch_size", "batch_size", "prompts", "reward")


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is a hidden .tmp folder and never listed)."""
    return sorted((out_dir / "checkpoints").glob("epoch_[0-9][0-9][0-9][0-9][0-9][0-9]"))


def save_checkpoint(trainer: "Trainer", epoch: int, out_dir: Path) -> None:
    """Everything needed to continue bit-for-bit: weights, optimizer, EMA, RNG of every rank, counters.
    Collective (every rank gathers its shards); rank 0 writes to a temporary folder and renames it."""
    import shutil

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    d, policy = trainer.d, trainer.policy
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = gather_tensors(trainer.trainable)
    optimizer = get_optimizer_state_dict(policy, trainer.optimizer, options=opts)
    ema = gather_tensors(dict(zip(trainer.trainable, trainer.ema.shadow)))
    rng = [None] * d.world_size
    dist.all_gather_object(rng, torch.get_rng_state())
    if d.master:
        final = out_dir / "checkpoints" / f"epoch_{epoch:06d}"
        tmp = final.parent / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {"model": model, "optimizer": optimizer, "ema": ema, "rng": rng, "epoch": epoch,
                 "optimizer_steps": trainer.optimizer_steps, "bad_steps_in_row": trainer.bad_steps_in_row}
        torch.save(state, tmp / "state.pt")
        meta = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "world_size": d.world_size,
                "args": {k: getattr(trainer.args, k) for k in RESUME_KEYS},
                "trainable": {k: list(v.shape) for k, v in model.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[: -trainer.args.keep_checkpoints]:
            shutil.rmtree(old)
    dist.barrier()


def read_checkpoint(path: Path, args: Args, trainable: dict) -> dict:
    """Load and check a checkpoint on rank 0; raise ValueError saying why it cannot be used."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)  # no arbitrary pickles
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
        raise ValueError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
    changed = [f"{k} ({meta['args'].get(k)!r} -> {getattr(args, k)!r})" for k in RESUME_KEYS
               if meta["args"].get(k) != getattr(args, k)]
    if changed:
        raise ValueError(f"checkpoint {path} was made with other settings: {', '.join(changed)}")
    shapes = {k: list(v.shape) for k, v in trainable.items()}
    if meta["trainable"] != shapes or {k: list(v.shape) for k, v in state["model"].items()} != shapes:
        raise ValueError(f"checkpoint {path} holds weights of another model (trainable parameters differ)")
    return state


def load_checkpoint(trainer: "Trainer", path: Path) -> int:
    """Restore a checkpoint on every rank (rank 0 reads, the others receive). Returns its epoch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    d, policy = trainer.d, trainer.policy
    state, problem = {}, [None]
    if d.master:
        try:
            state = read_checkpoint(path, trainer.args, trainer.trainable)
        except ValueError as e:
            problem = [str(e)]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise SystemExit(f"flash_grpo.py: error: --resume: {problem[0]}; nothing was changed")
    scatter_tensors(trainer.trainable, state.get("model"), d)
    scatter_tensors(dict(zip(trainer.trainable, trainer.ema.shadow)), state.get("ema"), d)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(policy, trainer.optimizer, state.get("optimizer", {}), options=opts)
    reshard(policy)
    counters = [state.get(k) for k in ("epoch", "optimizer_steps", "bad_steps_in_row", "rng")]
    dist.broadcast_object_list(counters, src=0)
    epoch, trainer.optimizer_steps, trainer.bad_steps_in_row, rng = counters
    if len(rng) == d.world_size:  # the data and noise never depend on this; it only matters for user code
        torch.set_rng_state(rng[d.rank])
    return epoch


def export_model(trainer: "Trainer", out_dir: Path) -> Path:
    """The EMA weights in diffusers format: the whole transformer (load it with
    WanTransformer3DModel.from_pretrained), or with LoRA the adapter (WanPipeline.load_lora_weights)."""
    from safetensors.torch import save_file

    a, d, policy = trainer.args, trainer.d, trainer.policy
    with trainer.ema.swapped_in(policy):
        state = gather_tensors(dict(policy.named_parameters()))  # WanTransformer3DModel's buffers are not saved
    path = out_dir / "export"
    if d.master:
        if a.lora_rank > 0:
            from diffusers import WanPipeline

            layers = {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}
            WanPipeline.save_lora_weights(path, transformer_lora_layers=layers, transformer_lora_adapter_metadata={
                "r": a.lora_rank, "lora_alpha": a.lora_alpha, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
        else:
            (path / "transformer").mkdir(parents=True, exist_ok=True)
            policy.save_config(path / "transformer")
            save_file({k: v.contiguous() for k, v in state.items()},
                      path / "transformer" / "diffusion_pytorch_model.safetensors")
    dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------
# Training loop (section 4): sample with ITG -> score -> advantages -> one-step clipped, TGR-weighted loss
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
        self.models = load_models(args, d.master)
        try:
            self.reward_fn = (reward_lib.remote_reward(args.reward_url) if args.reward_url else
                              reward_lib.build_reward(args.reward, args.reward_frames))
        except ValueError as e:  # a learned reward's weights are missing: say what to download
            raise SystemExit(f"flash_grpo.py: error: --reward {args.reward}: {e}") from None
        m, device = self.models, d.device
        m.text_encoder.requires_grad_(False).eval().to(device)  # frozen, unsharded, one copy per rank
        prepare_vae(m.vae, device)                                  # likewise
        # Prompts are encoded once, up front; the text encoder then leaves the GPU.
        self.train_prompts = read_prompts(args.prompts) if args.prompts else TRAIN_PROMPTS
        eval_prompts = read_prompts(args.eval_prompts) if args.eval_prompts else EVAL_PROMPTS
        self.eval_prompts = eval_prompts[: args.num_eval_prompts]
        encode = lambda p: encode_prompts(m, p, args.max_sequence_length, device)  # noqa: E731
        self.train_embeds = encode(self.train_prompts)                     # (num_prompts, L, D)
        self.eval_embeds = encode(self.eval_prompts)
        self.neg_embeds = encode([args.negative_prompt])                   # (1, L, D)
        m.text_encoder.to("cpu")
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

    def reference_velocity(self, x, sigma, embeds, neg):
        transformer = self.policy if self.reference is None else self.reference
        ctx = adapters_disabled(transformer) if self.reference is None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            return predict_velocity(transformer, x, sigma, embeds, neg, self.args.guidance_scale)

    def sample(self, epoch: int):
        """Steps 1-3 of section 4 on this rank's share of the epoch's global batch."""
        a, d, m = self.args, self.d, self.models
        num_samples = a.prompts_per_epoch * a.group_size
        prompt_ids = epoch_prompt_indices(len(self.train_prompts), a.prompts_per_epoch, a.seed, epoch)  # (P,)
        group_ids, sde_steps, train_steps = exploration_plan(a, epoch)     # (P*G,), (P*G, N), (P*G, N)
        local = local_sample_ids(num_samples, a.train_batch_size, d)      # this rank's global sample ids
        per_rank = len(local)
        samples = {"x_t": [], "x_next": [], "k": [], "log_prob": [], "sample": []}
        videos, latents_all = [], []
        for start in tqdm(range(0, per_rank, a.batch_size), desc=f"epoch {epoch} rollouts", leave=False,
                          disable=not d.master):
            ids = local[start: start + a.batch_size]                        # global sample ids of this batch
            embeds = self.train_embeds[prompt_ids[group_ids[ids]]]          # (b, L, D)
            neg = self.neg_embeds.expand_as(embeds)
            noise = initial_noise(self.latent_shape, a.seed, epoch, ids).to(d.device)   # (b, C, F, H, W)
            gens = [generator_for(a.seed, "sde", epoch, int(j)) for j in ids]
            latents, tr = rollout(self.policy, noise, embeds, neg, self.sigmas, sde_steps[ids],
                                  a.guidance_scale, gens, a.noise_level, train_steps[ids])
            for name in ("x_t", "x_next", "k", "log_prob"):
                samples[name].append(tr[name])
            samples["sample"].append(ids[tr["index"]])
            latents_all.append(latents)
        samples = {name: torch.cat(v) for name, v in samples.items()}
        latents = torch.cat(latents_all)
        videos = decode_videos(m.vae, latents)                               # (n, F, 3, H, W)
        prompts = [self.train_prompts[int(prompt_ids[group_ids[j]])] for j in local]
        rewards = score_videos(self.reward_fn, videos, prompts)                   # (n,)
        order = all_gather_cat(local.to(d.device), d).cpu()                # which global sample each row is
        rewards = torch.empty(num_samples).index_copy_(0, order, all_gather_cat(rewards.to(d.device), d).cpu())
        # Note: groups with equal rewards keep advantage 0 instead of being dropped (no gradient, same work
        # on every rank)
        advantages = group_advantages(rewards, group_ids, a.global_std, a.adv_clip)
        j, k = samples["sample"], samples["k"]                              # per trained transition
        trained_k = train_steps.nonzero()[:, 1]                            # every trained step, global batch
        weights = tgr_weights(self.sigmas, k, a.noise_level, trained_k) if a.tgr else torch.ones(len(k))
        samples.update(advantages=advantages[j], weights=weights, group=group_ids[j],
                       prompt=prompt_ids[group_ids[j]])                    # embeddings are looked up when training
        self.plan = {"epoch": epoch, "prompts": prompt_ids.tolist(),
                     "train_steps": [row.nonzero().flatten().tolist() for row in train_steps],
                     "rewards": [round(r, 6) for r in rewards.tolist()],
                     "advantages": [round(x, 6) for x in advantages.tolist()]}  # the epoch's global table
        return samples, rewards, videos

    def train(self, samples: dict) -> dict:
        """Step 4 of section 4: recompute one step per sample, clipped TGR-weighted loss, optimizer steps."""
        a, d = self.args, self.d
        n = samples["k"].shape[0]
        per_sample = n // len(samples["sample"].unique())                   # trained steps per rollout
        per_step = a.train_batch_size // d.world_size * per_sample          # local transitions per optimizer step
        stats = {"loss": [], "clipfrac": [], "approx_kl": [], "kl": [], "grad_norm": [], "skipped_steps": 0,
                 "ratio_first": None}
        self.policy.train()
        # Note: no reshuffle: micro-batches are the rollout batches, so the first ratio is exactly 1
        for step_start in range(0, n, per_step):
            starts = range(step_start, min(step_start + per_step, n), a.batch_size)
            for start in starts:
                # FSDP2 reduce-scatters gradients only after the last micro-batch of the step
                self.policy.set_requires_gradient_sync(start == starts[-1])
                mb = {k: v[start: start + a.batch_size] for k, v in samples.items()}
                x, k, x_next = mb["x_t"].to(d.device), mb["k"], mb["x_next"].to(d.device)
                embeds = self.train_embeds[mb["prompt"].to(self.train_embeds.device)]  # (b, L, D)
                neg = self.neg_embeds.expand_as(embeds)
                v = predict_velocity(self.policy, x, self.sigmas[k], embeds, neg, a.guidance_scale)
                _, log_prob, mean, std = sde_step(x, v, self.sigmas, k, prev_sample=x_next, noise_level=a.noise_level)
                old_log_prob = mb["log_prob"].to(d.device)
                loss, diag = grpo_loss(log_prob, old_log_prob, mb["advantages"].to(d.device),
                                       mb["weights"].to(d.device), a.clip_range)
                if stats["ratio_first"] is None:
                    stats["ratio_first"] = torch.exp(log_prob - old_log_prob).detach().cpu()
                kl = torch.zeros((), device=d.device)
                if a.beta > 0:
                    ref_v = self.reference_velocity(x, self.sigmas[k], embeds, neg)
                    ref_mean = sde_step(x, ref_v, self.sigmas, k, prev_sample=x_next, noise_level=a.noise_level)[2]
                    kl = kl_to_reference(mean, ref_mean, std).mean()
                    loss = loss + a.beta * kl
                # the micro-batch mean, rescaled so that the step sees the mean over its samples; FSDP
                # averages over ranks, which makes it the mean over the global batch of the step
                (loss * len(k) / per_step).backward()
                stats["loss"].append(loss.item()), stats["kl"].append(kl.item())  # .item(): device syncs
                stats["clipfrac"].append(diag["clipfrac"].item()), stats["approx_kl"].append(diag["approx_kl"].item())
            grad_norm = self.optimizer_step()
            if grad_norm is None:
                stats["skipped_steps"] += 1
            else:
                stats["grad_norm"].append(grad_norm)
        self.policy.eval()
        return stats

    def optimizer_step(self) -> float | None:
        """Clip and step; a non-finite gradient skips the step (counted), and too many in a row abort."""
        a = self.args
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, a.max_grad_norm)).item()
        if not math.isfinite(grad_norm):  # every rank sees the same global norm, so all skip together
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_row += 1
            if self.bad_steps_in_row >= a.max_bad_steps:
                raise SystemExit(f"flash_grpo.py: error: {self.bad_steps_in_row} optimizer steps in a row had "
                                 f"non-finite gradients; stopping (see --max-bad-steps, try a lower --learning-rate)")
            return None
        self.bad_steps_in_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reshard(self.policy)  # no stale gathered weights in the next forward
        self.optimizer_steps += 1
        if self.optimizer_steps % a.ema_every == 0:
            self.ema.update()
        return grad_norm

    @torch.no_grad()
    def evaluate(self, epoch: int, out_dir: Path | None) -> list[float]:
        """Deterministic ODE samples of the held-out prompts with the EMA weights; each prompt's reward."""
        a, d, m = self.args, self.d, self.models
        sigmas = flow_sigmas(a.eval_steps, a.shift)
        with self.ema.swapped_in(self.policy):
            noise = torch.stack([torch.randn(self.latent_shape, generator=generator_for(a.seed, "eval", i))
                                 for i in range(len(self.eval_prompts))]).to(d.device)
            embeds = self.eval_embeds.to(d.device)
            latents = torch.cat([sample_ode(self.policy, noise[i:i + a.batch_size], embeds[i:i + a.batch_size],
                                            self.neg_embeds.expand_as(embeds[i:i + a.batch_size]), sigmas,
                                            a.guidance_scale) for i in range(0, len(noise), a.batch_size)])
        videos = decode_videos(m.vae, latents)
        rewards = score_videos(self.reward_fn, videos, self.eval_prompts)
        if out_dir is not None and d.master:
            for i, (video, r) in enumerate(zip(videos, rewards)):
                slug = "".join(c if c.isalnum() else "_" for c in self.eval_prompts[i][:40]).strip("_")
                save_video(video, out_dir / f"eval_epoch{epoch:04d}_prompt{i}_{slug}_reward{r:.3f}")  # .mp4 or .gif
        return rewards.tolist()


@contextlib.contextmanager
def adapters_disabled(transformer):
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def train(args: Args) -> "Trainer":
    """The whole run: resume if asked, then epochs of sample -> score -> train, logging, checkpoints,
    evaluation, and the export of the EMA weights at the end."""
    d = setup_distributed()
    if (args.prompts_per_epoch * args.group_size) % (d.world_size * args.batch_size) != 0 or \
            args.train_batch_size % (d.world_size * args.batch_size) != 0:
        raise SystemExit(f"flash_grpo.py: error: --prompts-per-epoch x --group-size and --train-batch-size "
                         f"must be multiples of world size x --batch-size ({d.world_size} x {args.batch_size})")
    out_dir = Path(args.output_dir) if args.output_dir else None
    if args.resume and out_dir is None:
        raise SystemExit("flash_grpo.py: error: --resume needs --output-dir (where the checkpoints are)")
    if not args.resume and out_dir is not None and ((out_dir / "metrics.jsonl").exists() or checkpoint_dirs(out_dir)):
        raise SystemExit(f"flash_grpo.py: error: --output-dir {out_dir} already holds a run; pass --resume to "
                         f"continue it, or choose another folder")
    torch.manual_seed(args.seed)
    trainer = Trainer(args, d)
    start = 0
    if args.resume and checkpoint_dirs(out_dir):
        latest = checkpoint_dirs(out_dir)[-1]
        start = load_checkpoint(trainer, latest) + 1
        print0(f"resumed from {latest}: continuing at epoch {start}", d=d)
    elif args.resume:
        print0(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; starting from scratch", d=d)
    if out_dir is not None and d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        for name in ("metrics.jsonl", "rollouts.jsonl"):  # forget rows written after the checkpoint
            log = out_dir / name
            rows = log.read_text().splitlines(keepends=True) if log.exists() else []
            log.write_text("".join(r for r in rows if json.loads(r)["epoch"] < start))
    print0(f"{args.model}: {sum(p.numel() for p in trainer.params):,} trainable parameters, "
           f"{args.prompts_per_epoch} prompts x {args.group_size} rollouts per epoch, world size {d.world_size}", d=d)
    trainer.history = []
    for epoch in tqdm(range(start, args.epochs), desc="epochs", disable=not d.master, initial=start,
                      total=args.epochs):
        t0 = time.time()
        samples, rewards, _ = trainer.sample(epoch)
        t_sample = time.time() - t0
        stats = trainer.train(samples)
        mean = lambda xs: float(all_reduce_mean(torch.tensor(sum(xs) / max(len(xs), 1)), d))  # noqa: E731
        row = {"epoch": epoch, "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
               "loss": mean(stats["loss"]), "clipfrac": mean(stats["clipfrac"]), "approx_kl": mean(stats["approx_kl"]),
               "kl": mean(stats["kl"]), "grad_norm": sum(stats["grad_norm"]) / max(len(stats["grad_norm"]), 1),
               "skipped_steps": stats["skipped_steps"], "optimizer_steps": trainer.optimizer_steps,
               "sample_time_s": t_sample, "time_s": time.time() - t0}
        last = epoch == args.epochs - 1
        if last or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0):
            row["eval_rewards"] = trainer.evaluate(epoch, out_dir)               # one per held-out prompt
            row["eval_reward"] = sum(row["eval_rewards"]) / len(row["eval_rewards"])
        trainer.history.append(row)
        if d.master:
            if out_dir is not None:
                with open(out_dir / "rollouts.jsonl", "a") as f:
                    f.write(json.dumps(trainer.plan) + "\n")
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            print0(f"epoch {epoch:4d} | reward {row['reward_mean']:.4f} +- {row['reward_std']:.4f} | "
                   f"loss {row['loss']:+.2e} | clipfrac {row['clipfrac']:.3f} | kl {row['approx_kl']:.1e} | "
                   f"grad {row['grad_norm']:.2e} | {row['time_s']:.1f}s"
                   + (f" | eval reward {row['eval_reward']:.4f}" if "eval_reward" in row else ""))
        if out_dir is not None and (last or (epoch + 1) % args.checkpoint_every == 0):
            save_checkpoint(trainer, epoch, out_dir)
    if out_dir is not None:
        print0(f"exported the EMA weights to {export_model(trainer, out_dir)}", d=d)
    return trainer


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.dry_run:
        print(dry_run(args))
        return
    train(args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
