"""bclib.quantize: the straight-through rounding, training onto the grid, the greedy bit search."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from bclib import models, quantize, reproduce, uniform_grid
from bclib.compression import LayerBits, compression_report, prune, quantized
from bclib.config import data_dir, results_dir
from bclib.data import TensorBatches, load_mnist
from bclib.load_coded import load_coded
from bclib.precision import round_to_bits
from bclib.testing import TinyResNet, randomise_batchnorm, sparsify, synthetic_mnist
from bclib.train import evaluate
from bclib.uniform_grid import GridStep


def pruned_lenet(seed: int = 0) -> tuple[nn.Module, list[LayerBits]]:
    torch.manual_seed(seed)
    model = models.build("lenet_300_100", "nj").eval()
    t = sparsify(model, 0.6, seed)
    return prune(model, t), compression_report(model, t).bits


def teacher_data(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Inputs labelled by a random linear teacher (10 classes, 20 features), and the teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Linear(20, 10)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(10, 20, generator=g))
        teacher.bias.zero_()
    x = torch.randn(n, 20, generator=g)
    with torch.no_grad():
        return x, teacher(x).argmax(1), teacher


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def test_rounding_forward_identity_backward() -> None:
    """The parametrization's value is round_to_bits; its gradient is the identity's (autograd oracle)."""
    w = torch.randn(7, 5, requires_grad=True)
    c = torch.randn(7, 5)
    q = quantize._OnGrid(LayerBits(3, 1))(w)
    assert torch.equal(q.detach(), round_to_bits(w.detach(), 3, 1))
    (q * c).sum().backward()
    assert torch.equal(w.grad, c)


def test_training_on_the_grid_recovers_what_rounding_lost() -> None:
    """A student near the teacher loses accuracy when rounded to 1 significand bit; training
    through the rounding wins it back (the rounded untrained student is the baseline)."""
    x, y, teacher = teacher_data()
    torch.manual_seed(1)
    student = nn.Linear(20, 10)
    with torch.no_grad():
        student.weight.copy_(teacher.weight + 0.3 * torch.randn(10, 20))
        student.bias.zero_()
    bits = [LayerBits(2, 0)]
    w0 = student.weight.detach().clone()
    before = accuracy(quantized(student, bits), x, y)
    batches = list(zip(x.split(64), y.split(64)))
    trained = quantize.train_on_grid(student, bits, batches, epochs=10, lr=3e-3)
    after = accuracy(quantized(trained, bits), x, y)
    assert after > before + 0.05, (before, after)
    assert torch.equal(student.weight, w0)  # the input is left alone
    assert not hasattr(trained, "parametrizations") and isinstance(trained.weight, nn.Parameter)


def test_train_on_grid_keeps_prunes_layer_names_and_leaves_the_net_alone() -> None:
    net, bits = pruned_lenet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(64, 784)
    y = torch.randint(0, 10, (64,))
    out = quantize.train_on_grid(net, bits, [(x, y)], epochs=1)
    assert out.bayesian_layer_names == net.bayesian_layer_names
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert not out.training
    assert quantize.train_on_grid(net, bits, [(x, y)], epochs=0).state_dict().keys() == before.keys()


def test_search_without_training_stops_where_every_step_down_breaks_the_budget() -> None:
    """Oracle: the result is within budget, and lowering any width by one from it is not
    (rounding only, so accuracy is a function of the bits; enough passes to converge)."""
    x, y, teacher = teacher_data(seed=2)
    net = nn.Sequential(nn.Linear(20, 10))
    with torch.no_grad():
        net[0].weight.copy_(teacher.weight)
        net[0].bias.zero_()
    start = [LayerBits(6, 10)]
    acc = lambda n: accuracy(n, x, y)  # noqa: E731
    floor = acc(quantized(net, start)) - 0.02
    bits = quantize.search_bits(net, start, acc, max_drop=0.02, passes=8)
    assert acc(quantized(net, bits)) >= floor
    assert bits[0].total < start[0].total
    for field in ("significand", "exponent"):
        lower = quantize._lowered(bits, 0, field)
        assert lower is None or acc(quantized(net, lower)) < floor


def test_fitting_goes_lower_than_searching_alone_within_the_same_floor() -> None:
    x, y, teacher = teacher_data(seed=3)
    net = nn.Sequential(nn.Linear(20, 10))
    with torch.no_grad():
        net[0].weight.copy_(teacher.weight + 0.2 * torch.randn(10, 20, generator=torch.Generator().manual_seed(0)))
        net[0].bias.zero_()
    start = [LayerBits(4, 6)]
    acc = lambda n: accuracy(n, x, y)  # noqa: E731
    batches = list(zip(x.split(64), y.split(64)))
    searched = quantize.search_bits(net, start, acc, max_drop=0.01)
    torch.manual_seed(0)
    fitted, bits = quantize.fit_bits(net, start, acc, batches, max_drop=0.01, rounds=2, epochs=5, lr=3e-3)
    assert bits[0].total < searched[0].total, (bits, searched)  # (3, 1) against (3, 2)
    assert acc(quantized(fitted, bits)) >= acc(quantized(net, start)) - 0.01


def test_bad_arguments() -> None:
    net, bits = pruned_lenet()
    acc = lambda n: 0.5  # noqa: E731
    with pytest.raises(ValueError, match="3 layers"):
        quantize.search_bits(net, bits[:2], acc)
    with pytest.raises(TypeError, match="LayerBits"):
        quantize.train_on_grid(net, [(3, 4)] * 3, [], epochs=1)
    with pytest.raises(TypeError, match="accuracy_of"):
        quantize.search_bits(net, bits, 0.9)
    with pytest.raises(ValueError, match="max_drop"):
        quantize.search_bits(net, bits, acc, max_drop=5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantize.search_bits(net, bits, lambda n: 97.0)
    with pytest.raises(ValueError, match="epochs"):
        quantize.train_on_grid(net, bits, [], epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        quantize.train_on_grid(net, bits, [], epochs=1, lr=0.0)
    with pytest.raises(ValueError, match="passes"):
        quantize.search_bits(net, bits, acc, passes=0)
    with pytest.raises(ValueError, match="rounds"):
        quantize.fit_bits(net, bits, acc, [], rounds=0)


def test_fast_quantize_stage_writes_its_section_and_file(tmp_path, monkeypatch) -> None:
    """``reproduce --fast``, ``--finetune``, ``--quantize`` on synthetic MNIST-shaped tensors (tmp_path only):
    the headline file decodes to the net whose errors and bits the JSON records."""
    monkeypatch.setattr(reproduce, "load_data", synthetic_mnist)
    args = ["--fast", "--out", str(tmp_path), "--only", "lenet_300_100-nj"]
    reproduce.main(args)
    with pytest.raises(FileNotFoundError, match="run --finetune first"):
        reproduce.quantize_run("lenet_300_100", "nj", tmp_path)
    reproduce.main(args + ["--finetune"])
    reproduce.main(args + ["--quantize"])
    r = json.loads((tmp_path / "lenet_300_100-nj.json").read_text())
    q = r["quantized"]
    qs = reproduce._quantize_settings("lenet_300_100", True)
    ft = r["finetuned"]["points"]  # the fast margin takes every fine-tuned level, each at every budget
    ft_head = ft[r["finetuned"]["headline"]]  # fine-tuned again with seed 2: the same level, its own error
    assert [o["seed"] for o in ft_head["other_seeds"]] == [2]
    assert all(o["architecture"] == ft_head["architecture"] and o["rate_pruning"] == ft_head["rate_pruning"]
               for o in ft_head["other_seeds"])  # fmt: skip
    assert [(p["finetuned_level"], p["max_drop"]) for p in q["points"]] == [
        ({k: f[k] for k in ("max_drop", "first_round") if k in f}, d) for f in ft for d in qs["budgets"]]
    head = q["points"][q["headline"]]
    level = next(f for f in ft if f["max_drop"] == head["finetuned_level"]["max_drop"]
                 and f.get("first_round") == head["finetuned_level"].get("first_round"))
    assert q["thresholds"] == level["thresholds"] and head["rate_pruning"] == level["rate_pruning"]
    path = tmp_path / q["file"]
    assert path.stat().st_size == head["coded_bytes"]
    net = load_coded(path)
    _, _, test_b = reproduce._split("lenet_300_100", r["train_limit"], 128, r["seed"])
    assert 100 * (1 - evaluate(net, test_b)) == pytest.approx(head["error"], abs=1e-9)
    layers = [m for m in net if isinstance(m, nn.Linear)]
    for layer, (e, s) in zip(layers, head["bits"], strict=True):  # every weight on its grid, every bias on 10 bits
        assert torch.equal(round_to_bits(layer.weight, e, s), layer.weight)
        assert torch.equal(round_to_bits(layer.bias, 8, q["bias_significand"]), layer.bias)
    assert all(b[0] + b[1] <= r0[0] + r0[1] for b, r0 in zip(head["bits"], q["bits_rule"]))
    assert [o["seed"] for o in head["other_seeds"]] == qs["seeds"]
    first = path.read_bytes()
    reproduce.main(args + ["--quantize"])  # seeded: the same files again
    again = json.loads((tmp_path / "lenet_300_100-nj.json").read_text())["quantized"]
    drop = lambda points: [{k: v for k, v in p.items() if k != "seconds"} for p in points]  # noqa: E731
    assert drop(again["points"]) == drop(q["points"])
    assert path.read_bytes() == first
    calls = []  # LeNet-300-100's grids are distilled from the Bayesian net: the loss is called
    loss = quantize.distillation_loss
    monkeypatch.setattr(quantize, "distillation_loss", lambda *a, **k: calls.append(1) or loss(*a, **k))
    reproduce.main(args + ["--grid"])  # uniform grids on the same fine-tuned headline
    g = json.loads((tmp_path / "lenet_300_100-nj.json").read_text())["grid"]
    assert g["distil"] and calls
    head = g["points"][g["headline"]]
    assert [(p["level"], p["max_drop"]) for p in g["points"]] == [(p["level"], p["max_drop"]) for p in q["points"]]
    assert g["levels_missing"] == []  # the same levels and budgets as --quantize
    path = tmp_path / g["file"]
    assert path.stat().st_size == head["coded_bytes"]
    net = load_coded(path)
    assert 100 * (1 - evaluate(net, test_b)) == pytest.approx(head["error"], abs=1e-9)
    for layer, step in zip([m for m in net if isinstance(m, nn.Linear)], head["steps"], strict=True):
        assert torch.equal(uniform_grid.round_to_step(layer.weight, uniform_grid.GridStep(step)), layer.weight)
    assert [o["seed"] for o in head["other_seeds"]] == qs["seeds"]
    if g["held"] is not None:  # the smallest file that holds over its trainings, also written
        assert (tmp_path / g["held_file"]).stat().st_size == g["points"][g["held"]]["coded_bytes"]
    assert "Uniform grids on the fine-tuned headline" in (tmp_path / "table.md").read_text()


SHIPPED = sorted(p.stem for p in results_dir().glob("*-*.json"))
needs_mnist = pytest.mark.skipif(
    not (data_dir() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(), reason="MNIST not in BCLIB_DATA"
)


def test_every_shipped_run_has_fitted_bits() -> None:
    assert SHIPPED and all("quantized" in json.loads((results_dir() / f"{r}.json").read_text()) for r in SHIPPED)


# the shipped runs and the seed runs that have fitted bits (results/seeds/seedS/<run>.json)
FITTED = SHIPPED + sorted(str(p.relative_to(results_dir()).with_suffix("")) for p in results_dir().glob("seeds/*/*-*.json")
                          if "quantized" in json.loads(p.read_text()))  # fmt: skip


@needs_mnist
@pytest.mark.parametrize("run", FITTED)
def test_shipped_fitted_file_gives_its_recorded_error(run: str) -> None:
    """The shipped ``<run>-quantized.bc`` is the headline's file: its size, test error and bits,
    and the headline is the smallest file at or below the paper's error (else the lowest error)."""
    r = json.loads((results_dir() / f"{run}.json").read_text())
    q = r["quantized"]
    head = q["points"][q["headline"]]
    path = (results_dir() / run).parent / q["file"]
    assert path.stat().st_size == head["coded_bytes"]
    net = load_coded(path)
    error = 100 * (1 - evaluate(net, TensorBatches(*load_mnist(train=False), batch_size=1000)))
    assert error == pytest.approx(head["error"], abs=0.011)
    for layer, (e, s) in zip([m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))], head["bits"], strict=True):
        assert torch.equal(round_to_bits(layer.weight, e, s), layer.weight)
    paper = reproduce.PAPER[(r["arch"], r["prior"])]["error"]
    within = [p for p in q["points"] if p["error"] <= paper + 1e-9]
    assert head == (min(within, key=lambda p: p["coded_bytes"]) if within else min(q["points"], key=lambda p: p["error"]))


