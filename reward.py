"""Flash-GRPO's rewards: training-free and learned ones, the spec parser, a reward server and its client.

Interface
---------
A *reward* is any callable ``reward_fn(videos, prompts) -> torch.Tensor`` where

* ``videos``  is a float tensor ``(B, F, C, H, W)`` with values in [0, 1], C = 3 (RGB);
* ``prompts`` is a list of B strings;
* the result is a float32 tensor of shape ``(B,)`` on ``videos.device``; higher is better.

The trainer calls ``build_reward(spec, frame_aggregation, device=...)``, or ``remote_reward(url, ...)`` for a
reward server, once, and then the returned callable; ``reward_bytes(spec, url)`` gives its memory plan the
bytes the reward holds on each GPU.  ``spec`` is one of

* a registry name:      ``"colorfulness"``  (see ``REWARDS``);
* a learned reward:     ``"hpsv3"``, ``"pickscore"``, ``"aesthetic"``, ``"clip"`` (see ``LEARNED``), with
  default weights from the Hugging Face cache, or ``"hpsv3@FOLDER"`` / ``"clip@HUB_ID"``;
* a weighted sum:       ``"temporal_consistency=1, colorfulness=0.5"`` (weight defaults to 1);
* a user function:      ``"path/to/file.py:function"`` or ``"package.module:function"``. It receives
  ``(videos, prompts)`` and must return ``(B,)`` itself (no frame aggregation). User functions may also appear
  as components of a weighted sum.

The training-free rewards need no weights and run on any device.  Each is registered as either *per-frame*
(returns ``(B, F)``, reduced to ``(B,)`` by ``aggregate_frames``) or *per-video* (returns ``(B,)`` directly).
Every component's output is validated (shape ``(B,)``, finite); a bad output raises ``RewardError`` naming the
offending reward, so a broken reward fails loudly instead of silently poisoning the group advantages.

The learned rewards are loaded straight onto ``device`` (each tensor read from the checkpoint file to the
device, no copy of the checkpoint in host memory), in bf16 on GPUs and fp32 elsewhere; their small heads stay
in fp32.

Reward server
-------------
A reward that needs its own GPU, environment or model can run in another process or on another machine::

    python reward.py serve --reward SPEC [--reward-frames top:0.3] [--host 127.0.0.1] [--port 8000]
        [--device cuda] [--max-request-mb 512] [--max-pixels 134217728] [--read-timeout 60]

serves any spec over HTTP/1.0, one request per connection, JSON only (never pickle).  Frame aggregation is the
server's ``--reward-frames``; the client's side has none.  There is no authentication: keep the server on
127.0.0.1 (the default) or a private network.

* ``GET /health`` -> 200 ::

      {"ok": true, "reward": SPEC, "slots": 2, "busy": N, "waiting": W, "saturated": S}

  ``busy`` requests hold a slot (being read, decoded or scored), ``waiting`` ones wait for a slot, and
  ``saturated`` (busy == slots) says that a request sent now waits before it is even read.  A server that
  answers /health is alive; whether it is free to score is ``saturated``.
* ``POST /score`` with a ``Content-Length`` and the body ::

      {"prompts": [str, ...], "videos": [[frame, ...], ...]}

  B prompts and B videos, all of the same F frames of the same H x W; each frame base64 PNG or JPEG, RGB, 8
  bits -> 200 ``{"rewards": [float, ...]}``, B finite numbers in the order of the videos.
* Errors answer ``{"error": "one line"}``: 400 a bad request (not JSON, missing or mistyped fields, a frame
  that is not an RGB PNG or JPEG, differing frame counts or sizes, or over the limits below), 404 no such
  endpoint, 408 the request was not read within ``--read-timeout``, 411 no ``Content-Length``, 413 a body over
  ``--max-request-mb``, 422 the reward raised a ValueError or returned something bad (NaN, inf, complex, a
  wrong shape, not a tensor), 500 anything else (the traceback goes to the server's log).

Limits: the server's memory is bounded and it cannot be stalled by its clients.

* A body over ``--max-request-mb`` (512) gets 413, before it is read.
* Each frame's size is read from its PNG or JPEG header before anything is decoded: a frame over
  MAX_FRAME_PIXELS (4096 x 4096), more than MAX_FRAMES (65,536) frames, or more than ``--max-pixels`` decoded
  pixels in one request (2^27, 16 bytes each once decoded: 2 GiB, 4 videos of 81 frames at 480 x 832) get 400,
  as does absurdly deep JSON.
* Two *slots*: two requests at a time are read, decoded and scored (one scored, the next one read and decoded
  meanwhile); the others wait with their body unread.  Memory is two bodies and two decoded requests.  The
  reward itself scores one request at a time.
* The read deadline, ``--read-timeout`` (60 s): a request must be read whole, headers and body, within this
  many seconds of the connection, not counting the time it waits for a slot.  It bounds the whole read, not
  each socket call, so a client that stalls mid-body or sends a byte a second is cut off (408 once its headers
  are in, a closed connection before) and frees its slot.  At the default limits a request must arrive
  at 8.5 MB/s.
* The listen backlog (128) queues clients that connect at once instead of resetting them.

``remote_reward(url, timeout=120, retries=3, backoff=1, image_format="PNG", stop=None)`` is the client, a
reward like any other:

* It sends uint8 frames, PNG by default (lossless, so it scores exactly what a local reward scores on
  round(x * 255) / 255), or JPEG (quality 95, no chroma subsampling: smaller, lossy).  It never uses a proxy.
* Each try has a total deadline of ``timeout`` seconds: connecting, sending, the server's queue and scoring,
  and reading the answer, however slowly the bytes come.  A server shared by several ranks scores their
  requests one after the other: the deadline must cover that queue.
* Connection errors, deadlines and 5xx answers are retried, ``retries`` tries in all, ``backoff * 2**k`` s
  apart; 4xx answers are not (asking again gets the same answer).  After a deadline the server may still be
  scoring the last try; the retry queues behind it.  When all tries fail: a one-line ``RewardError`` naming
  the URL.
* An answer over MAX_ANSWER_BYTES + MAX_ANSWER_BYTES_PER_VIDEO * B bytes (1 MB + 100 bytes a video; B rewards
  take a few kB) is refused with a ``RewardError`` without being read, and not retried.
* ``stop``, a callable, is the run's stop request (SIGTERM, Ctrl-C): it is looked at before each try, every
  POLL_S (0.2) s while a try sends its body or waits for the answer, and during the backoff; once it returns
  True the call raises ``RewardStopped`` (a ``RewardError``) with one line.  Connecting (the TCP and TLS
  handshakes and the request's headers) is not interrupted but ends by the deadline: a stop request ends the
  call within one deadline at worst, within POLL_S when the server is up.
* A ``remote_reward`` without ``stop`` pickles (it is a class, not a closure).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
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
import urllib.parse
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

__all__ = [
    "REWARDS", "RewardError", "RewardStopped", "RewardInfo", "aggregate_frames", "build_reward",
    "reward_bytes",
    "jpeg_compressibility", "jpeg_incompressibility", "colorfulness", "sharpness",
    "temporal_consistency", "brightness", "exposure", "make_server", "remote_reward",
    "LEARNED", "ClipScore", "HPSv3", "load_clip_score", "load_hpsv3", "clip_pixels", "qwen2vl_pixels",
]


class RewardError(ValueError):
    """A reward returned something unusable (wrong type, wrong shape, NaN or inf), or could not be scored."""


class RewardStopped(RewardError):
    """The run was asked to stop (SIGTERM, Ctrl-C) while the reward server's answer was awaited."""


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
    """What one clip (F, 3, H, W) in [0, 1] shows, judged from its pixels: the background is the nearest
    palette colour to the median of the frame borders; the shape is made of the pixels far from it: its colour
    (the nearest palette colour to their median), square or circle (how much of its bounding box it fills, in
    the middle frame: 1 for a square, pi/4 for a disc), and the direction its centroid moves, first to last
    frame."""
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
            horizontal = abs(dx) > abs(dy)
            out["direction"] = ("right" if dx > 0 else "left") if horizontal else ("down" if dy > 0 else "up")
    return out


