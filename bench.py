"""
Benchmarks that re-run the paper's comparative claims in this harness (PAPER.md sections 6 and 8).

    python bench.py                      # CPU, tiny random Wan stack: about 10 minutes on 2 cores
    python bench.py --quick              # fewer repeats and a shorter learning race: about 3 minutes
    python bench.py --out bench_results  # where the JSON and PNG plots go

It measures, side by side:
  1. the cost of one RL epoch (sampling and training) for flash, flow_grpo and flow_grpo_fast at the paper's
     schedule (20 steps, CFG): wall time, transformer forward/backward passes, and their ratios;
  2. the sampler's overhead: our rollout against diffusers' WanPipeline on the same model, steps, CFG and
     resolution (latents out);
  3. per-timestep gradient norms over the SDE window, with and without TGR;
  4. learning in miniature: mean reward against wall time for flash, flow_grpo and flow_grpo_fast (window 1)
     with the same time budget and several seeds;
  5. seconds per rollout video and per trained sample, peak GPU memory, and the MFU (model FLOPs utilisation) of
     sampling and training, for the real-size Wan2.1 architecture (--model) with random weights (flash_grpo's
     --init random: no download) and a training-free reward (colorfulness). One epoch warms up, the next is timed.

Section 5 alone, on one GPU (it writes gpu_MODEL.json):

    python bench.py --gpu-only --model wan1.3b                # the paper's 480x832, 81 frames, 20 steps, LoRA 16
    python bench.py --gpu-only --model wan14b --num-steps 4   # fewer steps: the 14B rollouts are slow; on an
                                                              # 80 GB GPU also fewer frames, e.g. --num-frames 25
                                                              # (the plan: flash_grpo.py --model wan14b --dry-run 1)
    python bench.py --gpu-only --model tiny --num-steps 2     # the same path on a CPU (wan models need a GPU)

--num-frames, --height, --width, --num-steps, --group-size (videos per epoch, default 2) and --batch-size shrink the
workload, --lora-rank 0 trains every weight, and --peak-tflops gives the bf16 peak of a GPU missing from
PEAK_BF16_TFLOPS (its MFU is otherwise n/a). The JSON and the printout state the workload.
Every figure is measured when the script runs; nothing is hard-coded. matplotlib, if installed, draws the
plots (`pip install matplotlib`); without it the JSON and the printed tables are still written.
"""

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import flash_grpo as fg  # noqa: E402

ALGOS = ("flash", "flow_grpo", "flow_grpo_fast")


class PassCounter:
    """Counts transformer forward passes (videos through the model; CFG's two branches count as two) and
    the backward passes that training adds (one per forward made with autograd on)."""

    def __init__(self, module):
        self.forward = self.backward = 0
        module.register_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        rows = inputs[0].shape[0] if inputs else 0
        self.forward += rows
        if torch.is_grad_enabled():
            self.backward += rows


def trainer_for(flags):
    args = fg.parse_args(["--model", "tiny", *flags])
    return fg.Trainer(args, fg.setup_distributed())


def epoch_cost(repeats: int) -> dict:
    """1. One epoch of each algorithm at 20 steps with CFG: sampling and training time, passes."""
    out = {}
    for algo in ALGOS:
        trainer = trainer_for(["--algo", algo, "--num-steps", "20", "--prompts-per-epoch", "2", "--group-size", "4",
                               "--batch-size", "8", "--train-batch-size", "8"])
        counter = PassCounter(trainer.policy)
        runs = []
        for epoch in range(repeats + 1):  # the first epoch warms up and is not timed
            counter.forward = counter.backward = 0
            t0 = time.perf_counter()
            samples, _, _ = trainer.sample(epoch)
            t1 = time.perf_counter()
            sampling_forward = counter.forward
            trainer.train(samples)
            t2 = time.perf_counter()
            runs.append({"sample_s": t1 - t0, "train_s": t2 - t1, "sample_forward": sampling_forward,
                         "train_forward": counter.forward - sampling_forward, "train_backward": counter.backward})
        runs = runs[1:]
        out[algo] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[algo]["epoch_s"] = out[algo]["sample_s"] + out[algo]["train_s"]
        out[algo]["videos"] = 8
    for algo in ALGOS:
        out[algo]["train_cost_vs_flash"] = out[algo]["train_s"] / out["flash"]["train_s"]
        out[algo]["epoch_cost_vs_flash"] = out[algo]["epoch_s"] / out["flash"]["epoch_s"]
    return out


