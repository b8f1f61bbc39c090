"""
Build the micro model: the Wan2.1 classes (AutoencoderKLWan, WanTransformer3DModel, UMT5EncoderModel and its
tokenizer) at a size that trains on a CPU, pretrained on a procedurally generated video world, so that
`flash_grpo.py --model micro` has prompts that mean something and videos a reward can judge.

    python build_micro.py            # the whole build, seeded, into micro/ (about 40 minutes on 2 cores)
    python build_micro.py --check    # measure the model in micro/: how often its clips follow their captions

The world: one shape (a square or a circle, 6 colours) moving left, right, up or down over a plain background
of another colour, 5 frames of 16 x 16 pixels, captioned by what it shows: "a red square moving left on a blue
background" (reward.micro_caption). A fifth of the 240 combinations of the four attributes is held out of
training; the check samples clips for them and judges each from its pixels (reward.judge_micro).

The build: 1. the VAE learns to reconstruct clips; 2. training clips are encoded once; 3. the transformer
learns flow matching on those latents, conditioned on a frozen random text encoder's caption embeddings (the
caption is dropped 10% of the time, for classifier-free guidance); 4. the check, written to check.json. Every
stage is seeded and counted in steps, not time; the weights are written with save_pretrained (safetensors) and
committed, so runs and tests never rebuild them. The stages can run as separate processes (--vae-only, then
--vae-from), with the same result.

Where it departs from Wan2.1, and why:
- patch_size (5, 2, 2): the 5 latent frames of a clip are one token. Wan's transformer has no absolute frame
  position, only RoPE, which is relative; with (1, 2, 2) patches a small model drew one static blob (the
  average of the path) and followed directions at chance. In one token, each frame has its own weights.
- The tokenizer keeps "X background" as one token, so that a colour has different tokens as the shape's
  colour and as the background's (the frozen random encoder gives a colour word nearly the same vector in
  both places, and cross-attention sees the caption as a set).
- The VAE compresses space by 2 and time not at all (Wan2.1's: 8 and 4), with 4 latent channels (16), and
  learns with the shape's outline weighted up, so that corners survive and squares stay square.
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
import torch.nn.functional as F  # noqa: E402

import flash_grpo as fg  # noqa: E402
import reward as R  # noqa: E402

HERE = Path(__file__).resolve().parent
FRAMES, SIZE, RADIUS, SPEED, JITTER = 5, 16, 5, 1, 1   # a shape 10 pixels across moves 1 pixel a frame
ATTRIBUTES = ("background", "colour", "shape", "direction")
RATES = (*ATTRIBUTES, "all four")            # what the check reports, besides sharpness
MAX_TOKENS = 16                              # a caption is 8 tokens and </s>
STEPS, GUIDANCE = 10, 2.0                    # the check's sampler (guidance chosen on training combinations)
VAE_CONFIG = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                  scale_factor_spatial=2, scale_factor_temporal=1)  # what the layers above do
TEXT_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
TRANSFORMER_CONFIG = dict(patch_size=(5, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4,
                          out_channels=4, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4,
                          cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                          rope_max_seq_len=32)


def all_combinations() -> list[tuple[str, str, str, str]]:
    colours = list(R.MICRO_COLOURS)
    return [(c, s, d, b) for c, s, d, b in itertools.product(colours, R.MICRO_SHAPES, R.MICRO_DIRECTIONS,
                                                             colours) if c != b]


def split_combinations(seed: int = 0) -> tuple[list, list]:
    """240 combinations: a seeded fifth held out of training (each attribute value still seen in training)."""
    combos = all_combinations()
    perm = torch.randperm(len(combos), generator=torch.Generator().manual_seed(seed)).tolist()
    held = [combos[i] for i in perm[: len(combos) // 5]]
    return [c for c in combos if c not in held], held


def render(colour: str, shape: str, direction: str, background: str, gen: torch.Generator) -> torch.Tensor:
    """One clip (F, 3, H, W) in [0, 1]: the shape's path is centred on the frame, give or take JITTER pixels.
    The shape's centre is a pixel corner, so a square is 2 RADIUS pixels across and the disc of the same width
    leaves out 5 pixels at each corner: it fills 80% of its bounding box, the square 100%."""
    dx, dy = R.MICRO_DIRECTIONS[direction]
    half = SPEED * (FRAMES - 1) / 2
    x0, y0 = (int(SIZE / 2 - d * half + torch.randint(-JITTER, JITTER + 1, (), generator=gen))
              for d in (dx, dy))
    centres = torch.arange(SIZE) + 0.5                                      # of the pixels
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
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


def to_vae(x: torch.Tensor) -> torch.Tensor:
    """Clips (B, F, 3, H, W) in [0, 1] -> the VAE's input (B, 3, F, H, W) in [-1, 1]."""
    return x.permute(0, 2, 1, 3, 4) * 2 - 1


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, C, F', H', W') -> clips (B, F, 3, H, W) in [0, 1]."""
    return ((vae.decode(z).sample.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def pixel_weights(x: torch.Tensor) -> torch.Tensor:
    """The VAE loss's weight of each pixel of clips (B, 3, F, H, W): 1, plus 9 on the shape (a tenth of the
    pixels: else the VAE first learns a good background alone), plus 20 on both sides of its outline (else
    corners come back rounded, and the judge reads squares as circles)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, 3, F, 4W)
    bg = border.flatten(2).median(-1).values.view(-1, 3, 1, 1, 1)
    shape = ((x - bg).norm(dim=1) > 0.3).float()                              # (B, F, H, W)
    outline = F.max_pool2d(shape, 3, 1, 1) + F.max_pool2d(-shape, 3, 1, 1)   # dilated minus eroded
    return (1 + 9 * shape + 20 * outline).unsqueeze(1)


def train_vae(train: list, steps: int, seed: int, log, lr: float = 2e-3, batch: int = 16):
    """The VAE on fresh clips of the training combinations, in [-1, 1] (inside the decoder's clamp). It
    learns from the posterior mean plus a little noise (full unit-variance samples stall it), with a small KL
    term and the weighted L1 + L2 loss of pixel_weights."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    test, captions = clips(train, 32, seed + 1)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:  # warm-up, then cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = to_vae(clips(train, batch, seed + 1000 + step)[0])
        post = vae.encode(x).latent_dist
        out = vae.decode(post.mean + 0.1 * post.std * torch.randn_like(post.mean)).sample
        loss = (pixel_weights(x) * ((out - x).abs() + (out - x) ** 2)).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            with torch.no_grad():
                rec = decode(vae, vae.encode(to_vae(test)).latent_dist.mean)
            judged = float(R.micro_adherence(rec, captions).mean())  # what the pixel judge still reads
            log(f"vae step {step + 1} ({time.time() - start:.0f} s): loss {loss.item():.4f}, "
                f"PSNR {psnr(rec, test):.1f} dB, judge on reconstructions {judged:.1%}")
    return vae.eval()


def word_tokenizer():
    """One token per word of the world's captions, except that "X background" is one token. Built in code,
    saved beside the model: <pad>=0, </s>=1, <unk>=2, then the vocabulary; a caption is 8 tokens and the end
    of the sequence: a | red | square | moving | left | on | a | blue background | </s>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "moving", "on", *R.MICRO_COLOURS, *R.MICRO_SHAPES, *R.MICRO_DIRECTIONS,
             *(f"{c} background" for c in R.MICRO_COLOURS)]
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # split at spaces, except a space before "background"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+(?!background\b)"), behavior="removed")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def text_encoder(seed: int):
    """The frozen caption encoder: UMT5's encoder, small and random (seeded), with the word-level tokenizer;
    the transformer learns to read its embeddings."""
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
            latents.append(vae.encode(to_vae(x)).latent_dist.mean)
        captions += caps
    return torch.cat(latents), captions


def train_transformer(latents, captions, tokenizer, encoder, steps: int, seed: int, log, lr: float = 1e-3):
    """Flow matching on the normalised latents: x_sigma = (1 - sigma) x_0 + sigma eps with sigma on the
    sampler's shifted grid distribution (uniform, then shift 3), the target the velocity eps - x_0; the
    caption is replaced by the empty prompt 10% of the time, so that classifier-free guidance has an
    unconditional model to contrast. The log shows how much the caption helps: the loss on a fixed batch at
    sigma 0.8 with its own captions, with another clip's, and with the shape word swapped (a model that
    ignores its caption, or the shape word, has them equal; the shape, a few pixels at the corners, is the
    last thing it learns)."""
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
    probe_x, probe_v = noised(probe, torch.full((128,), 0.8),
                              torch.randn(latents[probe].shape, generator=gen))
    other = {"square": "circle", "circle": "square"}
    swapped = embed(tokenizer, encoder,
                    [" ".join(other.get(w, w) for w in captions[i].split()) for i in probe])
    start, losses = time.time(), []
    for step in range(1, steps + 1):
        for group in opt.param_groups:                                         # warm-up, then cosine decay
            group["lr"] = lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(latents), (64,), generator=gen)
        cond = torch.where(torch.rand(64, generator=gen) < 0.1, len(unique), which[idx])
        u = torch.rand(64, generator=gen)
        sigma = 3 * u / (1 + 2 * u)                                  # the shift-3 grid's distribution
        x, target = noised(idx, sigma, torch.randn(latents[idx].shape, generator=gen))
        loss = ((model(x, fg.model_timesteps(sigma), table[cond], return_dict=False)[0] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 500 == 0 or step == steps:
            with torch.no_grad():
                t = fg.model_timesteps(torch.full((128,), 0.8))
                own, another, shape = (
                    ((model(probe_x, t, c, return_dict=False)[0] - probe_v) ** 2).mean().item()
                    for c in (table[which[probe]], table[which[probe.roll(1)]], swapped))
            recent = losses[-500:]
            log(f"transformer step {step} ({time.time() - start:.0f} s): "
                f"loss {sum(recent) / len(recent):.4f}; at sigma 0.8, own captions {own:.4f}, "
                f"another clip's {another:.4f}, shape swapped {shape:.4f}")
    return model.eval()


def judge_rates(videos: torch.Tensor, captions: list[str]) -> dict:
    """The share of clips (B, F, 3, H, W) that show each attribute their caption asks for, and all four."""
    judged = [R.judge_micro(v) for v in videos]
    asked = [R.parse_micro_caption(c) for c in captions]
    rates = {k: sum(j[k] == a[k] for j, a in zip(judged, asked)) / len(captions) for k in ATTRIBUTES}
    rates["all four"] = sum(all(j[k] == a[k] for k in a) for j, a in zip(judged, asked)) / len(captions)
    return rates


def check(path: Path, combos: list, n: int, seed: int, steps: int, guidance: float) -> dict:
    """Sample n clips of the given combinations with the model at path (the trainer's ODE sampler, its CFG)
    and judge each from its pixels: the share of clips showing each attribute, all four, and the sharpness."""
    m = fg.load_models(fg.Args(model="micro", model_path=str(path)))
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
    return {**judge_rates(videos, captions), "sharpness": float(R.micro_sharpness(videos).mean())}


def sample_check(path: Path, combos: list, n: int, seed: int, steps: int, guidance: float) -> dict:
    """check, and what it was asked, for check.json."""
    return {"clips": n, "seed": seed, "steps": steps, "guidance": guidance,
            **check(path, combos, n, seed, steps, guidance)}


def check_vae(path: Path, combos: list, n: int, seed: int) -> dict:
    """The VAE alone: n clips of the given combinations encoded (posterior mean) and decoded, their PSNR and
    what the judge reads on them."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(path / "vae").eval()
    x, captions = clips(combos, n, seed)
    with torch.no_grad():
        rec = decode(vae, vae.encode(to_vae(x)).latent_dist.mean)
    return {"clips": n, "seed": seed, "PSNR": psnr(rec, x), **judge_rates(rec, captions)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", default=str(HERE / "micro"), help="where the model goes (default: micro/)")
    parser.add_argument("--vae-steps", type=int, default=2000, help="the VAE's training steps")
    parser.add_argument("--transformer-steps", type=int, default=9000,
                        help="the transformer's training steps")
    parser.add_argument("--transformer-lr", type=float, default=1e-3)
    parser.add_argument("--clips", type=int, default=5000, help="training clips encoded for the transformer")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-only", action="store_true",
                        help="stage 1 only: train the VAE, save it in --out")
    parser.add_argument("--vae-from", help="skip stage 1: reuse the VAE of this model folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="only measure the model in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread per process: the fastest on small models, and runs stay comparable
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = split_combinations(args.seed)
    old = json.loads((out / "check.json").read_text()) if (out / "check.json").exists() else {}
    times = old.get("stage seconds", {})

    def log(msg):
        print(msg, flush=True)
        with open(out / "build.log", "a") as f:
            f.write(msg + "\n")

    if not args.check:
        if not args.vae_from:
            (out / "build.log").unlink(missing_ok=True)
        clock = time.time()
        if args.vae_from:
            from diffusers import AutoencoderKLWan

            vae = AutoencoderKLWan.from_pretrained(Path(args.vae_from) / "vae").eval()
        else:
            vae = train_vae(train, args.vae_steps, args.seed, log, args.vae_lr, args.vae_batch)
            times = {"vae": round(time.time() - clock)}
        if args.vae_only:
            vae.save_pretrained(out / "vae")
            (out / "check.json").write_text(json.dumps({"stage seconds": times}, indent=1) + "\n")
            return
        clock = time.time()
        latents, captions = encode_dataset(vae, train, args.clips, args.seed + 10**6)
        mean, std = latents.mean((0, 2, 3, 4)), latents.std((0, 2, 3, 4))   # per channel, as Wan's VAE config
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
        times["encoding"] = round(time.time() - clock)
        clock = time.time()
        tokenizer, encoder = text_encoder(args.seed)
        transformer = train_transformer(latents, captions, tokenizer, encoder, args.transformer_steps,
                                        args.seed, log, args.transformer_lr)
        times["transformer"] = round(time.time() - clock)
        vae.save_pretrained(out / "vae")
        transformer.save_pretrained(out / "transformer")
        encoder.save_pretrained(out / "text_encoder")
        tokenizer.save_pretrained(out / "tokenizer")
        (out / "train_prompts.txt").write_text("\n".join(R.micro_caption(*c) for c in train) + "\n")
        (out / "eval_prompts.txt").write_text("\n".join(R.micro_caption(*c) for c in held) + "\n")
    clock = time.time()
    if args.check:
        log("python build_micro.py --check")
    report = {name: sample_check(out, combos, 200, args.seed + 7, STEPS, GUIDANCE)
              for name, combos in (("held-out combinations", held), ("training combinations", train))}
    # the sample the test suite re-measures (smaller, so that the test is quick)
    report["test"] = sample_check(out, held, 48, args.seed + 8, STEPS, GUIDANCE)
    # how GUIDANCE was chosen, on the training combinations
    report["guidance sweep, training combinations"] = {
        str(g): sample_check(out, train, 200, args.seed + 7, STEPS, g) for g in (1.0, 1.5, 2.0, 3.0, 4.5)}
    # where the preset's Flash-GRPO run starts (micro/config.json: Wan2.1's CFG 4.5, few steps)
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    preset = config.get("args", {})
    if preset:
        report["held-out combinations, the preset's sampler"] = sample_check(
            out, held, 200, args.seed + 7, preset["num_steps"], preset["guidance_scale"])
    report["reconstructions"] = {name: check_vae(out, combos, 200, args.seed + 9)
                                 for name, combos in (("held-out", held), ("training", train))}
    times["check"] = round(time.time() - clock)
    sweep = report["guidance sweep, training combinations"]
    for name, r in [(k, r) for k, r in report.items() if "sharpness" in r] + [
            (f"training combinations, guidance {g}", r) for g, r in sweep.items()]:
        log(f"{name} ({r['clips']} clips, {r['steps']} steps, guidance {r['guidance']}): "
            + ", ".join(f"{k} {r[k]:.1%}" for k in RATES) + f", sharpness {r['sharpness']:.3f}")
    for name, r in report["reconstructions"].items():
        log(f"VAE reconstructions of {name} combinations ({r['clips']} clips): PSNR {r['PSNR']:.1f} dB, "
            + ", ".join(f"{k} {r[k]:.1%}" for k in RATES))
    log("stage seconds: " + ", ".join(f"{k} {v}" for k, v in times.items()))
    (out / "check.json").write_text(json.dumps({**report, "stage seconds": times}, indent=1) + "\n")


if __name__ == "__main__":
    main()