def micro_adherence(videos: torch.Tensor, prompts) -> torch.Tensor:
    """The share of the caption's four attributes (colour, shape, direction, background) the clip shows,
    judged from its pixels: 0, 0.25, ..., 1. (B,). A prompt that is not a micro-world caption is a
    RewardError."""
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
    """(N, 3, H, W) -> (N, 3, height, width) in [0, 1].  Antialiased bicubic is PIL's BICUBIC filter (a =
    -0.5); the clamp does what PIL's 8-bit images do to the filter's overshoot."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1)


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
    """Qwen2VLImageProcessor in torch: frames (N, 3, H, W) in [0, 1] -> pixel_values (N * gh * gw, 3 *
    temporal * patch^2) and image_grid_thw (N, 3).  Each image is one temporal patch (the frame repeated
    `temporal` times); patches are ordered so that each merge x merge square is contiguous, as the vision
    tower expects."""
    # Qwen2-VL's own size rule: multiples of 28, min_pixels <= h * w <= max_pixels, aspect kept
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    n = frames.shape[0]
    h, w = smart_resize(*frames.shape[-2:], factor=patch * merge, min_pixels=min_pixels,
                        max_pixels=max_pixels)
    x = _normalise(_resize(frames.float(), h, w), mean, std)
    gh, gw = h // patch, w // patch
    x = rearrange(x, "n c (gh mh ph) (gw mw pw) -> n gh gw mh mw c ph pw", mh=merge, mw=merge, ph=patch,
                  pw=patch)
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


def _dtype_on(device: torch.device) -> torch.dtype:
    """What the frozen models run in on `device`: bf16 on GPUs, fp32 elsewhere (slow and inexact in bf16)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class _FrameScorer(torch.nn.Module):
    """A frozen scoring model: (B, F, 3, H, W) in [0, 1] -> (B, F), `batch_frames` frames per forward pass, on
    the device it was loaded on (moved to the videos' device at the first call if that differs), in
    `_dtype_on(device)`; the small heads run in fp32, as they were trained."""
    batch_frames = 16

    def forward(self, videos: torch.Tensor, prompts) -> torch.Tensor:
        device = videos.device
        if next(self.parameters()).device != device:
            self.to(device=device, dtype=_dtype_on(device))
            if self.head is not None:
                self.head.float()
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
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.kind, self.head = kind, head
        self.size, self.crop, self.mean, self.std = size, crop, mean, std

    @torch.no_grad()
    def score(self, frames: torch.Tensor, texts: list[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = clip_pixels(frames, self.size, self.crop, self.mean, self.std).to(dtype)
        image = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        if self.kind == "aesthetic":
            return self.head(image).squeeze(-1)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = tokens.to(frames.device)
        text = F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)
        cos = (image * text).sum(-1)
        return cos * self.model.logit_scale.exp().float() if self.kind == "pickscore" else cos


def aesthetic_head(dim: int = 768) -> torch.nn.Sequential:
    """The LAION aesthetic predictor v2's MLP (keys layers.0 ... layers.7 of its .pth); dropout is inert."""
    L, D = torch.nn.Linear, torch.nn.Dropout
    return torch.nn.Sequential(L(dim, 1024), D(0.2), L(1024, 128), D(0.2), L(128, 64), D(0.1), L(64, 16),
                               L(16, 1))


CLIP_SOURCES = {  # name: (CLIP model, tokenizer and preprocessor config)
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "clip": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "aesthetic": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
}
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
AESTHETIC_HEAD_FILES = ("aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth")


def load_clip_score(kind: str, source: str | None = None, device: str | torch.device = "cpu") -> ClipScore:
    """`kind` with the default weights, or with a folder holding a CLIP model and its tokenizer (for
    "aesthetic" also the head's .pth file), on `device`: transformers builds the model on the meta device and
    reads each tensor of the checkpoint onto `device` in `_dtype_on(device)`."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    device = torch.device(device)
    model_src, tok_src = (source, source) if source else CLIP_SOURCES[kind]
    also = (f"; and {CLIP_SOURCES[kind][1]}'s tokenizer and preprocessor files into the same DIR"
            if kind == "pickscore" else "")
    hint = (f"Download it where there is network (huggingface-cli download {CLIP_SOURCES[kind][0]} "
            f"--local-dir DIR{also}) and use --reward {kind}@DIR")
    model = _load(f"the CLIP model for {kind!r}", model_src, lambda: CLIPModel.from_pretrained(
        model_src, dtype=_dtype_on(device), device_map=device), hint)
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
                      f"Download {AESTHETIC_HEAD[1]} from the hub repo {AESTHETIC_HEAD[0]} into DIR, beside "
                      f"CLIP ViT-L/14 (huggingface-cli download openai/clip-vit-large-patch14 --local-dir "
                      f"DIR), and use --reward aesthetic@DIR")
        head = aesthetic_head(model.config.projection_dim)
        head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        head.to(device).eval().requires_grad_(False)  # 0.9 M parameters: through the host is fine
    return ClipScore(model, tokenizer, kind, head, size, crop, mean, std)


# HPSv3 (Ma et al. 2025): Qwen2-VL-7B-Instruct fine-tuned on HPDv3 preferences, plus an MLP head read at a
# special <|Reward|> token.  The head predicts a Gaussian (mu, sigma) of preference; the score is mu,
# unbounded (the paper's Wan2.1-1.3B frames score about 3-6).  The prompt below, trailing spaces included, is
# the one the model was trained with.
HPSV3_SOURCES = ("Qwen/Qwen2-VL-7B-Instruct", "MizzenAI/HPSv3", "HPSv3.safetensors")
HPSV3_PIXELS = 256 * 28 * 28  # each frame is resized to this many pixels (min = max), 256 visual tokens
HPSV3_PROMPT = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and "
    "give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with "
    "0 being the worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be "
    "considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, "
    "such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and "
    "easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
    "visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color "
    "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene "
    "should convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score "
    "should be the lowest possible. \n"
    "Textual prompt - {prompt}\n"
    "\n"
    "\n"
    "\n"
    "Please provide the overall ratings of this image: <|Reward|>\n"
    "\n"
    "END\n"
)


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
        content = [{"type": "image"}, {"type": "text", "text": HPSV3_PROMPT.format(prompt=prompt)}]
        messages = [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens, 1)  # what Qwen2VLProcessor does

    @torch.no_grad()
    def score(self, frames: torch.Tensor, texts: list[str]) -> torch.Tensor:
        cfg = self.backbone.config.vision_config
        pixels, grid = qwen2vl_pixels(frames, self.pixels, self.pixels, cfg.patch_size,
                                      cfg.spatial_merge_size,
                                      cfg.temporal_patch_size)
        n_tokens = int(grid[0].prod()) // cfg.spatial_merge_size ** 2
        tokens = self.tokenizer([self.text(t, n_tokens) for t in texts], padding=True,
                                return_tensors="pt").to(frames.device)
        # where M-RoPE's 2-D positions go
        image = (tokens.input_ids == self.backbone.config.image_token_id).int()
        hidden = self.backbone(**tokens, pixel_values=pixels.to(next(self.backbone.parameters()).dtype),
                               image_grid_thw=grid, mm_token_type_ids=image).last_hidden_state
        at = tokens.input_ids == self.reward_id
        if not (at.sum(1) == 1).all():
            raise RewardError("HPSv3: each prompt must hold exactly one <|Reward|> token (was it truncated?)")
        return self.head(hidden[at].float())[:, 0]  # mu


def _hpsv3_key(key: str) -> tuple[str, str] | None:
    """An HPSv3 checkpoint key -> ("backbone", Qwen2VLModel's key) or ("head", the head's key); None for the
    LM head, which is not needed.  The checkpoint was saved from a Qwen2VLForConditionalGeneration of
    transformers 4.4x: "model.*" is the language model, "visual.*" the vision tower; newer layouts nest both
    under "model."."""
    if key.startswith("rm_head."):
        return "head", key.removeprefix("rm_head.")
    if key.startswith(("model.language_model.", "model.visual.")):
        return "backbone", key.removeprefix("model.")
    if key.startswith("model."):
        return "backbone", "language_model." + key.removeprefix("model.")
    if key.startswith("visual."):
        return "backbone", key
    if key.startswith("lm_head."):
        return None
    raise KeyError(f"unexpected key {key!r} in the HPSv3 checkpoint")


def _read_hpsv3(path: str, device: torch.device) -> tuple[dict, dict]:
    """HPSv3.safetensors -> (Qwen2VLModel's state dict, the head's), each tensor read straight onto `device`,
    one at a time, the backbone's cast to `_dtype_on(device)` there, the head's to fp32; the LM head is not
    read.  safetensors maps the file into memory, so the host never holds a copy of the checkpoint: on a GPU
    the bytes go from the page cache to the device; on a CPU the cast tensors are the model itself."""
    from safetensors import safe_open

    parts = {"backbone": {}, "head": {}}
    with safe_open(path, framework="pt", device=str(device)) as f:
        for key in f.keys():
            if (part := _hpsv3_key(key)) is not None:
                dtype = _dtype_on(device) if part[0] == "backbone" else torch.float32
                parts[part[0]][part[1]] = f.get_tensor(key).to(dtype)
    return parts["backbone"], parts["head"]


def load_hpsv3(source: str | None = None, device: str | torch.device = "cpu") -> HPSv3:
    """HPSv3 from the hub (Qwen2-VL-7B-Instruct's config and tokenizer, MizzenAI/HPSv3's HPSv3.safetensors),
    or a folder holding all of these, on `device`: the checkpoint is read tensor by tensor onto `device` in
    `_dtype_on(device)`, and Qwen2VLModel, built on the meta device, takes those tensors as its parameters."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLModel

    device, base = torch.device(device), source or HPSV3_SOURCES[0]
    hint = (f"Download it where there is network: huggingface-cli download {HPSV3_SOURCES[0]} --local-dir "
            f"DIR --include '*.json' '*.txt'; huggingface-cli download {HPSV3_SOURCES[1]} {HPSV3_SOURCES[2]} "
            f"--local-dir DIR; then use --reward hpsv3@DIR")

    def checkpoint():
        if source:
            path = os.path.join(source, HPSV3_SOURCES[2])
            if not os.path.isfile(path):
                raise OSError(f"no {HPSV3_SOURCES[2]} in the folder")
        else:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(*HPSV3_SOURCES[1:])
        return _read_hpsv3(path, device)

    config = _load("the Qwen2-VL config for HPSv3", base, lambda: AutoConfig.from_pretrained(base), hint)
    tokenizer = _load("the Qwen2-VL tokenizer for HPSv3", base, lambda: AutoTokenizer.from_pretrained(base),
                      hint)
    if not tokenizer.chat_template:  # some copies keep it only in the processor's chat_template.json
        from transformers.utils import cached_file
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(cached_file(base, "chat_template.json")) as f:
                tokenizer.chat_template = json.load(f)["chat_template"]
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer from {base!r} has no chat template (Qwen2-VL-Instruct's is needed). "
                         f"{hint}")
    tokenizer.add_tokens(["<|Reward|>"], special_tokens=True)
    state, head_state = _load("the HPSv3 weights", source or HPSV3_SOURCES[1], checkpoint, hint)
    config.text_config.vocab_size = state["language_model.embed_tokens.weight"].shape[0]
    # The tensors are already on the device in the right dtype: from_pretrained builds the model on the meta
    # device, makes them its parameters (no copy) and computes the buffers checkpoints do not hold (rotary
    # frequencies).
    backbone, info = Qwen2VLModel.from_pretrained(None, config=config, state_dict=state,
                                                  dtype=_dtype_on(device), device_map=device,
                                                  output_loading_info=True)
    missing, unexpected = sorted(info["missing_keys"])[:3], sorted(info["unexpected_keys"])[:3]
    if missing or unexpected:
        raise ValueError(f"the HPSv3 weights do not fit Qwen2VLModel: missing {missing}, "
                         f"unexpected {unexpected}")
    head = hpsv3_head(config.text_config.hidden_size).to(device)  # fp32
    head.load_state_dict(head_state)
    return HPSv3(backbone, head, tokenizer)


# name -> loader(source: str | None, device="cpu")
LEARNED: dict[str, Callable[..., _FrameScorer]] = {
    "hpsv3": load_hpsv3,
    "pickscore": functools.partial(load_clip_score, "pickscore"),
    "aesthetic": functools.partial(load_clip_score, "aesthetic"),
    "clip": functools.partial(load_clip_score, "clip"),
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


def _parse_spec(spec: str) -> list[tuple[str, str, float]]:
    """A spec -> its components (kind, name, weight), kind "builtin", "learned" or "user"; ValueError if
    bad."""
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
        if name in REWARDS:
            components.append(("builtin", name, weight))
        elif name.partition("@")[0] in LEARNED:
            components.append(("learned", name, weight))
        elif ":" in name:
            components.append(("user", name, weight))
        else:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}, "
                             f"learned: {', '.join(LEARNED)} (optionally NAME@FOLDER or NAME@HUB_ID), or "
                             f"'file.py:function' / 'module:function'")
    return components