def sampler_overhead(repeats: int) -> dict:
    """2. Our rollout vs diffusers' WanPipeline on the same (unsharded) transformer, latents out."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    args = fg.parse_args(["--model", "tiny"])
    m = fg.build_tiny_models(fg.MODEL_PRESETS["tiny"]["config"], 0)
    pipe = WanPipeline(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae, transformer=m.transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    embeds = fg.pad_embeds(fg.encode_prompts(m.tokenizer, m.text_encoder, ["a red fox in the snow"] * 8,
                                             args.max_sequence_length), args.max_sequence_length)
    neg = fg.pad_embeds(fg.encode_prompts(m.tokenizer, m.text_encoder, [""] * 8, args.max_sequence_length),
                        args.max_sequence_length)
    noise = torch.randn(8, *fg.latent_shape(args, m.vae))
    sigmas = fg.flow_sigmas(20, 3.0)

    def ours():
        fg.sample_ode(m.transformer, noise, embeds, neg, sigmas, 4.5)

    def theirs():
        pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, latents=noise.clone(), height=args.height,
             width=args.width, num_frames=args.num_frames, num_inference_steps=20, guidance_scale=4.5,
             output_type="latent")

    times = {"ours": [], "diffusers": []}
    with torch.no_grad():
        for fn in (ours, theirs):  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in (("ours", ours), ("diffusers", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {"ours_s": best["ours"], "diffusers_s": best["diffusers"], "ratio": best["ours"] / best["diffusers"],
            "videos": 8, "steps": 20}


def gradient_norms(draws: int) -> dict:
    """3. Gradient norm of the loss w.r.t. the transformer's weights at each step of the window, at the current
    policy (ratio 1, advantage 1), averaged over noise draws; with and without TGR."""
    trainer = trainer_for(["--num-steps", "20", "--prompts-per-epoch", "2", "--group-size", "4", "--batch-size", "8",
                           "--train-batch-size", "8"])
    a, window = trainer.args, trainer.args.sde_window
    embeds = trainer.prompt_embeds([0]).expand(4, -1, -1)
    neg = trainer.neg_embeds.expand_as(embeds)
    noise = fg.initial_noise(trainer.latent_shape, 0, 0, range(4))
    tgr = fg.tgr_weights(trainer.sigmas, torch.arange(window))              # uniform k over the window
    x, norms = noise, []
    for k in range(window):
        sigma = trainer.sigmas[k].expand(4)
        per_draw = []
        for draw in range(draws):
            v = fg.predict_velocity(trainer.policy, x, sigma, embeds, neg, a.guidance_scale)
            with torch.no_grad():
                _, _, mean, std = fg.sde_step(x, v, trainer.sigmas, k)
                eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(draw))
            _, log_prob, _, _ = fg.sde_step(x, v, trainer.sigmas, k, prev_sample=mean + std * eps)
            loss, _ = fg.grpo_loss(log_prob, log_prob.detach(), torch.ones(4), torch.ones(4), a.clip_range)
            loss.backward()  # FSDP2 reduces into the sharded .grad (autograd.grad cannot see through it)
            per_draw.append(fg.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in trainer.params])).item())
            trainer.optimizer.zero_grad(set_to_none=True)
        norms.append(statistics.mean(per_draw))
        with torch.no_grad():  # follow the ODE to the next step's input
            x = fg.ode_step(x, fg.predict_velocity(trainer.policy, x, sigma, embeds, neg, a.guidance_scale),
                            trainer.sigmas, k)
    plain = torch.tensor(norms)
    rectified = plain * tgr

    def spread(t):
        return {"max_over_min": (t.max() / t.min()).item(), "cv": (t.std() / t.mean()).item()}

    lam = fg.lambda_t(trainer.sigmas, torch.arange(window))
    return {"steps": list(range(window)), "without_tgr": plain.tolist(), "with_tgr": rectified.tolist(),
            "spread_without_tgr": spread(plain), "spread_with_tgr": spread(rectified),
            "lambda_ratio": (lam.max() / lam.min()).item()}


def learning_race(budget_s: float, seeds: list[int]) -> dict:
    """4. Mean reward against wall time, same budget for every algorithm (the tiny preset's settings)."""
    out = {}
    for algo in ALGOS:
        out[algo] = []
        for seed in seeds:
            trainer = trainer_for(["--algo", algo, "--seed", str(seed)])
            curve, t0, epoch = [], time.perf_counter(), 0
            while time.perf_counter() - t0 < budget_s:
                samples, rewards, _ = trainer.sample(epoch)
                trainer.train(samples)
                curve.append((time.perf_counter() - t0, rewards.mean().item()))
                epoch += 1
            out[algo].append({"seed": seed, "curve": curve})
    return out


# Dense bf16 tensor-core peaks in TFLOPS (NVIDIA datasheets; their "with sparsity" figures are twice these), matched
# in order against torch.cuda.get_device_name(): the H100 SXM part calls itself "NVIDIA H100 80GB HBM3".
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 80GB HBM3", 989.4), ("H100 SXM", 989.4), ("H200", 989.4),
                    ("A100", 312.0))