def test_fit_bits_on_a_pruned_residual_net_with_batchnorm() -> None:
    torch.manual_seed(0)
    model = randomise_batchnorm(models.to_bayesian(TinyResNet(), "nj")).eval()
    t = sparsify(model, 0.3)
    x = torch.randn(256, 3, 8, 8)
    pruned = prune(model, t, x[:1])
    with torch.no_grad():
        y = pruned(x).argmax(1)  # labels the pruned net gets right: accuracy 1 before rounding
    acc = lambda n: accuracy(n, x, y)  # noqa: E731
    start = compression_report(model, t, x[:1]).bits
    floor = acc(quantized(pruned, start)) - 0.05
    net, bits = quantize.fit_bits(pruned, start, acc, list(zip(x.split(32), y.split(32))), max_drop=0.05, epochs=2)
    assert net.bayesian_layer_names == pruned.bayesian_layer_names
    assert sum(b.total for b in bits) < sum(b.total for b in start)
    stored = quantized(net, bits, quantize.BIAS_SIGNIFICAND)
    assert acc(stored) >= floor
    for name, b in zip(stored.bayesian_layer_names, bits):
        w = stored.get_submodule(name).weight
        assert torch.equal(round_to_bits(w, b.exponent, b.significand), w)


def test_smallest_zeroed_counts_zeros_and_ties() -> None:
    """The mask zeroes the smallest magnitudes, the weight's zeros and the ties at the cut included."""
    w = torch.tensor([[0.1, -0.5, 0.2], [0.2, 3.0, -0.05]])
    assert quantize.smallest_zeroed(w, 0.0).eq(1).all()
    assert quantize.smallest_zeroed(w, 0.5).tolist() == [[0, 1, 0], [0, 1, 0]]  # the cut at 0.2 takes both 0.2s
    assert quantize.smallest_zeroed(torch.tensor([0.0, 0.0, 1.0, 2.0]), 0.5).tolist() == [0, 0, 1, 1]
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"in \[0, 1\) \(0.7: the smallest 70 %\)"):
            quantize.smallest_zeroed(w, bad)


