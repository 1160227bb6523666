"""bclib.viz: snapshot arrays, pixel masks, animations (CPU, small random Bayesian net)."""
import matplotlib

matplotlib.use("Agg")

import base64  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from bclib import compression, models, viz  # noqa: E402

THRESHOLDS = [-3.0, -3.0, -3.0]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = models.lenet_300_100("nj")
    with torch.no_grad():  # make some groups prunable: large log_alpha on a few pixels and neurons
        layers = models.bayesian_layers(model)
        layers[0].scale.z_logvar[:200] = 2.0
        layers[1].scale.z_logvar[:50] = 2.0
    return model


@pytest.fixture(scope="module")
def snaps(net):
    return [viz.snapshot(net, THRESHOLDS, epoch=e) for e in range(3)]


def test_snapshot_arrays(net, snaps):
    s = snaps[0]
    assert [w.shape for w in s.weights] == [(300, 784), (100, 300), (10, 100)]
    assert all(w.dtype == np.float16 for w in s.weights)
    assert [a.shape for a in s.log_alpha] == [(784,), (300,), (100,)]
    assert [m.dtype for m in s.kept_inputs] == [np.bool_] * 3
    masks = compression.group_masks(net, THRESHOLDS)
    assert s.architecture == [m.kept for m in masks] == [(584, 250), (250, 100), (100, 10)]
    assert s.thresholds == THRESHOLDS
    assert [x.epoch for x in snaps] == [0, 1, 2]


def test_masked_weights_match_bayesian_mask(net, snaps):
    s = snaps[0]
    masks = compression.group_masks(net, THRESHOLDS)
    for i, layer in enumerate(models.bayesian_layers(net)):
        w = s.masked_weights(i)
        expect = masks[i].weight_mask(layer.weight_mu.shape).bool().numpy()
        assert np.array_equal(np.isfinite(w), expect)
        kept = layer.posterior_weight_mean().detach().numpy()[expect]
        np.testing.assert_allclose(w[expect], kept, rtol=1e-3, atol=1e-4)  # float16 storage
        assert np.all(s.masked_weights(i, signed=False)[expect] >= 0)


def test_pixel_mask(snaps):
    mask = viz.pixel_mask(snaps[0])
    assert mask.shape == (28, 28) and mask.dtype == np.bool_
    assert int(mask.sum()) == 584 and not mask.flat[0]
    assert viz.log_alpha_image(snaps[0]).shape == (28, 28)


def test_pixel_mask_needs_flat_first_layer():
    torch.manual_seed(0)
    conv = models.lenet5_caffe("nj")
    s = viz.snapshot(conv, [0.0] * 4)
    assert s.weights[0].shape == (20, 25)  # conv weights flattened to (filters, in * kernel)
    assert s.weight_mask(0).shape == (20, 25)
    with pytest.raises(ValueError, match="pixel"):
        viz.pixel_mask(s)


@pytest.mark.parametrize("make", [viz.animate_training, viz.animate_pixel_mask])
def test_animation_frames_and_html(snaps, make):
    anim = make(snaps, dpi=30)
    html = viz.show_animation(anim).data
    assert "<script" in html
    frames = set(re.findall(r"frames\[(\d+)\] = \"data:image", html))
    assert frames == {str(i) for i in range(len(snaps))}  # one embedded image per snapshot


def test_labels_checked(snaps):
    with pytest.raises(ValueError, match="labels"):
        viz.animate_pixel_mask(snaps, labels=["a"])
    with pytest.raises(ValueError, match="no snapshots"):
        viz.animate_training([])


def test_save_gif(snaps, tmp_path):
    path = viz.save_gif(viz.animate_pixel_mask(snaps, dpi=30), tmp_path / "mask.gif")
    with Image.open(path) as im:
        assert im.n_frames == len(snaps)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.gif"]  # no temporary file left


