"""`t2f toy ...`: commands for the toy world.

    t2f toy render --out faces.png --seed 0      a grid of random faces, one caption each printed
    t2f toy render --out compare.png --generator t2f/toy/assets/generator.safetensors
                                                 each row of renders render(z) above G(z) of the same z
    t2f toy classifier --out t2f/toy/assets      retrain the attribute classifier (seeded), print accuracy
    t2f toy classifier --out t2f/toy/assets/backbone --seed 1   retrain the recaptioner's toy backbone
    t2f toy shards --out shards/toy              the toy dataset as WebDataset shards (real builder)
    t2f toy pretrain --out t2f/toy/assets/generator   refit the shipped tiny StyleGAN2 to the renderer

Each subcommand registers itself with `_add_<name>(subparsers)`; modules that need torch are
imported inside the command, so `t2f toy --help` stays fast.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="t2f toy", description="The toy world: procedural faces, "
                                     "captions, attribute classifier.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_render(sub)
    _add_classifier(sub)
    _add_module(sub, "shards", "t2f.toy.dataset", "write the toy train/test splits as WebDataset shards")
    _add_module(sub, "pretrain", "t2f.toy.pretrain", "fit the tiny StyleGAN2 to the renderer (the shipped generator)")
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _add_module(sub, name: str, module: str, help_: str):
    """A subcommand implemented by a module with `add_arguments(parser)` and `run(args)`."""
    import importlib

    target = importlib.import_module(module)  # these modules import torch lazily
    p = sub.add_parser(name, help=help_, description=(target.__doc__ or "").split("\n\n")[0])
    target.add_arguments(p)
    p.set_defaults(run=target.run)


# ---------------------------------------------------------------------------- render


def _add_render(sub):
    p = sub.add_parser("render", help="write a PNG grid of random faces and print a caption for each")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--zoom", type=int, default=2, help="pixel repeat for viewing (1 = native 64x64 faces)")
    p.add_argument("--generator", default="", help="a toy generator .safetensors: under each row of renders "
                   "render(z), a row of its faces G(z) for the same latents")
    p.set_defaults(run=_run_render)


def _generated_rows(path: str, z, cols: int):
    """G(z) of the toy generator at `path` as uint8 rows (rows * 64, cols * 64, 3), or exit 2 when unloadable."""
    import numpy as np
    import torch

    from t2f.models.weights import load_generator

    G = load_generator(path)
    with torch.no_grad():
        faces = G(torch.from_numpy(z).float(), noise_mode="const").clamp(-1, 1)  # (N, 3, 64, 64)
    faces = ((faces + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (N, 64, 64, 3)
    rows = faces.reshape(-1, cols, *faces.shape[1:])  # (R, C, 64, 64, 3)
    return [np.concatenate(list(row), axis=1) for row in rows]


def _run_render(args) -> int:
    import numpy as np
    from PIL import Image

    from t2f.toy.attributes import Z_DIM, params_from_latent
    from t2f.toy.captions import captions_for
    from t2f.toy.render import SIZE, render

    if args.rows < 1 or args.cols < 1 or args.zoom < 1:
        print("t2f toy render: --rows, --cols and --zoom must be at least 1", file=sys.stderr)
        return 2
    if args.generator and not Path(args.generator).is_file():
        print(f"t2f toy render: --generator {args.generator}: no such file", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    z = np.zeros((args.rows * args.cols, Z_DIM))
    grid = np.zeros((args.rows * SIZE, args.cols * SIZE, 3), dtype=np.uint8)
    for i in range(args.rows * args.cols):
        z[i] = rng.standard_normal(Z_DIM)  # what sample_face draws
        attrs, nuisance = params_from_latent(z[i])
        r, c = divmod(i, args.cols)
        grid[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] = render(attrs, nuisance)
        print(f"[{r},{c}] {captions_for(attrs, rng, n=1)[0]}")
    if args.generator:  # interleave: render row, generated row, ...
        rows = np.split(grid, args.rows)
        grid = np.concatenate([part for pair in zip(rows, _generated_rows(args.generator, z, args.cols)) for part in pair])
    image = Image.fromarray(grid)
    if args.zoom > 1:
        image = image.resize((image.width * args.zoom, image.height * args.zoom), Image.NEAREST)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({args.rows}x{args.cols} faces, seed {args.seed})")
    return 0


# ---------------------------------------------------------------------------- classifier


def _add_classifier(sub):
    from_here = Path(__file__).parent / "assets"
    p = sub.add_parser("classifier", help="train the attribute classifier on fresh renders and report accuracy")
    p.add_argument("--out", default=str(from_here), help=f"output folder (default: the shipped {from_here})")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=2000, help="held-out renders for the accuracy report")
    p.set_defaults(run=_run_classifier)


def _run_classifier(args) -> int:
    from t2f.toy.classifier import build_classifier

    if args.steps < 1 or args.batch_size < 2 or args.eval_images < 1:
        print("t2f toy classifier: --steps >= 1, --batch-size >= 2 and --eval-images >= 1", file=sys.stderr)
        return 2
    info = build_classifier(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            eval_images=args.eval_images)
    acc, soft = info["accuracy"], info["accuracy_blur_sigma_1"]
    print(f"{'attribute':<20} {'accuracy':>8} {'blurred':>8}")
    for name, value in acc["per_attribute"].items():
        print(f"{name:<20} {value:8.4f} {soft['per_attribute'][name]:8.4f}")
    print(f"{'mean':<20} {acc['mean']:8.4f} {soft['mean']:8.4f}")
    print(f"trained in {info['training']['seconds']} s; held out: {acc['num_images']} renders "
          f"(seed {acc['seed']}); wrote {Path(args.out) / 'classifier.safetensors'} and classifier.json")
    return 0
