"""Bits fitted to the data on one fine-tuned level of a finished run, not only on its headline.

    BCLIB_DATA=../shared/data OMP_NUM_THREADS=1 python tools/quantize_level.py lenet_300_100 nj 0.02+0.005

Runs :func:`bclib.reproduce._quantize_level` at every budget of ``_quantize_settings`` (the bit
search on held-out data, training through the rounding, the coded file read back) on the
fine-tuned level ``results/state/finetune/<arch>-<prior>-<level>.pt`` that ``--finetune`` left
(``<budget>``, or ``<first budget>+<budget>`` for a second-round level), with the run's seed and
split, and prints each point: coded bytes, test and held-out error, bits. Files go to ``--out``,
never into ``results/``: ``--quantize`` tries only the levels within ``margin`` of the paper's
error. For any other level.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bclib import compression, reproduce
from bclib.config import results_dir
from bclib.train import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=["lenet_300_100", "lenet5_caffe"])
    ap.add_argument("prior", choices=["nj", "hs"])
    ap.add_argument("level", help="fine-tuning level, e.g. 0.02 or 0.02+0.005 (see results/table.md)")
    ap.add_argument("--lam", type=float, nargs="*", default=[],
                    help="also rate-aware rounding (bclib.rate_aware) at these lam, e.g. 3 6 12")
    ap.add_argument("--out", type=Path, default=Path("results-levels"), help="coded files and point JSON")
    args = ap.parse_args()
    _, _, res = reproduce._finished(args.arch, args.prior, results_dir(), "tools/quantize_level.py")
    stem = f"{results_dir()}/state/finetune/{args.arch}-{args.prior}-{args.level}"  # levels hold dots: no with_suffix
    if not Path(f"{stem}.pt").is_file():
        raise FileNotFoundError(f"{stem}.pt is missing: run python -m bclib.reproduce --finetune "
                                f"--only {args.arch}-{args.prior} first (it keeps every level there)")  # fmt: skip
    level = json.loads(Path(f"{stem}.json").read_text())
    model = load_checkpoint(Path(f"{stem}.pt"))[0]
    batches = reproduce._split(args.arch, res["train_limit"], 128, res["seed"])
    bits = compression.compression_report(model, level["thresholds"], reproduce._example_input(batches[1])).bits
    s = reproduce._quantize_settings(args.arch, False)
    out = args.out / f"{args.arch}-{args.prior}-{args.level}-quantized"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.arch}-{args.prior} level {args.level}: fine-tuned test error {level['error_compressed']:.2f} %, "
          f"x{level['rate_pruning']:.1f} pruning", flush=True)  # fmt: skip
    points = []
    for d in s["budgets"]:
        p = reproduce._quantize_level(model, level["thresholds"], bits, d, s, res["seed"], batches, out / f"{d:g}.bc",
                                      tuple(args.lam))  # fmt: skip
        points.append(p)
        print(f"  budget {d:g}: {p['coded_bytes']:,} bytes, test error {p['error']:.2f} % (held-out "
              f"{p['held_out_error']:.2f} %), bits {p['bits']}", flush=True)  # fmt: skip
        for r in p.get("rate_aware", []):
            print(f"    rate-aware, lam {r['lam']:g}: {r['coded_bytes']:,} bytes, test error {r['error']:.2f} % "
                  f"(held-out {r['held_out_error']:.2f} %)", flush=True)  # fmt: skip
    reproduce._atomic_json({"level": level, "points": points}, out / "points.json")


if __name__ == "__main__":
    main()
