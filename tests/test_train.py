"""Objective, training loop, data loading and checkpoints."""
import os
import subprocess
import sys
import time

import pytest
import torch

from bclib import data, models, train
from bclib.config import data_dir

HAVE_MNIST = (data_dir() / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="MNIST not in BCLIB_DATA (set BCLIB_DATA=../shared/data)")


def test_elbo_loss_parts():
    torch.manual_seed(0)
    net = models.lenet_300_100("nj")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    logits = net(x)
    loss, ce, kl = train.elbo_loss(net, logits, y, n_data=60000)
    torch.testing.assert_close(loss, ce + kl / 60000)
    torch.testing.assert_close(kl, models.kl_divergence(net))
    assert train.kl_schedule(0, 5) == pytest.approx(0.2) and train.kl_schedule(10, 5) == 1.0
    assert [train.lr_factor(e, 10, 4) for e in (0, 6, 7, 9)] == [1.0, 1.0, 0.75, 0.25]
    assert train.lr_factor(3, 10, 0) == 1.0


def test_training_is_seeded_and_resumable(tmp_path):
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))

    def run(epochs, state=None, cooldown=0):
        torch.manual_seed(0)
        net = models.lenet_300_100("nj")
        batches = data.TensorBatches(x, y, 64, shuffle=True, generator=torch.Generator().manual_seed(0))
        hist = train.train(net, batches, epochs, n_data=256, lr_cooldown=cooldown, state_path=state, progress=False)
        return net, hist

    a, ha = run(2)
    b, hb = run(2)
    assert ha[-1]["loss"] == hb[-1]["loss"]
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # an interrupted run (1 epoch saved) resumes to the same history length
    _, h1 = run(1, tmp_path / "s.pt")
    _, h2 = run(2, tmp_path / "s.pt")
    assert len(h2) == 2 and h2[0] == h1[0]
    # going on with more epochs and a learning-rate cool-down equals having had them from the start
    c, hc = run(4, tmp_path / "s.pt", cooldown=2)
    d, hd = run(4, cooldown=2)
    assert [h["lr"] for h in hd] == [1e-3, 1e-3, 1e-3, 5e-4]
    for pc, pd in zip(c.parameters(), d.parameters()):
        assert torch.equal(pc, pd)


@pytest.mark.parametrize("prior, variance_dtype", [("nj", None), ("hs", None), ("nj", torch.bfloat16)])
def test_compiled_steps_train_as_eager_ones(prior, variance_dtype):
    """train(compile=True) against eager training, the oracle: same seed, same noise (drawn by
    the eager generator), so the same parameters after two epochs up to float rounding of the
    fused kernels (bfloat16 variance products: to bfloat16's rounding); the module keeps its
    own state_dict keys."""
    x, y = torch.randn(192, 1, 4, 4), torch.randint(0, 3, (192,))

    def run(compile):
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.ReLU(),
                                    torch.nn.Linear(12, 3))
        net = models.to_bayesian(plain, prior=prior, variance_dtype=variance_dtype)
        batches = data.TensorBatches(x, y, 64, shuffle=True, generator=torch.Generator().manual_seed(0))
        hist = train.train(net, batches, 2, n_data=192, kl_warmup=1, progress=False, compile=compile)
        return net, hist

    (eager, h_eager), (compiled, h_compiled) = run(False), run(True)
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert h_compiled[-1]["loss"] == pytest.approx(h_eager[-1]["loss"], rel=1e-5)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = models.lenet5_caffe("hs").eval()
    train.save_checkpoint(tmp_path / "c.pt", net, "lenet5_caffe", "hs", note="x")
    loaded, meta = train.load_checkpoint(tmp_path / "c.pt")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), net(x))
    assert meta == {"note": "x", "arch": "lenet5_caffe", "prior": "hs"}
    train.save_checkpoint(tmp_path / "h.pt", net, "lenet5_caffe", "hs", half=True)
    assert (tmp_path / "h.pt").stat().st_size < 0.6 * (tmp_path / "c.pt").stat().st_size
    half, _ = train.load_checkpoint(tmp_path / "h.pt")
    torch.testing.assert_close(half(x), net(x), atol=0.05, rtol=0.05)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    net = models.lenet_300_100("nj")
    good = tmp_path / "good.pt"
    train.save_checkpoint(good, net, "lenet_300_100", "nj")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        train.load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a bclib checkpoint"):
        train.load_checkpoint(other)
    mismatched = tmp_path / "mismatched.pt"
    state = torch.load(good, weights_only=True)
    state["prior"] = "hs"
    torch.save(state, mismatched)
    with pytest.raises(ValueError, match="does not match lenet_300_100 with prior 'hs'"):
        train.load_checkpoint(mismatched)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    train.atomic_save({"a": 1}, path)

    def broken_save(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        train.atomic_save({"a": 2}, path)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="BCLIB_DATA"):
        data.load_mnist(train=False, root=tmp_path / "nowhere", download=False)


