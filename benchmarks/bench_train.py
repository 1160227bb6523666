"""Training-step cost of the Bayesian layers against the plain network, as ratios from one run.

    python benchmarks/bench_train.py [--arch lenet_300_100] [--steps 100] [--repeats 5] [--profile] [--compile]

Each network is trained with the same loop (bclib.train.train: Adam, lr 1e-3, batch 128,
data preloaded as tensors) on the same random MNIST-shaped batches. Rounds alternate between
the networks, so machine load hits all of them alike; the median time per step is reported.

It counts the ATen operators a step dispatches (each costs a few microseconds of fixed overhead),
and times what a Bayesian step cannot avoid: its matrix products (forward and backward
of every linear/conv layer, no element-wise work, no optimiser: one per layer for the plain
net, two, for means and variances, for the Bayesian one, whose first layer also needs its
input gradients because ``z`` scales the inputs) and its noise (one normal draw per example
and group for ``z``, one per pre-activation). ``(plain step - plain products + Bayesian
products + noise) / plain step`` is the ratio a Bayesian step would reach if all its other
work were free: a floor for any implementation on this machine. A second floor adds what
Adam must do more for the Bayesian parameters (means, log-variances and scales: twice the
plain net's count): the Adam step of each net, timed alone. ``--profile`` adds, for the
plain and the normal-Jeffreys step (and its compiled step with ``--compile``), the operators
that take the most time (torch.profiler).
The ``bfloat16 variances`` rows run the normal-Jeffreys net's variance products in bfloat16
(``variance_dtype``, :mod:`bclib.lrt`); the floors are those of float32 products. Where the
CPU has no native bfloat16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is False) those
rows are slower, not faster. ``--compile`` adds the plain, both Bayesian nets and the bfloat16
one trained with ``train(compile=True)`` (forward pass and KL compiled by ``torch.compile``;
the first round, which compiles, is not counted), their ratios to the eager plain step and to
the compiled plain step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bclib import data, models, train

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def time_steps(net: torch.nn.Module, batches: data.TensorBatches, compile: bool = False) -> float:
    """Seconds per training step for one pass over ``batches``."""
    t0 = time.perf_counter()
    train.train(net, batches, 1, n_data=60000, progress=False, compile=compile)
    return (time.perf_counter() - t0) / len(batches)


def products_seconds(plain: nn.Sequential, x: torch.Tensor, bayesian: bool, repeats: int = 20) -> float:
    """Median seconds for the forward and backward products of one step (see the module doc)."""
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append((m, i[0].detach())))
             for m in plain.modules() if isinstance(m, _WEIGHTED)]  # fmt: skip
    plain(x)
    for h in hooks:
        h.remove()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for i, (layer, a) in enumerate(inputs):
            a = a.requires_grad_(bayesian or i > 0)  # a plain first layer needs no input gradient
            outs = [layer(a), layer(a * a)] if bayesian else [layer(a)]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def adam_seconds(net: nn.Module, repeats: int = 100) -> float:
    """Median seconds of one Adam step (fused, as ``bclib.train.train``) over ``net``'s parameters."""
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=0.0, fused=True)  # lr 0: the net is left as it was
    times = []
    for _ in range(repeats + 10):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    for p in params:
        p.grad = None
    return statistics.median(times[10:])


def noise_seconds(bayes: nn.Sequential, x: torch.Tensor, repeats: int = 20) -> float:
    """Median seconds to draw the standard normal noise of one training step of ``bayes``."""
    counts = []
    hooks = [m.register_forward_hook(lambda m, i, o: counts.append(o.numel() + len(i[0]) * m.num_groups))
             for m in models.bayesian_layers(bayes)]  # fmt: skip
    with torch.no_grad():
        bayes.train()(x)
    for h in hooks:
        h.remove()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.randn(sum(counts))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="lenet_300_100", choices=sorted(models.ARCHITECTURES))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="also list the costliest operators per step")
    ap.add_argument("--compile", action="store_true", help="also time the nets trained with train(compile=True)")
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.steps * args.batch_size
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    batches = data.TensorBatches(x, y, args.batch_size, shuffle=True)
    priors = {"plain": None, "nj": "nj", "hs": "hs", "nj, bfloat16 variances": "nj"}
    nets = {k: models.build(args.arch, p) for k, p in priors.items()}
    compiled = {f"{k}, compiled": models.build(args.arch, p) for k, p in priors.items()} if args.compile else {}
    nets.update(compiled)
    for k, net in nets.items():
        if "bfloat16" in k:
            for layer in models.bayesian_layers(net):
                layer.variance_dtype = torch.bfloat16
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(args.repeats + 1):  # the first round warms up (and compiles)
        for k, net in nets.items():
            times[k].append(time_steps(net, batches, compile=k in compiled))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"{args.arch}, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"native bfloat16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print("| network | ms per step | ratio to plain | ratio to compiled plain | aten operators per step |\n"
          "| --- | --- | --- | --- | --- |")
    few = data.TensorBatches(x[: 10 * args.batch_size], y[: 10 * args.batch_size], args.batch_size)
    for k, t in med.items():
        ops = "–" if k in compiled else f"{aten_ops_per_step(nets[k], few):.0f}"  # compiled kernels bypass ATen
        to_compiled = f"{t / med['plain, compiled']:.2f}x" if compiled else "–"
        print(f"| {k} | {1000 * t:.2f} | {t / med['plain']:.2f}x | {to_compiled} | {ops} |")
    x1 = x[: args.batch_size]
    mm_plain, mm_bayes = products_seconds(nets["plain"], x1, False), products_seconds(nets["plain"], x1, True)
    noise = noise_seconds(nets["nj"], x1)
    adam_plain, adam_bayes = adam_seconds(nets["plain"]), adam_seconds(nets["nj"])
    floor = (med["plain"] - mm_plain + mm_bayes + noise) / med["plain"]
    print(f"\nper step: matrix products plain {1000 * mm_plain:.2f} ms, Bayesian {1000 * mm_bayes:.2f} ms "
          f"({mm_bayes / mm_plain:.2f}x); noise draws {1000 * noise:.2f} ms; "
          f"floor for the Bayesian step: {floor:.2f}x plain")
    print(f"Adam step plain {1000 * adam_plain:.2f} ms, normal-Jeffreys {1000 * adam_bayes:.2f} ms; "
          f"floor with Adam: {floor + (adam_bayes - adam_plain) / med['plain']:.2f}x plain")  # fmt: skip
    if args.profile:
        for k in ("plain", "nj") + (("nj, compiled",) if compiled else ()):
            print(f"\n{k}: operators by self CPU time over {len(batches)} steps")
            print(profile_steps(nets[k], batches, compile=k in compiled))


def aten_ops_per_step(net: torch.nn.Module, batches: data.TensorBatches) -> float:
    """ATen operators dispatched per training step (forward, backward, optimiser), counted over one pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            nonlocal count
            count += 1
            return func(*args, **(kwargs or {}))

    with Count():
        train.train(net, batches, 1, n_data=60000, progress=False)
    return count / len(batches)


def profile_steps(net: torch.nn.Module, batches: data.TensorBatches, rows: int = 15, compile: bool = False) -> str:
    """torch.profiler's table of the costliest operators over one pass of training steps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        time_steps(net, batches, compile)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


if __name__ == "__main__":
    main()