def transformer_flops(config, tokens: int, text_len: int, train: bool = False, lora_rank: int = 0) -> int:
    """Matmul FLOPs of WanTransformer3DModel for ONE video (one CFG branch): the forward, or with train=True the
    forward and backward. A matmul (m x k) @ (k x n) counts 2 m n k. tokens = F' x H'/2 x W'/2 (patch 1x2x2).

    Forward, per block (d = model dim, f = FFN dim): self-attention q, k, v, out and cross-attention q, out on the
    video tokens, 2 T d^2 each; cross-attention k, v on the text tokens, 2 L d^2 each; the FFN, 4 T d f; the attention
    scores and weighted sums over all heads, 4 T^2 d (self) and 4 T L d (cross). Once: the patch embedding and the
    output projection, and the embedders of the text (two d-wide layers per text token) and of the timestep (a
    two-layer MLP and the 6d modulation projection, per video). Left out: the elementwise work (norms, RoPE, softmax,
    GELU, modulation, LoRA's scaling), which neither MFU nor FlopCounterMode counts. A test checks this against
    torch.utils.flop_counter.FlopCounterMode, forward and backward, with and without LoRA.

    Backward, as MFU counts it ("model FLOPs"): what the gradients need, without activation checkpointing's
    recomputed forward. Each matmul's input gradient and weight gradient cost its forward again, where they are
    needed: full fine-tuning needs both everywhere except the inputs of the model (latents, text, timesteps), i.e.
    about 3x the forward; with LoRA the frozen weights need no gradient, so the backward is the input gradients
    along the video path (about 1x the forward), the attention cores' second operand (both are activations) and
    the adapters' own gradients.
    """
    T, L, r, n = tokens, text_len, lora_rank, config.num_layers
    d, f, p = config.num_attention_heads * config.attention_head_dim, config.ffn_dim, math.prod(config.patch_size)
    video = n * 2 * T * d * (6 * d + 2 * f)        # per block: attn1 q, k, v, out; attn2 q, out; FFN in, out
    text = n * 2 * L * d * 2 * d                   # attn2 k, v on the text tokens
    cores = n * 4 * T * d * (T + L)                # Q K^T and softmax(.) V, all heads: self T x T, cross T x L
    patch_in, patch_out = 2 * T * p * config.in_channels * d, 2 * T * d * p * config.out_channels
    text_in, time_in = 2 * L * config.text_dim * d, 2 * config.freq_dim * d   # first layers of the embedders
    forward = video + text + cores + patch_in + patch_out + text_in + 2 * L * d * d + time_in + 2 * d * 7 * d
    if not train:
        return forward
    if r == 0:  # no gradient for the model's inputs: latents (patch embedding), text and timestep embeddings
        return 3 * forward - patch_in - text_in - time_in
    adapters = n * 4 * r * d * (6 * T + 2 * L)     # LoRA's A (d -> r) and B (r -> d) on the 8 attention projections
    backward = (video + 2 * cores + patch_out      # input gradients of the frozen video path, both core operands
                + adapters                         # the adapters' weight gradients
                + n * 2 * r * d * (12 * T + 2 * L)  # their input gradients (A's only on video tokens: text is frozen)
                - 6 * T * d * (d + r))             # block 0's q, k, v inputs: nothing upstream of them trains
    return forward + adapters + backward


