"""
Benchmarks that re-run the paper's comparative claims in this harness (its teaser figure's cost, its Figures 4 and 5) and ablate its two parts.

    python bench.py                      # CPU, tiny random Wan stack: about 10 minutes on 2 cores
    python bench.py --quick              # fewer repeats: about 3 minutes
    python bench.py --out bench_results  # where the JSON and PNG plots go

It measures, side by side:
  1. the cost of one RL epoch (sampling and training) for flash, flow_grpo and flow_grpo_fast at the paper's
     schedule (20 steps, CFG): wall time, transformer forward/backward passes, and their ratios;
  2. the sampler's overhead: our rollout against diffusers' WanPipeline on the same model, steps, CFG and
     resolution (latents out);
  3. per-timestep gradient norms over the SDE window, with and without TGR;
  4. (--race, not part of the default run) the paper's comparisons on the micro model (build_micro.py): flash,
     flow_grpo (both noise schedules), Fast1, flash --no-itg and --no-tgr, and two settings beyond the paper
     (the per-group std, twice the noise at k*), at equal forward-equivalents, over seeds and both micro
     rewards; (--snr) each arm's gradient signal-to-noise ratio;
  5. seconds per rollout video and per trained sample, peak GPU memory, and the MFU (model FLOPs utilisation) of
     sampling and training, for the real-size Wan2.1 architecture (--model) with random weights (flash_grpo's
     --init random: no download) and a training-free reward (colorfulness). One epoch warms up, the next is timed;
  6. (--scale-only, not part of the default run) the real-scale paths on a CPU, 2 ranks under torchrun: each rank's
     host memory for the prompt-embedding cache at 1,000, 5,000 and 20,000 prompts, and while saving a checkpoint
     and exporting the real wan1.3b transformer (random weights; LoRA, and full fine-tuning of 15 of its 30
     blocks); a 20,000-prompt tiny run; the reward gap of a bf16 VAE decode.

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
import dataclasses
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
import reward as reward_lib  # noqa: E402

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
            samples, _ = trainer.sample(epoch)
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
    m = fg.load_models(fg.parse_args(["--model", "tiny"]))
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


def race_arms(num_steps: int) -> dict[str, list[str]]:
    """The paper's comparisons as flash_grpo.py flags (README, Baselines and ablations)."""
    return {
        "flash": ["--algo", "flash"],
        "flow_grpo": ["--algo", "flow_grpo"],
        "flow_grpo, Flow-GRPO's noise": ["--algo", "flow_grpo", "--noise-schedule", "flow_grpo"],
        "fast1": ["--algo", "flow_grpo_fast", "--fast-window", "1"],
        "flash --no-itg": ["--algo", "flash", "--no-itg"],
        "flash --no-tgr": ["--algo", "flash", "--no-tgr"],
    }


def more_arms() -> dict[str, list[str]]:
    """Flash-GRPO beyond the paper's settings: the advantage over each group's std, twice the release's noise at
    k* (g_max = 2 sigma_1 = 1.85 at 5 steps)."""
    return {"flash --no-global-std": ["--algo", "flash", "--no-global-std"],
            "flash, noise x2": ["--algo", "flash", "--noise-level", "1.85"]}


def group_stats(groups: torch.Tensor) -> tuple[float, float]:
    """An epoch's (P, G) rewards: the mean std inside a group, and the share of groups whose rewards are all
    equal (advantage 0: no gradient)."""
    return float(groups.std(1, unbiased=False).mean()), float((groups == groups[:, :1]).all(1).float().mean())