def build_reward(spec: str, frame_aggregation: str = "mean", load: bool = True,
                 device: str | torch.device = "cpu") -> Callable:
    """Turn a reward spec string into a validated ``reward_fn(videos, prompts) -> (B,)``.

    See the module docstring for the spec grammar.  All errors (unknown name, bad
    weight, missing file/module/function/weights, bad aggregation) are one-line ValueErrors,
    raised here at build time rather than in the middle of training.  ``load=False`` checks
    the spec without loading the learned rewards' models (the result cannot score).  The learned
    rewards' models are loaded straight onto ``device``, the one the videos will be on (e.g. the rank's GPU).
    """
    _parse_aggregation(frame_aggregation)
    components = []
    for kind, name, weight in _parse_spec(spec):
        if kind == "builtin":
            info = REWARDS[name]
            components.append((name, weight, info.fn, info.per_frame))
        elif kind == "learned":
            learned, _, source = name.partition("@")
            scorer = LEARNED[learned](source or None, device) if load else None
            components.append((name, weight, scorer, True))
        else:
            components.append((name, weight, _load_user_function(name), False))
    return _BuiltReward(spec.strip(), components, frame_aggregation.strip())


# --------------------------------------------------------------------------- memory plan
# Parameters of the default learned rewards' models, counted on Qwen2VLModel (Qwen2-VL-7B without its LM head)
# and CLIPModel built on the meta device with the values of the config.json of Qwen/Qwen2-VL-7B-Instruct,
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore_v1 is that CLIP fine-tuned: the same shapes) and
# openai/clip-vit-large-patch14; a test builds them again.  HPSv3's checkpoint may have resized Qwen2-VL's
# 152,064-row embedding to its tokenizer (151,658 tokens with <|Reward|>): a few hundred rows, 0.02% at most.
DEFAULT_PARAMETERS = {"hpsv3": 7_746_378_240, "pickscore": 986_109_441, "clip": 427_616_513,
                      "aesthetic": 427_616_513}