def test_tensor_batches():
    x, y = torch.arange(10).float(), torch.arange(10)
    b = data.TensorBatches(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(b) == 3
    seen = torch.cat([yy for _, yy in b])
    assert sorted(seen.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="differ in length"):
        data.TensorBatches(x, y[:3])


@needs_mnist
def test_short_training_on_mnist_reaches_90_percent():
    """BCLIB_FAST-sized run: 10k images, one plain and one Bayesian epoch."""
    torch.manual_seed(0)
    xtr, ytr = data.load_mnist(True, limit=10000)
    xte, yte = data.load_mnist(False)
    assert xtr.shape == (10000, 1, 28, 28) and abs(xtr.mean().item()) < 0.1
    batches = data.TensorBatches(xtr, ytr, 128, shuffle=True)
    plain = models.lenet_300_100(None)
    train.train(plain, batches, 1, progress=False)
    net = models.to_bayesian(plain, "nj")
    t0 = time.perf_counter()
    train.train(net, batches, 1, n_data=60000, progress=False)
    acc = train.evaluate(net, data.TensorBatches(xte, yte, 1000))
    print(f"accuracy {acc:.4f}, Bayesian epoch on 10k images {time.perf_counter() - t0:.1f}s")
    assert acc > 0.9


def test_save_checkpoint_checks_the_architecture(tmp_path):
    net = models.lenet_300_100("nj")
    with pytest.raises(ValueError, match="unknown architecture"):
        train.save_checkpoint(tmp_path / "a.pt", net, "lenet_9", "nj")
    with pytest.raises(ValueError, match="is not lenet5_caffe with prior 'nj'"):
        train.save_checkpoint(tmp_path / "a.pt", net, "lenet5_caffe", "nj")
    assert not (tmp_path / "a.pt").exists()
    train.save_checkpoint(tmp_path / "a.pt", net, "lenet_300_100", "nj")
    model, _ = train.load_checkpoint(tmp_path / "a.pt", device="meta")
    assert next(model.parameters()).device.type == "meta"


def test_recalibrate_batchnorm_averages_eval_mode_statistics():
    """Oracle: BatchNorm's running statistics equal the statistics of its inputs at the posterior means."""
    torch.manual_seed(0)
    net = models.to_bayesian(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3)))
    xs = [torch.randn(8, 1, 6, 6) for _ in range(3)]
    train.recalibrate_batchnorm(net, [(x, None) for x in xs + xs], n_batches=3)
    with torch.no_grad():
        h = torch.cat([net[0].eval()(x) for x in xs])  # the conv at its posterior means
    torch.testing.assert_close(net[1].running_mean, h.mean((0, 2, 3)))
    batch_vars = torch.stack([net[0](x).var((0, 2, 3), unbiased=True) for x in xs])
    torch.testing.assert_close(net[1].running_var, batch_vars.mean(0))
    assert not net.training and net[1].momentum == 0.1


@pytest.mark.parametrize("setting, flushed", [(None, True), ("0", False)])
def test_importing_bclib_flushes_subnormals_in_every_thread(setting, flushed):
    """1e-30 * 1e-10 is subnormal in float32: zero where flushing is on, in the worker threads too
    (a tensor large enough to be split between two threads); BCLIB_FLUSH_DENORMAL=0 keeps it."""
    code = ("import bclib, torch; torch.set_num_threads(2); "
            "print((torch.full((1 << 22,), 1e-30) * 1e-10).count_nonzero().item())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "BCLIB_FLUSH_DENORMAL"}
    if setting is not None:
        env["BCLIB_FLUSH_DENORMAL"] = setting
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) == (0 if flushed else 1 << 22)
