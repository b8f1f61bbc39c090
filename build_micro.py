"""
Build the micro model: the Wan2.1 classes (AutoencoderKLWan, WanTransformer3DModel, UMT5EncoderModel and its
tokenizer) at a size that trains on a CPU, pretrained on a procedurally generated video world, so that
`flash_grpo.py --model micro` has prompts that mean something and videos a reward can judge.

    python build_micro.py                # the whole build, seeded, into micro/ (BUILD_MINUTES minutes on 2 cores)
    python build_micro.py --check        # measure the model in micro/: how often its clips follow their captions

The world: one shape (a square or a circle, 6 colours) moving left, right, up or down over a plain background of
another colour, 5 frames of 32 x 32 pixels, captioned by what it shows: "a red square moving left on a blue
background" (reward.micro_caption). A fifth of the 240 combinations of the four attributes is held out of
training; the check samples clips for them and judges each from its pixels (reward.judge_micro).

The build: 1. the VAE learns to reconstruct clips; 2. every training clip is encoded once; 3. the transformer
learns flow matching on those latents, conditioned on a frozen random text encoder's caption embeddings (one
token per word; the caption is dropped 10% of the time, for classifier-free guidance); 4. the check, written to
check.json. Every stage is seeded and counted in steps, not time; the weights are written with save_pretrained
(safetensors) and committed, so runs and tests never rebuild them.
"""

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import flash_grpo as fg  # noqa: E402
import reward as R  # noqa: E402

HERE = Path(__file__).resolve().parent
FRAMES, SIZE, RADIUS, SPEED, JITTER = 5, 32, 5, 3, 3   # a shape 10 pixels across moves 3 pixels a frame
RATES = ("colour", "shape", "direction", "background", "all four")  # what the check reports, besides sharpness
MAX_TOKENS = 16                              # a caption is 10 words and </s>
VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, False],
                  scale_factor_spatial=4, scale_factor_temporal=1)  # what the layers above do (Wan2.1's: 8 and 4)
TEXT_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
TRANSFORMER_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16,
                          out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def all_combinations() -> list[tuple[str, str, str, str]]:
    colours = list(R.MICRO_COLOURS)
    return [(c, s, d, b) for c, s, d, b in itertools.product(colours, R.MICRO_SHAPES, R.MICRO_DIRECTIONS, colours)
            if c != b]


