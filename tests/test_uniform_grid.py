"""bclib.uniform_grid and the coded file's step model: rounding, search, training, exact round trip."""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bclib.load_coded as lc
from bclib import coded, models, quantize, reproduce, uniform_grid
from bclib.compression import LayerBits, compression_report, former_group_layers, prune, quantized
from bclib.config import data_dir, results_dir
from bclib.data import TensorBatches, load_mnist
from bclib.load_coded import CodedFormatError, load_coded
from bclib.paper import PAPER
from bclib.testing import TinyResNet, randomise_batchnorm, sparsify
from bclib.train import evaluate
from bclib.uniform_grid import GridStep, on_steps, round_to_step

def task(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.Sequential]:
    """Gaussian inputs labelled by a random linear map, and that map as a one-layer net."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Linear(12, 5, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(5, 12, generator=g))
    x = torch.randn(n, 12, generator=g)
    with torch.no_grad():
        return x, teacher(x).argmax(1), nn.Sequential(teacher)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def kt_bits_closed_form(symbols: np.ndarray, contexts: np.ndarray, K: int) -> float:
    """-log2 of the KT sequence probability, per context
    ``prod_s Gamma(n_s + 1/2) / Gamma(1/2) * Gamma(K/2) / Gamma(n + K/2)`` (order-free)."""
    nats = 0.0
    for c in np.unique(contexts):
        n = np.bincount(symbols[contexts == c], minlength=K)
        nats -= sum(math.lgamma(v + 0.5) - math.lgamma(0.5) for v in n)
        nats -= math.lgamma(K / 2) - math.lgamma(n.sum() + K / 2)
    return nats / math.log(2)


def test_a_step_is_a_positive_float32() -> None:
    assert GridStep(0.1).step == float(np.float32(0.1))
    for bad in (0.0, -1.0, math.nan, math.inf, 1e-50, "0.1"):
        with pytest.raises(ValueError, match="grid step"):
            GridStep(bad)  # type: ignore[arg-type]


def test_rounding_is_numpy_rint_times_the_step() -> None:
    w = torch.randn(50, 40) * 0.3
    w[0, :4] = torch.tensor([0.05, 0.15, -0.05, 0.25])  # ties at step 0.1 (to even, as np.rint)
    s = GridStep(0.1)
    ref = np.rint(w.numpy() / np.float32(s.step)) * np.float32(s.step)
    assert np.array_equal(round_to_step(w, s).numpy(), ref.astype(np.float32))


def test_rounding_forward_identity_backward() -> None:
    """The parametrization's value is round_to_step; its gradient is the identity's (autograd oracle)."""
    w = torch.randn(7, 5, requires_grad=True)
    c = torch.randn(7, 5)
    q = uniform_grid._OnStep(GridStep(0.3))(w)
    assert torch.equal(q.detach(), round_to_step(w.detach(), GridStep(0.3)))
    (q * c).sum().backward()
    assert torch.equal(w.grad, c)


def test_search_keeps_the_floor_and_stops_at_the_first_rung_below() -> None:
    """One layer: the chosen step keeps held-out accuracy within max_drop of the finest
    rung's; one rung coarser does not (the greedy search is maximal)."""
    x, y, net = task()
    acc = lambda n: accuracy(n, x, y)  # noqa: E731
    floor = acc(on_steps(net, uniform_grid._rung_steps(net, [uniform_grid.FINEST]))) - 0.02
    (step,) = uniform_grid.search_steps(net, acc, 0.02)
    assert acc(on_steps(net, [step])) >= floor
    rung = round(uniform_grid.LADDER * math.log2(step.step / uniform_grid._rms(net[0].weight)))
    assert step == uniform_grid._rung_steps(net, [rung])[0]
    assert rung < uniform_grid.COARSEST
    assert acc(on_steps(net, uniform_grid._rung_steps(net, [rung + 1]))) < floor