def race(out: Path, budget: float, seeds: list[int], rewards: list[str], jobs: int = 2) -> dict:
    """4. The race on the micro model: every arm gets the same compute, `budget` forward-equivalents, with each
    reward and seed, as `flash_grpo.py --model micro` runs (2 at a time, one thread each). Returns each run's
    curve: (forward-equivalents, rollout reward) per epoch, and the evaluations (held-out captions, EMA, ODE)."""
    import subprocess
    import sys

    runs, queue = {}, []
    for reward in rewards:
        for name, flags in {**race_arms(0), **more_arms()}.items():
            flags = [*flags, "--reward", reward, "--reward-frames", "mean"]
            epochs = max(1, math.ceil(budget / fg.forward_equivalents(fg.parse_args(["--model", "micro", *flags]))))
            for seed in seeds:
                folder = out / "race" / reward / name.replace(" ", "_").replace(",", "").replace("'", "") / str(seed)
                runs[(reward, name, seed)] = folder
                if not (folder / "export").exists():  # a finished run is not run again
                    queue.append([sys.executable, str(Path(__file__).parent / "flash_grpo.py"), "--model", "micro",
                                  *flags, "--seed", str(seed), "--epochs", str(epochs),
                                  "--eval-every", str(max(1, epochs // 8)), "--output-dir", str(folder)]
                                 + (["--resume"] if folder.exists() else []))
    running = []
    while queue or running:
        while queue and len(running) < jobs:
            running.append(subprocess.Popen(queue.pop(0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True))
        for proc in running[:]:
            if proc.poll() is not None:
                running.remove(proc)
                assert proc.returncode == 0, proc.stderr.read()[-2000:]
        time.sleep(1)
    results, group_size = {}, fg.parse_args(["--model", "micro"]).group_size
    for (reward, name, seed), folder in runs.items():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        plans = [json.loads(line) for line in (folder / "rollouts.jsonl").read_text().splitlines()]
        stats = [group_stats(torch.tensor(p["rewards"]).view(-1, group_size)) for p in plans]  # per epoch
        results.setdefault(reward, {}).setdefault(name, []).append({
            "group_spread": statistics.mean(spread for spread, _ in stats),
            "groups_all_equal": statistics.mean(equal for _, equal in stats),
            "seed": seed, "curve": [(r["forward_equivalents"], r["reward_mean"]) for r in rows],
            "eval": [(0, rows[0]["eval_reward_before"])] + [(r["forward_equivalents"], r["eval_reward"])
                                                             for r in rows if "eval_reward" in r]})
    return results


def snr_arms() -> dict[str, list[str]]:
    """The race's arms, and Flash-GRPO with one of its exploration noise (the release's g_max = sigma_1 = 0.92 at
    5 steps), window or group size changed (64 videos an epoch in all)."""
    flash = ["--algo", "flash"]
    return {**race_arms(0), **more_arms(), "flash, noise x0.5": [*flash, "--noise-level", "0.46"],
            "flash, window 1": [*flash, "--sde-window", "1"],
            "flash, window 4": [*flash, "--sde-window", "4"],
            "flash, G 4": [*flash, "--group-size", "4", "--prompts-per-epoch", "16"],
            "flash, G 16": [*flash, "--group-size", "16", "--prompts-per-epoch", "4"]}


def gradient_snr(draws: int, rewards: list[str], arms: list[str] | None = None) -> dict:
    """The signal-to-noise ratio of an epoch's policy gradient at the micro model's weights, per arm and reward:
    `draws` epochs (fresh prompts, k* and noise), each giving g, the gradient of the epoch's loss over all its
    transitions, no step taken. SNR = |E g|^2 / E|g - E g|^2, from the draws' Gram matrix: |E g|^2 as the mean
    dot product of two different draws (unbiased), the noise as the draws' variance; its standard error by
    leaving one draw out (jackknife). Per trained transition and per forward-equivalent: the SNR over their
    count in an epoch (the SNR of a mean of independent draws grows with their number). With it, the rewards'
    std inside a group, and the share of groups whose rewards are all equal (advantage 0, no gradient)."""

    def snr(gram: torch.Tensor) -> float:
        n, total, trace = len(gram), float(gram.sum()), float(gram.trace())
        return ((total - trace) / (n * (n - 1))) / ((trace - total / n) / (n - 1))

    out = {}
    for reward in rewards:
        for name, flags in snr_arms().items():
            if arms and name not in arms:
                continue
            args = fg.parse_args(["--model", "micro", *flags, "--reward", reward, "--reward-frames", "mean"])
            trainer, grads, spread, dead = fg.Trainer(args, fg.setup_distributed()), [], [], []
            for epoch in range(draws):
                samples, rewards = trainer.sample(epoch)
                epoch_spread, epoch_dead = group_stats(rewards.view(-1, args.group_size))
                spread.append(epoch_spread)
                dead.append(epoch_dead)
                n = len(samples["k"])
                for start in range(0, n, args.batch_size):
                    loss, diag = trainer.loss({k: t[start: start + args.batch_size] for k, t in samples.items()})
                    (loss * len(diag["ratio"]) / n).backward()
                grads.append(torch.cat([fg.full_tensor(p.grad).flatten() for p in trainer.params]).double())
                trainer.optimizer.zero_grad(set_to_none=True)
            g = torch.stack(grads)
            gram = g @ g.T
            value, keep = snr(gram), torch.ones(draws, dtype=torch.bool)
            loo = []
            for i in range(draws):
                keep[i] = False
                loo.append(snr(gram[keep][:, keep]))
                keep[i] = True
            se = math.sqrt((draws - 1) / draws * sum((x - statistics.mean(loo)) ** 2 for x in loo))
            fe = fg.forward_equivalents(args)
            out.setdefault(reward, {})[name] = {"snr": value, "snr_se": se, "draws": draws, "transitions": n,
                                                "forward_equivalents": fe, "snr_per_transition": value / n,
                                                "snr_per_1k_forward_equivalents": 1000 * value / fe,
                                                "snr_per_1k_forward_equivalents_se": 1000 * se / fe,
                                                "group_spread": statistics.mean(spread),
                                                "groups_all_equal": statistics.mean(dead)}
            print(f"{reward:16} {name:32} SNR {value:8.4f} +- {se:.4f}  per transition {value / n:.2e}  per 1k "
                  f"forward-equivalents {1000 * value / fe:.4f} +- {1000 * se / fe:.4f}  spread in a group "
                  f"{statistics.mean(spread):.3f}, groups all equal {statistics.mean(dead):.2f}", flush=True)
    return out


def race_table(results: dict) -> dict:
    """Per reward and arm, over the seeds: the held-out evaluation before, at the evaluation nearest half the
    budget and at the end (mean and std), its best along the way, and the rollouts' mean reward over the last
    fifth of the budget."""
    table = {}
    for reward, arms in results.items():
        for name, runs in arms.items():
            final = torch.tensor([run["eval"][-1][1] for run in runs])
            half = torch.tensor([min(run["eval"], key=lambda e: abs(e[0] - run["eval"][-1][0] / 2))[1]
                                 for run in runs])
            best = torch.tensor([max(v for _, v in run["eval"]) for run in runs])
            late = torch.tensor([statistics.mean(v for _, v in run["curve"][-max(1, len(run["curve"]) // 5):])
                                 for run in runs])
            table.setdefault(reward, {})[name] = {
                "before": statistics.mean(run["eval"][0][1] for run in runs),
                "half": float(half.mean()), "half_std": float(half.std()) if len(runs) > 1 else 0.0,
                "final": float(final.mean()), "final_std": float(final.std()) if len(runs) > 1 else 0.0,
                "best": float(best.mean()), "late_rollouts": float(late.mean()),
                "late_rollouts_std": float(late.std()) if len(runs) > 1 else 0.0, "seeds": len(runs),
                "group_spread": statistics.mean(run["group_spread"] for run in runs),
                "groups_all_equal": statistics.mean(run["groups_all_equal"] for run in runs)}
    return table


def print_race(table: dict, budget: float) -> None:
    print(f"\n4. The race on the micro model, {budget:,.0f} forward-equivalents per run (held-out evaluation: before "
          f"-> half the budget -> final, mean +- std over seeds; best along the way; rollouts over the last fifth)")
    for reward, arms in table.items():
        print(reward)
        for name, r in arms.items():
            print(f"  {name:30} {r['before']:.3f} -> {r['half']:.3f} +- {r['half_std']:.3f} (half) -> {r['final']:.3f} "
                  f"+- {r['final_std']:.3f}  best {r['best']:.3f}  "
                  f"late rollouts {r['late_rollouts']:.3f} +- {r['late_rollouts_std']:.3f}  spread in a group "
                  f"{r['group_spread']:.3f}, all equal {r['groups_all_equal']:.2f}  ({r['seeds']} seeds)")


def plot_race(results: dict, out: Path) -> list[str]:
    """race_REWARD.png, the paper's arms, and race_more_REWARD.png, Flash-GRPO beside the arms beyond them: the
    held-out evaluation and the rollouts' reward against compute, mean over seeds and its spread (min to max);
    the seeds' points are taken in order, at the first seed's compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for reward, arms in results.items():
        paper = [name for name in arms if name in race_arms(0)]
        for suffix, names in (("", paper), ("_more", ["flash"] + [n for n in arms if n not in paper])):
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for i, name in enumerate(names):
                runs = arms[name]
                for ax, key in zip(axes, ("eval", "curve")):
                    grid = torch.tensor([x for x, _ in runs[0][key]], dtype=torch.float64)
                    values = torch.tensor([[v for _, v in run[key]][: len(grid)] for run in runs], dtype=torch.float64)
                    ax.plot(grid, values.mean(0), color=f"C{i}", label=name)
                    ax.fill_between(grid, values.min(0).values, values.max(0).values, color=f"C{i}", alpha=0.15)
            axes[0].set(xlabel="compute (transformer forward-equivalents)", ylabel=reward,
                        title="held-out captions (EMA weights, ODE)")
            axes[1].set(xlabel="compute (transformer forward-equivalents)", title="rollouts (the epoch's mean)")
            axes[0].legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / f"race{suffix}_{reward}.png", dpi=110)
            plt.close(fig)
            written.append(f"race{suffix}_{reward}.png")
    return written


# Dense bf16 tensor-core peaks in TFLOPS (NVIDIA datasheets; their "with sparsity" figures are twice these), matched
# in order against torch.cuda.get_device_name(): the H100 SXM part calls itself "NVIDIA H100 80GB HBM3".
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 80GB HBM3", 989.4), ("H100 SXM", 989.4), ("H200", 989.4),
                    ("A100", 312.0))


# ----------------------------------------------------------------------------------------------
# The memory plan of flash_grpo.py --dry-run, and the FLOP count of the MFU figures
# ----------------------------------------------------------------------------------------------

def token_grid(latent_shape: tuple, patch_size: tuple) -> tuple[int, int, int]:
    """The transformer's tokens per video, (F', H'/2, W'/2) for Wan's 1 x 2 x 2 patches; their product is T."""
    return tuple(n // p for n, p in zip(latent_shape[1:], patch_size))


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


def memory_plan(args, world: int, bf16: bool = True) -> tuple[list, list, dict]:
    """The memory each of `world` GPUs (bf16, as on GPUs; fp32 throughout with bf16=False, as on CPUs) and each
    rank's host need for a flash_grpo.py run, from models built on the meta device: (GPU rows, host rows,
    counts). Every row is something flash_grpo.py holds; its comments say where."""
    # the published architectures on the meta device: no weights, no memory (micro's small weights load)
    m = fg.load_models(dataclasses.replace(args, init="random"), device="meta")
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    transformer = m.transformer
    keep = set(transformer._keep_in_fp32_modules)
    fp32 = count(p for n, p in transformer.named_parameters() if keep & set(n.split(".")))  # replicated, fp32
    total, block = count(transformer.parameters()), count(transformer.blocks[0].parameters())
    largest = max(p.numel() for p in transformer.parameters())
    adapters = 0
    if args.lora_rank > 0:
        fg.add_lora(transformer, args.lora_rank, args.lora_alpha)
        adapters = count(transformer.parameters()) - total
    trainable = adapters or total
    sharded_trainable = adapters or total - fp32                            # FSDP2's; the fp32 modules are whole
    base = (2 if bf16 and args.lora_rank else 4) * (total - fp32)           # a frozen base is kept in bf16
    shape = fg.latent_shape(args, m.vae)
    grid = token_grid(shape, transformer.config.patch_size)
    cfg = fg.cfg_branches(args.guidance_scale)                                # both CFG branches carry gradients
    acts = {ckpt: activation_bytes(transformer.config, math.prod(grid), args.max_sequence_length,
                                   cfg * args.batch_size, args.lora_rank, ckpt) for ckpt in (True, False)}
    steps = fg.trained_steps(args)                                          # trained transitions per rollout
    samples = args.prompts_per_epoch * args.group_size / world            # rollouts per rank per epoch
    text_dim = transformer.config.text_dim
    try:
        reward = reward_lib.reward_bytes(args.reward, args.reward_url)
    except ValueError:                                                      # NAME@SOURCE without local files
        reward = 0
    full = args.lora_rank == 0
    gpu = [
        (f"transformer weights, {'bf16' if base < 4 * (total - fp32) else 'fp32'}, 1/N each", base / world),
        ("LoRA adapters, fp32, 1/N" if adapters else "the fp32 modules' gradients, AdamW, EMA (full FT)",
         4 * adapters / world if adapters else 16 * fp32),
        ("modules kept in fp32 (time embedder, norms, scale-shift), whole", 4 * fp32),
        ("gradients of what trains, fp32, 1/N (reduced every micro-batch)", 4 * sharded_trainable / world),
        ("AdamW state (2 moments), fp32, 1/N", 8 * sharded_trainable / world),
        ("EMA of what trains, fp32, 1/N", 4 * sharded_trainable / world),
        ("gathered weights: 2 blocks + root, bf16", 2 * (2 * block + total - block * len(transformer.blocks))),
        ("VAE, fp32, one copy per rank", 4 * count(m.vae.parameters())),
        (f"reward model ({args.reward if not args.reward_url else 'served: none here'})", reward),
        (f"transitions kept: {samples:g} rollouts x {steps} x (x_k, x_k+1), fp32", samples * steps * 8 * math.prod(shape)),
        ("prompt embeddings of a micro-batch and the negative, padded", (cfg * args.batch_size + 1) * args.max_sequence_length * text_dim * 4),
    ]
    gpu = [(name, n) for name, n in gpu if n or "reward" in name]
    before = sum(n for _, n in gpu)
    micro = f"activations, batch {args.batch_size}" + (" x 2 (CFG)" if cfg == 2 else "")
    gpu += [("total before activations", before), (f"{micro}, checkpointed", acts[True]),
            (f"{micro}, not checkpointed", acts[False]),
            ("total per GPU, " + ("checkpointed" if args.gradient_checkpointing else "not checkpointed"),
             before + acts[args.gradient_checkpointing])]
    saved = 16 * trainable                                                 # weights, EMA, AdamW's 2 moments, fp32
    host = [
        ("rank 0 at start-up: the whole transformer, fp32, until sharded", 4 * total),
        ("text encoder, bf16, while prompts are encoded (first run only)", 2 * count(m.text_encoder.parameters())),
        ("a checkpoint's shards staged to the host, at most (GPUs)", 2 * min(fg.FILE_BYTES, saved) / world),
        ("rank 0 exporting: " + ("the adapters, whole" if adapters else "the largest whole tensor"),
         4 * (adapters if adapters else largest)),
    ]
    info = dict(total=total, trainable=trainable, text=count(m.text_encoder.parameters()),
                vae=count(m.vae.parameters()), grid=grid, saved=saved, text_dim=text_dim, full=full)
    return gpu, host, info


def fits(args, world: int) -> str | None:
    """Why this run cannot fit its GPUs (or, on CPUs, its host's memory), from `memory_plan`, or None: checked
    before any weight is loaded."""
    import torch

    cuda = torch.cuda.is_available()
    gpu, _, _ = memory_plan(args, world, bf16=cuda)
    need = gpu[-1][1]
    if cuda:
        have, where = torch.cuda.get_device_properties(0).total_memory, "this GPU"
    else:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / ranks_here, "each rank's share of RAM"
    if need <= have:
        return None
    return (f"the run does not fit: its memory plan needs {need / 2**30:,.1f} GB per rank and {where} has "
            f"{have / 2**30:,.1f} GB (--dry-run {world} shows the plan); serve the reward on other GPUs "
            f"(--reward-url), train LoRA (--lora-rank 16), or make less (--num-frames, --height, --width, "
            f"--batch-size, --prompts-per-epoch, --group-size)")


def dry_run(args) -> str:
    """`flash_grpo.py --dry-run N`: parameter counts, and the memory each of N GPUs and each rank's host need."""
    world = args.dry_run
    gpu, host, info = memory_plan(args, world)
    gb = lambda n: f"{n / 2**30:7.2f} GB"  # noqa: E731
    grid, num_prompts = info["grid"], len(fg.default_prompts(args)[0])
    lines = [f"{args.model} on {world} GPU(s), {'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full fine-tuning'}",
             f"  transformer      {info['total']:>15,} parameters ({info['trainable']:,} trainable)",
             f"  text encoder     {info['text']:>15,} parameters (loaded only to fill the prompt cache)",
             f"  VAE              {info['vae']:>15,} parameters",
             "  memory per GPU:"]
    lines += [f"    {name:66} {gb(n)}" for name, n in gpu]
    lines += [f"    (activations at {args.height}x{args.width}, {args.num_frames} frames: {' x '.join(map(str, grid))} = "
              f"{math.prod(grid):,} tokens per video and {args.max_sequence_length} text tokens, bf16;",
              "     the backward's transient gradients come on top; while scoring, one decoded micro-batch adds "
              f"{gb(args.batch_size * args.num_frames * 3 * args.height * args.width * 4).strip()})",
              "  host memory per rank:"]
    lines += [f"    {name:66} {gb(n)}" for name, n in host]
    lines += [f"  disk: checkpoints {gb(info['saved']).strip()} each (1/N written by each rank); prompt cache of "
              f"{num_prompts:,} prompts at most {gb(num_prompts * args.max_sequence_length * info['text_dim'] * 2).strip()} "
              f"(bf16, {info['text_dim'] * 2 // 1024} kB per real token)"]
    return "\n".join(lines)


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
    samples, _ = trainer.sample(1)
    t1 = clock()
    sampling_memory = peak_memory()
    t1_train = clock()  # after peak_memory's empty_cache, which is not training
    trainer.train(samples)
    t2 = clock()
    training_memory = peak_memory()

    tokens = math.prod(token_grid(trainer.latent_shape, trainer.policy.config.patch_size))
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


# ----------------------------------------------------------------------------------------------
# 6. The scale paths on this CPU: 2 ranks under torchrun, host memory measured per rank
# ----------------------------------------------------------------------------------------------

def status_gb(field: str) -> float:
    """A field of /proc/self/status in GiB: VmRSS (resident now) or VmHWM (the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS


def prompts_like(n: int, seed: int = 0) -> list[str]:
    """n distinct captions of 25 to 60 bytes (the byte-level tokenizer's tokens): about UMT5's token count of
    a typical 20 to 45 word prompt, so the cache's size on disk is realistic."""
    import random

    rng = random.Random(seed)
    words = "a red blue fox cat boat city street rain snow sea forest river dancer lantern slowly at night".split()
    return [f"{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))[:55] for i in range(n)]


def scale_cache(num_prompts: int, out: Path, d) -> dict:
    """The prompt cache at UMT5-XXL's width (4096, bf16, 512 tokens) with an embedding table standing in for
    the encoder's 24 layers (the cache does not care what computes the vectors): each rank's host memory at its
    peak while it encodes its chunks, what stays resident after (the allocator keeps freed memory), and the peak
    on top of that over 4 epochs of reads at the release's shapes (4 prompts x 8 videos, micro-batch 1); against
    the (P, 512, 4096) fp32 table every rank used to hold."""
    import types

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(384, 4096, dtype=torch.bfloat16)  # ByT5Tokenizer's ids

        device = property(lambda self: self.table.weight.device)

        def forward(self, ids, mask):
            return types.SimpleNamespace(last_hidden_state=self.table(ids))

    args = fg.parse_args(["--model", "tiny", "--max-sequence-length", "512"])
    prompts = prompts_like(num_prompts)
    before = status_gb("VmRSS")
    reset_peak()
    t0 = time.time()
    cache = fg.PromptCache(prompts, args, d, out / "cache", lambda: (fg.ByT5Tokenizer(), Encoder()))
    build_s, build_peak = time.time() - t0, status_gb("VmHWM") - before
    indexed = status_gb("VmRSS")
    reset_peak()
    for epoch in range(4):  # this rank's micro-batches of 4 epochs
        prompt_ids = fg.epoch_prompt_indices(num_prompts, 4, 0, epoch).repeat_interleave(8)
        for j in fg.local_sample_ids(32, 16, d):
            fg.pad_embeds(cache.get([prompt_ids[j]]), 512)
    read_peak = status_gb("VmHWM") - indexed                              # on top of what the build left
    disk = sum(f.stat().st_size for f in cache.folder.iterdir())
    return {"prompts": num_prompts, "rank": d.rank, "encode_s": build_s, "disk_gb": disk / 2**30,
            "index_mb": (cache.lengths.nbytes + cache.starts.nbytes) / 2**20, "build_peak_gb": build_peak,
            "indexed_gb": indexed - before, "epoch_reads_peak_gb": read_peak, "old_table_gb": num_prompts * 512 * 4096 * 4 / 2**30,
            "tokens_per_prompt": float(cache.lengths.float().mean())}


def scale_checkpoint(lora_rank: int, out: Path, d) -> dict:
    """Saving a checkpoint and exporting, 2 ranks of the real wan1.3b transformer with random weights after one
    optimizer step: each rank's resident memory before, and its peak during each. A small text encoder of
    UMT5-XXL's width stands in for its 11 GB (only the transformer matters here); full fine-tuning keeps 15 of
    the 30 blocks, because weights, gradients, AdamW and EMA of the whole model on 2 ranks (28 GB) exceed
    this 24 GB machine."""
    wan = fg.preset("wan1.3b")
    wan["text_encoder"].update(vocab_size=384, d_ff=64, num_layers=1, num_heads=1, d_kv=64)
    if lora_rank == 0:
        wan["transformer"]["num_layers"] = 15
    fg.preset = lambda model, preset=fg.preset: wan if model == "wan1.3b" else preset(model)  # this process only
    args = fg.parse_args(["--model", "wan1.3b", "--init", "random", "--height", "32", "--width", "32", "--num-frames",
                          "5", "--num-steps", "2", "--max-sequence-length", "16", "--prompts-per-epoch", "1",
                          "--group-size", "2", "--train-batch-size", "2", "--reward", "colorfulness", "--epochs",
                          "1", "--lora-rank", str(lora_rank), "--output-dir", str(out / "run")])
    trainer = fg.Trainer(args, d)
    samples, _ = trainer.sample(0)
    trainer.train(samples)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    state = fg.checkpoint_tensors(trainer, with_optimizer=True)
    r = {"rank": d.rank, "lora_rank": lora_rank, "blocks": len(trainer.policy.blocks),
         "parameters": sum(p.numel() for p in trainer.policy.parameters()),
         "model_shard_gb": sum(local(p).nbytes for p in trainer.policy.parameters()) / 2**30,
         "checkpoint_shard_gb": sum(local(t).nbytes for t in state.values()) / 2**30,
         "largest_tensor_gb": max(p.numel() * 4 for p in trainer.policy.parameters()) / 2**30}
    for phase, run in (("save", lambda: fg.save_checkpoint(trainer, 0, out / "run")),
                       ("export", lambda: fg.export_model(trainer, out / "run"))):
        d.barrier()
        r[f"{phase}_before_gb"] = status_gb("VmRSS")
        reset_peak()
        t0 = time.time()
        run()
        r[f"{phase}_s"], r[f"{phase}_peak_gb"] = time.time() - t0, status_gb("VmHWM")
    return r


def vae_precision() -> dict:
    """How far the rewards of a bf16 decode are from an fp32 one (the training decodes in fp32, as WanPipeline
    does): the Wan2.1 VAE architecture with random weights, 9 frames at 64x64 from unit-normal latents."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()
    latents = torch.randn(4, 16, 3, 8, 8)
    fp32 = fg.decode_videos(vae, latents)
    bf16 = fg.decode_videos(vae.to(torch.bfloat16), latents)
    out = {"max_pixel_gap": float((fp32 - bf16).abs().max()), "mean_pixel_gap": float((fp32 - bf16).abs().mean())}
    for name in ("colorfulness", "sharpness", "brightness", "temporal_consistency"):
        fn = reward_lib.build_reward(name, "mean")
        a, b = fn(fp32, [""] * 4), fn(bf16, [""] * 4)
        out[name] = {"fp32": a.tolist(), "max_gap": float((a - b).abs().max()),
                     "gap_over_spread": float((a - b).abs().max() / a.std().clamp_min(1e-12))}
    return out


def scale_worker(part: str, out: Path) -> None:
    d = fg.setup_distributed()
    torch.set_num_threads(1)
    r = scale_cache(int(part[5:]), out / part, d) if part.startswith("cache") else \
        scale_checkpoint({"lora": 16, "full": 0}[part], out / part, d)
    (out / f"scale_{part}_rank{d.rank}.json").write_text(json.dumps(r))


def scale_figures(out: Path) -> dict:
    """6. Each part in 2 fresh processes under torchrun (fresh, so that one part's freed memory does not hide
    the next one's), and a 2-epoch tiny run with 20,000 prompts against one with the 32 built-in ones."""
    import shutil
    import subprocess
    import sys

    results = {}
    for part in ("cache1000", "cache5000", "cache20000", "lora", "full"):
        work = out / "scale_work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--scale-worker", part, "--out", str(work)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        results[part] = [json.loads((work / f"scale_{part}_rank{r}.json").read_text()) for r in range(2)]
        shutil.rmtree(work)
        print(part, results[part])
    runs = {}
    for name, prompts in (("32 prompts", None), ("20,000 prompts", prompts_like(20000, seed=1))):
        work = out / "scale_work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        flags = ["--model", "tiny", "--epochs", "2", "--output-dir", str(work / "run")]
        if prompts:
            (work / "prompts.txt").write_text("\n".join(prompts))
            flags += ["--prompts", str(work / "prompts.txt")]
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "flash_grpo.py"), *flags],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)                             # this child's own peak
        assert status == 0, f"the tiny run with {name} failed"
        runs[name] = {"seconds": time.time() - t0, "max_rss_gb": usage.ru_maxrss / 2**20}
        shutil.rmtree(work)
    results["tiny_runs"] = runs
    results["vae_precision"] = vae_precision()
    return results


def print_scale(r: dict) -> None:
    print("\n6. Scale paths on this CPU, 2 ranks (host memory per rank, GiB)")
    print(f"{'prompts':>8} {'tokens':>7} {'disk':>7} {'encode s':>9} {'index MB':>9} {'encoding':>9} {'indexed':>8} "
          f"{'epoch reads':>12} {'old table':>10}")
    for part in ("cache1000", "cache5000", "cache20000"):
        for c in r[part]:
            print(f"{c['prompts']:>8,} {c['tokens_per_prompt']:7.1f} {c['disk_gb']:7.2f} {c['encode_s']:9.1f} "
                  f"{c['index_mb']:9.2f} {c['build_peak_gb']:+9.3f} {c['indexed_gb']:+8.3f} "
                  f"{c['epoch_reads_peak_gb']:+12.3f} {c['old_table_gb']:10.1f}   (rank {c['rank']})")
    print(f"{'':10} {'blocks':>6} {'model shard':>12} {'ckpt shard':>11} {'largest':>8} {'save: before':>13} "
          f"{'peak':>7} {'export: before':>15} {'peak':>7}")
    for part in ("lora", "full"):
        for c in r[part]:
            print(f"{part} rank {c['rank']} {c['blocks']:>6} {c['model_shard_gb']:12.2f} {c['checkpoint_shard_gb']:11.2f} "
                  f"{c['largest_tensor_gb']:8.3f} {c['save_before_gb']:13.2f} {c['save_peak_gb']:7.2f} "
                  f"{c['export_before_gb']:15.2f} {c['export_peak_gb']:7.2f}")
    for name, run in r["tiny_runs"].items():
        print(f"tiny run, 2 epochs, {name}: {run['seconds']:.1f} s, peak resident {run['max_rss_gb']:.2f} GiB")
    v = r["vae_precision"]
    print(f"VAE decode bf16 vs fp32 (random weights): pixels max {v['max_pixel_gap']:.4f}, mean "
          f"{v['mean_pixel_gap']:.4f}; " + ", ".join(f"{k} {v[k]['max_gap']:.2e} ({v[k]['gap_over_spread']:.2f} of "
                                                    f"the spread)" for k in ("colorfulness", "sharpness",
                                                                            "brightness", "temporal_consistency")))


def plot(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
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
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
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
    g = parser.add_argument_group("4. The race on the micro model (long: about 20 minutes per 10 runs on 2 cores)")
    g.add_argument("--race", action="store_true", help="run only section 4 (writes race.json and race_*.png)")
    g.add_argument("--budget", type=float, default=2e5, help="forward-equivalents per run (default: 200,000)")
    g.add_argument("--seeds", type=int, default=5, help="seeds per arm and reward (default: 5)")
    g.add_argument("--rewards", default="micro_adherence,micro_sharpness", help="the rewards raced on")
    g.add_argument("--snr", type=int, metavar="DRAWS", help="instead: each arm's gradient signal-to-noise ratio "
                   "at the micro model's weights, over DRAWS epochs (writes snr.json)")
    g.add_argument("--snr-arms", help="with --snr: only these arms (names as printed, separated by ;)")
    g = parser.add_argument_group("6. Scale paths on a CPU")
    g.add_argument("--scale-only", action="store_true", help="run only section 6 (writes scale.json; ~15 minutes)")
    g.add_argument("--scale-worker", help=argparse.SUPPRESS)  # one rank of a section-6 part, under torchrun
    args = parser.parse_args(argv)
    if not (0 < args.budget < math.inf and args.seeds >= 1):
        parser.exit(2, f"bench.py: error: --budget must be a positive number and --seeds at least 1, not "
                       f"{args.budget}, {args.seeds}\n")
    if args.snr is not None and args.snr < 2:
        parser.exit(2, f"bench.py: error: --snr {args.snr}: needs at least 2 draws (a variance)\n")
    unknown = set(args.snr_arms.split(";")) - set(snr_arms()) if args.snr_arms else set()
    if unknown:
        parser.exit(2, f"bench.py: error: --snr-arms: no arm named {sorted(unknown)}; the arms: {list(snr_arms())}\n")
    if args.scale_worker:
        return args
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
    if args.scale_worker:
        return scale_worker(args.scale_worker, out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    torch.manual_seed(0)
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    if args.snr:
        results["snr"] = gradient_snr(args.snr, args.rewards.split(","), args.snr_arms and args.snr_arms.split(";"))
        (out / "snr.json").write_text(json.dumps(results, indent=1))
        return print(f"wrote {out / 'snr.json'}")
    if args.race:
        results["race"] = race(out, args.budget, list(range(args.seeds)), args.rewards.split(","))
        results["race_table"] = race_table(results["race"])
        (out / "race.json").write_text(json.dumps(results, indent=1))
        written = plot_race(results["race"], out)
        print_race(results["race_table"], args.budget)
        print(f"\nwrote {out / 'race.json'} and {', '.join(written)}")
        return
    if args.scale_only:
        results["scale"] = scale_figures(out)
        (out / "scale.json").write_text(json.dumps(results, indent=1))
        print_scale(results["scale"])
        print(f"\nwrote {out / 'scale.json'}")
        return
    if args.gpu_only:
        results["gpu"] = gpu_figures(gpu_flags(args), args.peak_tflops)
        (out / f"gpu_{args.model}.json").write_text(json.dumps(results, indent=1))
        print_gpu(results["gpu"])
        print(f"\nwrote {out / f'gpu_{args.model}.json'}")
        return
    results["epoch_cost"] = epoch_cost(repeats=1 if quick else 3)
    results["sampler_overhead"] = sampler_overhead(repeats=2 if quick else 5)
    results["gradient_norms"] = gradient_norms(draws=2 if quick else 8)
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
    print_gpu(results["gpu"])
    print(f"\nwrote {out / 'results.json'}" + (f" and {', '.join(written)}" if written else
                                               " (install matplotlib for the plots)"))


if __name__ == "__main__":
    main()
