"""The shipped runs in results/: each checkpoint reproduces the errors its JSON records."""
import json

import pytest
import torch

from bclib import baselines, compression, reproduce, results
from bclib.config import data_dir, results_dir
from bclib.data import TensorBatches, load_mnist
from bclib.train import evaluate, load_checkpoint

RUNS = sorted(p.stem for p in results_dir().glob("*-*.json"))
pytestmark = pytest.mark.skipif(
    not (data_dir() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(), reason="MNIST not in BCLIB_DATA"
)


@pytest.fixture(scope="module")
def test_batches():
    return TensorBatches(*load_mnist(train=False), batch_size=1000)


def test_all_four_runs_are_shipped():
    assert RUNS == ["lenet5_caffe-hs", "lenet5_caffe-nj", "lenet_300_100-hs", "lenet_300_100-nj"]


@pytest.mark.parametrize("run", RUNS)
def test_shipped_run_reproduces_its_errors(run, test_batches):
    r = json.loads((results_dir() / f"{run}.json").read_text())
    bayes, meta = load_checkpoint(results_dir() / f"{run}.pt")
    assert (meta["arch"], meta["prior"]) == (r["arch"], r["prior"])
    error = lambda net: 100 * (1 - evaluate(net, test_batches))  # noqa: E731
    assert error(bayes) == pytest.approx(r["error_bayes"], abs=0.011)
    report = compression.compression_report(bayes, r["thresholds"])
    assert report.rate_precision == pytest.approx(r["rate_precision"], rel=1e-6)
    pruned = compression.prune(bayes, r["thresholds"])
    assert error(pruned) == pytest.approx(r["error_pruned"], abs=0.011)
    assert error(reproduce.quantized(pruned, report.bits)) == pytest.approx(r["error_compressed"], abs=0.011)
    shipped = torch.load(results_dir() / f"{run}-pruned.pt", weights_only=False)
    assert error(shipped) == pytest.approx(r["error_pruned"], abs=0.011)
    assert [p["max_drop"] for p in r["tradeoff"]] == list(reproduce.BUDGETS)
    assert r["tradeoff"][-1]["thresholds"] == r["thresholds"]  # the headline is the last budget
    for p in r["tradeoff"][:-1]:
        report = compression.compression_report(bayes, p["thresholds"])
        assert report.rate_precision == pytest.approx(p["rate_precision"], rel=1e-6)
        quantized = reproduce.quantized(compression.prune(bayes, p["thresholds"]), report.bits)
        assert error(quantized) == pytest.approx(p["error_compressed"], abs=0.011)


@pytest.mark.parametrize("run", RUNS)
def test_shipped_baselines_reproduce(run, test_batches):
    """The recorded baselines (bclib.baselines): fixed thresholds and the norm ranking, from the checkpoint."""
    r = json.loads((results_dir() / f"{run}.json").read_text())
    b = r["baselines"]
    assert [p["max_drop"] for p in b["norm"]] == [p["max_drop"] for p in b["plain"]] == list(reproduce.BUDGETS)
    bayes, _ = load_checkpoint(results_dir() / f"{run}.pt")
    x = torch.zeros(1, 1, 28, 28)
    fixed = {p["fixed_threshold"]: p for p in b["fixed"]}
    want = fixed[-3.0]
    got = baselines.point(bayes, want["thresholds"], test_batches, x)
    assert got["rate_pruning"] == pytest.approx(want["rate_pruning"], rel=1e-6)
    assert got["error_compressed"] == pytest.approx(want["error_compressed"], abs=0.011)
    norm = b["norm"][-1]
    got = baselines.point(baselines.ranked_by(bayes, baselines.neg_log_group_norm), norm["thresholds"], test_batches, x)
    assert got["rate_precision"] == pytest.approx(norm["rate_precision"], rel=1e-6)
    assert got["error_compressed"] == pytest.approx(norm["error_compressed"], abs=0.011)


SEEDS = sorted(results_dir().glob("seeds/seed*"))


def test_seed_runs_are_shipped_and_agree_with_their_checkpoints():
    """More training seeds (results/seeds/seedS, from reproduce --seed S): every run with
    seeds 2 and 3, LeNet-300-100 with seeds 4 and 5 too, each with the shipped run's recipe, its
    JSON's compression numbers at every budget those its checkpoint gives."""
    assert [p.name for p in SEEDS] == ["seed2", "seed3", "seed4", "seed5"]
    for arch, prior in results.MNIST_RUNS:
        runs = results.seed_runs(arch, prior)  # checks JSON == checkpoint at every budget
        assert sorted(runs) == ([1, 2, 3, 4, 5] if arch == "lenet_300_100" else [1, 2, 3])
        for r in runs.values():
            assert r["epochs"] == runs[1]["epochs"] and not r["fast"]