def test_training_on_the_steps_recovers_what_rounding_lost() -> None:
    """A student near the teacher rounded to a coarse step loses accuracy; trained through the
    rounding it wins it back. fit_steps returns the searched steps and a trained net."""
    x, y, teacher = task()
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(12, 5))
    with torch.no_grad():
        student[0].weight.copy_(teacher[0].weight + 0.3 * torch.randn(5, 12))
        student[0].bias.zero_()
    start = student[0].weight.clone()
    steps = [GridStep(0.8)]
    before = accuracy(on_steps(student, steps), x, y)
    torch.manual_seed(0)
    trained = uniform_grid.train_on_steps(student, steps, TensorBatches(x, y, 128, shuffle=True), 5, 1e-2)
    assert accuracy(on_steps(trained, steps), x, y) > before + 0.05
    assert torch.equal(student[0].weight, start)  # the input net is left as it was
    acc = lambda n: accuracy(n, x, y)  # noqa: E731
    torch.manual_seed(0)
    net, fitted = uniform_grid.fit_steps(student, acc, TensorBatches(x, y, 128, shuffle=True), 0.05, epochs=1)
    assert fitted == uniform_grid.search_steps(student, acc, 0.05)
    assert not torch.equal(net[0].weight, student[0].weight)


def test_distillation_loss_matches_numpy_and_its_gradient_the_closed_form() -> None:
    g = torch.Generator().manual_seed(3)
    s, t, T = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64), 2.5
    s.requires_grad_(True)
    loss = quantize.distillation_loss(s, t, T)
    sn, tn = s.detach().numpy() / T, t.numpy() / T
    log_q = sn - np.log(np.exp(sn).sum(1, keepdims=True))
    log_p = tn - np.log(np.exp(tn).sum(1, keepdims=True))
    assert loss.item() == pytest.approx(T * T * (np.exp(log_p) * (log_p - log_q)).sum(1).mean(), rel=1e-12)
    loss.backward()
    assert np.allclose(s.grad.numpy(), T * (np.exp(log_q) - np.exp(log_p)) / len(sn), atol=1e-12)


def test_training_with_a_teacher_follows_the_teacher_not_the_labels() -> None:
    """Labels from one linear map, a teacher that is another: distilled through the rounding,
    the student ends nearer the teacher's outputs than label training takes it."""
    x, y, _ = task()
    _, _, other = task(seed=1)
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(12, 5))
    steps, batches = [GridStep(0.1)], TensorBatches(x, y, 128, shuffle=True)
    trained = {}
    for name, teacher in (("labels", None), ("teacher", other)):
        torch.manual_seed(0)
        trained[name] = uniform_grid.train_on_steps(student, steps, batches, 5, 5e-2, teacher=teacher)
    with torch.no_grad():
        kl = {k: quantize.distillation_loss(on_steps(n, steps)(x), other(x)).item() for k, n in trained.items()}
    assert kl["teacher"] < kl["labels"] / 10
    assert accuracy(on_steps(trained["teacher"], steps), x, other(x).argmax(1)) > 0.9
    with pytest.raises(TypeError, match="teacher"):
        uniform_grid.train_on_steps(student, steps, batches, 1, teacher=lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        quantize.train_through(student, batches, 1, 1e-3, lambda i, m: nn.Identity(), teacher=other, temperature=0)


def test_bad_arguments_name_themselves() -> None:
    net = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 5))
    with pytest.raises(ValueError, match="2 layers"):
        on_steps(net, [GridStep(0.1)])
    with pytest.raises(TypeError, match="GridStep"):
        on_steps(net, [LayerBits(3, 1), GridStep(0.1)])
    with pytest.raises(TypeError, match="accuracy_of"):
        uniform_grid.search_steps(net, 0.9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_drop"):
        uniform_grid.search_steps(net, lambda n: 1.0, 2.0)
    with pytest.raises(ValueError, match="rounds"):
        uniform_grid.fit_steps(net, lambda n: 1.0, [], rounds=0)


# --- the coded file's step model -----------------------------------------------------------
def grid_net(arch: str = "lenet_300_100") -> tuple[nn.Module, list]:
    """A pruned LeNet whose first layer is on a uniform grid and the others on bit precision."""
    torch.manual_seed(0)
    model = models.build(arch, "nj").eval()
    t = sparsify(model, 0.4, 0)
    pruned, bits = prune(model, t), compression_report(model, t).bits
    first = GridStep(0.3 * float(former_group_layers(pruned)[0].weight.detach().std()))
    net = quantized(pruned, bits, quantize.BIAS_SIGNIFICAND)
    with torch.no_grad():
        w = former_group_layers(net)[0].weight
        w.copy_(round_to_step(w, first))
    return net, [first, *bits[1:]]


@pytest.mark.parametrize("arch", ["lenet_300_100", "lenet5_caffe"])
def test_grid_layers_round_trip_exactly(tmp_path: Path, arch: str) -> None:
    net, spec = grid_net(arch)
    enc = coded.encode_network(net, spec)
    assert enc.data[4] == 3  # a step layer: format version 3
    (tmp_path / "g.bc").write_bytes(enc.data)
    got = load_coded(tmp_path / "g.bc")
    stored = [m for m in got if isinstance(m, (nn.Linear, nn.Conv2d))]
    for g, w in zip(stored, former_group_layers(net), strict=True):
        assert torch.equal(g.weight, w.weight)  # equal values (a weight on 0 reads back as +0.0)
        assert torch.equal(g.bias.view(torch.int32), w.bias.view(torch.int32))
    x = torch.randn(16, *({"lenet_300_100": (784,), "lenet5_caffe": (1, 28, 28)}[arch]))
    with torch.no_grad():
        assert torch.equal(got(x), net(x))
    assert enc.layers[0].model.startswith("step(")
    sym, n_min, K = coded.step_symbols(former_group_layers(net)[0].weight, spec[0], "0")
    assert enc.layers[0].width == math.ceil(math.log2(K))
    ctx = lc.weight_contexts(len(sym), former_group_layers(net)[0].weight.shape[0], 1 if "row" in enc.layers[0].model else 0)
    assert enc.layers[0].weight_bits == pytest.approx(kt_bits_closed_form(sym, ctx, K), rel=1e-9)


def test_a_file_without_step_layers_stays_version_2() -> None:
    torch.manual_seed(0)
    model = models.build("lenet_300_100", "nj").eval()
    t = sparsify(model, 0.4, 0)
    assert coded.encode_network(prune(model, t), compression_report(model, t).bits).data[4] == 2


def test_weights_off_the_grid_are_refused() -> None:
    net, spec = grid_net()
    with torch.no_grad():
        former_group_layers(net)[0].weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="not on its grid.*on_steps"):
        coded.encode_network(net, spec)