# What the heads read: Qwen2-VL-7B's hidden size, CLIP ViT-L/14's image embedding
HEAD_WIDTHS = {"hpsv3": 3584, "aesthetic": 768}


def _head_parameters(kind: str, width: int) -> int:
    make = {"hpsv3": hpsv3_head, "aesthetic": aesthetic_head}.get(kind)
    if make is None:  # clip and pickscore have no head
        return 0
    with torch.device("meta"):
        return sum(p.numel() for p in make(width).parameters())


def _learned_parameters(kind: str, source: str | None) -> tuple[int, int]:
    """(backbone, head) parameter counts of the model `LEARNED[kind](source)` loads, from local files only."""
    if source is None:
        return DEFAULT_PARAMETERS[kind], _head_parameters(kind, HEAD_WIDTHS.get(kind, 0))
    try:
        if kind == "hpsv3":  # the checkpoint's header: the shapes of the tensors the loader keeps; no data
            from safetensors import safe_open

            counts = {"backbone": 0, "head": 0}
            with safe_open(os.path.join(source, HPSV3_SOURCES[2]), framework="pt") as f:
                for key in f.keys():
                    if (part := _hpsv3_key(key)) is not None:
                        counts[part[0]] += math.prod(f.get_slice(key).get_shape())
            return counts["backbone"], counts["head"]
        from transformers import CLIPConfig, CLIPModel

        config = CLIPConfig.from_pretrained(source, local_files_only=True)  # the folder's or the cache's
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = CLIPModel(config)
        return sum(p.numel() for p in model.parameters()), _head_parameters(kind, config.projection_dim)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot count the parameters of reward {kind}@{source} from local files: "
                         f"{type(e).__name__}: {_one_line(e)[:200]}") from None


