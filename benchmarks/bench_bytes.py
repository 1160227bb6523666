"""Bytes of every shipped run, held against the KL: dense, bit-packed, lzma, entropy-coded.

    BCLIB_DATA=../shared/data python benchmarks/bench_bytes.py [--results results] [--only lenet5_caffe-nj]

For each shipped run (``results/<arch>-<prior>.json`` and ``.pt``) and each point of its
error-compression trade-off (the thresholds of every budget; the headline is the last) it
measures, for the network of ``quantized(prune(model, thresholds), bits)``:

- the dense float32 net (weights and biases) and its weights alone;
- the bit-packed file of ``bclib.export.export_compressed``, and lzma (xz, preset 9e; and the
  raw LZMA2 stream without the xz container) over it: the general-purpose baseline;
- the entropy-coded file of ``bclib.coded.export_coded`` (best model per layer) and, at the
  headline, the files with one model forced on every layer, and the weights' code length
  under the parametric models (quantized Laplace, Gaussian) that the format leaves out;
- the bit count of ``compression_report`` (kept weights times their bits, weights only);
- the KL of the kept posterior in bits (``bclib.coded.kept_kl``: normal-Jeffreys scales
  counted with Sparse VD's constant, a group with ``alpha -> inf`` costing 0) and the
  significand bits below the posterior's noise (``bclib.coded.bits_below_noise``);
- the test error of the decoded file and of the quantized net (they must agree);
- where ``reproduce --quantize`` ran, its headline file ``results/<run>-quantized.bc`` (the
  fine-tuned net with bits fitted to the data), and where ``--grid`` ran,
  ``results/<run>-grid.bc`` (on uniform grids): size, decoded test error, lzma over it.

It writes each run's headline file to ``results/<arch>-<prior>.bc``, all numbers to
``results/bytes.json`` (atomically) and prints the tables. Time is not measured.
"""
from __future__ import annotations

import argparse
import json
import lzma
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from bclib import coded, compression
from bclib.atomic import atomic_write
from bclib.config import results_dir
from bclib.export import export_compressed
from bclib.load_coded import load_coded
from bclib.paper import PAPER
from bclib.results import BYTES_GOALS, MNIST_RUNS, Run, load_runs, nearest_to_paper
from bench_inference import mnist_test_set  # the sibling script (python puts its folder on sys.path)

WEIGHTED = (nn.Linear, nn.Conv2d)


def test_error(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        pred = torch.cat([net(xb).argmax(1) for xb in x.split(1000)])
    return 100.0 * (pred != y).float().mean().item()


def lzma_sizes(data: bytes) -> dict[str, int]:
    """lzma over ``data``: the xz file, and the raw LZMA2 stream (no container, no checksum)."""
    raw = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    return {"xz": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
            "lzma2_raw": len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=raw))}  # fmt: skip