def test_a_damaged_step_spec_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A step of 0 or NaN, or an empty alphabet, with a valid CRC (a writer bug): CodedFormatError."""
    net = nn.Sequential(nn.Linear(6, 3))
    spec = [GridStep(0.25)]
    net = on_steps(net, spec)
    body = coded.encode_network(net, spec).data[lc.HEADER.size :]
    spec_len, pos = lc._varint(body, 0)
    n_words, pos = lc._varint(body, pos)
    words = body[pos + spec_len :]
    (layer,) = lc._Spec(body[pos : pos + spec_len]).layers()

    def file(f32_bits: int, K: int) -> bytes:
        s = coded._varint(1) + coded._varints(lc.LAYER_TYPES.index("linear"), 6, 3, 1, 0, 0, 0, 3, layer["ctx"], 0,
                                              f32_bits, lc.zigzag(layer["n_min"]), K, *layer["bias_e"], layer["bias_m"])  # fmt: skip
        body = coded._varints(len(s), n_words) + s + words
        return lc.MAGIC + bytes([3]) + zlib.crc32(body).to_bytes(4, "little") + body

    quarter = int(np.float32(0.25).view(np.uint32))
    assert file(quarter, layer["K"]) == coded.encode_network(net, spec).data  # the rebuilt spec is the writer's
    for f32_bits, K, msg in [(0, layer["K"], "not positive"), (0x7FC00000, layer["K"], "not positive"),
                             (quarter, 0, "alphabet is empty")]:  # fmt: skip
        path = tmp_path / "d.bc"
        path.write_bytes(file(f32_bits, K))
        with pytest.raises(CodedFormatError, match=msg):
            load_coded(path)



def test_fit_steps_on_a_pruned_residual_net_with_batchnorm() -> None:
    torch.manual_seed(0)
    model = randomise_batchnorm(models.to_bayesian(TinyResNet(), "nj")).eval()
    x = torch.randn(256, 3, 8, 8)
    pruned = prune(model, sparsify(model, 0.3), x[:1])
    with torch.no_grad():
        y = pruned(x).argmax(1)  # labels the pruned net gets right
    acc = lambda n: accuracy(n, x, y)  # noqa: E731
    floor = acc(on_steps(pruned, uniform_grid._rung_steps(pruned, [uniform_grid.FINEST] * 3))) - 0.05
    net, steps = uniform_grid.fit_steps(pruned, acc, list(zip(x.split(32), y.split(32))), 0.05, epochs=2)
    assert net.bayesian_layer_names == pruned.bayesian_layer_names
    stored = on_steps(net, steps, quantize.BIAS_SIGNIFICAND)
    assert acc(on_steps(pruned, steps)) >= floor  # the search's floor, before training
    for name, s in zip(stored.bayesian_layer_names, steps):
        w = stored.get_submodule(name).weight
        assert torch.equal(round_to_step(w, s), w)


# the shipped runs and the seed runs with uniform grids (``reproduce --grid``)
GRIDDED = sorted(str(p.relative_to(results_dir()).with_suffix("")) for p in results_dir().glob("**/*-*.json")
                 if "grid" in json.loads(p.read_text()))  # fmt: skip


def test_every_shipped_run_has_uniform_grids() -> None:
    assert {"lenet_300_100-nj", "lenet_300_100-hs", "lenet5_caffe-nj", "lenet5_caffe-hs"} <= set(GRIDDED)


@pytest.mark.skipif(not (data_dir() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(),
                    reason="MNIST not in BCLIB_DATA")  # fmt: skip
@pytest.mark.parametrize("run", GRIDDED)
def test_shipped_grid_file_gives_its_recorded_error(run: str) -> None:
    """The shipped ``<run>-grid.bc`` is the headline's file: its size, test error and steps, and
    the headline is the smallest file at or below the paper's error (else the lowest error).
    The held point's file likewise, its other trainings all at or below the paper's error."""
    r = json.loads((results_dir() / f"{run}.json").read_text())
    g = r["grid"]
    test_b = TensorBatches(*load_mnist(train=False), batch_size=1000)
    paper = PAPER[(r["arch"], r["prior"])]["error"]
    for key, index in (("file", g["headline"]), ("held_file", g.get("held"))):
        if index is None:
            continue
        p = g["points"][index]
        path = (results_dir() / run).parent / g[key]
        assert path.stat().st_size == p["coded_bytes"] and path.read_bytes()[4] == 3
        net = load_coded(path)
        assert 100 * (1 - evaluate(net, test_b)) == pytest.approx(p["error"], abs=0.011)
        for layer, s in zip([m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))], p["steps"], strict=True):
            assert torch.equal(round_to_step(layer.weight, GridStep(s)), layer.weight)
    head = g["points"][g["headline"]]
    within = [p for p in g["points"] if p["error"] <= paper + 1e-9]
    assert head == (min(within, key=lambda p: p["coded_bytes"]) if within else min(g["points"], key=lambda p: p["error"]))
    if g.get("held") is not None:
        held = g["points"][g["held"]]
        assert held["error"] <= paper + 1e-9 and all(o["error"] <= paper + 1e-9 for o in held["other_seeds"])


def test_the_held_point_is_the_smallest_whose_other_trainings_stay_at_the_error() -> None:
    """``_smallest_held`` walks the points at or below the error from the smallest file, retrains
    only those it needs, and stops at the first whose other trainings all stay there."""
    points = [{"coded_bytes": 100, "error": 1.9}, {"coded_bytes": 200, "error": 1.7},
              {"coded_bytes": 300, "error": 1.8}, {"coded_bytes": 400, "error": 1.6}]  # fmt: skip
    others = {200: [1.7, 1.85], 300: [1.8, 1.75], 400: [1.7]}
    retrained = []

    def retrain(p):
        retrained.append(p["coded_bytes"])
        p["other_seeds"] = [{"error": e} for e in others[p["coded_bytes"]]]

    assert reproduce._smallest_held(points, 1.8, retrain) is points[2]
    assert retrained == [200, 300]  # not the 1.9 % point, not past the held one
    assert reproduce._smallest_held(points, 1.65, retrain) is None and retrained[-1] == 400
