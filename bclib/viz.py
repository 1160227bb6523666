"""Pictures of what a Bayesian network prunes: weight heatmaps, the pixel mask, animations.

A :class:`Snapshot` is a small numpy copy of a network's posterior (``E[w]`` per layer as
float16, ``log_alpha`` per group and the kept groups for some thresholds), so a training
run can keep one per epoch and animate them afterwards without holding on to models::

    snaps = [snapshot(model, thresholds, epoch=0)]
    train(model, ..., on_epoch_end=lambda e, m: snaps.append(snapshot(m, thresholds, e + 1)))
    show_animation(animate_training(snaps))      # in a notebook: HTML with play controls

:func:`setup` (called in every chapter's import cell) makes figures readable in the book's
text column, about 750 px wide: fonts of 10-12 pt at 100 dpi, figures at most
:data:`PAGE_WIDTH` inches wide, and high-dpi ("retina") inline PNGs in a notebook.

Needs matplotlib (not a dependency of the rest of bclib).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from torch import nn

from .compression import group_masks
from .models import bayesian_layers

PRUNED_COLOR = "#c8c8c8"  # pruned weights are drawn in grey, distinct from white (≈ 0)
MNIST_SHAPE = (28, 28)
PAGE_WIDTH = 7.5  # inches: the book's ~750 px text column at FIGURE_DPI
FIGURE_DPI = 100  # CSS pixels per inch of a figure (inline PNGs and animation frames)
FONT_SIZE = 11.0  # points: ~15 px at FIGURE_DPI


def style(font_size: float = FONT_SIZE) -> dict[str, Any]:
    """The rcParams of :func:`setup`: font sizes relative to ``font_size``, page-wide figures."""
    return {
        "figure.dpi": FIGURE_DPI,
        "figure.figsize": (PAGE_WIDTH, 4.2),
        "font.size": font_size,
        "axes.titlesize": font_size + 1,
        "axes.labelsize": font_size,
        "xtick.labelsize": font_size - 1,
        "ytick.labelsize": font_size - 1,
        "legend.fontsize": font_size - 1,
        "figure.titlesize": font_size + 2,
    }


def setup(font_size: float = FONT_SIZE, formats: Sequence[str] = ("retina",)) -> None:
    """Make the chapter's figures readable at the page's width; call once after the imports.

    Sets :func:`style`'s rcParams and, inside IPython, the inline backend's formats
    (``"retina"``: PNGs at twice the pixel density, shown at :data:`FIGURE_DPI`; ``"svg"``
    also works). Outside IPython only the rcParams change.
    """
    if not formats:
        raise ValueError("formats is empty: pass e.g. ('retina',), ('png',) or ('svg',)")
    mpl.rcParams.update(style(font_size))
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is not None:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats(*formats)


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
        weights=[
            l.posterior_weight_mean().detach().cpu().flatten(1).numpy().astype(np.float16)
            for l in layers
        ],
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
            f"the first layer has {v.size} input groups, not {math.prod(shape)} pixels of "
            f"{shape}: the pixel mask needs a fully connected first layer on flattened images"
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


def heatmap_figure(n_layers: int, dpi: Optional[int] = None) -> tuple[Figure, list[Axes]]:
    """A page-wide figure for ``n_layers`` heatmaps: the first (widest) layer alone on top.

    The other layers follow two per row, so no panel is narrower than half the page and the
    tick labels keep their size (a row of three or four panels shrinks them to a few pixels).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    rest_rows = math.ceil((n_layers - 1) / 2)
    mosaic = [["0", "0"]] + [
        [str(1 + 2 * r), str(2 + 2 * r) if 2 + 2 * r < n_layers else "."] for r in range(rest_rows)
    ]
    fig, named = plt.subplot_mosaic(
        mosaic, figsize=(PAGE_WIDTH, 3.2 + 2.9 * rest_rows), dpi=dpi or FIGURE_DPI,
        layout="constrained", height_ratios=[1.15] + [1.0] * rest_rows,
    )  # fmt: skip
    return fig, [named[str(i)] for i in range(n_layers)]