def split_combinations(seed: int = 0) -> tuple[list, list]:
    """240 combinations: a seeded fifth held out of training (each attribute value still seen in training)."""
    combos = all_combinations()
    perm = torch.randperm(len(combos), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [combos[i] for i in perm[: len(combos) // 5]]
    return [c for c in combos if c not in held], held


def render(colour: str, shape: str, direction: str, background: str, gen: torch.Generator) -> torch.Tensor:
    """One clip (F, 3, H, W) in [0, 1]: the shape's path is centred on the frame, give or take JITTER pixels."""
    dx, dy = R.MICRO_DIRECTIONS[direction]
    half = SPEED * (FRAMES - 1) / 2
    x0, y0 = (int(SIZE / 2 - d * half + torch.randint(-JITTER, JITTER + 1, (), generator=gen)) for d in (dx, dy))
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    video = torch.tensor(R.MICRO_COLOURS[background]).view(1, 3, 1, 1).repeat(FRAMES, 1, SIZE, SIZE)
    for f in range(FRAMES):
        cx, cy = x0 + dx * SPEED * f, y0 + dy * SPEED * f
        if shape == "square":
            inside = ((xx - cx).abs() < RADIUS) & ((yy - cy).abs() < RADIUS)
        else:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < RADIUS ** 2
        video[f, :, inside] = torch.tensor(R.MICRO_COLOURS[colour]).view(3, 1)
    return video


def clips(combos: list, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n clips of random combinations from `combos`: (n, F, 3, H, W) in [0, 1], and their captions."""
    gen = torch.Generator().manual_seed(seed)
    chosen = [combos[int(i)] for i in torch.randint(len(combos), (n,), generator=gen)]
    return torch.stack([render(*c, gen) for c in chosen]), [R.micro_caption(*c) for c in chosen]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def train_vae(train: list, steps: int, seed: int, log, lr: float = 2e-3, batch: int = 16) -> "AutoencoderKLWan":
    """The VAE on fresh clips of the training combinations, in [-1, 1] (inside the decoder's clamp). It learns
    from the posterior mean plus a little noise (full unit-variance samples stall it), with a small KL term and
    the shape's pixels weighted up."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    test, captions = clips(train, 32, seed + 1)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:  # warm-up, then cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, _ = clips(train, batch, seed + 1000 + step)
        x = x.permute(0, 2, 1, 3, 4) * 2 - 1                                # (B, 3, F, H, W) in [-1, 1]
        post = vae.encode(x).latent_dist
        z = post.mean + 0.1 * post.std * torch.randn_like(post.mean)
        out = vae.decode(z).sample
        # the shape is a tenth of the pixels: weighted 10x, else the VAE first learns a good background alone
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, 3, F, 4W)
        bg = border.flatten(2).median(-1).values.view(-1, 3, 1, 1, 1)
        weight = 1 + 9 * ((x - bg).norm(dim=1, keepdim=True) > 0.3)
        loss = (weight * ((out - x).abs() + (out - x) ** 2)).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            with torch.no_grad():
                rec = decode(vae, vae.encode(test.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mean)
            judged = float(R.micro_adherence(rec, captions).mean())  # what the pixel judge still reads
            log(f"vae step {step + 1} ({time.time() - start:.0f} s): loss {loss.item():.4f}, PSNR {psnr(rec, test):.1f} dB, "
                f"judge on reconstructions {judged:.1%}")
    return vae.eval()


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, C, F', H', W') -> clips (B, F, 3, H, W) in [0, 1]."""
    return ((vae.decode(z).sample.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)


def word_tokenizer():
    """One token per word of the world's captions (built in code, saved beside the model): <pad>=0, </s>=1,
    <unk>=2, then the vocabulary; a caption is 10 words and the end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "moving", "on", "background", *R.MICRO_COLOURS, *R.MICRO_SHAPES, *R.MICRO_DIRECTIONS]
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def text_encoder(seed: int):
    """The frozen caption encoder: UMT5's encoder, small and random (seeded), with a word-level tokenizer; the
    transformer learns to read its embeddings."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                          decoder_start_token_id=0, **TEXT_CONFIG))
    return tokenizer, encoder.eval().requires_grad_(False)


def embed(tokenizer, encoder, captions: list[str]) -> torch.Tensor:
    """Padded caption embeddings (n, MAX_TOKENS, D), as the trainer computes them."""
    return fg.pad_embeds(fg.encode_prompts(tokenizer, encoder, captions, MAX_TOKENS), MAX_TOKENS)


def encode_dataset(vae, train: list, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n training clips through the VAE once: the posterior means (n, C, F', H', W') and the captions."""
    latents, captions = [], []
    for start in range(0, n, 64):
        x, caps = clips(train, min(64, n - start), seed + start)
        with torch.no_grad():
            latents.append(vae.encode(x.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mean)
        captions += caps
    return torch.cat(latents), captions


def train_transformer(latents, captions, tokenizer, encoder, steps: int, seed: int, log, lr: float = 1e-3):
    """Flow matching on the normalised latents: x_sigma = (1 - sigma) x_0 + sigma eps with sigma on the sampler's
    shifted grid distribution (uniform, then shift 3), the target the velocity eps - x_0; the caption is replaced by
    the empty prompt 10% of the time, so that classifier-free guidance has an unconditional model to contrast.
    The log shows how much the caption helps: the loss on a fixed batch with its own captions and with another
    clip's (a model that ignores its caption has the two equal)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    unique = sorted(set(captions))
    table = embed(tokenizer, encoder, unique + [""])                          # (U + 1, L, D)
    which = torch.tensor([unique.index(c) for c in captions])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)

    def noised(idx, sigma, eps):
        s = sigma.view(-1, 1, 1, 1, 1)
        return (1 - s) * latents[idx] + s * eps, eps - latents[idx]

    probe = torch.randint(len(latents), (128,), generator=gen)                 # the fixed batch of the log
    probe_x, probe_v = noised(probe, torch.full((128,), 0.8), torch.randn(latents[probe].shape, generator=gen))
    start, losses = time.time(), []
    for step in range(1, steps + 1):
        for group in opt.param_groups:                                         # warm-up, then cosine decay
            group["lr"] = lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(latents), (64,), generator=gen)
        cond = torch.where(torch.rand(64, generator=gen) < 0.1, len(unique), which[idx])
        u = torch.rand(64, generator=gen)
        sigma = 3 * u / (1 + 2 * u)                                           # the shift-3 grid's distribution
        x, target = noised(idx, sigma, torch.randn(latents[idx].shape, generator=gen))
        loss = ((model(x, fg.model_timesteps(sigma), table[cond], return_dict=False)[0] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 500 == 0 or step == steps:
            with torch.no_grad():
                t = fg.model_timesteps(torch.full((128,), 0.8))
                own, other = (((model(probe_x, t, table[c], return_dict=False)[0] - probe_v) ** 2).mean().item()
                              for c in (which[probe], which[probe.roll(1)]))
            log(f"transformer step {step} ({time.time() - start:.0f} s): loss {sum(losses[-500:]) / len(losses[-500:]):.4f}; "
                f"at sigma 0.8, own captions {own:.4f}, another clip's {other:.4f}")
    return model.eval()


def check(path: Path, combos: list, n: int, seed: int, steps: int, guidance: float) -> dict:
    """Sample n clips of the given combinations with the model at path (the trainer's ODE sampler, its CFG)
    and judge each from its pixels: the share of clips showing each attribute, and all four."""
    m = fg.pretrained_models({"weights": path}, None, master=True, text_encoder=True)
    shape = fg.latent_shape(argparse.Namespace(num_frames=FRAMES, height=SIZE, width=SIZE), m.vae)
    gen = torch.Generator().manual_seed(seed)
    chosen = [combos[int(i)] for i in torch.randint(len(combos), (n,), generator=gen)]
    captions = [R.micro_caption(*c) for c in chosen]
    embeds, neg = embed(m.tokenizer, m.text_encoder, captions), embed(m.tokenizer, m.text_encoder, [""])
    noise = torch.randn((n, *shape), generator=gen)
    with torch.no_grad():
        latents = fg.sample_ode(m.transformer.eval(), noise, embeds, neg.expand_as(embeds),
                                fg.flow_sigmas(steps, 3.0), guidance)
        videos = fg.decode_videos(m.vae.eval(), latents)
    judged = [R.judge_micro(v) for v in videos]
    asked = [R.parse_micro_caption(c) for c in captions]
    rates = {k: sum(j[k] == a[k] for j, a in zip(judged, asked)) / n for k in asked[0]}
    rates["all four"] = sum(all(j[k] == a[k] for k in a) for j, a in zip(judged, asked)) / n
    rates["sharpness"] = float(R.micro_sharpness(videos).mean())
    return rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", default=str(HERE / "micro"), help="where the model goes (default: micro/)")
    parser.add_argument("--vae-steps", type=int, default=2400, help="the VAE's training steps")
    parser.add_argument("--transformer-steps", type=int, default=6000, help="the transformer's training steps")
    parser.add_argument("--transformer-lr", type=float, default=1e-3)
    parser.add_argument("--clips", type=int, default=20000, help="training clips encoded for the transformer")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-only", action="store_true")
    parser.add_argument("--vae-from", help="reuse the VAE of a model folder")

    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="only measure the model in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread per process is the fastest on small models (and keeps runs comparable)
    out = Path(args.out)
    train, held = split_combinations(args.seed)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if not args.check:
        t0 = time.time()
        if args.vae_from:
            from diffusers import AutoencoderKLWan

            vae = AutoencoderKLWan.from_pretrained(Path(args.vae_from) / "vae").eval()
        else:
            vae = train_vae(train, args.vae_steps, args.seed, log, args.vae_lr, args.vae_batch)
        if args.vae_only:
            vae.save_pretrained(out / "vae")
            return
        latents, captions = encode_dataset(vae, train, args.clips, args.seed + 10**6)
        mean, std = latents.mean((0, 2, 3, 4)), latents.std((0, 2, 3, 4))   # per channel, as Wan's VAE config
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
        tokenizer, encoder = text_encoder(args.seed)
        transformer = train_transformer(latents, captions, tokenizer, encoder, args.transformer_steps, args.seed,
                                        log, args.transformer_lr)
        out.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(out / "vae")
        transformer.save_pretrained(out / "transformer")
        encoder.save_pretrained(out / "text_encoder")
        tokenizer.save_pretrained(out / "tokenizer")
        (out / "train_prompts.txt").write_text("\n".join(R.micro_caption(*c) for c in train) + "\n")
        (out / "eval_prompts.txt").write_text("\n".join(R.micro_caption(*c) for c in held) + "\n")
        log(f"built in {(time.time() - t0) / 60:.1f} minutes")
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    steps, guidance = config.get("args", {}).get("num_steps", 10), config.get("args", {}).get("guidance_scale", 4.5)
    report = {name: {"clips": 200, "seed": args.seed + 7, **check(out, combos, 200, args.seed + 7, steps, guidance)}
              for name, combos in (("held-out combinations", held), ("training combinations", train))}
    # the sample the test suite re-measures (smaller, so that the test is quick)
    report["test"] = {"clips": 48, "seed": args.seed + 8, "steps": steps, "guidance": guidance,
                      **check(out, held, 48, args.seed + 8, steps, guidance)}
    for name, r in report.items():
        log(f"{name} ({r['clips']} clips): " + ", ".join(f"{k} {r[k]:.1%}" for k in RATES) +
            f", sharpness {r['sharpness']:.3f}")
    (out / "check.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
