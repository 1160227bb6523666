"""bclib.viz: snapshot arrays, pixel masks, animations (CPU, small random Bayesian net)."""
import matplotlib

matplotlib.use("Agg")

import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

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
    from PIL import Image

    path = viz.save_gif(viz.animate_pixel_mask(snaps, dpi=30), tmp_path / "mask.gif")
    with Image.open(path) as im:
        assert im.n_frames == len(snaps)