def plot_weight_heatmaps(
    snap: Snapshot,
    axes: Optional[Sequence[Axes]] = None,
    signed: bool = True,
    vmax: Optional[Sequence[float]] = None,
    colorbar: bool = True,
) -> list[AxesImage]:
    """One heatmap per layer of ``E[w]`` (outputs × inputs), pruned weights in grey.

    ``signed=True`` uses a diverging map centred on 0, else ``|E[w]|`` on a sequential map.
    ``vmax`` fixes each layer's colour limit (default: the 99th percentile of its kept |E[w]|).
    Without ``axes`` the panels are laid out by :func:`heatmap_figure`. Matrices larger than
    a panel are drawn antialiased, so that thin grey stripes (pruned rows and columns) show
    as lighter bands instead of disappearing between pixels. ``colorbar`` adds one per panel.
    """
    n = len(snap.weights)
    if axes is None:
        _, axes = heatmap_figure(n)
    if len(axes) != n:
        raise ValueError(f"got {len(axes)} axes for {n} layers: pass one axes per group layer")
    cmap = mpl.colormaps["RdBu_r" if signed else "magma_r"].with_extremes(bad=PRUNED_COLOR)
    images = []
    for i, ax in enumerate(axes):
        lim = vmax[i] if vmax is not None else _layer_vmax(snap, i)
        w = snap.masked_weights(i, signed)
        smooth = "nearest" if max(w.shape) <= 150 else "antialiased"
        im = ax.imshow(
            w, cmap=cmap, aspect="auto", interpolation=smooth,
            vmin=-lim if signed else 0.0, vmax=lim,
        )  # fmt: skip
        ax.set_title(_heatmap_title(snap, i))
        ax.set_xlabel("input neuron")
        ax.set_ylabel("output neuron")
        if colorbar:
            ax.figure.colorbar(im, ax=ax, shrink=0.9, pad=0.01, label=r"$\mathbb{E}[w]$")
        images.append(im)
    return images


def plot_pixel_mask(
    snap: Snapshot,
    axes: Optional[Sequence[Axes]] = None,
    shape: tuple[int, int] = MNIST_SHAPE,
    alpha_range: tuple[float, float] = (-10.0, 10.0),
    colorbar: Optional[bool] = None,
) -> list[AxesImage]:
    """Two panels: the first layer's ``log_alpha`` per pixel, and the pixels that are kept.

    ``colorbar`` (default: only when this function makes the figure) adds the scale of
    ``log_alpha``.
    """
    own = axes is None
    if own:
        _, axes = plt.subplots(1, 2, figsize=(0.8 * PAGE_WIDTH, 3.3), layout="constrained")
    a = axes[0].imshow(
        log_alpha_image(snap, shape), cmap="viridis", vmin=alpha_range[0], vmax=alpha_range[1]
    )
    m = axes[1].imshow(pixel_mask(snap, shape), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(r"$\log\alpha$ per pixel")
    axes[1].set_title(_pixel_title(snap))
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if own if colorbar is None else colorbar:
        axes[0].figure.colorbar(a, ax=axes[0], shrink=0.85)
    return [a, m]


def _pixel_title(snap: Snapshot) -> str:
    return f"kept pixels: {int(snap.kept_inputs[0].sum())} / {len(snap.kept_inputs[0])}"


def plot_log_alpha_history(
    snaps: Sequence[Snapshot], max_lines: int = 400, seed: int = 0
) -> tuple[Figure, list[Axes]]:
    """``log_alpha`` of every group against the epoch, one panel per layer (stacked).

    Each line is one group: blue if its last ``log_alpha`` is below the threshold (dashed),
    red if above. Layers with more than ``max_lines`` groups show a
    random subset of that many (chosen with ``seed``); the panel title says how many.
    """
    _check(snaps)
    epochs = np.array([s.epoch for s in snaps])
    n = len(snaps[0].log_alpha)
    fig, axes = plt.subplots(
        n, 1, figsize=(PAGE_WIDTH, 2.3 * n + 0.6), sharex=True, layout="constrained"
    )
    axes = list(np.atleast_1d(axes))
    rng = np.random.default_rng(seed)
    last = snaps[-1]
    for i, ax in enumerate(axes):
        traj = np.stack([s.log_alpha[i] for s in snaps])  # (snapshots, groups)
        groups = traj.shape[1]
        shown = groups > max_lines
        idx = np.sort(rng.choice(groups, max_lines, replace=False)) if shown else np.arange(groups)
        below = last.log_alpha[i] < last.thresholds[i]
        kept = below[idx]
        for keep, color in ((False, "C3"), (True, "C0")):
            cols = traj[:, idx[kept == keep]]
            if cols.size:
                ax.plot(epochs, cols, color=color, lw=0.6, alpha=0.35)
        ax.axhline(last.thresholds[i], ls="--", color="k", lw=1)
        subset = f" ({max_lines} drawn)" if shown else ""
        ax.set_title(f"layer {i + 1}: {groups} groups{subset}, {int(below.sum())} below threshold")
        ax.set_ylabel(r"$\log\alpha$")
    axes[-1].set_xlabel("epoch")
    return fig, axes


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
    dpi: int = FIGURE_DPI,
    fixed_colors: bool = False,
) -> FuncAnimation:
    """Weight heatmaps of every layer (laid out by :func:`heatmap_figure`), one frame per snapshot.

    Each frame scales its colours to its own weights (readable even when the kept weights
    grow during training); ``fixed_colors=True`` uses the last snapshot's limits throughout,
    so that growth and shrinkage of the weights show as changes of colour. Frames are
    :data:`PAGE_WIDTH` inches at ``dpi``: page-wide at the default.
    """
    _check(snaps)
    names = _labels(snaps, labels)
    n = len(snaps[0].weights)
    fig, axes = heatmap_figure(n, dpi=dpi)
    fixed = [_layer_vmax(snaps[-1], i) for i in range(n)] if fixed_colors else None
    images = plot_weight_heatmaps(snaps[0], axes, signed, fixed)
    suptitle = fig.suptitle(names[0])

    def update(k: int) -> list[Any]:
        for i, (im, ax) in enumerate(zip(images, axes)):
            im.set_data(snaps[k].masked_weights(i, signed))
            if fixed is None:
                lim = _layer_vmax(snaps[k], i)
                im.set_clim(-lim if signed else 0.0, lim)
            ax.set_title(_heatmap_title(snaps[k], i))
        suptitle.set_text(names[k])
        return [*images, suptitle]

    return FuncAnimation(fig, update, frames=len(snaps), interval=interval, blit=False)


