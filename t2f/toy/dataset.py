"""`t2f toy shards`: the toy world as a real dataset, written through the real shard builder.

Each face is `render(params_from_latent(z))` for a seeded standard-normal z, with 10 captions
from the grammar and its attribute vector; the splits go through `t2f.data.shards.build_shards`
(same tar format, manifest and vocabulary as MM-CelebA-HQ), with the all-MiniLM-L6-v2 features
of every caption stored so training skips the text encoder. Deterministic for a seed; a second
run with the same arguments finds every shard up to date and rewrites nothing. The manifest names
the toy metrics' plugin (options.eval_plugins: t2f.toy.metrics), so `t2f eval` and the trainer's
periodic evaluation add the toy metrics on these shards; shards built before it are fixed by
running the same command again (it rewrites only the manifest).
"""

import numpy as np

from t2f.toy.attributes import ATTRIBUTES, Z_DIM, params_from_latent
from t2f.toy.captions import captions_for
from t2f.toy.render import render

TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
METRICS_PLUGIN = "t2f.toy.metrics"  # the module that registers the toy metrics (not imported here: it loads eval)


def toy_samples(count: int, split: str, seed: int, start: int = 0):
    """SampleSpecs of `count` faces; ids `start..start+count-1` so train and test never collide."""
    from t2f.data.sources import SampleSpec

    rng = np.random.default_rng([seed, start])
    for i in range(start, start + count):
        attrs, nuisance = params_from_latent(rng.standard_normal(Z_DIM))
        captions = captions_for(attrs, rng, n=10)
        yield SampleSpec(f"{i:06d}", render(attrs, nuisance), captions, split,
                         {name: int(attrs[name]) for name in ATTRIBUTES}, source="toy")


class CachedEncoder:
    """Encodes each distinct caption once (toy captions repeat across faces)."""

    def __init__(self, encoder):
        self.encoder, self.name, self.cache = encoder, encoder.name, {}
        self.pooling, self.max_length = encoder.pooling, encoder.max_length  # recorded in the manifest

    def encode(self, captions):
        import torch

        new = sorted(set(captions) - set(self.cache))
        for start in range(0, len(new), 256):
            chunk = new[start:start + 256]
            self.cache.update(zip(chunk, self.encoder.encode(chunk).float()))
        return torch.stack([self.cache[c] for c in captions])  # (N, D)


def build_toy_shards(out, train: int = 1500, test: int = 250, seed: int = 0, text_features: bool = True,
                     workers: int = 0, progress: bool = True) -> dict:
    from t2f.data.shards import build_shards
    from t2f.eval.hooks import PLUGINS_OPTION

    encoder = None
    if text_features:
        from t2f.models.text_encoder import TextEncoder

        encoder = CachedEncoder(TextEncoder(TEXT_ENCODER, pooling="mean", max_length=64, local_files_only=True))
    samples = list(toy_samples(train, "train", seed)) + list(toy_samples(test, "test", seed, start=train))
    return build_shards(samples, out, resolution=64, fmt="png", shard_size=250, workers=workers, text_encoder=encoder,
                        attribute_names=ATTRIBUTES, source="toy", progress=progress,
                        options={"toy": {"train": train, "test": test, "seed": seed}, PLUGINS_OPTION: [METRICS_PLUGIN]})


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="shards/toy")
    parser.add_argument("--train", type=int, default=1500, help="train faces (10 captions each)")
    parser.add_argument("--test", type=int, default=250, help="held-out faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-text-features", action="store_true", help="do not store all-MiniLM-L6-v2 caption features")
    parser.add_argument("--workers", type=int, default=0, help="processes writing shards (0 = this one)")


def run(args) -> int:
    manifest = build_toy_shards(args.out, args.train, args.test, args.seed, not args.no_text_features, args.workers)
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    print(f"wrote {args.out}: {counts} faces, 10 captions each")
    return 0