def peak_tflops(override: float | None) -> tuple[float | None, str | None]:
    """The device's dense bf16 peak, or None and why MFU is n/a."""
    if not torch.cuda.is_available():
        return None, "n/a on CPU"
    if override:
        return override, None
    name = torch.cuda.get_device_name()
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)
    return peak, None if peak else f"n/a: no bf16 peak known for {name!r} (pass --peak-tflops)"


def gpu_flags(args) -> list[str]:
    """flash_grpo's flags for section 5's workload: one prompt's group of rollouts, one optimizer step."""
    flags = ["--model", args.model, "--init", "random", "--reward", "colorfulness",  # training-free: no weights
             "--num-steps", str(args.num_steps), "--prompts-per-epoch", "1", "--group-size", str(args.group_size),
             "--batch-size", str(args.batch_size), "--train-batch-size", str(args.group_size),
             "--lora-rank", str(args.lora_rank)]
    for flag in ("num_frames", "height", "width"):  # unset: the preset's, 81 x 480 x 832 for wan
        value = getattr(args, flag)
        flags += ["--" + flag.replace("_", "-"), str(value)] if value is not None else []
    return flags


def gpu_figures(flags: list[str], peak_override: float | None = None) -> dict:
    """5. Seconds per rollout video (the whole sampling phase: every step with CFG, VAE decode, reward) and per
    trained sample (forward and backward of both CFG branches, optimizer step), peak memory of each phase, and MFU,
    for the real-size architecture with random weights. On a CPU the same path runs (the tiny model only): wall
    times, no memory or MFU."""
    cuda = torch.cuda.is_available()
    trainer = fg.Trainer(fg.parse_args(flags), fg.setup_distributed())
    a = trainer.args

    def clock():
        if cuda:
            torch.cuda.synchronize()  # a device sync: the queued kernels finish inside the timed phase
        return time.perf_counter()

    def peak_memory():
        if not cuda:
            return None
        gb = {"allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
              "reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
        torch.cuda.empty_cache()       # the next phase's reserved peak starts from what is in use
        torch.cuda.reset_peak_memory_stats()
        return gb

    trainer.train(trainer.sample(0)[0])  # warm-up epoch: kernel selection, allocator, lazy initialisation
    peak_memory()
    t0 = clock()
    samples, _, _ = trainer.sample(1)
    t1 = clock()
    sampling_memory = peak_memory()
    t1_train = clock()  # after peak_memory's empty_cache, which is not training
    trainer.train(samples)
    t2 = clock()
    training_memory = peak_memory()

    tokens = math.prod(fg.token_grid(trainer.latent_shape, trainer.policy.config.patch_size))
    text_len, branches = a.max_sequence_length, fg.cfg_branches(a.guidance_scale)  # CFG: both branches train
    videos, trained = a.group_size, len(samples["k"])
    forward = transformer_flops(trainer.policy.config, tokens, text_len)
    train = branches * transformer_flops(trainer.policy.config, tokens, text_len, True, a.lora_rank)
    sampling_flops, training_flops = videos * a.num_steps * branches * forward, trained * train
    peak, why = peak_tflops(peak_override)
    mfu = lambda flops, s: flops / s / (peak * 1e12) if peak else None  # noqa: E731
    return {"model": a.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "workload": {"frames": a.num_frames, "height": a.height, "width": a.width, "steps": a.num_steps,
                         "tokens_per_video": tokens, "text_tokens": text_len, "videos_per_epoch": videos,
                         "batch_size": a.batch_size, "cfg_branches": branches,
                         "fine_tuning": f"LoRA rank {a.lora_rank}" if a.lora_rank else "full",
                         "gradient_checkpointing": a.gradient_checkpointing, "weights": "random"},
            "s_per_rollout_video": (t1 - t0) / videos, "s_per_trained_sample": (t2 - t1_train) / trained,
            "peak_memory": {"sampling": sampling_memory, "training": training_memory} if cuda else None,
            "forward_flops_per_video": forward, "train_flops_per_sample": train,
            "sampling_tflops_per_s": sampling_flops / (t1 - t0) / 1e12,
            "training_tflops_per_s": training_flops / (t2 - t1_train) / 1e12,
            "peak_bf16_tflops": peak, "mfu_sampling": mfu(sampling_flops, t1 - t0),
            "mfu_training": mfu(training_flops, t2 - t1_train), "mfu_note": why or
            ("model FLOPs: activation checkpointing's recomputed forward is not counted; the sampling time "
             "includes the VAE decode and the reward, whose FLOPs are not counted")}


def print_gpu(r: dict) -> None:
    w = r["workload"]
    print(f"\n5. {r['model']} ({w['weights']} weights, {w['fine_tuning']}) on {r['device']}: {w['frames']} frames "
          f"{w['height']}x{w['width']} ({w['tokens_per_video']:,} tokens, {w['text_tokens']} text tokens), "
          f"{w['steps']} steps, {w['cfg_branches']} CFG branches, {w['videos_per_epoch']} videos per epoch, "
          f"batch {w['batch_size']}; timed after one warm-up epoch")
    mfu = lambda x: f"MFU {100 * x:.1f}%" if x is not None else f"MFU: {r['mfu_note']}"  # noqa: E731
    for phase, seconds, per in (("sampling", "s_per_rollout_video", "rollout video"),
                                ("training", "s_per_trained_sample", "trained sample")):
        memory = r["peak_memory"] and r["peak_memory"][phase]
        print(f"   {phase}: {r[seconds]:.3f} s per {per}, {r[phase + '_tflops_per_s']:.3g} TFLOPS, "
              f"{mfu(r['mfu_' + phase])}" + (f", peak memory {memory['allocated_gb']:.2f} GB allocated / "
                                             f"{memory['reserved_gb']:.2f} GB reserved" if memory else ""))
    print(f"   transformer FLOPs: {r['forward_flops_per_video']:.4g} per video forward, "
          f"{r['train_flops_per_sample']:.4g} per trained sample (forward + backward, all CFG branches)"
          + (f"; {r['mfu_note']}" if r["peak_bf16_tflops"] else ""))


def plot(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, runs in results["learning"].items():
        for i, run in enumerate(runs):
            t, r = zip(*run["curve"])
            ax.plot(t, r, color={"flash": "C0", "flow_grpo": "C1", "flow_grpo_fast": "C2"}[algo], alpha=0.8,
                    label=algo if i == 0 else None)
    ax.set(xlabel="wall time (s)", ylabel="mean reward of the epoch", title="Learning in miniature (tiny model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning.png", dpi=120)
    written.append("learning.png")
    g = results["gradient_norms"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(g["steps"], g["without_tgr"], "o-", label="without TGR")
    ax.plot(g["steps"], g["with_tgr"], "s-", label="with TGR")
    ax.set(xlabel="SDE step k", ylabel="gradient norm", title="Per-timestep gradient norm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gradient_norms.png", dpi=120)
    written.append("gradient_norms.png")
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", default="bench_results", help="folder for the JSON results and the plots")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a shorter learning race")
    g = parser.add_argument_group("5. GPU figures")
    g.add_argument("--gpu-only", action="store_true", help="run only section 5 (writes gpu_MODEL.json)")
    g.add_argument("--model", choices=("tiny", "wan1.3b", "wan14b"), default="tiny",
                   help="architecture of section 5: wan1.3b and wan14b are real size with random weights (GPU only)")
    # flash_grpo's own flag names, so that its messages about a bad value name the flag given here
    g.add_argument("--num-frames", type=int, help="frames per video, 4k+1 (default: the preset's, 81 for wan)")
    g.add_argument("--height", type=int, help="video height, a multiple of 16 (default: the preset's, 480 for wan)")
    g.add_argument("--width", type=int, help="video width, a multiple of 16 (default: the preset's, 832 for wan)")
    g.add_argument("--num-steps", type=int, default=20, help="rollout steps (default: 20, the paper's)")
    g.add_argument("--group-size", type=int, default=2, help="rollouts per epoch, one prompt's group (default: 2)")
    g.add_argument("--batch-size", type=int, default=1, help="videos per forward pass, x2 with CFG (default: 1)")
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default: 16, the release); 0: train every "
                                                             "weight")
    g.add_argument("--peak-tflops", type=float, help="dense bf16 peak of a GPU missing from PEAK_BF16_TFLOPS")
    args = parser.parse_args(argv)
    if args.model != "tiny" and not torch.cuda.is_available():
        parser.exit(2, f"bench.py: error: --model {args.model} is the real-size architecture, too large for a CPU "
                       f"run: run it on a GPU (--model tiny runs the same path here)\n")
    if args.batch_size > 0 and args.group_size % args.batch_size:
        parser.exit(2, f"bench.py: error: --batch-size {args.batch_size} must divide --group-size {args.group_size}\n")
    fg.parse_args(gpu_flags(args))  # the workload's flags are checked now, not after sections 1-4
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    torch.manual_seed(0)
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    if args.gpu_only:
        results["gpu"] = gpu_figures(gpu_flags(args), args.peak_tflops)
        (out / f"gpu_{args.model}.json").write_text(json.dumps(results, indent=1))
        print_gpu(results["gpu"])
        print(f"\nwrote {out / f'gpu_{args.model}.json'}")
        return
    results["epoch_cost"] = epoch_cost(repeats=1 if quick else 3)
    results["sampler_overhead"] = sampler_overhead(repeats=2 if quick else 5)
    results["gradient_norms"] = gradient_norms(draws=2 if quick else 8)
    results["learning"] = learning_race(budget_s=20 if quick else 60, seeds=[0, 1] if quick else [0, 1, 2])
    results["gpu"] = gpu_figures(gpu_flags(args), args.peak_tflops)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    written = plot(results, out)

    print(f"\n1. One RL epoch, 8 videos, 20 steps, CFG 4.5 (median of runs; {results['machine']})")
    print(f"{'algo':16} {'sample s':>9} {'train s':>9} {'epoch s':>9} {'fwd (sample)':>13} {'fwd+bwd (train)':>16}"
          f" {'train x flash':>14} {'epoch x flash':>14}")
    for algo, r in results["epoch_cost"].items():
        print(f"{algo:16} {r['sample_s']:9.2f} {r['train_s']:9.2f} {r['epoch_s']:9.2f} {r['sample_forward']:13.0f} "
              f"{r['train_forward']:7.0f} + {r['train_backward']:<6.0f} {r['train_cost_vs_flash']:14.2f} "
              f"{r['epoch_cost_vs_flash']:14.2f}")
    s = results["sampler_overhead"]
    print(f"\n2. Sampler: ours {s['ours_s']:.3f} s, diffusers WanPipeline {s['diffusers_s']:.3f} s, "
          f"ratio {s['ratio']:.3f} (8 videos, 20 steps, best of runs)")
    g = results["gradient_norms"]
    print(f"\n3. Per-timestep gradient norm over steps 0..{len(g['steps']) - 1}: max/min without TGR "
          f"{g['spread_without_tgr']['max_over_min']:.2f} (cv {g['spread_without_tgr']['cv']:.2f}), with TGR "
          f"{g['spread_with_tgr']['max_over_min']:.2f} (cv {g['spread_with_tgr']['cv']:.2f}); lambda ratio "
          f"{g['lambda_ratio']:.2f}")
    print("\n4. Learning race (mean reward: first epoch -> last epoch within the budget, per seed)")
    for algo, runs in results["learning"].items():
        cells = [f"{run['curve'][0][1]:.4f} -> {run['curve'][-1][1]:.4f} ({len(run['curve'])} epochs)"
                 for run in runs]
        print(f"{algo:16} " + " | ".join(cells))
    print_gpu(results["gpu"])
    print(f"\nwrote {out / 'results.json'}" + (f" and {', '.join(written)}" if written else
                                               " (install matplotlib for the plots)"))


if __name__ == "__main__":
    main()
