"""What an evaluation plugs in: FID feature extractors, the LPIPS model, the toy attribute scorer.

`evaluate()` takes an `EvalHooks`; any part left as None is built from the config for the
metrics that need it (Inception and LPIPS from local files, the toy classifier shipped with
the package). Tests and the trainer pass their own parts: a tiny extractor, a model kept
between periodic evaluations.

An attribute scorer is `scorer(images (B, 3, H, W) in [-1, 1], captions) -> list` with, per
image, a list of 0/1 (one per attribute: does the image show what the caption says) or None
when the caption cannot be scored.
"""

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from t2f.eval.fid import InceptionFeatures, InceptionWeightsMissing, feature_extractor
from t2f.eval.lpips import LpipsWeightsMissing, load_lpips, lpips_distance

MissingWeights = (InceptionWeightsMissing, LpipsWeightsMissing)


@dataclass
class EvalHooks:
    fid_extractor: object = None  # NamedExtractor for "fid" (default: clean-fid Inception)
    toy_extractor: object = None  # NamedExtractor for "toy_fid" (default: toy classifier features)
    lpips_model: object = None  # lpips.LPIPS for "lpips" and "diversity"
    attribute_scorer: object = None  # for "attributes" (default: toy classifier vs parsed caption)
    skipped: dict = field(default_factory=dict)  # metric -> why (weights missing, skip_missing=True)

    def lpips(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lpips_distance(self.lpips_model, a, b)  # (B,)


def build_hooks(cfg, device, metrics, given: EvalHooks | None = None, skip_missing: bool = False):
    """(hooks with every part `metrics` need, {metric: why skipped}). Missing weights raise unless skip_missing.

    `given` is filled in place, so a caller that keeps it (the trainer) builds each part once;
    a metric skipped once stays skipped for it.
    """
    hooks = given if given is not None else EvalHooks()
    e, skipped = cfg.eval, hooks.skipped
    builders = {
        "fid": ("fid_extractor", lambda: InceptionFeatures(e.inception, device=device)),
        "toy_fid": ("toy_extractor", lambda: toy_feature_extractor(device, e.toy_classifier)),
        "lpips": ("lpips_model", lambda: load_lpips(e.lpips_alexnet, e.lpips_linear, device=device)),
        "diversity": ("lpips_model", lambda: load_lpips(e.lpips_alexnet, e.lpips_linear, device=device)),
        "attributes": ("attribute_scorer", lambda: toy_attribute_scorer(device, e.toy_classifier)),
    }
    for metric in metrics:
        if metric not in builders or metric in skipped or getattr(hooks, builders[metric][0]) is not None:
            continue
        field, build = builders[metric]
        try:
            setattr(hooks, field, build())
        except (*MissingWeights, FileNotFoundError) as err:
            if not skip_missing:
                raise
            skipped[metric] = " ".join(str(err).split())  # one line, the missing path included
            warnings.warn(f"eval: skipping {metric}: {err}")
    return hooks, skipped


def toy_feature_extractor(device, path: str = "") -> object:
    """The toy attribute classifier's penultimate features: a FID that knows what toy faces look like."""
    from t2f.toy.classifier import features, load_classifier

    from t2f.toy.classifier import ASSETS, WEIGHTS_NAME

    model = load_classifier(path or None, device=device)
    weights = Path(path) if path else ASSETS / WEIGHTS_NAME
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]  # retrained classifier -> new real stats
    return feature_extractor(f"toy-classifier-{digest}", lambda images: features(images.to(device), model))


def toy_attribute_scorer(device, path: str = ""):
    """Per image: 0/1 per toy attribute, the classifier's reading (p > 0.5) vs the caption's attributes."""
    from t2f.toy.attributes import ATTRIBUTES
    from t2f.toy.captions import parse_caption
    from t2f.toy.classifier import load_classifier, predict_attributes

    model = load_classifier(path or None, device=device)

    def score(images: torch.Tensor, captions: list[str]) -> list:
        predicted = (predict_attributes(images.to(device), model) > 0.5).cpu()  # (B, A)
        rows = []
        for caption, row in zip(captions, predicted.tolist()):
            try:
                wanted = parse_caption(caption)
            except ValueError:  # not a toy-grammar caption: nothing to compare with
                rows.append(None)
                continue
            rows.append([int(bool(p) == bool(wanted[name])) for p, name in zip(row, ATTRIBUTES)])
        return rows

    return score
