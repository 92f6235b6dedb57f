"""What an evaluation reports: the protocol beside every number, metrics.json, the log lines.

A number without its protocol cannot be compared with anyone else's (METHOD.md: the paper does
not say how it measured FID), so the record always carries the split, the image counts, the
caption protocol, seed, truncation, resolution and one line per metric saying what it measures.
"""

import hashlib
import json
import os
from pathlib import Path

from t2f.checkpointing import read_state
from t2f.config import to_dict
from t2f.eval.clip import clip_source
from t2f.eval.hooks import registered
from t2f.eval.protocols import PROTOCOLS, deviations


def truncation_of(cfg) -> float:
    """The truncation psi evaluation uses: eval.truncation_psi, else the generator's default."""
    return cfg.generator.truncation_psi if cfg.eval.truncation_psi is None else cfg.eval.truncation_psi


def config_hash(cfg) -> str:
    """Hash of the model's config (the eval section left out: it is recorded as the protocol)."""
    tree = {k: v for k, v in to_dict(cfg).items() if k != "eval"}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def protocol_record(pipeline, metrics, data_id, seen: int, generated: int, split_count: int) -> dict:
    e, res = pipeline.cfg.eval, data_id["resolution"]
    size = f"generated {pipeline.resolution}px resized to {res}px (antialiased bicubic)" \
        if pipeline.resolution != res else f"{res}px"
    common = {"split": data_id["split"], "test_images": seen, "generated_images": generated,
              "captions": f"{e.protocol}: {PROTOCOLS[e.protocol]}", "caption_protocol": e.protocol,
              "seed": e.seed, "truncation_psi": truncation_of(pipeline.cfg), "resolution": size}
    if e.protocol == "mmcelebahq":
        common.update(caption_seed=e.caption_seed, deviations=deviations(e.protocol, seen, split_count))
    if {"clip_score", "r_precision"} & set(metrics):
        common["clip_checkpoint"] = clip_source(pipeline.cfg)  # the CLIP that scored text-image agreement
    known = registered()
    return {**common, **{m: known[m].protocol for m in metrics}}


def _metric_of(value_name: str) -> str:
    """The metric that reports `value_name` (e.g. lpips_paired -> lpips)."""
    return next(m.name for m in registered().values() if value_name in m.value_names)


def metrics_record(pipeline, values, metrics, skipped, seen, data_id, shards, step, seconds, meters, generated,
                   manifest) -> dict:
    if step is None and pipeline.checkpoint is not None and (pipeline.checkpoint / "state.json").is_file():
        step = read_state(pipeline.checkpoint).get("step")
    split_count = manifest["splits"][data_id["split"]]["count"]
    return {"metrics": values, "protocol": protocol_record(pipeline, metrics, data_id, seen, generated, split_count),
            "metric_of": {name: _metric_of(name) for name in values},  # value -> the metric whose protocol line it has
            "dataset": manifest.get("source"), "split_images": split_count, "trl_weight": pipeline.cfg.loss.trl_weight,
            "step": step, "checkpoint": str(pipeline.checkpoint) if pipeline.checkpoint else None,
            "config_hash": config_hash(pipeline.cfg), "shards": shards, "skipped": skipped,
            "real_stats": {n: {"path": str(m.cache.path(m.parts)), "from_cache": m.real_from_cache}
                           for n, m in meters.items()},
            "seconds": round(seconds, 1)}


def _number(value: float) -> str:
    """Four decimals, six for small values (KID is of the order of 0.01)."""
    return f"{value:10.6f}" if 0 < abs(value) < 0.1 else f"{value:10.4f}"


def report(result, out_path, log_fn) -> None:
    p = result["protocol"]
    drawn = f", caption seed {p['caption_seed']}" if "caption_seed" in p else ""
    print(f"[t2f eval] {p['split']} split: {p['test_images']} test images, {p['generated_images']} generated; "
          f"captions {p['captions']}{drawn}; seed {p['seed']}, truncation {p['truncation_psi']}, {p['resolution']}")
    for name, value in result["metrics"].items():
        print(f"  {name:<22} {_number(value)}   [{p['caption_protocol']}{drawn}; {p[_metric_of(name)]}]")
    for deviation in p.get("deviations", []):
        print(f"  not the {p['caption_protocol']} protocol: {deviation}")
    for name, why in result["skipped"].items():
        print(f"  {name:<22} {'skipped':>10}   [{why}]")
    if out_path:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
        print(f"[t2f eval] wrote {out}")
    if log_fn is not None:
        log_fn({f"eval/{k}": v for k, v in result["metrics"].items()}, result["step"])
