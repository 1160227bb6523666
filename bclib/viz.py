"""Pictures of what a Bayesian network prunes: weight heatmaps, the pixel mask, animations.

A :class:`Snapshot` is a small numpy copy of a network's posterior (``E[w]`` per layer as
float16, ``log_alpha`` per group and the kept groups for some thresholds), so a training
run can keep one per epoch and animate them afterwards without holding on to models::

    snaps = [snapshot(model, thresholds, epoch=0)]
    train(model, ..., on_epoch_end=lambda e, m: snaps.append(snapshot(m, thresholds, e + 1)))
    show_animation(animate_training(snaps))      # in a notebook: HTML with play controls

Needs matplotlib (not a dependency of the rest of bclib).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.axes import Axes
from matplotlib.image import AxesImage
from torch import nn

from .compression import group_masks
from .models import bayesian_layers

PRUNED_COLOR = "#c8c8c8"  # pruned weights are drawn in grey, distinct from white (≈ 0)
MNIST_SHAPE = (28, 28)


@dataclass
class Snapshot:
    """A network's posterior at one moment, as numpy arrays (one entry per group layer).

    Attributes:
        epoch: label of the moment (e.g. the epoch just finished; 0 = before training).
        weights: posterior means ``E[w]`` as float16, flattened to ``(outputs, inputs * kernel)``.
        log_alpha: per-group ``log_alpha`` (inputs of linear layers, filters of conv layers).
        kept_inputs, kept_outputs: boolean masks from :func:`bclib.compression.group_masks`.
        thresholds: the ``log_alpha`` thresholds that produced the masks.
    """

    epoch: int
    weights: list[np.ndarray]
    log_alpha: list[np.ndarray]
    kept_inputs: list[np.ndarray]
    kept_outputs: list[np.ndarray]
    thresholds: list[float]

    @property
    def architecture(self) -> list[tuple[int, int]]:
        """Kept ``(inputs, outputs)`` per layer."""
        return [(int(i.sum()), int(o.sum())) for i, o in zip(self.kept_inputs, self.kept_outputs)]

    def weight_mask(self, layer: int) -> np.ndarray:
        """Boolean mask, shaped like ``weights[layer]``, of the weights that survive pruning."""
        ins, outs = self.kept_inputs[layer], self.kept_outputs[layer]
        per_input = self.weights[layer].shape[1] // max(len(ins), 1)  # kernel size for conv layers
        return np.outer(outs, np.repeat(ins, per_input))

    def masked_weights(self, layer: int, signed: bool = True) -> np.ndarray:
        """``E[w]`` (or ``|E[w]|``) as float32, with pruned weights set to NaN."""
        w = self.weights[layer].astype(np.float32)
        w = w if signed else np.abs(w)
        return np.where(self.weight_mask(layer), w, np.nan)


@torch.no_grad()
def snapshot(model: nn.Module, thresholds: Sequence[float], epoch: int = 0) -> Snapshot:
    """Copy the posterior of ``model``'s group layers and the masks for ``thresholds``."""
    layers = bayesian_layers(model)
    masks = group_masks(model, thresholds)
    return Snapshot(
        epoch=int(epoch),
        weights=[l.posterior_weight_mean().detach().cpu().flatten(1).numpy().astype(np.float16) for l in layers],
        log_alpha=[l.log_alpha.detach().cpu().float().numpy().copy() for l in layers],
        kept_inputs=[m.inputs.numpy().copy() for m in masks],
        kept_outputs=[m.outputs.numpy().copy() for m in masks],
        thresholds=[float(t) for t in thresholds],
    )


def pixel_mask(snap: Snapshot, shape: tuple[int, int] = MNIST_SHAPE) -> np.ndarray:
    """The first layer's kept input features (pixels) as a boolean image."""
    return _as_image(snap.kept_inputs[0], shape)


def log_alpha_image(snap: Snapshot, shape: tuple[int, int] = MNIST_SHAPE) -> np.ndarray:
    """The first layer's per-pixel ``log_alpha`` as an image (high = the pixel is noise)."""
    return _as_image(snap.log_alpha[0], shape)


