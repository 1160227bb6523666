"""What a code of a posterior sample (bits-back, MIRACLE) would cost, on a finished run's fine-tuned posterior.

    BCLIB_DATA=../shared/data OMP_NUM_THREADS=1 python tools/sample_code.py lenet_300_100 nj --shrinks 1 0.25 0.1 0.03

Reads ``results/<arch>-<prior>.json`` and its fine-tuned headline level (``reproduce
--finetune``; ``BCLIB_RESULTS`` points at another seed's folder) and prints, per ``shrink`` of
the posterior variances, the KL bytes of the kept weights' code under a Gaussian per layer and
the test errors of ``--samples`` networks drawn from the posterior (``bclib.sample_coding``),
beside the mean network's error and the run's fitted-bits file (``reproduce --quantize``).
``--progressive BETA SHRINK STAGES EPOCHS FIRST_EPOCHS`` (repeatable) runs MIRACLE's procedure
instead (:func:`bclib.sample_coding.progressive_code`) and prints its KL bytes and test error.
"""
from __future__ import annotations

import argparse

from bclib import compression, rate_aware, reproduce, sample_coding
from bclib.config import results_dir
from bclib.train import evaluate, load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=["lenet_300_100", "lenet5_caffe"])
    ap.add_argument("prior", choices=["nj", "hs"])
    ap.add_argument("--shrinks", type=float, nargs="+", default=[1.0, 0.25, 0.1, 0.03])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--progressive", type=float, nargs=5, action="append", metavar=("BETA", "SHRINK", "STAGES",
                    "EPOCHS", "FIRST_EPOCHS"), help="MIRACLE's procedure with these settings")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    _, _, res = reproduce._finished(args.arch, args.prior, results_dir(), "tools/sample_code.py")
    if "finetuned" not in res:
        raise SystemExit(f"{args.arch}-{args.prior} has no fine-tuned levels: run reproduce --finetune first")
    ft = res["finetuned"]
    t = ft["points"][ft["headline"]]["thresholds"]
    model = load_checkpoint(results_dir() / ft["checkpoint"])[0].eval()
    train_b, _, test_b = reproduce._split(args.arch, res["train_limit"], 128, res["seed"])
    net = compression.prune(model, t)

    def error(n: object) -> float:
        return 100 * (1 - evaluate(n, test_b))

    print(f"{args.arch}-{args.prior} (seed {res['seed']}), fine-tuned headline "
          f"x{ft['points'][ft['headline']]['rate_pruning']:.1f}: mean network {error(net):.2f} % test error")  # fmt: skip
    if "quantized" in res:
        q = res["quantized"]["points"][res["quantized"]["headline"]]
        print(f"fitted-bits file: {q['coded_bytes']:,} bytes at {q['error']:.2f} %")
    std = rate_aware.kept_posterior_std(model, t)
    if args.progressive:
        print("| beta | shrink | stages | epochs | first epochs | KL bytes of the weights | test error % |\n"
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
        for beta, k, g, e, e0 in args.progressive:
            train_b.generator.manual_seed(res["seed"])  # each setting sees the same data order
            c = sample_coding.progressive_code(net, std, train_b, beta, k, int(g), int(e), int(e0), seed=args.seed)
            print(f"| {beta:g} | {k:g} | {g:.0f} | {e:.0f} | {e0:.0f} | {c.kl_bytes:,.0f} | {error(c.net):.2f} |", flush=True)
        return
    print("| shrink | KL bytes of the weights | test error % of the samples |\n| ---: | ---: | --- |")
    for p in sample_coding.rate_distortion(net, std, args.shrinks, error, args.samples, args.seed):
        print(f"| {p.shrink:g} | {p.kl_bytes:,.0f} | {', '.join(f'{e:.2f}' for e in p.errors)} |")


if __name__ == "__main__":
    main()