def measure(run: Run, thresholds: list[float], tmp: Path, mnist: Optional[tuple[torch.Tensor, torch.Tensor]],
            headline: bool) -> tuple[dict[str, Any], coded.Encoded]:  # fmt: skip
    """Every size and code length of one point (one set of thresholds) of a run, and its coded file."""
    model = run.model
    report = compression.compression_report(model, thresholds)
    pruned = compression.prune(model, thresholds)
    quant = compression.quantized(pruned, report.bits)
    dense = compression.dense(model)
    packed = export_compressed(model, thresholds, tmp / "m.bclb")
    enc = coded.export_coded(model, thresholds, tmp / "m.bc")
    kl = coded.kept_kl(model, thresholds)
    noise = coded.bits_below_noise(model, thresholds)
    point: dict[str, Any] = {
        "thresholds": thresholds,
        "architecture": report.architecture,
        "bits": [[b.exponent, b.significand] for b in report.bits],
        "weights_kept": report.weights_kept,
        "dense_bytes": 4 * sum(p.numel() for p in dense.parameters()),
        "dense_weight_bytes": 4 * sum(m.weight.numel() for m in dense.modules() if isinstance(m, WEIGHTED)),
        "bitpacked_bytes": packed,
        "lzma_over_bitpacked": lzma_sizes((tmp / "m.bclb").read_bytes()),
        "coded_bytes": enc.size,
        "bitcount_bytes": sum(l.fixed_bits for l in enc.layers) / 8,
        "kl_bytes": sum(k.total for k in kl) / 8,
        "coded_parts_bits": {"weights": sum(l.weight_bits for l in enc.layers),
                             "biases": sum(l.bias_bits for l in enc.layers), "masks": enc.mask_bits,
                             "header_and_spec": 8 * (enc.size - enc.stream_bytes)},  # fmt: skip
        "layers": [
            {"name": l.name, "weights": l.weights, "bits": [l.bits.exponent, l.bits.significand], "model": l.model,
             "fixed_bits": l.fixed_bits, "coded_weight_bits": l.weight_bits, "coded_bias_bits": l.bias_bits,
             "kl_bits": {"z": k.z, "w": k.w, "b": k.b, "total": k.total}, "bits_below_noise": nz}
            for l, k, nz in zip(enc.layers, kl, noise)
        ],  # fmt: skip
    }
    if headline:
        point["coded_bytes_by_model"] = {m: coded.encode_network(pruned, report.bits, m).size for m in coded.PRECISION_MODELS}
        point["coded_bytes_by_model"]["best per layer"] = enc.size
        point["weight_bits_by_model"] = {"best per layer": sum(l.weight_bits for l in enc.layers)}
        for fam in ("laplace", "gaussian"):
            point["weight_bits_by_model"][fam] = sum(
                coded.parametric_bits(quant.get_submodule(n).weight, b, fam)
                for n, b in zip(pruned.bayesian_layer_names, report.bits)
            )  # fmt: skip
    if mnist is not None:
        point["error_decoded"] = test_error(load_coded(tmp / "m.bc"), *mnist)
        point["error_quantized"] = test_error(quant, *mnist)
    return point, enc


def measure_run(run: Run, tmp: Path, mnist: Optional[tuple[torch.Tensor, torch.Tensor]], out: Path) -> dict[str, Any]:
    """All points of a run; writes its headline coded file to ``out/<run>.bc``."""
    r = run.result
    points = []
    for p in r.get("tradeoff") or [r]:
        headline = p["thresholds"] == r["thresholds"]
        point, enc = measure(run, p["thresholds"], tmp, mnist, headline)
        point.update(max_drop=p.get("max_drop", r["max_drop"]), headline=headline, error_recorded=p["error_compressed"])
        points.append(point)
        if headline:
            atomic_write(out / f"{run.key}.bc", lambda f: f.write(enc.data))
    nearest = nearest_to_paper(r)
    goal_bytes, goal_error = BYTES_GOALS[r["arch"]]
    return {"arch": r["arch"], "prior": r["prior"], "paper_error": PAPER[(r["arch"], r["prior"])]["error"],
            "nearest_to_paper_max_drop": nearest["max_drop"], "goal": {"bytes": goal_bytes, "error": goal_error},
            "points": points}  # fmt: skip


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown: every point of every run, bytes beside the KL."""
    out = ["| run | budget | error % (decoded / quantized) | dense | bit-packed | xz / raw lzma2 of bit-packed | "
           "coded | bit count | KL | goal met |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in runs.items():
        for p in r["points"]:
            err = f"{p['error_decoded']:.2f} / {p['error_quantized']:.2f}" if "error_decoded" in p else "n/a"
            lz = p["lzma_over_bitpacked"]
            near = p["max_drop"] == r["nearest_to_paper_max_drop"]
            tags = ("headline" if p["headline"] else "") + (" nearest paper" if near else "")
            met = "error_decoded" in p and p["coded_bytes"] <= r["goal"]["bytes"] and p["error_decoded"] <= r["goal"]["error"]
            out.append(f"| {key} | {100 * p['max_drop']:.1f}{' (' + tags.strip() + ')' if tags else ''} | {err} | "
                       f"{p['dense_bytes']:,} | {p['bitpacked_bytes']:,} | {lz['xz']:,} / {lz['lzma2_raw']:,} | "
                       f"**{p['coded_bytes']:,}** | {p['bitcount_bytes']:,.0f} | {p['kl_bytes']:,.0f} | "
                       f"{'met' if met else 'missed'} |")  # fmt: skip
    return "\n".join(out)


def model_table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown: at each headline, the file under each weight model and the weights' code length."""
    out = ["| run | file bytes: uniform / symbol / factored / best per layer | weight bits: best / Laplace / Gaussian |",
           "|---|---|---|"]  # fmt: skip
    for key, r in runs.items():
        p = next(p for p in r["points"] if p["headline"])
        files = " / ".join(f"{v:,}" for v in p["coded_bytes_by_model"].values())
        w = p["weight_bits_by_model"]
        out.append(f"| {key} | {files} | {w['best per layer']:,.0f} / {w['laplace']:,.0f} / {w['gaussian']:,.0f} |")
    return "\n".join(out)