def _as_image(v: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if v.size != math.prod(shape):
        raise ValueError(
            f"the first layer has {v.size} input groups, not {math.prod(shape)} pixels of {shape}: "
            "the pixel mask needs a fully connected first layer on flattened images"
        )
    return v.reshape(shape)


# --- static figures ---------------------------------------------------------------------
def _layer_vmax(snap: Snapshot, layer: int) -> float:
    """A robust colour limit: the 99th percentile of |E[w]| over the kept weights."""
    kept = np.abs(snap.masked_weights(layer))
    kept = kept[np.isfinite(kept)]
    return float(np.percentile(kept, 99)) if kept.size else 1.0


def _heatmap_title(snap: Snapshot, layer: int) -> str:
    k_in, k_out = snap.architecture[layer]
    n_in, n_out = len(snap.kept_inputs[layer]), len(snap.kept_outputs[layer])
    return f"layer {layer + 1}: in {k_in}/{n_in}, out {k_out}/{n_out}"


def plot_weight_heatmaps(
    snap: Snapshot,
    axes: Optional[Sequence[Axes]] = None,
    signed: bool = True,
    vmax: Optional[Sequence[float]] = None,
) -> list[AxesImage]:
    """One heatmap per layer of ``E[w]`` (outputs × inputs), pruned weights in grey.

    ``signed=True`` uses a diverging map centred on 0, else ``|E[w]|`` on a sequential map.
    ``vmax`` fixes each layer's colour limit (default: the 99th percentile of its kept |E[w]|).
    Matrices larger than a panel are drawn antialiased, so that thin grey stripes (pruned
    rows and columns) show as lighter bands instead of disappearing between pixels.
    """
    n = len(snap.weights)
    if axes is None:
        _, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), constrained_layout=True)
        axes = np.atleast_1d(axes)
    cmap = mpl.colormaps["RdBu_r" if signed else "magma_r"].with_extremes(bad=PRUNED_COLOR)
    images = []
    for i, ax in enumerate(axes):
        lim = vmax[i] if vmax is not None else _layer_vmax(snap, i)
        w = snap.masked_weights(i, signed)
        im = ax.imshow(
            w, cmap=cmap, aspect="auto", interpolation="nearest" if max(w.shape) <= 150 else "antialiased",
            vmin=-lim if signed else 0.0, vmax=lim,
        )  # fmt: skip
        ax.set_title(_heatmap_title(snap, i), fontsize=9)
        ax.set_xlabel("input", fontsize=8)
        ax.set_ylabel("output", fontsize=8)
        ax.tick_params(labelsize=7)
        images.append(im)
    return images