def reward_bytes(spec: str, url: str | None = None) -> int:
    """The bytes a reward's weights hold on each training GPU, for the trainer's memory plan.

    0 for a reward served by ``url`` (--reward-url: the server holds it) and for the training-free rewards.
    A learned reward counts its model's parameters in the dtypes it runs in on a GPU: the backbone in bf16,
    the head in fp32; a weighted sum adds its parts (each part loads its own model).  A user function counts
    0: what it holds is not known without running it.  The transient memory of scoring (activations, the
    decoded frames) is not counted.  Nothing is loaded or downloaded: the default weights count
    DEFAULT_PARAMETERS, ``hpsv3@FOLDER`` the shapes in its checkpoint's header, a CLIP reward with a source
    its config (the folder's or the Hugging Face cache's) built on the meta device.  ValueError (one line) if
    those files are missing.
    """
    if url:
        return 0
    total = 0
    for kind, name, _ in _parse_spec(spec):
        if kind == "learned":
            learned, _, source = name.partition("@")
            backbone, head = _learned_parameters(learned, source or None)
            total += backbone * torch.bfloat16.itemsize + head * torch.float32.itemsize
    return total


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
                        raise ValueError(f"{len(videos)} x {len(video)} frames of {w}x{h} are over the limit "
                                         f"of {max_pixels:,} pixels a request (serve --max-pixels)")
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


