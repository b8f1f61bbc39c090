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
  5. on a GPU only: seconds per rollout video and per trained sample, peak memory.
Every figure is measured when the script runs; nothing is hard-coded. matplotlib, if installed, draws the
plots (`pip install matplotlib`); without it the JSON and the printed tables are still written.
"""

import argparse
import json
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
    embeds = fg.encode_prompts(m, ["a red fox in the snow"] * 8, args.max_sequence_length, "cpu")
    neg = fg.encode_prompts(m, [""] * 8, args.max_sequence_length, "cpu")
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
    embeds = trainer.train_embeds[:1].expand(4, -1, -1)
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


def gpu_figures() -> dict:
    """5. Needs a GPU; on a CPU it says so instead of reporting a number."""
    if not torch.cuda.is_available():
        return {"skipped": "no GPU on this machine"}
    trainer = trainer_for(["--num-steps", "20", "--prompts-per-epoch", "2", "--group-size", "4", "--batch-size", "4",
                           "--train-batch-size", "8"])
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    samples, _, _ = trainer.sample(0)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    trainer.train(samples)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"s_per_rollout_video": (t1 - t0) / 8, "s_per_trained_sample": (t2 - t1) / 8,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", default="bench_results", help="folder for results.json and the plots")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a shorter learning race")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    torch.manual_seed(0)
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    results["epoch_cost"] = epoch_cost(repeats=1 if quick else 3)
    results["sampler_overhead"] = sampler_overhead(repeats=2 if quick else 5)
    results["gradient_norms"] = gradient_norms(draws=2 if quick else 8)
    results["learning"] = learning_race(budget_s=20 if quick else 60, seeds=[0, 1] if quick else [0, 1, 2])
    results["gpu"] = gpu_figures()
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
    print(f"\n5. GPU: {results['gpu']}")
    print(f"\nwrote {out / 'results.json'}" + (f" and {', '.join(written)}" if written else
                                               " (install matplotlib for the plots)"))


if __name__ == "__main__":
    main()