def plot_pixel_mask(
    snap: Snapshot,
    axes: Optional[Sequence[Axes]] = None,
    shape: tuple[int, int] = MNIST_SHAPE,
    alpha_range: tuple[float, float] = (-10.0, 10.0),
) -> list[AxesImage]:
    """Two panels: the first layer's ``log_alpha`` per pixel, and the pixels that are kept."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(6.4, 3.4), constrained_layout=True)
    a = axes[0].imshow(log_alpha_image(snap, shape), cmap="viridis", vmin=alpha_range[0], vmax=alpha_range[1])
    m = axes[1].imshow(pixel_mask(snap, shape), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(r"$\log\alpha$ per pixel", fontsize=9)
    axes[1].set_title(_pixel_title(snap), fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return [a, m]


def _pixel_title(snap: Snapshot) -> str:
    return f"kept pixels: {int(snap.kept_inputs[0].sum())} / {len(snap.kept_inputs[0])}"


# --- animations -------------------------------------------------------------------------
def _labels(snaps: Sequence[Snapshot], labels: Optional[Sequence[str]]) -> list[str]:
    if labels is None:
        return [f"epoch {s.epoch}" for s in snaps]
    if len(labels) != len(snaps):
        raise ValueError(f"got {len(labels)} labels for {len(snaps)} snapshots")
    return list(labels)


def _check(snaps: Sequence[Snapshot]) -> None:
    if not snaps:
        raise ValueError("no snapshots to animate: collect them with snapshot(model, thresholds)")


def animate_training(
    snaps: Sequence[Snapshot],
    signed: bool = True,
    labels: Optional[Sequence[str]] = None,
    interval: int = 600,
    dpi: int = 72,
    figsize: Optional[tuple[float, float]] = None,
    fixed_colors: bool = False,
) -> FuncAnimation:
    """Weight heatmaps of every layer, one frame per snapshot.

    Each frame scales its colours to its own weights (readable even when the kept weights
    grow during training); ``fixed_colors=True`` uses the last snapshot's limits throughout,
    so that growth and shrinkage of the weights show as changes of colour.
    """
    _check(snaps)
    names = _labels(snaps, labels)
    n = len(snaps[0].weights)
    fig, axes = plt.subplots(1, n, figsize=figsize or (3.4 * n, 3.3), dpi=dpi, constrained_layout=True)
    axes = np.atleast_1d(axes)
    fixed = [_layer_vmax(snaps[-1], i) for i in range(n)] if fixed_colors else None
    images = plot_weight_heatmaps(snaps[0], axes, signed, fixed)
    suptitle = fig.suptitle(names[0])

    def update(k: int) -> list[Any]:
        for i, (im, ax) in enumerate(zip(images, axes)):
            im.set_data(snaps[k].masked_weights(i, signed))
            if fixed is None:
                lim = _layer_vmax(snaps[k], i)
                im.set_clim(-lim if signed else 0.0, lim)
            ax.set_title(_heatmap_title(snaps[k], i), fontsize=9)
        suptitle.set_text(names[k])
        return [*images, suptitle]

    return FuncAnimation(fig, update, frames=len(snaps), interval=interval, blit=False)


def animate_pixel_mask(
    snaps: Sequence[Snapshot],
    labels: Optional[Sequence[str]] = None,
    interval: int = 600,
    dpi: int = 72,
    shape: tuple[int, int] = MNIST_SHAPE,
) -> FuncAnimation:
    """The first layer's per-pixel ``log_alpha`` and kept-pixel mask, one frame per snapshot."""
    _check(snaps)
    names = _labels(snaps, labels)
    fig, axes = plt.subplots(1, 2, figsize=(6.0, 3.4), dpi=dpi, constrained_layout=True)
    lo = min(float(s.log_alpha[0].min()) for s in snaps)
    hi = max(float(s.log_alpha[0].max()) for s in snaps)
    images = plot_pixel_mask(snaps[0], axes, shape, (max(lo, -12.0), min(max(hi, 0.0), 12.0)))
    fig.colorbar(images[0], ax=axes[0], shrink=0.8)
    suptitle = fig.suptitle(names[0])

    def update(k: int) -> list[Any]:
        images[0].set_data(log_alpha_image(snaps[k], shape))
        images[1].set_data(pixel_mask(snaps[k], shape))
        axes[1].set_title(_pixel_title(snaps[k]), fontsize=9)
        suptitle.set_text(names[k])
        return [*images, suptitle]

    return FuncAnimation(fig, update, frames=len(snaps), interval=interval, blit=False)


def show_animation(anim: FuncAnimation, frame_format: str = "png", embed_limit_mb: float = 20.0) -> Any:
    """The animation as self-contained HTML with play controls (``to_jshtml``); closes its figure.

    Frames are rendered at the figure's own dpi (set by the ``animate_*`` functions), even
    where a notebook backend changed ``savefig.dpi``. ``frame_format="jpeg"`` makes noisy
    frames such as weight heatmaps about three times smaller than PNG.
    """
    from IPython.display import HTML

    fig = anim._fig  # type: ignore[attr-defined]
    try:
        rc = {"savefig.dpi": "figure", "animation.embed_limit": embed_limit_mb, "animation.frame_format": frame_format}
        with mpl.rc_context(rc):
            html = anim.to_jshtml()
    finally:
        plt.close(fig)
    return HTML(html)


def save_gif(anim: FuncAnimation, path: Path | str, fps: float = 2.0, dpi: Optional[int] = None) -> Path:
    """Write the animation as a GIF with Pillow (no ffmpeg needed), e.g. for a README."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = anim._fig  # type: ignore[attr-defined]
    anim.save(str(path), writer=PillowWriter(fps=fps), dpi=dpi or fig.dpi)
    return path