# ------------------------------------------------------------------------ deadlines
READ_TIMEOUT_S = 60.0   # serve --read-timeout: a request is read whole, headers and body, within this
POLL_S = 0.2            # a client waiting for the server looks at its stop request this often


class _Stop(Exception):
    """The caller's stop request, seen while waiting (the client turns it into a RewardStopped)."""


class _Deadline:
    """The moment by which a socket exchange must be over, and, for the client, the run's stop request.

    Every blocking socket call gets as its timeout what is *left* until the deadline (`wait()`), so the
    deadline bounds the whole exchange: with a timeout per call instead, a peer that sends a byte a second
    would keep it alive forever.  Where there is a stop request to watch, a call waits at most POLL_S at a
    time."""

    def __init__(self, seconds: float, stop: Callable[[], bool] | None = None):
        self.at, self.stop = time.monotonic() + seconds, stop

    def left(self) -> float:
        """Seconds left; TimeoutError once the deadline has passed, _Stop once a stop was requested."""
        if self.stop is not None and self.stop():
            raise _Stop
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline has passed")
        return left

    def wait(self) -> float:
        """The timeout of the next blocking socket call."""
        return self.left() if self.stop is None else min(self.left(), POLL_S)


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, bounded by a _Deadline; wrap it in an io.BufferedReader to read lines."""

    def __init__(self, sock, deadline: _Deadline):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            self.sock.settimeout(self.deadline.wait())
            try:
                return self.sock.recv_into(buffer)
            except TimeoutError:  # one wait ended: look at the deadline and the stop request again
                pass


class _Slots:
    """At most `capacity` requests at a time are read, decoded and scored; the others wait here, counted."""

    def __init__(self, capacity: int):
        self.capacity, self.busy, self.waiting = capacity, 0, 0
        self.changed = threading.Condition()

    def __enter__(self):
        with self.changed:
            self.waiting += 1
            self.changed.wait_for(lambda: self.busy < self.capacity)
            self.waiting, self.busy = self.waiting - 1, self.busy + 1

    def __exit__(self, *exc):
        with self.changed:
            self.busy -= 1
            self.changed.notify()

    def state(self) -> dict:
        with self.changed:
            return {"slots": self.capacity, "busy": self.busy, "waiting": self.waiting,
                    "saturated": self.busy >= self.capacity}


# ---------------------------------------------------------------------------- server
class _Handler(http.server.BaseHTTPRequestHandler):
    def setup(self):
        super().setup()
        # Reading the request, its headers (http.server's readline) and its body (ours), is bounded by one
        # deadline. A timeout while reading the headers ends the connection without an answer (http.server).
        self.rfile.close()
        self.deadline = _Deadline(self.server.read_timeout)
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.deadline))

    def end_headers(self):  # every answer, ours and http.server's, is written with a timeout of its own
        self.connection.settimeout(self.server.read_timeout)
        super().end_headers()

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
        self._answer(200, {"ok": True, "reward": self.server.spec_name, **self.server.slots.state()})

    def _read_body(self) -> bytes:
        try:
            n = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            raise _BadRequest(411, "missing or bad Content-Length") from None
        if n < 0:
            self.close_connection = True
            raise _BadRequest(400, f"Content-Length is {n}")
        try:
            if n <= self.server.max_bytes:
                return self.rfile.read(n)
            # Read the body away first, when it is not absurd: closing a socket that still holds unread data
            # sends a TCP reset, and the client would see "connection reset" instead of this answer.
            left = n if n <= 4 * self.server.max_bytes else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
                left -= len(chunk)
        except TimeoutError:  # the read deadline has passed: drop the request, free its slot
            self.close_connection = True
            raise _BadRequest(408, f"the request was not received within {self.server.read_timeout:g} s "
                                   f"(serve --read-timeout)") from None
        self.close_connection = True
        raise _BadRequest(413, f"request body is {n / 1e6:.1f} MB, over the server's limit of "
                               f"{self.server.max_bytes / 1e6:g} MB (serve --max-request-mb)")

    def do_POST(self):
        if self.path != "/score":
            return self._answer(404, {"error": f"no such endpoint: POST {self.path}"})
        srv = self.server
        try:
            # Two requests at a time hold memory (one scored, one read and decoded); the others wait with
            # their body unread, so memory is bounded by two bodies and two decoded requests.
            waiting = time.monotonic()
            with srv.slots:
                self.deadline.at += time.monotonic() - waiting  # waiting for a slot is not reading
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
                max_request_mb: float = 512.0, device: str = "cpu", max_pixels: int = 2**27,
                read_timeout: float = READ_TIMEOUT_S) -> http.server.ThreadingHTTPServer:
    """An HTTP server scoring with ``reward_fn`` on ``device``; call its ``serve_forever()``.  Port 0 picks a
    free port: the real one is ``server.server_address[1]``. Memory is bounded by two requests of at most
    ``max_request_mb`` of body and ``max_pixels`` decoded pixels (16 bytes each: 2 GiB at the default,
    4 videos of 81 frames at 480 x 832); each request must be read within ``read_timeout`` seconds."""
    if not (0 < max_request_mb < math.inf and max_pixels > 0 and 0 < read_timeout < math.inf):
        raise ValueError(f"need a positive max_request_mb, max_pixels and read_timeout, got "
                         f"{max_request_mb}, {max_pixels}, {read_timeout}")
    server = _Server((host, port), _Handler)
    server.reward_fn, server.spec_name, server.device = reward_fn, spec_name, torch.device(device)
    server.max_bytes, server.max_pixels = int(max_request_mb * 1e6), int(max_pixels)
    server.read_timeout = float(read_timeout)
    server.lock, server.slots = threading.Lock(), _Slots(2)
    return server


# ---------------------------------------------------------------------------- client
MAX_ANSWER_BYTES = 1_000_000      # the client refuses an answer of B rewards over this
MAX_ANSWER_BYTES_PER_VIDEO = 100  # plus this per video (a float in JSON takes at most 25 characters)


class _ReadsFrom:
    """What http.client.HTTPResponse needs of a socket: makefile() giving the stream it reads."""

    def __init__(self, stream):
        self.stream = stream

    def makefile(self, mode):
        return self.stream


def _send(sock, data: bytes, deadline: _Deadline) -> None:
    """sock.sendall(data), bounded by the deadline and watching the stop request."""
    view = memoryview(data)
    while view:
        sock.settimeout(deadline.wait())
        try:
            view = view[sock.send(view[:1 << 20]):]
        except TimeoutError:  # the server took nothing during this wait: look at the deadline and stop again
            pass


class _RemoteReward:
    """What ``remote_reward`` returns; a class rather than a closure so that it pickles (without a `stop`)."""

    def __init__(self, url: str, timeout: float, retries: int, backoff: float, image_format: str,
                 stop: Callable[[], bool] | None):
        self.name = self.__name__ = url
        self.timeout, self.retries, self.backoff, self.image_format = timeout, retries, backoff, image_format
        self.stop = stop

    def _encode(self, frame: np.ndarray) -> str:
        buf = io.BytesIO()
        # PNG level 1: ~15% larger than the default 6 and about twice as fast.  JPEG without
        # chroma subsampling: PIL's default 4:2:0 would blur exactly what colour rewards measure.
        options = {"quality": 95, "subsampling": 0} if self.image_format == "JPEG" else {"compress_level": 1}
        Image.fromarray(frame).save(buf, format=self.image_format, **options)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def _exchange(self, body: bytes, max_answer: int, deadline: _Deadline) -> tuple[int, bytes]:
        """One try, by the deadline: connect, send the request, read the answer -> (status, answer's body)."""
        url = urllib.parse.urlsplit(self.name)
        https = url.scheme == "https"
        # Connecting waits for the deadline, not for the stop request: a stop ends the call within a deadline.
        connection = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
            url.hostname, url.port or (443 if https else 80), timeout=deadline.left())
        try:
            connection.connect()
            connection.putrequest("POST", url.path.rstrip("/") + "/score", skip_accept_encoding=True)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            _send(connection.sock, body, deadline)
            stream = io.BufferedReader(_DeadlineReader(connection.sock, deadline))
            response = http.client.HTTPResponse(_ReadsFrom(stream))
            response.begin()  # the status line and the headers
            length = response.getheader("Content-Length", "")
            if length.isdigit() and int(length) > max_answer:
                raise self._too_large(response.status, f"{int(length):,} bytes", max_answer)
            data = response.read(max_answer + 1)
            if len(data) > max_answer:
                raise self._too_large(response.status, "no Content-Length, longer than that", max_answer)
            if response.length:  # the server closed the connection before the end of its Content-Length
                raise http.client.IncompleteRead(data, response.length)
            return response.status, data
        finally:
            connection.close()

    def _too_large(self, status: int, size: str, max_answer: int) -> RewardError:
        return RewardError(f"reward server {self.name}: its answer (HTTP {status}, {size}) is over the "
                           f"client's limit of {max_answer:,} bytes; not read")

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.stop is not None and self.stop():
                raise _Stop
            time.sleep(min(left, POLL_S))

    def _post(self, body: bytes, max_answer: int) -> bytes:
        try:
            for attempt in range(self.retries):
                try:
                    status, data = self._exchange(body, max_answer, _Deadline(self.timeout, self.stop))
                    if status < 300:
                        return data
                    try:
                        error = _one_line(json.loads(data)["error"])
                    except Exception:  # not our server's JSON (a 404 page of another server)
                        error = (_one_line(data[:80].decode(errors="replace"))
                                 or http.client.responses.get(status, "no message"))
                    if status < 500:  # the request is wrong: asking again gets the same answer
                        raise RewardError(f"reward server {self.name} rejected the request (HTTP {status}): "
                                          f"{error}")
                    last = f"HTTP {status}: {error}"
                except TimeoutError:
                    last = f"timed out after {self.timeout:g} s"
                except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short
                    last = getattr(e, "strerror", None) or _one_line(e) or type(e).__name__
                # After a timeout the server may still be busy with the last try; its lock queues the
                # retry behind it, so the growing wait also gives it time to finish.
                if attempt + 1 < self.retries:
                    self._sleep(self.backoff * 2 ** attempt)
        except _Stop:
            message = f"stopped waiting for reward server {self.name}: the run was asked to stop"
            raise RewardStopped(message) from None
        raise RewardError(f"reward server {self.name} did not answer after {self.retries} tries: {last}")

    def __call__(self, videos: torch.Tensor, prompts) -> torch.Tensor:
        _check_inputs(videos, prompts)
        B = videos.shape[0]
        if not torch.isfinite(videos).all():  # a local reward would fail on these; so must we
            raise RewardError(f"videos for reward {self.name!r} contain NaN or inf")
        frames = _uint8_frames(videos)  # quantised explicitly: the server scores round(x * 255) / 255
        body = json.dumps({"prompts": [str(p) for p in prompts],
                           "videos": [[self._encode(frame) for frame in video] for video in frames]})
        data = self._post(body.encode(), MAX_ANSWER_BYTES + MAX_ANSWER_BYTES_PER_VIDEO * B)
        try:
            rewards = json.loads(data)["rewards"]
            assert isinstance(rewards, list) and all(type(r) in (int, float) for r in rewards)
        except Exception:
            data = _one_line(data[:80].decode(errors="replace"))
            raise RewardError(f"reward server {self.name} answered {data}, "
                              f'expected {{"rewards": [number, ...]}}') from None
        return _check(self.name, torch.tensor(rewards, dtype=torch.float32), B, (B,)).to(videos.device)


