"""The toy world's evaluation metrics, registered with t2f.eval on import (the eval plugin that toy
shards name in their manifest, so `t2f eval` and the trainer's periodic evaluation add them on
toy shards without being asked):

- attributes: the shipped attribute classifier (the judge) reads each generated face (p > 0.5)
  and is compared with the attributes its caption names; reported as the accuracy over all
  attributes, the exact match (every attribute right) and a per-attribute breakdown;
- second_reader: the same reading by a second classifier (t2f/toy/assets/reader, seed 2), which no
  part of the pipeline saw: neither the generator's fit, nor the recaptioner, nor training. If
  the pipeline had learnt the judge's quirks instead of the attributes, the two would disagree;
- toy_fid: FID (clean-fid's Frechet distance) on the judge's penultimate features, a FID that
  knows what toy faces look like.

attributes and toy_fid read `eval.toy_classifier` (empty: the judge shipped in t2f/toy/assets).
"""

import hashlib
import math
from pathlib import Path

from t2f.eval.fid import feature_extractor
from t2f.eval.hooks import Metric, register_metric
from t2f.toy.attributes import ATTRIBUTES
from t2f.toy.captions import parse_caption
from t2f.toy.classifier import ASSETS, READER, WEIGHTS_NAME, features, load_classifier, predict_attributes


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


def _scored(records, metric: str = "attributes") -> list:
    return [r[metric] for r in records if r[metric] is not None]


def summariser(metric: str, prefix: str):
    """records -> {PREFIX_accuracy, PREFIX_exact_match} of one reader's rows."""
    def summarise(records) -> dict:
        rows = _scored(records, metric)
        if not rows:
            return {}
        return {f"{prefix}_accuracy": math.fsum(sum(row) for row in rows) / (len(rows) * len(rows[0])),
                f"{prefix}_exact_match": sum(all(row) for row in rows) / len(rows)}
    return summarise


def breakdown(metric: str, prefix: str):
    """records -> {PREFIX_accuracy_per_attribute: agreement per attribute, in ATTRIBUTES order}."""
    def details(records) -> dict:
        rows = _scored(records, metric)
        per_attribute = {name: sum(row[i] for row in rows) / len(rows) for i, name in enumerate(ATTRIBUTES)} if rows else {}
        return {f"{prefix}_accuracy_per_attribute": per_attribute}
    return details


summarise_attributes, attribute_breakdown = summariser("attributes", "attribute"), breakdown("attributes", "attribute")


register_metric(Metric(
    "attributes", "toy classifier (p > 0.5) vs the attributes named by the input caption; "
                  "accuracy over all attributes, exact match = every attribute right",
    build=attribute_scorer, score=score_attributes, summarise=summarise_attributes, details=attribute_breakdown,
    values=("attribute_accuracy", "attribute_exact_match"), auto=on_toy_shards))
register_metric(Metric(
    "second_reader", "a second toy classifier (seed 2, seen by no part of the pipeline; p > 0.5) vs the attributes "
                     "named by the input caption; accuracy over all attributes, exact match = every attribute right",
    build=lambda cfg, device: load_classifier(READER, device=device), score=score_attributes,
    summarise=summariser("second_reader", "second_reader"), details=breakdown("second_reader", "second_reader"),
    values=("second_reader_accuracy", "second_reader_exact_match"), auto=on_toy_shards))
register_metric(Metric(
    "toy_fid", "clean-fid Frechet distance on the toy attribute classifier's penultimate features; generated vs real",
    kind="fid", build=toy_feature_extractor, auto=on_toy_shards))