def animate_pixel_mask(
    snaps: Sequence[Snapshot],
    labels: Optional[Sequence[str]] = None,
    interval: int = 600,
    dpi: int = FIGURE_DPI,
    shape: tuple[int, int] = MNIST_SHAPE,
) -> FuncAnimation:
    """The first layer's per-pixel ``log_alpha`` and kept-pixel mask, one frame per snapshot."""
    _check(snaps)
    names = _labels(snaps, labels)
    fig, axes = plt.subplots(
        1, 2, figsize=(0.85 * PAGE_WIDTH, 3.6), dpi=dpi, layout="constrained"
    )
    lo = min(float(s.log_alpha[0].min()) for s in snaps)
    hi = max(float(s.log_alpha[0].max()) for s in snaps)
    alpha_range = (max(lo, -12.0), min(max(hi, 0.0), 12.0))
    images = plot_pixel_mask(snaps[0], axes, shape, alpha_range, colorbar=True)
    suptitle = fig.suptitle(names[0])

    def update(k: int) -> list[Any]:
        images[0].set_data(log_alpha_image(snaps[k], shape))
        images[1].set_data(pixel_mask(snaps[k], shape))
        axes[1].set_title(_pixel_title(snaps[k]))
        suptitle.set_text(names[k])
        return [*images, suptitle]

    return FuncAnimation(fig, update, frames=len(snaps), interval=interval, blit=False)


def show_animation(
    anim: FuncAnimation, frame_format: str = "png", embed_limit_mb: float = 20.0
) -> Any:
    """The animation as self-contained HTML with play controls (``to_jshtml``); closes its figure.

    Frames are rendered at the figure's own dpi (set by the ``animate_*`` functions), even
    where a notebook backend changed ``savefig.dpi``. ``frame_format="jpeg"`` makes noisy
    frames such as weight heatmaps about three times smaller than PNG. Raises ValueError
    when the frames exceed ``embed_limit_mb`` (matplotlib would silently drop the rest).
    """
    from IPython.display import HTML

    fig = anim._fig  # type: ignore[attr-defined]
    rc = {
        "savefig.dpi": "figure",
        "animation.embed_limit": embed_limit_mb,
        "animation.frame_format": frame_format,
    }
    try:
        with mpl.rc_context(rc):
            html = anim.to_jshtml()
    finally:
        plt.close(fig)
    expected = anim._save_count  # type: ignore[attr-defined]
    embedded = len(re.findall(r"frames\[\d+\] = \"data:image", html))
    if expected is not None and embedded < expected:
        raise ValueError(
            f"only {embedded} of {expected} frames fit in embed_limit_mb={embed_limit_mb}: "
            "use fewer snapshots, a lower dpi or frame_format='jpeg'"
        )
    return HTML(html)


def save_gif(
    anim: FuncAnimation, path: Path | str, fps: float = 2.0, dpi: Optional[int] = None
) -> Path:
    """Write the animation as a GIF with Pillow (no ffmpeg needed), e.g. for a README.

    Written to a temporary file beside ``path`` and renamed, so ``path`` is never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = anim._fig  # type: ignore[attr-defined]
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.gif")
    try:
        anim.save(str(tmp), writer=PillowWriter(fps=fps), dpi=dpi or fig.dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