@pytest.mark.parametrize("grid", ["fitted bits", "uniform grid"])
def test_zeros_stay_zero_through_training_and_in_the_stored_net(grid: str) -> None:
    """``zeros``: the masked weights get no gradient and are zero in the trained copy and its
    rounding; the others train; masks of ones change nothing, bit for bit; bad masks are refused."""
    x, y, _ = teacher_data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10))
    if grid == "fitted bits":
        spec = [LayerBits(3, 2), LayerBits(3, 2)]
        train = lambda zeros: quantize.train_on_grid(net, spec, TensorBatches(x, y, 128, shuffle=True), 2, 1e-2,
                                                     zeros=zeros)  # noqa: E731
        store = lambda n: quantized(n, spec)  # noqa: E731
    else:
        spec = [GridStep(0.05), GridStep(0.05)]
        train = lambda zeros: uniform_grid.train_on_steps(net, spec, TensorBatches(x, y, 128, shuffle=True), 2, 1e-2,
                                                          zeros=zeros)  # noqa: E731
        store = lambda n: uniform_grid.on_steps(n, spec)  # noqa: E731
    mask, before = quantize.smallest_zeroed(net[0].weight, 0.6), copy.deepcopy(net.state_dict())
    torch.manual_seed(1)
    out = train([0.6, 0.0])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # net left as it was
    assert torch.equal(out[0].weight[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert not torch.equal(out[0].weight[mask == 1], net[0].weight[mask == 1])  # the rest trained
    assert not torch.equal(out[2].weight, net[2].weight)
    assert (store(out)[0].weight == 0).float().mean() >= 0.6
    torch.manual_seed(1)
    plain = train(None)
    torch.manual_seed(1)
    ones = train([0.0, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ones.state_dict().values()))
    with pytest.raises(ValueError, match=r"one fraction per former group layer \(2\), e\.g\. \[0\.7\] \+ \[0\] \* 1"):
        train([0.5])
    with pytest.raises(ValueError, match="masks must match the former group layers.*quantize.zero_masks"):
        quantize.train_through(net, TensorBatches(x, y, 128), 1, 1e-2, lambda i, layer: nn.Identity(),
                               masks=[torch.ones(3), torch.ones(10, 16)])  # fmt: skip


def test_fit_steps_and_fit_bits_refuse_bad_zeros_before_their_search() -> None:
    net = nn.Sequential(nn.Linear(20, 10))
    never = lambda n: pytest.fail("searched before checking zeros")  # noqa: E731
    with pytest.raises(ValueError, match="one fraction per former group layer"):
        uniform_grid.fit_steps(net, never, [], zeros=[0.5, 0.5])
    with pytest.raises(ValueError, match="one fraction per former group layer"):
        quantize.fit_bits(net, [LayerBits(3, 2)], never, [], zeros=[0.5, 0.5])


def test_fit_bits_holds_its_zeros() -> None:
    x, y, _ = teacher_data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10))
    acc = lambda n: accuracy(n, x, y)  # noqa: E731
    out, bits = quantize.fit_bits(net, [LayerBits(3, 4)] * 2, acc, TensorBatches(x, y, 128, shuffle=True),
                                  max_drop=0.02, epochs=1, zeros=[0.5, 0.0])  # fmt: skip
    mask = quantize.smallest_zeroed(net[0].weight, 0.5)
    assert torch.equal(quantized(out, bits)[0].weight[mask == 0], torch.zeros(int((mask == 0).sum())))


