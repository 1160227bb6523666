"""CPU inference and storage: dense LeNet vs the pruned net vs the compressed file reloaded.

    python benchmarks/bench_inference.py [--arch lenet_300_100 lenet5_caffe] [--threads 1] [--repeats 30] [--json PATH]

For each shipped Bayesian checkpoint ``results/<arch>-<prior>.pt`` whose run has finished
(thresholds in ``results/<arch>-<prior>.json``) it compares three networks:

- dense: the plain LeNet at full size holding the posterior means ``E[w]``;
- pruned: ``bclib.compression.prune`` at the run's thresholds (float32 weights);
- reloaded: that net written by ``bclib.export.export_compressed`` and read back by
  ``bclib.load_compressed`` (weights rounded to the report's bits).

The dense and the pruned net also run rewritten for eager PyTorch (``bclib.runtime.faster_eager``:
2x2 max pools as maxima of strided views, layers called as functions, ReLU in place; bit for bit
the same), rewritten so with their hidden fully connected widths padded to multiples of 16
(``faster_eager x16``: the same to float rounding), so and with the fully connected weights
stored transposed (``faster_eager x16 Wt``: ``transposed=True``), rewritten and run on slices of 128 examples
(``bclib.runtime.InChunks``: tensors small enough for the allocator to reuse), so with each
convolution's kernel tuned at the batch's shape, the slice's above 128 (``in slices, tuned``:
``bclib.runtime.tune_convolutions``, made again at each batch size; the kernels chosen are
printed) and in onnxruntime (``bclib.runtime.OnnxRuntimeNet``, as many threads). Timings are medians over
``--repeats`` interleaved runs after a warm-up, under ``torch.inference_mode``; speed-ups are
dense time / compressed time from the same run and the same runtime, set beside the ratio of
multiply-adds (MACs) of the linear and conv layers and
the ratio of their activations (values written, which ReLU and pooling read: ``cost.activations``).
A floor: reading the input once (``x.sum()``) plus the pruned net's products alone (each
``F.linear`` and convolution, on the kernel the runtime chose, called on the input it saw),
timed in the same rounds, in the PyTorch runtime fastest for the dense net in the runs of benchmarks/README.md
(``faster_eager x16 Wt`` for the fully connected nets, ``in slices, tuned`` for the
convolutional ones, its products on the same slices); dense time in that runtime / floor is the
speed-up the pruned net would reach there if its input selection, ReLUs, pooling and calls were
free. It cannot skip reading the input: the kept pixels of a fully connected net lie on nearly
all of the input's cache lines, and a convolution reads them all.
``--profile`` lists where the pruned net's time goes at the largest batch, in eager PyTorch as
``prune`` builds it and after ``faster_eager(net, width_multiple=16)``; ``--compile`` adds
``torch.compile`` (inductor, static shapes) of the ``faster_eager`` nets as a runtime. Sizes: the
dense float32 state (weights + biases), the compressed file, the achieved rate (dense
weight bytes / file bytes) and ``compression_report``'s theoretical ``rate_precision``
(weights only, no header, spec or biases). Test errors on MNIST need ``BCLIB_DATA``.
An architecture without a finished run falls back to a freshly initialised Bayesian net
with hand-set ``log_alpha`` (the paper's kept architecture, random weights), marked so.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bclib import compression, cost, models
from bclib.atomic import atomic_write
from bclib.compression import compression_report, prune, quantized
from bclib.config import results_dir
from bclib.data import load_mnist
from bclib.export import export_compressed
from bclib.load_compressed import load_compressed
from bclib.runtime import CONVOLUTION_KERNELS, InChunks, OnnxRuntimeNet, chosen_kernels, faster_eager, tune_convolutions
from bclib.train import load_checkpoint

BATCH_SIZES = (1, 64, 1024)
PRIORS = ("nj", "hs")
# Fallback: share of groups pruned per layer, so that the kept groups match the paper's
# BC-GNJ architectures (LeNet-300-100: 278-98-13; LeNet-5-Caffe: 8-13-88-13).
FALLBACK_PRUNED = {"lenet_300_100": [1 - 278 / 784, 1 - 98 / 300, 1 - 13 / 100],
                   "lenet5_caffe": [1 - 8 / 20, 1 - 13 / 50, 1 - 88 / 208, 1 - 13 / 500]}  # fmt: skip
WEIGHTED = (nn.Linear, nn.Conv2d)
# Other ways to run the dense and the pruned net: name -> f(net, example input, threads).
RUNTIMES = {"faster_eager": lambda net, x, threads: faster_eager(net),
            "faster_eager x16": lambda net, x, threads: faster_eager(net, width_multiple=16),
            "faster_eager x16 Wt": lambda net, x, threads: faster_eager(net, width_multiple=16, transposed=True),
            "faster_eager in slices": lambda net, x, threads: InChunks(faster_eager(net), 128),
            "onnxruntime": OnnxRuntimeNet}  # fmt: skip
# The floor times the products of this runtime's pruned net; its dense time over the floor: the bound.
FLOOR_RUNTIME = {"fully connected": "faster_eager x16 Wt", "convolutional": "in slices, tuned"}
COMPILED = {"torch.compile": lambda net, x, threads: torch.compile(faster_eager(net), dynamic=False)}  # --compile
# Made again at every batch size from that batch: "in slices" with each convolution's kernel tuned at the slice's shape.
PER_BATCH = {"in slices, tuned": lambda net, x, threads: InChunks(tune_convolutions(faster_eager(net), x[:128]), 128)}


@dataclass
class Case:
    """One Bayesian network to compress, and where it came from."""

    name: str
    source: str
    model: nn.Sequential
    thresholds: list[float]


@dataclass
class Row:
    name: str
    source: str
    architecture: str
    macs_dense: int
    macs_compressed: int
    activations_dense: int
    activations_compressed: int
    dense_state_bytes: int
    dense_weight_bytes: int
    file_bytes: int
    rate_achieved: float
    rate_precision: float
    error_reloaded: Optional[float] = None
    error_quantized: Optional[float] = None
    timings_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    floor_runtime: str = ""  # the runtime of the floor's products (:func:`floor_runtime`)
    kernels: dict[int, dict[str, list[str]]] = field(default_factory=dict)  # PER_BATCH's tuned convolutions

    @property
    def mac_ratio(self) -> float:
        return self.macs_dense / max(self.macs_compressed, 1)

    @property
    def activation_ratio(self) -> float:
        return self.activations_dense / max(self.activations_compressed, 1)


def shipped_cases(results: Path, archs: Sequence[str] = tuple(FALLBACK_PRUNED)) -> list[Case]:
    """Finished runs in ``results``; a hand-pruned fresh net for an architecture without any."""
    cases = []
    for arch in archs:  # the MNIST nets; bench_any_network.py times VGG and ResNet
        found = []
        for prior in PRIORS:
            ckpt, summary = results / f"{arch}-{prior}.pt", results / f"{arch}-{prior}.json"
            if ckpt.is_file() and summary.is_file():
                model, _ = load_checkpoint(ckpt)
                found.append(Case(f"{arch}-{prior}", str(ckpt), model, json.loads(summary.read_text())["thresholds"]))
        cases += found or [fallback_case(arch)]
    return cases


def fallback_case(arch: str, seed: int = 0) -> Case:
    """A fresh BC-GNJ net whose pruned groups get ``log_alpha = z_logvar - log z_mu^2 ≈ 4`` (threshold 0)."""
    torch.manual_seed(seed)
    model = models.build(arch, "nj").eval()
    layers = models.bayesian_layers(model)
    with torch.no_grad():
        for layer, share in zip(layers, FALLBACK_PRUNED[arch]):
            z_logvar = layer.scale.z_logvar
            z_logvar[torch.randperm(z_logvar.numel())[: round(share * z_logvar.numel())]] = 4.0
    return Case(f"{arch}-nj", "FALLBACK: fresh net, random weights, hand-set log_alpha", model, [0.0] * len(layers))


def test_error(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        pred = torch.cat([net(xb).argmax(1) for xb in x.split(1000)])
    return 100.0 * (pred != y).float().mean().item()


def benchmark(case: Case, repeats: int, threads: int, mnist: Optional[tuple[torch.Tensor, torch.Tensor]],
              tmp: Path, runtimes: dict = RUNTIMES, per_batch: dict = PER_BATCH) -> Row:  # fmt: skip
    report = compression_report(case.model, case.thresholds)
    dense, pruned = compression.dense(case.model), prune(case.model, case.thresholds)
    path = tmp / f"{case.name}.bclb"
    file_bytes = export_compressed(case.model, case.thresholds, path)
    reloaded = load_compressed(path)
    dense_weights = sum(m.weight.numel() for m in dense.modules() if isinstance(m, WEIGHTED))
    one = torch.randn(1, 1, 28, 28)
    row = Row(
        name=case.name, source=case.source,
        architecture="-".join(f"{i}x{o}" for i, o in report.architecture),
        macs_dense=cost.macs(dense, one), macs_compressed=cost.macs(reloaded, one),
        activations_dense=cost.activations(dense, one), activations_compressed=cost.activations(reloaded, one),
        dense_state_bytes=4 * sum(p.numel() for p in dense.parameters()), dense_weight_bytes=4 * dense_weights,
        file_bytes=file_bytes, rate_achieved=4 * dense_weights / file_bytes, rate_precision=report.rate_precision,
    )  # fmt: skip
    if mnist is not None:
        row.error_reloaded = test_error(reloaded, *mnist)
        row.error_quantized = test_error(quantized(pruned, report.bits), *mnist)
    row.floor_runtime = floor_runtime(pruned)
    nets = {"dense": dense, "pruned": pruned, "reloaded": reloaded}
    for runtime, make in runtimes.items():
        nets[f"dense {runtime}"], nets[f"pruned {runtime}"] = make(dense, one, threads), make(pruned, one, threads)
    for b in BATCH_SIZES:
        x = torch.randn(b, 1, 28, 28)
        for runtime, make in per_batch.items():
            nets[f"dense {runtime}"], nets[f"pruned {runtime}"] = make(dense, x, threads), make(pruned, x, threads)
            row.kernels[b] = {k: chosen_kernels(nets[f"{k} {runtime}"].net) for k in ("dense", "pruned")}
        floor = {}
        if f"pruned {row.floor_runtime}" in nets:
            floor = {"read input": torch.sum, "pruned products": Products(nets[f"pruned {row.floor_runtime}"], x)}
        row.timings_ms[b] = cost.time_forward({**nets, **floor}, x, repeats)
    return row


def floor_runtime(pruned: nn.Module) -> str:
    """The runtime whose products make the floor (:data:`FLOOR_RUNTIME`)."""
    conv = any(isinstance(m, nn.Conv2d) for m in pruned.modules())
    return FLOOR_RUNTIME["convolutional" if conv else "fully connected"]


class Products:
    """The linear and convolution calls of ``net(x)`` (a ``faster_eager`` graph, or ``InChunks`` of
    one: the calls of every slice) called alone on their recorded inputs."""

    def __init__(self, net: nn.Module, x: torch.Tensor) -> None:
        self.calls: list[tuple] = []
        calls, products = self.calls, {F.linear, *CONVOLUTION_KERNELS}

        class Recorder(torch.fx.Interpreter):
            def call_function(self, target, args, kwargs):  # type: ignore[no-untyped-def]
                if target in products:
                    calls.append((target, args, kwargs))
                return super().call_function(target, args, kwargs)

        graph, slices = (net.net, x.split(net.size)) if isinstance(net, InChunks) else (net, [x])
        with torch.inference_mode():
            for xs in slices:
                Recorder(graph).run(xs)

    def __call__(self, x: torch.Tensor) -> None:
        for target, args, kwargs in self.calls:
            target(*args, **kwargs)


def markdown(rows: list[Row], others: Sequence[str] = tuple(RUNTIMES)) -> str:
    err = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    out = ["| model | kept (in x out per layer) | MACs dense / compressed | dense state bytes | file bytes "
           "| achieved rate | theoretical rate_precision | test error % reloaded / quantized |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        out.append(f"| {r.name} | {r.architecture} | {r.macs_dense:,} / {r.macs_compressed:,} (x{r.mac_ratio:.1f}) | "
                   f"{r.dense_state_bytes:,} | {r.file_bytes:,} | x{r.rate_achieved:.1f} | x{r.rate_precision:.1f} | "
                   f"{err(r.error_reloaded)} / {err(r.error_quantized)} |")  # fmt: skip
    runtimes = ["eager", *others]
    out += ["", f"Runtimes: {', '.join(runtimes)}; speed-up = dense time / pruned time in the same runtime.", "",
            f"| model | batch | dense ms ({' / '.join(runtimes)}) | pruned ms | reloaded ms (eager) "
            "| speed-up | MAC ratio | activation ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        for b, t in r.timings_ms.items():
            d = [t["dense"]] + [t[f"dense {k}"] for k in others]
            p = [t["pruned"]] + [t[f"pruned {k}"] for k in others]
            out.append(f"| {r.name} | {b} | {' / '.join(f'{v:.3f}' for v in d)} | {' / '.join(f'{v:.3f}' for v in p)} | "
                       f"{t['reloaded']:.3f} | {' / '.join(f'x{u / v:.2f}' for u, v in zip(d, p))} | "
                       f"x{r.mac_ratio:.1f} | x{r.activation_ratio:.1f} |")  # fmt: skip
    out += ["", "Floor: read the input + the pruned products alone; bound = dense time in the floor's runtime / floor.",
            "", "| model | runtime | batch | read input ms | pruned products ms | floor ms | pruned ms | dense ms "
            "| bound speed-up | bound / MAC ratio |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        for b, t in r.timings_ms.items():
            if "read input" not in t:
                continue
            floor = t["read input"] + t["pruned products"]
            dense, pruned = t[f"dense {r.floor_runtime}"], t[f"pruned {r.floor_runtime}"]
            out.append(f"| {r.name} | {r.floor_runtime} | {b} | {t['read input']:.3f} | {t['pruned products']:.3f} | "
                       f"{floor:.3f} | {pruned:.3f} | {dense:.3f} | x{dense / floor:.2f} | "
                       f"{100 * dense / floor / r.mac_ratio:.0f} % |")  # fmt: skip
    return "\n".join(out)


def profile_pruned(case: Case, batch: int, padded: bool = False, rows: int = 8) -> str:
    """torch.profiler's table of the pruned net's costliest operators at ``batch`` (eager PyTorch)."""
    net, x = prune(case.model, case.thresholds), torch.randn(batch, 1, 28, 28)
    if padded:
        net = faster_eager(net, width_multiple=16)
    with torch.inference_mode():
        net(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                net(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def mnist_test_set() -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    try:
        return load_mnist(False, download=False)
    except FileNotFoundError as err:
        print(f"no MNIST test set, test errors skipped: {err}")
        return None


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", choices=list(FALLBACK_PRUNED), default=list(FALLBACK_PRUNED),
                    help="networks to time (default both)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per net and batch size (median reported)")
    ap.add_argument("--results", type=Path, default=results_dir(), help="folder of the shipped runs")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--profile", action="store_true", help="also list the pruned nets' costliest operators at batch 1024")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the faster_eager nets")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = shipped_cases(args.results, args.arch)
    mnist = mnist_test_set()
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = {**RUNTIMES, **(COMPILED if args.compile else {})}
        rows = [benchmark(c, args.repeats, args.threads, mnist, Path(tmp), runtimes) for c in cases]
    runtimes.update(PER_BATCH)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"median of {args.repeats} runs\n")  # fmt: skip
    for r in rows:
        print(f"- {r.name}: {r.source}")
    print()
    print(markdown(rows, list(runtimes)))
    print("\nTuned convolution kernels (dense; pruned) per batch size:")
    for r in rows:
        if any(k["dense"] for k in r.kernels.values()):
            print(f"- {r.name}: " + ", ".join(f"{b}: {'/'.join(k['dense'])}; {'/'.join(k['pruned'])}"
                                              for b, k in r.kernels.items()))  # fmt: skip
    if args.profile:
        for c in cases:
            for padded in (False, True):
                how = "faster_eager(net, width_multiple=16)" if padded else "eager"
                print(f"\n{c.name}, pruned, {how}, batch {BATCH_SIZES[-1]}: operators by self CPU time over 10 passes")
                print(profile_pruned(c, BATCH_SIZES[-1], padded))
    if args.json is not None:
        settings = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
        text = json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=2)
        atomic_write(args.json, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
