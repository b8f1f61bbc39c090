"""Reward functions for Flash-GRPO: training-free rewards, learned rewards, a spec parser, a server.

Interface
---------
A *reward* is any callable ``reward_fn(videos, prompts) -> torch.Tensor`` where

* ``videos``  is a float tensor ``(B, F, C, H, W)`` with values in [0, 1], C = 3 (RGB);
* ``prompts`` is a list of B strings;
* the result is a float32 tensor of shape ``(B,)`` on ``videos.device``; higher is better.

The trainer only ever calls ``build_reward(spec, frame_aggregation)`` and then the
returned callable.  ``spec`` is one of

* a registry name:      ``"colorfulness"``  (see ``REWARDS``);
* a learned reward:     ``"hpsv3"``, ``"pickscore"``, ``"aesthetic"``, ``"clip"`` (see ``LEARNED``), with
  default weights from the Hugging Face cache, or ``"hpsv3@FOLDER"`` / ``"clip@HUB_ID"``;
* a weighted sum:       ``"temporal_consistency=1, colorfulness=0.5"`` (weight defaults to 1);
* a user function:      ``"path/to/file.py:function"`` or ``"package.module:function"``.
  It receives ``(videos, prompts)`` and must return ``(B,)`` itself (no frame aggregation).
  User functions may also appear as components of a weighted sum.

The training-free rewards need no weights and run on any device.  Each is registered as
either *per-frame* (returns ``(B, F)``, reduced to ``(B,)`` by ``aggregate_frames``) or
*per-video* (returns ``(B,)`` directly).  Every component's output is validated (shape
``(B,)``, finite); a bad output raises ``RewardError`` naming the offending reward, so
a broken reward fails loudly instead of silently poisoning the group advantages.

Reward server
-------------
A reward that needs its own GPU, environment or model can run in another process or on
another machine: ``python reward.py serve --reward SPEC [--reward-frames top:0.3]
[--host 127.0.0.1] [--port 8000]`` serves any spec over HTTP, JSON only (never pickle):

* ``GET /health`` -> ``{"ok": true, "reward": SPEC}``;
* ``POST /score`` ``{"prompts": [str, ...], "videos": [[frame, ...], ...]}``, frames base64
  PNG or JPEG (RGB, uint8), all videos of one F, H, W -> ``{"rewards": [float, ...]}``.
  Errors answer ``{"error": "one line"}``: 400 bad request (bad JSON, frames too large or too many,
  checked before decoding), 411/413 a missing or too large body, 422 the reward raised or returned
  something bad (NaN, inf, complex, a wrong shape), 500 anything else. Memory is bounded: two
  requests at a time are read and decoded, the others wait with their body unread.

``remote_reward(url)`` is the client, a reward like any other.  It sends uint8 frames (PNG
by default, lossless), so it scores exactly what a local reward scores on round(x*255)/255.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import http.server
import importlib
import importlib.util
import io
import json
import math
import os
import re
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

__all__ = [
    "REWARDS", "RewardError", "RewardInfo", "aggregate_frames", "build_reward",
    "jpeg_compressibility", "jpeg_incompressibility", "colorfulness", "sharpness",
    "temporal_consistency", "brightness", "exposure", "make_server", "remote_reward",
    "LEARNED", "ClipScore", "HPSv3", "load_clip_score", "load_hpsv3", "clip_pixels", "qwen2vl_pixels",
]


class RewardError(ValueError):
    """A reward returned something unusable (wrong type, wrong shape, NaN or inf)."""


# ----------------------------------------------------------------------------- helpers
def _luma(videos: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B; (B, F, 3, H, W) -> (B, F, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=videos.device, dtype=torch.float32)
    return torch.einsum("bfchw,c->bfhw", videos.float(), w)


# ----------------------------------------------------------------- per-frame rewards
def _uint8_frames(videos: torch.Tensor) -> np.ndarray:
    """(B, F, 3, H, W) in [0, 1] -> (B, F, H, W, 3) uint8 for PIL: round(x * 255), quantised on the device
    and copied to the CPU once (PIL only runs there)."""
    frames = (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.permute(0, 1, 3, 4, 2).cpu().numpy()


def _check_inputs(videos: torch.Tensor, prompts) -> None:
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be (B, F, 3, H, W), got {tuple(videos.shape)}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {videos.shape[0]} videos")


def _jpeg_size_kb(videos: torch.Tensor) -> torch.Tensor:
    frames = _uint8_frames(videos)
    sizes = np.empty(frames.shape[:2], dtype=np.float32)
    for b in range(frames.shape[0]):
        for f in range(frames.shape[1]):
            buf = io.BytesIO()
            Image.fromarray(frames[b, f]).save(buf, format="JPEG", quality=95)
            sizes[b, f] = buf.tell() / 1000.0  # kilobytes, as in DDPO
    return torch.from_numpy(sizes).to(videos.device)


def jpeg_compressibility(videos: torch.Tensor, prompts=None) -> torch.Tensor:
    """Minus the JPEG size (kB, PIL quality 95) of each frame; DDPO (Black et al. 2023).

    Rewards simple, smooth images with little high-frequency detail.  Returns (B, F).
    """
    return -_jpeg_size_kb(videos)


def jpeg_incompressibility(videos: torch.Tensor, prompts=None) -> torch.Tensor:
    """Plus the JPEG size (kB, quality 95) of each frame; DDPO's "incompressibility".

    Rewards detailed, textured images.  Returns (B, F).
    """
    return _jpeg_size_kb(videos)


def colorfulness(videos: torch.Tensor, prompts=None) -> torch.Tensor:
    """Hasler & Suesstrunk (2003) colourfulness of each frame, divided by 100.

    On 0-255 RGB: rg = R - G, yb = (R + G)/2 - B and
    M = sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2)
    (population statistics over the frame's pixels).  The paper's scale runs from 0
    (grey) to ~100+ ("extremely colourful"); dividing by 100 makes it O(1).  Returns (B, F).
    """
    x = videos.float() * 255.0
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    rg = (r - g).flatten(2)              # (B, F, H*W)
    yb = (0.5 * (r + g) - b).flatten(2)
    std = torch.sqrt(rg.var(-1, unbiased=False) + yb.var(-1, unbiased=False))
    mean = torch.sqrt(rg.mean(-1) ** 2 + yb.mean(-1) ** 2)
    return (std + 0.3 * mean) / 100.0


_LAPLACIAN = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]
SHARPNESS_SCALE = 100.0


def sharpness(videos: torch.Tensor, prompts=None) -> torch.Tensor:
    """Variance of the 3x3 Laplacian of the BT.601 luma ("variance of Laplacian",
    Pech-Pacheco et al. 2000, the usual blur detector).  Returns (B, F).

    Scale: luma in [0, 1], times SHARPNESS_SCALE = 100, i.e. the 0-255 value / 650.25.
    The common OpenCV blur threshold of 100 (0-255 units) becomes ~0.15; a flat image
    scores 0 and the worst case, a 1-pixel checkerboard, scores 16 * 100 = 1600.
    Only "valid" pixels are used (no padding) so image borders do not count as edges.
    """
    B, Fr, _, H, W = videos.shape
    y = _luma(videos).reshape(B * Fr, 1, H, W)
    k = torch.tensor(_LAPLACIAN, device=videos.device, dtype=torch.float32).view(1, 1, 3, 3)
    lap = F.conv2d(y, k).flatten(1)
    return (lap.var(-1, unbiased=False) * SHARPNESS_SCALE).view(B, Fr)


def brightness(videos: torch.Tensor, prompts=None) -> torch.Tensor:
    """Mean BT.601 luma of each frame, in [0, 1].  Returns (B, F)."""
    return _luma(videos).mean(dim=(-2, -1))


def exposure(videos: torch.Tensor, prompts=None) -> torch.Tensor:
    """1 - 2 |mean luma - 0.5| per frame: 1 at mid-grey, 0 for all-black or all-white.

    A crude well-exposedness score (cf. Mertens et al. 2007, who weight pixels by their
    distance to 0.5).  Returns (B, F).
    """
    return 1.0 - 2.0 * (brightness(videos) - 0.5).abs()


# ----------------------------------------------------------------- per-video rewards
def temporal_consistency(videos: torch.Tensor, prompts=None) -> torch.Tensor:
    """Minus the mean absolute difference between consecutive frames.  Returns (B,).

    0 for a static (or single-frame) video, -1 for frames alternating black/white.
    A cheap flicker penalty; on its own it is maximised by a frozen video, so it is meant
    to be combined with other rewards in a weighted sum.
    """
    x = videos.float()
    if x.shape[1] < 2:
        return torch.zeros(x.shape[0], device=x.device)
    return -(x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(-1)


# ------------------------------------------------------------------------ the micro world
# `--model micro` is pretrained on clips of one shape moving over a plain background, captioned by what they
# show: "a red square moving left on a blue background" (build_micro.py renders them). The rewards below judge
# a clip from its pixels alone, so RL on the micro model has rewards that mean something and can be checked.
MICRO_COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.25, 0.9),
                 "yellow": (0.9, 0.85, 0.15), "magenta": (0.85, 0.2, 0.85), "cyan": (0.15, 0.85, 0.85)}
MICRO_SHAPES = ("square", "circle")
MICRO_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down
MICRO_CAPTION = re.compile(r"a (\w+) (\w+) moving (\w+) on a (\w+) background")


def micro_caption(colour: str, shape: str, direction: str, background: str) -> str:
    return f"a {colour} {shape} moving {direction} on a {background} background"


def parse_micro_caption(prompt: str) -> dict | None:
    """The attributes a caption asks for, or None if it is not a micro-world caption."""
    m = MICRO_CAPTION.fullmatch(" ".join(prompt.split()))
    if not m or m[1] not in MICRO_COLOURS or m[2] not in MICRO_SHAPES or m[3] not in MICRO_DIRECTIONS \
            or m[4] not in MICRO_COLOURS:
        return None
    return dict(zip(("colour", "shape", "direction", "background"), m.groups()))


def judge_micro(video: torch.Tensor) -> dict:
    """What one clip (F, 3, H, W) in [0, 1] shows, judged from its pixels: the background is the nearest palette
    colour to the median of the frame borders; the shape is made of the pixels far from it: its colour (the
    nearest palette colour to their median), square or circle (how much of its bounding box it fills, in the
    middle frame: 1 for a square, pi/4 for a disc), and the direction its centroid moves, first to last frame."""
    x = video.float().cpu()
    palette = torch.tensor(list(MICRO_COLOURS.values()))                     # (6, 3)
    nearest = lambda rgb: list(MICRO_COLOURS)[int(((palette - rgb) ** 2).sum(1).argmin())]  # noqa: E731
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (F, 3, 4W)
    bg = border.permute(1, 0, 2).flatten(1).median(1).values                 # (3,)
    mask = ((x - bg.view(1, 3, 1, 1)) ** 2).sum(1).sqrt() > 0.3              # (F, H, W): the shape's pixels
    out = {"background": nearest(bg), "colour": None, "shape": None, "direction": None}
    if mask.sum() < 4:
        return out
    out["colour"] = nearest(x.permute(0, 2, 3, 1)[mask].median(0).values)
    middle = mask[len(mask) // 2]
    if middle.any():
        ys, xs = middle.nonzero(as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        out["shape"] = "square" if middle.sum() / box > 0.9 else "circle"
    if mask[0].any() and mask[-1].any():
        (y0, x0), (y1, x1) = (m.nonzero().float().mean(0) for m in (mask[0], mask[-1]))
        dx, dy = float(x1 - x0), float(y1 - y0)
        if max(abs(dx), abs(dy)) >= 1:
            out["direction"] = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    return out


def micro_adherence(videos: torch.Tensor, prompts) -> torch.Tensor:
    """The share of the caption's four attributes (colour, shape, direction, background) the clip shows, judged
    from its pixels: 0, 0.25, ..., 1. (B,). A prompt that is not a micro-world caption is a RewardError."""
    _check_inputs(videos, prompts)
    scores = []
    for video, prompt in zip(videos, prompts):
        asked = parse_micro_caption(prompt)
        if asked is None:
            raise RewardError(f"micro_adherence: {prompt!r} is not a micro-world caption "
                              f"('a COLOUR SHAPE moving DIRECTION on a COLOUR background')")
        shown = judge_micro(video)
        scores.append(sum(shown[k] == v for k, v in asked.items()) / 4)
    return torch.tensor(scores, device=videos.device)


def micro_sharpness(videos: torch.Tensor, prompts=None) -> torch.Tensor:
    """How cleanly each frame is two flat colours, the micro world's look: 1 minus the mean distance (RGB, in
    [0, 1] units) of each pixel to the nearer of the frame's background colour (the median of its borders) and
    its shape's colour (the mean of the pixels far from the background). Blur, smears and blotches lower it;
    a clean frame scores 1. (B, F): per frame."""
    x = videos.float()                                                           # (B, F, 3, H, W)
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, F, 3, 4W)
    bg = border.median(-1).values[..., None, None]                               # (B, F, 3, 1, 1)
    far = ((x - bg).norm(dim=2) > 0.3).unsqueeze(2)                              # (B, F, 1, H, W)
    fg = (x * far).sum((-1, -2), keepdim=True) / far.sum((-1, -2), keepdim=True).clamp_min(1)
    fg = torch.where(far.any(-1, keepdim=True).any(-2, keepdim=True), fg, bg)   # no shape: the background
    return 1 - torch.minimum((x - bg).norm(dim=2), (x - fg).norm(dim=2)).mean((-1, -2))


# ------------------------------------------------------------------------ learned rewards
# Frozen models from transformers, loaded once by `build_reward` from the Hugging Face cache (or the hub,
# where the network allows) or from a local folder: "hpsv3", "pickscore", "aesthetic", "clip", and
# "NAME@SOURCE" for another hub id or folder (README: where to get each).  All four score frames, so the
# trainer's --reward-frames reduces them to one score per video (release: mean of the top 30%).
# Images are prepared in torch on the videos' device, with the sizes and statistics of the processor
# classes; the tests compare the two.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, height, width) in [0, 1].  Antialiased bicubic is PIL's BICUBIC filter (a = -0.5);
    the clamp does what PIL's 8-bit images do to the filter's overshoot."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - x.new_tensor(mean).view(-1, 1, 1)) / x.new_tensor(std).view(-1, 1, 1)


def clip_pixels(frames: torch.Tensor, size: int = 224, crop: int = 224, mean=OPENAI_CLIP_MEAN,
                std=OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIPImageProcessor in torch: frames (N, 3, H, W) in [0, 1] -> (N, 3, crop, crop).
    Shortest edge to `size` (bicubic), centre crop, normalise."""
    h, w = frames.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = _resize(frames.float(), nh, nw)
    top, left = int((nh - crop) / 2), int((nw - crop) / 2)
    return _normalise(x[..., top:top + crop, left:left + crop], mean, std)


