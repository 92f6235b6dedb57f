"""What an evaluation plugs in: the metric registry, and the parts (networks) metrics are built from.

Metrics register themselves, as in stylegan3's `metric_main.register_metric`, so a world adds its
own without the evaluator naming it:

    register_metric(Metric("toy_fid", "FID on ...", kind="fid", build=my_extractor))
    register_metric(Metric("attributes", "...", kind="per_image", build=my_scorer_builder,
                           score=..., summarise=..., values=("attribute_accuracy", ...),
                           auto=lambda manifest: manifest.get("source") == "toy"))

Three kinds: "fid" (`build(cfg, device)` returns a `feature_extractor`; the metric's value is
the FID on those features, under the metric's name), "kid" (the same, with KID and its spread as
values; a kid and a fid metric with the same `part` share one pass of the extractor) and
"per_image" (`score(part, generated)` returns one entry per generated image; `summarise(records)`
turns the records of all ranks, in a fixed order, into values; `details(records)` may add more
keys to the record). A metric whose `auto(manifest)` is true runs on those shards without being
asked. A `build` that raises MetricUnavailable (CLIP metrics with a text encoder that has no
image tower) skips its metric with the reason, whatever `skip_missing` says.

Plugins: a shard manifest names the modules that register its world's metrics under
`options.eval_plugins` (the toy shards name t2f.toy.metrics); `evaluate()` imports them before
it reads `eval.metrics`, and `t2f eval --plugin MODULE` adds one by hand.

`evaluate()` takes an `EvalHooks`: parts already built, keyed by `Metric.part`. The trainer keeps
one between periodic evaluations, so each network loads once; tests pass their own small ones.
"""

import functools
import importlib
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from t2f.eval import clip
from t2f.eval.captions import BLEU_PROTOCOL, bleu4
from t2f.eval.fid import InceptionFeatures
from t2f.eval.kid import KID_PROTOCOL
from t2f.eval.lpips import load_lpips, lpips_distance

PLUGINS_OPTION = "eval_plugins"  # key in a manifest's "options": modules that register metrics
KINDS = ("fid", "kid", "per_image")  # kid: values (name, name_std)


@dataclass(frozen=True)
class Metric:
    name: str  # as written in eval.metrics
    protocol: str  # one line saying what is measured, written beside every number
    kind: str = "per_image"  # fid | per_image (module docstring)
    build: Callable | None = None  # (cfg, device) -> the part it needs; None: needs none
    score: Callable | None = None  # per_image: (part, Generated) -> one entry per image
    summarise: Callable | None = None  # per_image: records -> {value name: float}
    details: Callable | None = None  # records -> {extra record key: value}
    values: tuple = ()  # the value names it reports (fid: its own name; kid: name, name_std)
    part: str = ""  # parts with the same key are built once (lpips, diversity); default: the name
    auto: Callable | None = None  # manifest -> True: run on these shards without being asked

    @property
    def part_key(self) -> str:
        return self.part or self.name

    @property
    def value_names(self) -> tuple:
        if self.kind == "kid":
            return self.values or (self.name, f"{self.name}_std")
        return self.values or (self.name,)


class MetricUnavailable(RuntimeError):
    """Raised by a metric's `build` when these models cannot measure it; the message is the reason."""


_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add (or replace, on a module reload) a metric; returns it."""
    if metric.kind not in KINDS:
        raise ValueError(f"metric {metric.name!r}: kind must be one of {KINDS}, got {metric.kind!r}")
    if metric.kind == "per_image" and (metric.score is None or metric.summarise is None):
        raise ValueError(f"per_image metric {metric.name!r} needs score and summarise")
    _REGISTRY[metric.name] = metric
    return metric


def registered() -> dict[str, Metric]:
    """name -> Metric, in registration order (the built-in ones first)."""
    return dict(_REGISTRY)


def load_plugins(modules) -> None:
    """Import the modules that register metrics; a name that cannot be imported is a one-line error."""
    for name in modules:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise ValueError(f"eval plugin {name!r} is not a module name (e.g. t2f.toy.metrics)")
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"eval plugin {name!r} cannot be imported ({err}); is its package installed?") from None


def manifest_plugins(manifest: dict) -> list:
    return list((manifest.get("options") or {}).get(PLUGINS_OPTION, []))


def select_metrics(text: str, manifest: dict) -> list[str]:
    """The metrics `text` (a comma list) asks for, then those the shards add on their own."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in _REGISTRY]
    if unknown:
        raise ValueError(f"eval.metrics: unknown metric(s) {unknown}; choose from {', '.join(_REGISTRY)} "
                         "(a world's own metrics come with its shards' manifest or `t2f eval --plugin MODULE`)")
    auto = [m.name for m in _REGISTRY.values() if m.auto is not None and m.auto(manifest)]
    return names + [m for m in auto if m not in names]