HEADLINES = {"fitted": "quantized", "grid": "grid"}  # bytes.json's key: the run JSON's section


def measure_headline(run: Run, results: Path, mnist: Optional[tuple[torch.Tensor, torch.Tensor]],
                     section: str) -> Optional[dict[str, Any]]:  # fmt: skip
    """The headline file of ``reproduce --quantize`` (``section`` "quantized": bits fitted to the
    data) or ``--grid`` ("grid": uniform grids): its size, the test error of the decoded file
    (it must agree with the recorded one) and lzma over it."""
    q = run.result.get(section)
    if q is None:
        return None
    head = q["points"][q["headline"]]
    data = (results / q["file"]).read_bytes()
    point = {"max_drop": head["max_drop"], "coded_bytes": len(data), "lzma_over_coded": lzma_sizes(data)["lzma2_raw"],
             "kl_bytes": head["kl_bytes"], "error_recorded": head["error"],
             **{k: head[k] for k in ("bits", "steps", "bitpacked_bytes") if k in head}}  # fmt: skip
    if mnist is not None:
        point["error_decoded"] = test_error(load_coded(results / q["file"]), *mnist)
    return point


def headline_table(runs: dict[str, dict[str, Any]], key: str) -> str:
    """Markdown: each run's headline file under ``key`` ("fitted" or "grid"), beside the KL and the goal."""
    out = ["| run | budget | error % (decoded / recorded) | bit-packed | coded | raw lzma2 of coded | KL | goal met |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in runs.items():
        p = r.get(key)
        if p is None:
            continue
        err = f"{p['error_decoded']:.2f} / {p['error_recorded']:.2f}" if "error_decoded" in p else "n/a"
        met = "error_decoded" in p and p["coded_bytes"] <= r["goal"]["bytes"] and p["error_decoded"] <= r["goal"]["error"]
        packed = f"{p['bitpacked_bytes']:,}" if "bitpacked_bytes" in p else "–"
        out.append(f"| {name} | {100 * p['max_drop']:.1f} | {err} | {packed} | **{p['coded_bytes']:,}** | "
                   f"{p['lzma_over_coded']:,} | {p['kl_bytes']:,.0f} | {'met' if met else 'missed'} |")  # fmt: skip
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=results_dir(),
                    help="folder of the shipped runs (and of the output)")  # fmt: skip
    ap.add_argument("--only", nargs="*", default=None, help="run keys, e.g. lenet5_caffe-nj (default: all)")
    args = ap.parse_args(argv)
    wanted = [(a, p) for a, p in MNIST_RUNS if args.only is None or f"{a}-{p}" in args.only]
    found, missing = load_runs(wanted, args.results)
    for m in missing:
        print(m)
    mnist = mnist_test_set()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {key: measure_run(run, Path(tmp), mnist, args.results) for key, run in found.items()}
    for key, run in found.items():
        for name, section in HEADLINES.items():
            point = measure_headline(run, args.results, mnist, section)
            if point is not None:
                runs[key][name] = point
    out = args.results / "bytes.json"
    if out.is_file() and args.only is not None:  # keep the runs not measured this time
        runs = {**json.loads(out.read_text())["runs"], **runs}
    settings = {"torch": torch.__version__, "command": "python benchmarks/bench_bytes.py"}
    text = json.dumps({"settings": settings, "runs": runs}, indent=1)
    atomic_write(out, lambda f: f.write(text.encode()))
    print(table(runs))
    print()
    print(model_table(runs))
    print("\nBits fitted to the data (reproduce --quantize), the headline file of each run:\n")
    print(headline_table(runs, "fitted"))
    print("\nUniform grids (reproduce --grid), the headline file of each run:\n")
    print(headline_table(runs, "grid"))
    print(f"\nwrote {out} and the headline files {args.results}/<run>.bc")


if __name__ == "__main__":
    main()