def remote_reward(url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                  image_format: str = "PNG", stop: Callable[[], bool] | None = None) -> Callable:
    """A reward scored by ``python reward.py serve`` at ``url`` (e.g. "http://host:8000").

    ``timeout`` (s) is the total deadline of each try: connecting, sending, the server's queue and scoring,
    reading the answer.  ``retries`` is the number of tries in all, for connection errors, deadlines and 5xx
    answers, waiting ``backoff * 2**attempt`` s in between; 4xx answers are not retried.  ``stop``, if given,
    is called every POLL_S s while waiting and between tries: once it returns True the call raises
    RewardStopped.  Other failures raise a one-line RewardError naming the server.  "JPEG" (quality 95)
    frames are smaller but lossy; PNG ones are exact.  The module docstring has the whole protocol.
    """
    try:  # .port raises ValueError for a port that is not a number in 0..65535
        parts = urllib.parse.urlsplit(url)
        scheme, host, _ = parts.scheme, parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"bad reward server URL {url!r}: {e}") from None
    if scheme not in ("http", "https") or not host:
        raise ValueError(f"reward server URL must start with http:// or https:// and name a host, "
                         f"got {url!r}")
    if image_format.upper() not in ("PNG", "JPEG") or retries < 1:
        raise ValueError(f"need image_format 'PNG' or 'JPEG' and retries >= 1, got {image_format!r}, "
                         f"{retries}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"the reward server's timeout must be a positive number of seconds, not {timeout!r}")
    if not 0 <= backoff < math.inf:
        raise ValueError(f"backoff must be a finite number of seconds >= 0, not {backoff!r}")
    if stop is not None and not callable(stop):
        raise ValueError(f"stop must be a callable returning True once the run should stop, not {stop!r}")
    return _RemoteReward(url, float(timeout), retries, backoff, image_format.upper(), stop)


# ------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reward.py", description="Flash-GRPO rewards.")
    serve = parser.add_subparsers(dest="command", required=True).add_parser(
        "serve", help="serve a reward over HTTP (see the module docstring)")
    serve.add_argument("--reward", required=True, help="a reward spec, as for the trainer's --reward")
    # Default top:0.3 as in the trainer: switching it to --reward-url must not change the reward.
    serve.add_argument("--reward-frames", default="top:0.3", help="mean or top:FRACTION (default: top:0.3)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="0.0.0.0 to accept other machines (no authentication!)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--max-request-mb", type=float, default=512.0, help="larger request bodies get 413")
    serve.add_argument("--max-pixels", type=int, default=2**27,
                       help="decoded pixels a request may hold, videos x frames x height x width "
                            "(default: 2^27, 4 videos of 81 frames at 480x832); larger requests get 400 "
                            "before decoding")
    serve.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S,
                       help="seconds in which a request must be read whole, headers and body, not "
                            f"counting its wait for a slot (default: {READ_TIMEOUT_S:g}); slower ones get "
                            "408 and are dropped")
    serve.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="where the videos are scored (default: the first GPU if there is one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        serve.error(f"argument --port: {args.port} is not in 0..65535")
    if not 0 < args.max_request_mb < math.inf:
        serve.error(f"argument --max-request-mb: must be a positive number, not {args.max_request_mb}")
    if args.max_pixels < 1:
        serve.error(f"argument --max-pixels: must be positive, not {args.max_pixels}")
    if not 0 < args.read_timeout < math.inf:
        serve.error(f"argument --read-timeout: must be a positive number of seconds, not {args.read_timeout}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:  # a bad name, or CUDA asked of a build or machine without it
        serve.error(f"argument --device: {args.device!r}: {_one_line(e)}")
    try:
        reward_fn = build_reward(args.reward, args.reward_frames, device=args.device)  # straight onto it
    except ValueError as e:
        print(f"reward.py serve: error: {e}", file=sys.stderr)
        return 2
    try:
        server = make_server(reward_fn, reward_fn.name, args.host, args.port, args.max_request_mb,
                             args.device, args.max_pixels, args.read_timeout)
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