# ---------------------------------------------------------------------------- parts


@dataclass
class EvalHooks:
    parts: dict = field(default_factory=dict)  # Metric.part_key -> built part (extractor, LPIPS model, scorer)
    skipped: dict = field(default_factory=dict)  # metric -> why (weights missing, skip_missing=True)


def build_hooks(cfg, device, metrics, given: EvalHooks | None = None, skip_missing: bool = False):
    """(hooks with every part `metrics` need, {metric: why skipped}). Missing weights raise unless skip_missing.

    `given` is filled in place, so a caller that keeps it (the trainer) builds each part once;
    a metric skipped once stays skipped for it.
    """
    hooks = given if given is not None else EvalHooks()
    for name in metrics:
        metric = _REGISTRY[name]
        if metric.build is None or name in hooks.skipped or metric.part_key in hooks.parts:
            continue
        try:
            hooks.parts[metric.part_key] = metric.build(cfg, device)
        except MetricUnavailable as err:
            hooks.skipped[name] = " ".join(str(err).split())
            warnings.warn(f"eval: skipping {name}: {err}", stacklevel=2)
        except FileNotFoundError as err:  # Inception's and LPIPS's "weights missing" errors are ones too
            if not skip_missing:
                raise
            hooks.skipped[name] = " ".join(str(err).split())  # one line, the missing path included
            warnings.warn(f"eval: skipping {name}: {err}", stacklevel=2)
    return hooks, hooks.skipped


class Generated:
    """What a per-image metric sees of one chunk: the generated images, their captions, the real
    image of each caption, and (made on first use) a second sample of each caption."""

    def __init__(self, pipeline, images, captions, reals, regenerate):
        self.pipeline, self.images, self.captions, self.reals = pipeline, images, captions, reals
        self._regenerate, self._memo = regenerate, {}

    def memo(self, name: str, make: Callable):
        """`make()` once per chunk: metrics that share a part (CLIP score, R-precision) share its work."""
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    @functools.cached_property
    def second_sample(self) -> torch.Tensor:
        return self._regenerate()  # (B, 3, R, R): other CA noise, same captions


# ---------------------------------------------------------------------------- built-in metrics


def _mean_of(metric: str, value: str):
    return lambda records: {value: math.fsum(r[metric] for r in records) / len(records)}


def _lpips_model(cfg, device):
    return load_lpips(cfg.eval.lpips_alexnet, cfg.eval.lpips_linear, device=device)


register_metric(Metric(
    "fid", "clean-fid mode=clean (8-bit images, PIL bicubic to 299), Inception-v3 pool3 2048-d; generated vs real",
    kind="fid", build=lambda cfg, device: InceptionFeatures(cfg.eval.inception, device=device)))
register_metric(Metric(
    "kid", KID_PROTOCOL, kind="kid", part="fid",
    build=lambda cfg, device: InceptionFeatures(cfg.eval.inception, device=device)))
register_metric(Metric(
    "lpips", "LPIPS v0.1 AlexNet, generated image vs the real image of its caption (the paper's pairing), mean",
    build=_lpips_model, part="lpips", values=("lpips_paired",), summarise=_mean_of("lpips", "lpips_paired"),
    score=lambda model, g: lpips_distance(model, g.images, g.reals).tolist()))
register_metric(Metric(
    "diversity", "LPIPS v0.1 AlexNet between two samples (different CA noise) of the same caption, mean",
    build=_lpips_model, part="lpips", values=("lpips_diversity",), summarise=_mean_of("diversity", "lpips_diversity"),
    score=lambda model, g: lpips_distance(model, g.images, g.second_sample).tolist()))
register_metric(Metric(
    "bleu", f"{BLEU_PROTOCOL}; recaptioner greedy decoding of each generated image vs its input caption",
    values=("bleu4",), score=lambda _, g: g.pipeline.read_back(g.images),
    summarise=lambda records: {"bleu4": bleu4([r["bleu"] for r in records], [[r["caption"]] for r in records])}))


def _clip_part(cfg, device):
    try:
        return clip.build_clip_scorer(cfg, device)
    except clip.MissingImageTower as err:
        raise MetricUnavailable(str(err)) from None


register_metric(Metric(
    "clip_score", clip.CLIP_SCORE_PROTOCOL, build=_clip_part, part="clip", values=("clip_score", "clip_score_real"),
    score=clip.score_clip, summarise=clip.summarise_clip))
register_metric(Metric(
    "r_precision", clip.R_PRECISION_PROTOCOL, build=_clip_part, part="clip", values=("r_precision", "r_precision_real"),
    score=clip.score_r_precision, summarise=clip.summarise_r_precision, details=clip.r_precision_details))
