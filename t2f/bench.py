"""Benchmarks: `python -m t2f.bench WHAT` or `t2f bench WHAT`.

Every benchmark times the fast path against a reference in the same run and prints ratios,
so numbers from different machines are never compared directly. Each one lives beside the
code it measures and exposes `main(argv) -> int`; this file routes.
"""

import importlib
import sys

BENCHMARKS = {
    "ops": ("t2f.ops.benchmark", "fused Triton ops vs the PyTorch reference at FFHQ-1024 layer shapes"),
    "generator": ("t2f.models.benchmark", "synthesis forward+backward-to-w: fp16 fused vs fp16 ref vs fp32 ref"),
    "data": ("t2f.data.benchmark", "WebDataset loader vs a plain Dataset over the source folder"),
    "train": ("t2f.trainer.benchmark", "training samples/s and peak memory, fp16-fused vs fp32-reference generator"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: t2f bench {" + ",".join(BENCHMARKS) + "} [ARGS...]\n")
        for name, (_, help_) in BENCHMARKS.items():
            print(f"  {name:<10} {help_}")
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"t2f bench: unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
