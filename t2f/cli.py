"""The `t2f` console script: one entry point, one subcommand per tool.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only
routes, so `t2f --help` stays fast (modules import torch only when their command runs).
"""

import importlib
import sys

# name -> (module implementing `main(argv)`, one-line help)
COMMANDS = {
    "convert": ("t2f.models.convert", "convert a StyleGAN2 checkpoint (NVlabs .pkl, rosinality .pt) to t2f safetensors"),
    "bench": ("t2f.bench", "benchmarks that print fast-path / reference ratios (ops, generator, data, train)"),
    "shards": ("t2f.shards_cli", "build WebDataset shards + manifest from MM-CelebA-HQ, CelebAText-HQ or a jsonl; verify them"),
    "generate": ("t2f.generate", "faces from captions with a trained checkpoint: a captioned grid or one PNG per image"),
    "serve": ("t2f.serve", "a web page (Gradio) to try a checkpoint: faces, read-back, the recaptioner's attention"),
    "eval": ("t2f.eval.evaluate", "FID, KID (clean-fid), LPIPS, CLIP score and R-precision of a checkpoint on a test split"),
    "toy": ("t2f.toy.cli", "the toy world: render faces, build its shards, refit its generator or attribute classifier"),
    "standins": ("t2f.standins", "random-weight stand-ins of CLIP, StyleGAN2 FFHQ-1024, ResNet-101, CelebA sets: real formats"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: t2f COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `t2f COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"t2f: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