def qwen2vl_pixels(frames: torch.Tensor, min_pixels: int, max_pixels: int, patch: int = 14, merge: int = 2,
                   temporal: int = 2, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """Qwen2VLImageProcessor in torch: frames (N, 3, H, W) in [0, 1] -> pixel_values (N * gh * gw, 3 * temporal
    * patch^2) and image_grid_thw (N, 3).  Each image is one temporal patch (the frame repeated `temporal`
    times); patches are ordered so that each merge x merge square is contiguous, as the vision tower expects."""
    # Qwen2-VL's own size rule: multiples of 28, min_pixels <= h * w <= max_pixels, aspect kept
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    n = frames.shape[0]
    h, w = smart_resize(*frames.shape[-2:], factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    x = _normalise(_resize(frames.float(), h, w), mean, std)
    gh, gw = h // patch, w // patch
    x = rearrange(x, "n c (gh mh ph) (gw mw pw) -> n gh gw mh mw c ph pw", mh=merge, mw=merge, ph=patch, pw=patch)
    x = x.unsqueeze(-3).expand(*x.shape[:6], temporal, patch, patch)  # (..., c, t, ph, pw)
    grid = torch.tensor([[1, gh, gw]] * n, device=frames.device)
    return x.reshape(n * gh * gw, -1), grid


def _load(what: str, source: str, load: Callable, hint: str):
    """Call `load()`; a missing or broken download becomes one line that says what to fetch."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as e:
        if os.path.isdir(source):
            why = f"{type(e).__name__}: {_one_line(e)[:200].rstrip('.')}"
        elif source.count("/") == 1 and not os.path.isabs(source):
            why = "a hub id that is not in the local cache (and no network?)"
        else:
            why = "no such folder"
        raise ValueError(f"could not load {what} from {source!r}: {why}. {hint}") from None


class _FrameScorer(torch.nn.Module):
    """A frozen scoring model: (B, F, 3, H, W) in [0, 1] -> (B, F), `batch_frames` frames per forward pass,
    on the videos' device (moved there at the first call), in bf16 on GPUs."""
    batch_frames = 16

    def forward(self, videos: torch.Tensor, prompts) -> torch.Tensor:
        device = videos.device
        if next(self.parameters()).device != device:
            self.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            if self.head is not None:
                self.head.float()  # the small heads run in fp32, as they were trained
        B, Fr = videos.shape[:2]
        frames, texts = videos.flatten(0, 1), [p for p in prompts for _ in range(Fr)]
        scores = [self.score(frames[i:i + self.batch_frames], texts[i:i + self.batch_frames])
                  for i in range(0, B * Fr, self.batch_frames)]
        return torch.cat(scores).float().view(B, Fr)


class ClipScore(_FrameScorer):
    """One CLIP model, three rewards (per frame):

    * "pickscore": PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences;
      logit_scale.exp() * cos(text, image), about 17-24 for generated images;
    * "clip": text-image alignment, cos(text, image) of CLIP ViT-L/14, about 0.15-0.40;
    * "aesthetic": the LAION aesthetic predictor v2: a small MLP on the L2-normalised CLIP ViT-L/14 image
      embedding, trained on ratings of 1-10 (SAC, LAION-Logos, AVA); about 4-7. Ignores the prompt.
    """

    def __init__(self, model, tokenizer, kind: str, head: torch.nn.Module | None = None, size: int = 224,
                 crop: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.model, self.tokenizer, self.kind, self.head = model.eval().requires_grad_(False), tokenizer, kind, head
        self.size, self.crop, self.mean, self.std = size, crop, mean, std

    @torch.no_grad()
    def score(self, frames: torch.Tensor, texts: list[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = clip_pixels(frames, self.size, self.crop, self.mean, self.std).to(dtype)
        image = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        if self.kind == "aesthetic":
            return self.head(image).squeeze(-1)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(frames.device)
        text = F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)
        cos = (image * text).sum(-1)
        return cos * self.model.logit_scale.exp().float() if self.kind == "pickscore" else cos


def aesthetic_head(dim: int = 768) -> torch.nn.Sequential:
    """The LAION aesthetic predictor v2's MLP (keys layers.0 ... layers.7 of its .pth). Dropout is inert here."""
    L, D = torch.nn.Linear, torch.nn.Dropout
    return torch.nn.Sequential(L(dim, 1024), D(0.2), L(1024, 128), D(0.2), L(128, 64), D(0.1), L(64, 16), L(16, 1))


CLIP_SOURCES = {  # name: (CLIP model, tokenizer and preprocessor config)
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "clip": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "aesthetic": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
}
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
AESTHETIC_HEAD_FILES = ("aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth")


def load_clip_score(kind: str, source: str | None = None) -> ClipScore:
    """`kind` with the default weights, or with a folder holding a CLIP model and its tokenizer (for
    "aesthetic" also the head's .pth file)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model_src, tok_src = (source, source) if source else CLIP_SOURCES[kind]
    hint = (f"Download it where there is network (huggingface-cli download {CLIP_SOURCES[kind][0]} --local-dir DIR"
            + ("" if kind != "pickscore" else f"; and {CLIP_SOURCES[kind][1]}'s tokenizer and preprocessor files "
                                              f"into the same DIR") + f") and use --reward {kind}@DIR")
    model = _load(f"the CLIP model for {kind!r}", model_src,
                  lambda: CLIPModel.from_pretrained(model_src, dtype=torch.float32), hint)
    tokenizer = None if kind == "aesthetic" else _load(  # the aesthetic predictor ignores the prompt
        f"the CLIP tokenizer for {kind!r}", tok_src, lambda: AutoTokenizer.from_pretrained(tok_src), hint)
    try:  # the sizes and statistics the model was trained with; OpenAI's when there is no preprocessor file
        proc = CLIPImageProcessorPil.from_pretrained(tok_src)
        size, crop = proc.size["shortest_edge"], proc.crop_size["height"]
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, KeyError, TypeError):
        size = crop = model.config.vision_config.image_size
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    head = None
    if kind == "aesthetic":
        def head_state():
            if source:
                path = next((os.path.join(source, f) for f in AESTHETIC_HEAD_FILES
                             if os.path.isfile(os.path.join(source, f))), None)
                if path is None:
                    raise OSError(f"no {' or '.join(AESTHETIC_HEAD_FILES)} in the folder")
            else:
                from huggingface_hub import hf_hub_download
                path = hf_hub_download(*AESTHETIC_HEAD)
            return torch.load(path, map_location="cpu", weights_only=True)
        state = _load("the aesthetic head", source or AESTHETIC_HEAD[0], head_state,
                      f"Download {AESTHETIC_HEAD[1]} from the hub repo {AESTHETIC_HEAD[0]} into DIR, beside CLIP "
                      f"ViT-L/14 (huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR), and use "
                      f"--reward aesthetic@DIR")
        head = aesthetic_head(model.config.projection_dim)
        head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        head.eval().requires_grad_(False)
    return ClipScore(model, tokenizer, kind, head, size, crop, mean, std)


# HPSv3 (Ma et al. 2025): Qwen2-VL-7B-Instruct fine-tuned on HPDv3 preferences, plus an MLP head read at a
# special <|Reward|> token.  The head predicts a Gaussian (mu, sigma) of preference; the score is mu, unbounded
# (the paper's Wan2.1-1.3B frames score about 3-6).  The prompt below, trailing spaces included, is the one
# the model was trained with.
HPSV3_SOURCES = ("Qwen/Qwen2-VL-7B-Instruct", "MizzenAI/HPSv3", "HPSv3.safetensors")
HPSV3_PIXELS = 256 * 28 * 28  # each frame is resized to this many pixels (min = max), 256 visual tokens
HPSV3_PROMPT = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 
Textual prompt - {prompt}



Please provide the overall ratings of this image: <|Reward|>

END
"""


def hpsv3_head(hidden: int) -> torch.nn.Sequential:
    L, R = torch.nn.Linear, torch.nn.ReLU
    return torch.nn.Sequential(L(hidden, 1024), R(), torch.nn.Dropout(0.05), L(1024, 16), R(), L(16, 2))


class HPSv3(_FrameScorer):
    """HPSv3 per frame: the chat-formatted prompt with one image, the backbone's last hidden state at the
    <|Reward|> token, the head's mu."""
    batch_frames = 8

    def __init__(self, backbone, head, tokenizer, pixels: int = HPSV3_PIXELS):
        super().__init__()
        self.backbone, self.head = backbone.eval().requires_grad_(False), head.eval().requires_grad_(False)
        self.tokenizer, self.pixels = tokenizer, pixels
        tokenizer.padding_side = "right"
        self.reward_id = tokenizer.convert_tokens_to_ids("<|Reward|>")

    def text(self, prompt: str, image_tokens: int) -> str:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": HPSV3_PROMPT.format(prompt=prompt)}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens, 1)  # what Qwen2VLProcessor does

    @torch.no_grad()
    def score(self, frames: torch.Tensor, texts: list[str]) -> torch.Tensor:
        cfg = self.backbone.config.vision_config
        pixels, grid = qwen2vl_pixels(frames, self.pixels, self.pixels, cfg.patch_size, cfg.spatial_merge_size,
                                      cfg.temporal_patch_size)
        n_tokens = int(grid[0].prod()) // cfg.spatial_merge_size ** 2
        tokens = self.tokenizer([self.text(t, n_tokens) for t in texts], padding=True,
                                return_tensors="pt").to(frames.device)
        image = (tokens.input_ids == self.backbone.config.image_token_id).int()  # where M-RoPE's 2-D positions go
        hidden = self.backbone(**tokens, pixel_values=pixels.to(next(self.backbone.parameters()).dtype),
                               image_grid_thw=grid, mm_token_type_ids=image).last_hidden_state
        at = tokens.input_ids == self.reward_id
        if not (at.sum(1) == 1).all():
            raise RewardError("HPSv3: each prompt must hold exactly one <|Reward|> token (was it truncated?)")
        return self.head(hidden[at].float())[:, 0]  # mu


def _hpsv3_state(state: dict) -> tuple[dict, dict]:
    """The HPSv3 checkpoint's keys -> (Qwen2VLModel's, the head's).  The checkpoint was saved from a
    Qwen2VLForConditionalGeneration of transformers 4.4x: "model.*" is the language model, "visual.*"
    the vision tower; newer layouts nest both under "model."; the LM head is not needed."""
    backbone, head = {}, {}
    for k, v in state.items():
        if k.startswith("rm_head."):
            head[k.removeprefix("rm_head.")] = v
        elif k.startswith(("model.language_model.", "model.visual.")):
            backbone[k.removeprefix("model.")] = v
        elif k.startswith("model."):
            backbone["language_model." + k.removeprefix("model.")] = v
        elif k.startswith("visual."):
            backbone[k] = v
        elif not k.startswith("lm_head."):
            raise KeyError(f"unexpected key {k!r} in the HPSv3 checkpoint")
    return backbone, head


def load_hpsv3(source: str | None = None) -> HPSv3:
    """HPSv3 from the hub (Qwen2-VL-7B-Instruct's config and tokenizer, MizzenAI/HPSv3's HPSv3.safetensors),
    or a folder holding all of these."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLModel

    base = source or HPSV3_SOURCES[0]
    hint = (f"Download it where there is network: huggingface-cli download {HPSV3_SOURCES[0]} --local-dir DIR "
            f"--include '*.json' '*.txt'; huggingface-cli download {HPSV3_SOURCES[1]} {HPSV3_SOURCES[2]} --local-dir "
            f"DIR; then use --reward hpsv3@DIR")

    def checkpoint():
        if source:
            path = os.path.join(source, HPSV3_SOURCES[2])
            if not os.path.isfile(path):
                raise OSError(f"no {HPSV3_SOURCES[2]} in the folder")
        else:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(*HPSV3_SOURCES[1:])
        return _hpsv3_state(load_file(path))

    config = _load("the Qwen2-VL config for HPSv3", base, lambda: AutoConfig.from_pretrained(base), hint)
    tokenizer = _load("the Qwen2-VL tokenizer for HPSv3", base, lambda: AutoTokenizer.from_pretrained(base), hint)
    if not tokenizer.chat_template:  # some copies keep it only in the processor's chat_template.json
        from transformers.utils import cached_file
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(cached_file(base, "chat_template.json")) as f:
                tokenizer.chat_template = json.load(f)["chat_template"]
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer from {base!r} has no chat template (Qwen2-VL-Instruct's is needed). {hint}")
    tokenizer.add_tokens(["<|Reward|>"], special_tokens=True)
    state, head_state = _load("the HPSv3 weights", source or HPSV3_SOURCES[1], checkpoint, hint)
    config.text_config.vocab_size = state["language_model.embed_tokens.weight"].shape[0]
    dtype = state["language_model.embed_tokens.weight"].dtype  # as stored (bf16): no fp32 copy in host memory
    backbone, info = Qwen2VLModel.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                  output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ValueError(f"the HPSv3 weights do not fit Qwen2VLModel: missing {sorted(info['missing_keys'])[:3]}, "
                         f"unexpected {sorted(info['unexpected_keys'])[:3]}")
    head = hpsv3_head(config.text_config.hidden_size)
    head.load_state_dict(head_state)
    return HPSv3(backbone, head, tokenizer)


LEARNED: dict[str, Callable[[str | None], _FrameScorer]] = {
    "hpsv3": load_hpsv3,
    "pickscore": lambda source: load_clip_score("pickscore", source),
    "aesthetic": lambda source: load_clip_score("aesthetic", source),
    "clip": lambda source: load_clip_score("clip", source),
}


class RewardInfo(NamedTuple):
    fn: Callable[..., torch.Tensor]
    per_frame: bool  # True: fn returns (B, F) and is frame-aggregated; False: (B,)


REWARDS: dict[str, RewardInfo] = {
    "jpeg_compressibility": RewardInfo(jpeg_compressibility, True),
    "jpeg_incompressibility": RewardInfo(jpeg_incompressibility, True),
    "colorfulness": RewardInfo(colorfulness, True),
    "sharpness": RewardInfo(sharpness, True),
    "brightness": RewardInfo(brightness, True),
    "exposure": RewardInfo(exposure, True),
    "temporal_consistency": RewardInfo(temporal_consistency, False),
    "micro_adherence": RewardInfo(micro_adherence, False),
    "micro_sharpness": RewardInfo(micro_sharpness, True),
}


# ------------------------------------------------------------------ frame aggregation
def _parse_aggregation(how: str) -> float | None:
    """None for "mean", the fraction for "top:FRACTION"; ValueError otherwise."""
    how = how.strip()
    if how == "mean":
        return None
    if how.startswith("top:"):
        try:
            frac = float(how[4:])
        except ValueError:
            frac = float("nan")
        if 0.0 < frac <= 1.0:
            return frac
    raise ValueError(f"bad frame aggregation {how!r}: expected 'mean' or 'top:FRACTION' "
                     f"with 0 < FRACTION <= 1 (e.g. 'top:0.3')")


def aggregate_frames(scores: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Reduce per-frame scores (B, F) to per-video scores (B,).

    "mean" averages all frames; "top:FRACTION" averages the best ceil(FRACTION * F)
    frames (at least one).  Flash-GRPO uses "top:0.3": a video is judged by its best
    moments, so a few weak frames do not drown an otherwise good sample.
    """
    frac = _parse_aggregation(how)
    if scores.ndim != 2:
        raise ValueError(f"aggregate_frames expects scores of shape (B, F), got {tuple(scores.shape)}")
    if frac is None:
        return scores.mean(dim=1)
    # The 1e-9 guards against float noise: 0.07 * 100 = 7.000000000000001 must give 7.
    k = max(1, math.ceil(frac * scores.shape[1] - 1e-9))
    return scores.topk(k, dim=1).values.mean(dim=1)


# ---------------------------------------------------------------------- user rewards
def _load_user_function(spec: str) -> Callable:
    """Resolve "path/to/file.py:function" or "package.module:function"."""
    target, _, fn_name = spec.rpartition(":")  # rpartition: the path itself may hold ':'
    if not target or not fn_name:
        raise ValueError(f"bad reward spec {spec!r}: expected 'file.py:function' or 'module:function'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise ValueError(f"reward file not found: {target!r} (from spec {spec!r})")
        mod_name = f"_user_reward_{abs(hash(path)):x}"
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        # Register before executing, as a normal import would; dataclasses and pickling
        # look the module up in sys.modules while the file is being executed.
        sys.modules[mod_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise ValueError(f"could not load reward file {target!r}: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ValueError(f"could not import reward module {target!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"reward function {fn_name!r} not found in {target!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable (got {type(fn).__name__})")
    return fn


# -------------------------------------------------------------------------- building
def _check(name: str, out, batch: int, shape: tuple) -> torch.Tensor:
    """Validate one component's output; raise RewardError naming the component."""
    if not isinstance(out, torch.Tensor):
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, expected a torch.Tensor")
    if out.is_complex():  # .float() would keep the real part in silence
        raise RewardError(f"reward {name!r} returned complex values ({out.dtype}), expected real numbers")
    if tuple(out.shape) != shape:
        raise RewardError(f"reward {name!r} returned shape {tuple(out.shape)}, expected {shape}")
    bad = ~torch.isfinite(out.float())
    if bad.any():
        n_bad = int(bad.reshape(batch, -1).any(dim=1).sum())
        raise RewardError(f"reward {name!r} returned NaN or inf for {n_bad} of {batch} videos")
    return out


class _BuiltReward:
    """Weighted sum of named components; what ``build_reward`` returns."""

    def __init__(self, name: str, components: list, frame_aggregation: str):
        self.name = self.__name__ = name
        self.components = components  # [(name, weight, fn, per_frame)]
        self.frame_aggregation = frame_aggregation

    def __repr__(self) -> str:
        return f"<reward {self.name!r}, frames: {self.frame_aggregation}>"

    @torch.no_grad()  # rewards are black boxes to GRPO; no gradient ever flows through them
    def __call__(self, videos: torch.Tensor, prompts) -> torch.Tensor:
        _check_inputs(videos, prompts)
        B, Fr = videos.shape[:2]
        total = torch.zeros(B, dtype=torch.float32, device=videos.device)
        for name, weight, fn, per_frame in self.components:
            try:
                out = fn(videos, prompts)
            except RewardError:
                raise
            except Exception as e:  # a user function's bug: one line naming it, not a traceback mid-run
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {_one_line(e)}") from e
            if per_frame:  # check the frames first so a NaN is blamed before topk hides it
                out = aggregate_frames(_check(name, out, B, (B, Fr)).float(), self.frame_aggregation)
            out = _check(name, out, B, (B,))
            total += weight * out.to(device=videos.device, dtype=torch.float32)
        return _check(self.name, total, B, (B,))  # finite parts can sum to inf (a weight of 1e39)


def build_reward(spec: str, frame_aggregation: str = "mean", load: bool = True) -> Callable:
    """Turn a reward spec string into a validated ``reward_fn(videos, prompts) -> (B,)``.

    See the module docstring for the spec grammar.  All errors (unknown name, bad
    weight, missing file/module/function/weights, bad aggregation) are one-line ValueErrors,
    raised here at build time rather than in the middle of training.  ``load=False`` checks
    the spec without loading the learned rewards' models (the result cannot score).
    """
    _parse_aggregation(frame_aggregation)
    components = []
    for part in spec.split(","):
        part = part.strip()
        name, weight = part, 1.0
        if "=" in part:
            name, _, w = (s.strip() for s in part.rpartition("="))
            try:
                weight = float(w)
            except ValueError:
                weight = float("nan")
            if not math.isfinite(weight):
                raise ValueError(f"bad weight {w!r} for reward {name!r} in spec {spec!r}")
        if not name:
            raise ValueError(f"empty reward name in spec {spec!r}")
        learned, _, source = name.partition("@")
        if name in REWARDS:
            info = REWARDS[name]
            components.append((name, weight, info.fn, info.per_frame))
        elif learned in LEARNED:
            components.append((name, weight, LEARNED[learned](source or None) if load else None, True))
        elif ":" in name:
            components.append((name, weight, _load_user_function(name), False))
        else:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}, learned: "
                             f"{', '.join(LEARNED)} (optionally NAME@FOLDER or NAME@HUB_ID), or "
                             f"'file.py:function' / 'module:function'")
    return _BuiltReward(spec.strip(), components, frame_aggregation.strip())


# ---------------------------------------------------------------------- reward server
def _one_line(x) -> str:
    return " ".join(str(x).split())


class _BadRequest(Exception):
    """(status, message): the client's fault.  Not a ValueError: those, from the reward, are 422."""


MAX_FRAME_PIXELS = 4096 * 4096  # a larger frame is refused before it is decoded
MAX_FRAMES = 65536              # frames per request


def _decode_request(body: bytes, max_pixels: int) -> tuple[torch.Tensor, list[str]]:
    """The /score JSON body -> (videos (B, F, 3, H, W) float32 in [0, 1], prompts). Each frame's size is read
    from its header and checked before anything is decoded: a frame holds at most MAX_FRAME_PIXELS and the
    request at most max_pixels (16 bytes each once decoded: uint8, then float32)."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise _BadRequest(400, f"body is not valid JSON: {_one_line(e) or type(e).__name__}") from None
    prompts, videos = (req.get("prompts"), req.get("videos")) if isinstance(req, dict) else (None, None)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _BadRequest(400, 'expected a JSON object with "prompts": a list of strings')
    if not isinstance(videos, list) or not videos or not all(isinstance(v, list) and v for v in videos):
        raise _BadRequest(400, 'expected "videos": a non-empty list of non-empty lists of base64 frames')
    if len(prompts) != len(videos):
        raise _BadRequest(400, f"got {len(prompts)} prompts for {len(videos)} videos")
    if any(len(video) != len(videos[0]) for video in videos):
        raise _BadRequest(400, f"the videos have different frame counts ({sorted({len(v) for v in videos})})")
    if len(videos) * len(videos[0]) > MAX_FRAMES:
        raise _BadRequest(400, f"{len(videos)} x {len(videos[0])} frames, over the limit of {MAX_FRAMES}")
    out = None  # (B, F, H, W, 3) uint8, allocated once the first frame gives H and W
    for i, video in enumerate(videos):
        for j, b64 in enumerate(video):
            try:  # only the protocol's two formats, and only RGB: converting would hide a client bug
                if not isinstance(b64, str):
                    raise ValueError(f"expected a base64 string, got {type(b64).__name__}")
                data = io.BytesIO(base64.b64decode(b64, validate=True))
                with Image.open(data, formats=["PNG", "JPEG"]) as img:  # reads the header only
                    w, h = img.size
                    if img.mode != "RGB":
                        raise ValueError(f"image mode is {img.mode}, expected RGB")
                    if w * h > MAX_FRAME_PIXELS:
                        raise ValueError(f"{w}x{h} is over the limit of {MAX_FRAME_PIXELS:,} pixels a frame")
                    if out is None and len(videos) * len(video) * w * h > max_pixels:
                        raise ValueError(f"{len(videos)} x {len(video)} frames of {w}x{h} are over the limit of "
                                         f"{max_pixels:,} pixels a request (serve --max-pixels)")
                    if out is not None and (h, w) != out.shape[2:4]:
                        raise ValueError(f"{w}x{h}, but video 0 frame 0 is {out.shape[3]}x{out.shape[2]}")
                    frame = np.asarray(img)                                      # decoded here
            except Exception as e:  # bad base64, not an image, truncated, too large...
                error = _one_line(e) or type(e).__name__
                raise _BadRequest(400, f"video {i} frame {j}: cannot decode: {error}") from None
            if out is None:
                out = np.empty((len(videos), len(video), *frame.shape), dtype=np.uint8)
            out[i, j] = frame
    # contiguous: the layout of a locally built (B, F, 3, H, W) tensor, so that the reward's
    # reductions run in the same order and score exactly what a local call would.
    return torch.from_numpy(out).permute(0, 1, 4, 2, 3).contiguous().float() / 255.0, prompts


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 300  # seconds per socket read/write: a stalled client cannot hold a thread forever

    def _answer(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path != "/health":
            return self._answer(404, {"error": f"no such endpoint: GET {self.path}"})
        self._answer(200, {"ok": True, "reward": self.server.spec_name})

    def _read_body(self) -> bytes:
        try:
            n = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            raise _BadRequest(411, "missing or bad Content-Length") from None
        if n < 0:
            self.close_connection = True
            raise _BadRequest(400, f"Content-Length is {n}")
        if n > self.server.max_bytes:
            # Read the body away first, when it is not absurd: closing a socket that still holds unread data
            # sends a TCP reset, and the client would see "connection reset" instead of this answer.
            left = n if n <= 4 * self.server.max_bytes else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
                left -= len(chunk)
            self.close_connection = True
            raise _BadRequest(413, f"request body is {n / 1e6:.1f} MB, over the server's limit of "
                                   f"{self.server.max_bytes / 1e6:g} MB (serve --max-request-mb)")
        return self.rfile.read(n)

    def do_POST(self):
        if self.path != "/score":
            return self._answer(404, {"error": f"no such endpoint: POST {self.path}"})
        srv = self.server
        try:
            # Two requests at a time hold memory (one scored, one read and decoded); the others wait with
            # their body unread, so memory is bounded by two bodies and two decoded requests.
            with srv.slots:
                videos, prompts = _decode_request(self._read_body(), srv.max_pixels)
                with srv.lock, torch.no_grad():  # the reward may hold a model and state: one call at a time
                    out = srv.reward_fn(videos.to(srv.device), prompts)
            # Checked here as well: make_server takes any callable, and JSON has no NaN.
            B = len(prompts)
            status, answer = 200, {"rewards": _check(srv.spec_name, out, B, (B,)).cpu().tolist()}
        except _BadRequest as e:
            status, answer = e.args[0], {"error": e.args[1]}
        except ValueError as e:  # RewardError, or the reward rejecting its input
            status, answer = 422, {"error": _one_line(e)}
        except Exception as e:
            self.log_error("%s", traceback.format_exc())  # the whole story goes to the server's log
            status, answer = 500, {"error": f"{type(e).__name__}: {_one_line(e)}"}
        self._answer(status, answer)


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog: 50 clients connecting at once are queued, not reset
    daemon_threads = True


def make_server(reward_fn: Callable, spec_name: str, host: str = "127.0.0.1", port: int = 8000,
                max_request_mb: float = 512.0, device: str = "cpu",
                max_pixels: int = 2**27) -> http.server.ThreadingHTTPServer:
    """An HTTP server scoring with ``reward_fn`` on ``device``; call its ``serve_forever()``.  Port 0 picks a
    free port: the real one is ``server.server_address[1]``. Memory is bounded by two requests of at most
    ``max_request_mb`` of body and ``max_pixels`` decoded pixels (16 bytes each: 2 GiB at the default,
    4 videos of 81 frames at 480 x 832)."""
    if not (0 < max_request_mb < math.inf and max_pixels > 0):
        raise ValueError(f"need a positive max_request_mb and max_pixels, got {max_request_mb}, {max_pixels}")
    server = _Server((host, port), _Handler)
    server.reward_fn, server.spec_name, server.device = reward_fn, spec_name, torch.device(device)
    server.max_bytes, server.max_pixels = int(max_request_mb * 1e6), int(max_pixels)
    server.lock, server.slots = threading.Lock(), threading.BoundedSemaphore(2)
    return server


# ---------------------------------------------------------------------- reward client
# No proxies: a reward server is an internal service, and an http_proxy set for internet
# access would otherwise receive the requests and answer them with its own errors.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _RemoteReward:
    """What ``remote_reward`` returns; a class rather than a closure so that it pickles."""

    def __init__(self, url: str, timeout: float, retries: int, backoff: float, image_format: str):
        self.name = self.__name__ = url
        self.timeout, self.retries, self.backoff, self.image_format = timeout, retries, backoff, image_format

    def _encode(self, frame: np.ndarray) -> str:
        buf = io.BytesIO()
        # PNG level 1: ~15% larger than the default 6 and about twice as fast.  JPEG without
        # chroma subsampling: PIL's default 4:2:0 would blur exactly what colour rewards measure.
        options = {"quality": 95, "subsampling": 0} if self.image_format == "JPEG" else {"compress_level": 1}
        Image.fromarray(frame).save(buf, format=self.image_format, **options)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(self.name.rstrip("/") + "/score", data=body,
                                         headers={"Content-Type": "application/json"})
        for attempt in range(self.retries):
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:  # the server answered (a URLError too: caught first)
                try:
                    error = _one_line(json.loads(e.read())["error"])
                except Exception:  # not our server's JSON (a proxy, a 404 page)
                    error = _one_line(e.reason)
                if e.code < 500:  # the request is wrong: asking again gets the same answer
                    raise RewardError(f"reward server {self.name} rejected the request "
                                      f"(HTTP {e.code}): {error}") from None
                last = f"HTTP {e.code}: {error}"
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                last = (f"timed out after {self.timeout:g} s" if isinstance(reason, TimeoutError) else
                        getattr(reason, "strerror", None) or _one_line(reason) or type(reason).__name__)
            # After a timeout the server may still be busy with the last try; its lock queues the
            # retry behind it, so the growing wait also gives it time to finish.
            if attempt + 1 < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise RewardError(f"reward server {self.name} did not answer after {self.retries} tries: {last}")

    def __call__(self, videos: torch.Tensor, prompts) -> torch.Tensor:
        _check_inputs(videos, prompts)
        B = videos.shape[0]
        if not torch.isfinite(videos).all():  # a local reward would fail on these; so must we
            raise RewardError(f"videos for reward {self.name!r} contain NaN or inf")
        frames = _uint8_frames(videos)  # quantised explicitly: the server scores round(x * 255) / 255
        body = json.dumps({"prompts": [str(p) for p in prompts],
                           "videos": [[self._encode(frame) for frame in video] for video in frames]})
        data = self._post(body.encode())
        try:
            rewards = json.loads(data)["rewards"]
            assert isinstance(rewards, list) and all(type(r) in (int, float) for r in rewards)
        except Exception:
            data = _one_line(data[:80].decode(errors="replace"))
            raise RewardError(f"reward server {self.name} answered {data}, "
                              f'expected {{"rewards": [number, ...]}}') from None
        return _check(self.name, torch.tensor(rewards, dtype=torch.float32), B, (B,)).to(videos.device)


def remote_reward(url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                  image_format: str = "PNG") -> Callable:
    """A reward scored by ``python reward.py serve`` at ``url`` (e.g. "http://host:8000").

    ``timeout`` (s) applies to each socket operation.  ``retries`` is the number of tries in
    all, for connection errors, timeouts and 5xx answers, waiting ``backoff * 2**attempt`` s
    in between; 4xx answers are not retried.  Failures raise a one-line RewardError naming
    the server.  "JPEG" (quality 95) frames are smaller but lossy; PNG ones are exact.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"reward server URL must start with http:// or https://, got {url!r}")
    if image_format.upper() not in ("PNG", "JPEG") or retries < 1:
        raise ValueError(f"need image_format 'PNG' or 'JPEG' and retries >= 1, got {image_format!r}, {retries}")
    return _RemoteReward(url, timeout, retries, backoff, image_format.upper())


# ------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reward.py", description="Flash-GRPO rewards.")
    serve = parser.add_subparsers(dest="command", required=True).add_parser(
        "serve", help="serve a reward over HTTP (see the module docstring)")
    serve.add_argument("--reward", required=True, help="a reward spec, as for the trainer's --reward")
    # Default top:0.3 as in the trainer: switching it to --reward-url must not change the reward.
    serve.add_argument("--reward-frames", default="top:0.3", help="mean or top:FRACTION (default: top:0.3)")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (no authentication!)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--max-request-mb", type=float, default=512.0, help="larger request bodies get 413")
    serve.add_argument("--max-pixels", type=int, default=2**27,
                       help="decoded pixels a request may hold, videos x frames x height x width (default: 2^27, "
                            "4 videos of 81 frames at 480x832); larger requests get 400 before decoding")
    serve.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="where the videos are scored (default: the first GPU if there is one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        serve.error(f"argument --port: {args.port} is not in 0..65535")
    if not 0 < args.max_request_mb < math.inf:
        serve.error(f"argument --max-request-mb: must be a positive number, not {args.max_request_mb}")
    if args.max_pixels < 1:
        serve.error(f"argument --max-pixels: must be positive, not {args.max_pixels}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:  # a bad name, or CUDA asked of a build or machine without it
        serve.error(f"argument --device: {args.device!r}: {_one_line(e)}")
    try:
        reward_fn = build_reward(args.reward, args.reward_frames)
    except ValueError as e:
        print(f"reward.py serve: error: {e}", file=sys.stderr)
        return 2
    try:
        server = make_server(reward_fn, reward_fn.name, args.host, args.port, args.max_request_mb, args.device,
                             args.max_pixels)
    except OSError as e:
        print(f"reward.py serve: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"reward server listening on http://{host}:{port} (reward: {reward_fn.name}, "
          f"frames: {reward_fn.frame_aggregation}, device: {server.device})", flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a quiet exit
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