# --- readability at the page's width (~750 px text column) ------------------------------
MIN_TICK_PX = 12  # tick labels at least this tall on the page (the issue found ~6 px)


def _px(points: float, fig) -> float:
    return points * fig.dpi / 72


@pytest.fixture
def styled():
    with matplotlib.rc_context():
        viz.setup()
        yield
    plt.close("all")


def test_setup_sets_readable_style(styled):
    rc = matplotlib.rcParams
    assert rc["figure.dpi"] == viz.FIGURE_DPI
    assert rc["figure.figsize"][0] * rc["figure.dpi"] <= 760
    assert _px(rc["xtick.labelsize"], plt.figure()) >= MIN_TICK_PX
    with pytest.raises(ValueError, match="formats"):
        viz.setup(formats=())


def _check_readable(fig) -> None:
    width_px = fig.get_figwidth() * fig.dpi
    assert 600 <= width_px <= 760, f"figure {width_px:.0f} px wide"
    for ax in fig.axes:
        for label in ax.get_xticklabels() + ax.get_yticklabels():
            assert _px(label.get_fontsize(), fig) >= MIN_TICK_PX
        if ax.get_label() != "<colorbar>":  # every panel at least a quarter of the page wide
            assert ax.get_position().width * width_px >= 200, ax.get_title()


def test_heatmaps_readable(styled, snaps):
    images = viz.plot_weight_heatmaps(snaps[0])
    fig = images[0].axes.figure
    fig.canvas.draw()
    _check_readable(fig)
    assert len(images) == 3 and len(fig.axes) == 6  # three heatmaps with a colour bar each
    top = images[0].axes.get_position()
    assert top.width > 0.7 and all(im.axes.get_position().y1 < top.y0 for im in images[1:])


def test_heatmap_figure_layout():
    fig, axes = viz.heatmap_figure(4)
    assert len(axes) == 4 and fig.get_figwidth() == viz.PAGE_WIDTH
    with pytest.raises(ValueError, match="n_layers"):
        viz.heatmap_figure(0)
    plt.close("all")


def test_axes_count_checked(snaps):
    _, ax = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="one axes per group layer"):
        viz.plot_weight_heatmaps(snaps[0], ax)
    plt.close("all")


def test_log_alpha_history(styled, net):
    snaps = [viz.snapshot(net, THRESHOLDS, epoch=e) for e in range(3)]
    fig, axes = viz.plot_log_alpha_history(snaps, max_lines=300)
    fig.canvas.draw()
    _check_readable(fig)
    # layer 1: 300 of 784 groups drawn; layers 2, 3: all. 200 + 50 groups were made noisy.
    assert len(axes[0].lines) == 300 + 1 and len(axes[2].lines) == 100 + 1  # + threshold line
    assert "300 drawn" in axes[0].get_title() and "584 below" in axes[0].get_title()
    red = [l for l in axes[1].lines if l.get_color() == "C3"]
    assert len(red) == 50  # the noisy groups of layer 2 are drawn as pruned


def _frame_sizes(html: str) -> set[tuple[int, int]]:
    frames = re.findall(r'frames\[\d+\] = "data:image/\w+;base64,([^"]+)"', html)
    sizes = set()
    for f in frames:
        with Image.open(io.BytesIO(base64.b64decode(f.replace("\\n", "")))) as im:
            sizes.add(im.size)
    return sizes


@pytest.mark.parametrize("make", [viz.animate_training, viz.animate_pixel_mask])
def test_animation_frames_page_wide(styled, snaps, make):
    html = viz.show_animation(make(snaps[:2]), frame_format="jpeg").data
    ((w, h),) = _frame_sizes(html)
    assert 600 <= w <= 760 and h >= 300


def test_animation_over_embed_limit_raises(snaps):
    with pytest.raises(ValueError, match="frames fit"):
        viz.show_animation(viz.animate_pixel_mask(snaps), embed_limit_mb=0.01)
