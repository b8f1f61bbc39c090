"""Reward functions for Flash-GRPO (training-free rewards and a small spec parser).

Interface
---------
A *reward* is any callable ``reward_fn(videos, prompts) -> torch.Tensor`` where

* ``videos``  is a float tensor ``(B, F, C, H, W)`` with values in [0, 1], C = 3 (RGB);
* ``prompts`` is a list of B strings;
* the result is a float32 tensor of shape ``(B,)`` on ``videos.device``; higher is better.

The trainer only ever calls ``build_reward(spec, frame_aggregation)`` and then the
returned callable.  ``spec`` is one of

* a registry name:      ``"colorfulness"``  (see ``REWARDS``);
* a weighted sum:       ``"temporal_consistency=1, colorfulness=0.5"`` (weight defaults to 1);
* a user function:      ``"path/to/file.py:function"`` or ``"package.module:function"``.
  It receives ``(videos, prompts)`` and must return ``(B,)`` itself (no frame aggregation).
  User functions may also appear as components of a weighted sum.

The built-in rewards need no weights and run on any device.  Each is registered as
either *per-frame* (returns ``(B, F)``, reduced to ``(B,)`` by ``aggregate_frames``) or
*per-video* (returns ``(B,)`` directly).  Every component's output is validated (shape
``(B,)``, finite); a bad output raises ``RewardError`` naming the offending reward, so
a broken reward fails loudly instead of silently poisoning the group advantages.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import math
import os
import sys
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "REWARDS", "RewardError", "RewardInfo", "aggregate_frames", "build_reward",
    "jpeg_compressibility", "jpeg_incompressibility", "colorfulness", "sharpness",
    "temporal_consistency", "brightness", "exposure",
]


class RewardError(ValueError):
    """A reward returned something unusable (wrong type, wrong shape, NaN or inf)."""


# ----------------------------------------------------------------------------- helpers
def _luma(videos: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B; (B, F, 3, H, W) -> (B, F, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=videos.device, dtype=torch.float32)
    return torch.einsum("bfchw,c->bfhw", videos.float(), w)


# ----------------------------------------------------------------- per-frame rewards
def _jpeg_size_kb(videos: torch.Tensor) -> torch.Tensor:
    # PIL only runs on the CPU, so quantise to uint8 on the device and copy once.
    frames = (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, F, H, W, 3) for PIL
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
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"videos must be (B, F, 3, H, W), got {tuple(videos.shape)}")
        B, Fr = videos.shape[:2]
        if len(prompts) != B:
            raise ValueError(f"got {len(prompts)} prompts for {B} videos")
        total = torch.zeros(B, dtype=torch.float32, device=videos.device)
        for name, weight, fn, per_frame in self.components:
            out = fn(videos, prompts)
            if per_frame:  # check the frames first so a NaN is blamed before topk hides it
                out = aggregate_frames(_check(name, out, B, (B, Fr)).float(), self.frame_aggregation)
            out = _check(name, out, B, (B,))
            total += weight * out.to(device=videos.device, dtype=torch.float32)
        return total


def build_reward(spec: str, frame_aggregation: str = "mean") -> Callable:
    """Turn a reward spec string into a validated ``reward_fn(videos, prompts) -> (B,)``.

    See the module docstring for the spec grammar.  All errors (unknown name, bad
    weight, missing file/module/function, bad aggregation) are one-line ValueErrors,
    raised here at build time rather than in the middle of training.
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
        if name in REWARDS:
            info = REWARDS[name]
            components.append((name, weight, info.fn, info.per_frame))
        elif ":" in name:
            components.append((name, weight, _load_user_function(name), False))
        else:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))} "
                             f"(or 'file.py:function' / 'module:function')")
    return _BuiltReward(spec.strip(), components, frame_aggregation.strip())
