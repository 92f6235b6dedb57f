"""The toy world's evaluation metrics, registered with t2f.eval on import (the eval plugin that toy
shards name in their manifest, so `t2f eval` and the trainer's periodic evaluation add them on
toy shards without being asked):

- attributes: the shipped attribute classifier (the judge) reads each generated face (p > 0.5)
  and is compared with the attributes its caption names; reported as the accuracy over all
  attributes, the exact match (every attribute right) and a per-attribute breakdown;
- toy_fid: FID (clean-fid's Frechet distance) on the judge's penultimate features, a FID that
  knows what toy faces look like.

Both read `eval.toy_classifier` (empty: the judge shipped in t2f/toy/assets).
"""

import hashlib
import math
from pathlib import Path

from t2f.eval.fid import feature_extractor
from t2f.eval.hooks import Metric, register_metric
from t2f.toy.attributes import ATTRIBUTES
from t2f.toy.captions import parse_caption
from t2f.toy.classifier import ASSETS, WEIGHTS_NAME, features, load_classifier, predict_attributes


def on_toy_shards(manifest: dict) -> bool:
    return manifest.get("source") == "toy"


def toy_feature_extractor(cfg, device):
    """The judge's penultimate features, named after its file's hash (retrained judge -> new real stats)."""
    path = cfg.eval.toy_classifier
    model = load_classifier(path or None, device=device)
    weights = Path(path) if path else ASSETS / WEIGHTS_NAME
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return feature_extractor(f"toy-classifier-{digest}", lambda images: features(images.to(device), model))


def attribute_scorer(cfg, device):
    """The judge, loaded once; `score_attributes` reads generated faces with it."""
    return load_classifier(cfg.eval.toy_classifier or None, device=device)


def score_attributes(model, generated) -> list:
    """Per image: 0/1 per attribute (the judge's reading vs the caption), or None when the caption
    is not in the toy grammar (nothing to compare with)."""
    device = next(model.parameters()).device
    predicted = (predict_attributes(generated.images.to(device), model) > 0.5).cpu()  # (B, A)
    rows = []
    for caption, row in zip(generated.captions, predicted.tolist()):
        try:
            wanted = parse_caption(caption)
        except ValueError:
            rows.append(None)
            continue
        rows.append([int(bool(p) == bool(wanted[name])) for p, name in zip(row, ATTRIBUTES)])
    return rows


def _scored(records) -> list:
    return [r["attributes"] for r in records if r["attributes"] is not None]


def summarise_attributes(records) -> dict:
    rows = _scored(records)
    if not rows:
        return {}
    return {"attribute_accuracy": math.fsum(sum(row) for row in rows) / (len(rows) * len(rows[0])),
            "attribute_exact_match": sum(all(row) for row in rows) / len(rows)}


def attribute_breakdown(records) -> dict:
    """Agreement per attribute, in ATTRIBUTES order."""
    rows = _scored(records)
    per_attribute = {name: sum(row[i] for row in rows) / len(rows) for i, name in enumerate(ATTRIBUTES)} if rows else {}
    return {"attribute_accuracy_per_attribute": per_attribute}


register_metric(Metric(
    "attributes", "toy classifier (p > 0.5) vs the attributes named by the input caption; "
                  "accuracy over all attributes, exact match = every attribute right",
    build=attribute_scorer, score=score_attributes, summarise=summarise_attributes, details=attribute_breakdown,
    values=("attribute_accuracy", "attribute_exact_match"), auto=on_toy_shards))
register_metric(Metric(
    "toy_fid", "clean-fid Frechet distance on the toy attribute classifier's penultimate features; generated vs real",
    kind="fid", build=toy_feature_extractor, auto=on_toy_shards))
