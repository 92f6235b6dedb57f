"""`t2f eval`: FID, KID, LPIPS and text-image agreement of a checkpoint on a test split; also the periodic eval.

    t2f eval --ckpt runs/mmcelebahq --metrics fid,kid,lpips --protocol mmcelebahq
    t2f eval --table --ckpt runs/mmcelebahq                                # its numbers beside the paper's
    t2f eval --ckpt runs/x --plugin t2f.toy.metrics --metrics attributes   # a world's metric on other shards
    accelerate launch -m t2f.eval.evaluate --ckpt runs/mmcelebahq          # every GPU takes a slice

    # the trainer, every train.eval_every steps, on all ranks; `hooks = EvalHooks()` made once and
    # kept, so Inception / LPIPS load on the first call only:
    pipe = Pipeline.from_parts(cfg, accelerator.unwrap_model(model), generator, text_encoder, vocab)
    evaluate(pipe, max_images=cfg.eval.subset, step=step, out_path=run_dir / "eval" / f"step-{step:08d}.json",
             log_fn=lambda scalars, step: ..., hooks=hooks, skip_missing=True)

What is measured (the protocol is written next to every number, in the log and in metrics.json):
- fid: clean-fid 'clean' FID, images generated from the split's captions vs the split's real
  images (t2f/eval/fid.py); real statistics are cached per (shards, split, resolution, subset,
  protocol, extractor); kid: clean-fid's KID on the same features, with its spread (t2f/eval/kid.py);
- lpips (paired, the paper's): generated image vs the real image of its caption; diversity:
  two samples of the same caption (t2f/eval/lpips.py);
- bleu: the recaptioner's greedy caption of each generated image vs the caption it was made from;
- clip_score, r_precision: CLIP's agreement of each generated image with its caption, and
  AttnGAN's ranking of the true caption among 99 others (t2f/eval/clip.py), with the real
  images' values beside them; skipped with the reason when the text encoder has no image tower;
- whatever the shards' world registers (t2f/eval/hooks.py): the manifest names the modules, which
  may add metrics on their own shards (the toy world's attributes and toy_fid).

Caption protocol (t2f/eval/protocols.py): `one` generates one image from the first caption of
every test image; `all` one image from every caption; `mmcelebahq` the dataset maintainers' one
caption drawn at random per image (seeded, recorded), at 256px. Every rank reads the split in the same order and takes
every world_size-th image, so a subset means the same images on any number of ranks; per-image
CA noise is seeded from (seed, image id, caption index), so results do not depend on the rank
count. Ranks send their partial results to rank 0, which computes and writes metrics.json; what
needs the whole set at once (KID's subsets, R-precision's distractors) is drawn there, from
results sorted by image id, so it is the same on any number of ranks.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from t2f.data.remote import public
from t2f.eval.distributed import broadcast, gather, leave_process_group, rank_world
from t2f.eval.fid import FidMeter, RealStatsCache
from t2f.eval.hooks import EvalHooks, Generated, build_hooks, load_plugins, manifest_plugins, registered, select_metrics
from t2f.eval.protocols import PROTOCOLS, check_protocol, eval_resolution, protocol_captions
from t2f.eval.report import metrics_record, report, truncation_of
from t2f.inference import resize_images, sample_seed

# ---------------------------------------------------------------------------- the evaluation


def evaluate(pipeline, *, shards=None, split=None, max_images=None, step=None, out_path=None, log_fn=None,
             hooks: EvalHooks | None = None, skip_missing=False, progress=True) -> dict:
    """Run the metrics of `pipeline.cfg.eval` on `split` of `shards`; every rank must call it.

    Returns the metrics record on every rank; rank 0 writes it to `out_path` (when given) and
    calls `log_fn({"eval/<name>": value}, step)`. `hooks` supplies the metrics' parts (feature
    extractors, the LPIPS model, scorers; built from the config when missing); with
    `skip_missing`, a metric whose weights are not on disk is skipped with a warning instead of
    raising. The shards' manifest names the plugins that register their world's metrics.
    """
    from t2f.data.loader import make_eval_loader, read_manifest

    cfg, e = pipeline.cfg, pipeline.cfg.eval
    shards, split = str(shards or cfg.data.shards), split or cfg.data.eval_split
    max_images = e.max_images if max_images is None else max_images
    check_protocol(e.protocol)
    manifest = read_manifest(shards)
    load_plugins(manifest_plugins(manifest))
    metrics = select_metrics(e.metrics, manifest)
    hooks, skipped = build_hooks(cfg, pipeline.device, metrics, hooks, skip_missing)
    skipped = {m: why for m, why in skipped.items() if m in metrics}
    metrics = [m for m in metrics if m not in skipped]
    rank, world = rank_world()
    resolution = eval_resolution(cfg)
    data_id = {"split": split, "shards": _split_digest(manifest, split), "resolution": resolution,
               "max_images": max_images, "protocol": e.protocol}
    meters = _fid_meters(hooks, metrics, data_id, e.stats_cache, world)
    loader = make_eval_loader(shards, split, batch_size=e.batch_size, resolution=resolution, vocab=pipeline.vocab,
                              max_tokens=cfg.data.max_caption_tokens)
    tic = time.perf_counter()
    total = min(max_images or math.inf, manifest["splits"][split]["count"])
    bar = _progress(math.ceil(total / world), enabled=progress and rank == 0)
    records, seen = _run(pipeline, loader, rank, world, max_images, meters, hooks, metrics, resolution, bar)
    parts = gather((records, {name: m.moments() for name, m in meters.items()}), world)
    result = None
    if rank == 0:
        values, details = _combine(parts, meters, metrics, e.seed, e.protocol)
        generated = sum(len(r) for r, _ in parts)
        result = metrics_record(pipeline, values, metrics, skipped, seen, data_id, public(shards), step,
                                time.perf_counter() - tic, meters, generated, manifest)
        result.update(details)
        report(result, out_path, log_fn)
    return broadcast(result, world)


def _split_digest(manifest: dict, split: str) -> str:
    """What the real images depend on: the split's shard names and checksums (not where they live)."""
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in the shards; they have: {', '.join(manifest['splits'])}")
    shards = [(s["name"], s.get("sha256")) for s in manifest["splits"][split]["shards"]]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def _feature_metrics(metrics) -> list:
    return [m for m in registered().values() if m.kind in ("fid", "kid") and m.name in metrics]


def _fid_meters(hooks, metrics, data_id, stats_cache, world) -> dict:
    """One meter per feature extractor (fid and kid of the same part share it), keyed by part."""
    cache, meters = RealStatsCache(stats_cache or None), {}
    for m in _feature_metrics(metrics):
        if m.part_key not in meters:
            keep = any(k.kind == "kid" and k.part_key == m.part_key for k in _feature_metrics(metrics))
            meters[m.part_key] = FidMeter(hooks.parts[m.part_key], data_id, cache, keep_features=keep)
    # rank 0 alone computes and caches the real statistics: every rank follows its decision
    needs = broadcast({name: m.needs_real for name, m in meters.items()}, world)
    for name, meter in meters.items():
        meter.collect_real = needs[name]
    return meters


def _my_images(loader, rank: int, world: int, limit: int, counter: list):
    """(key, real image, captions) of every world_size-th image of the split, the first `limit` only."""
    for batch in loader:
        for j, key in enumerate(batch["key"]):
            if limit and counter[0] >= limit:
                return
            if counter[0] % world == rank:
                yield key, batch["image"][j], batch["all_captions"][j]
            counter[0] += 1


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="img", disable=not enabled, leave=False)


@torch.no_grad()
def _run(pipeline, loader, rank, world, limit, meters, hooks, metrics, resolution, bar):
    """This rank's share: per generated image a record, FID moments in the meters."""
    e, counter, records = pipeline.cfg.eval, [0], []
    images = _my_images(loader, rank, world, limit, counter)
    for group in _chunks(images, e.batch_size):
        reals = torch.stack([image for _, image, _ in group]).to(pipeline.device)  # (B, 3, R, R)
        for meter in meters.values():
            meter.add_real(reals, [key for key, _, _ in group])
        jobs = [(i, key, c, caption) for i, (key, _, captions) in enumerate(group)
                for c, caption in protocol_captions(e, key, captions)]
        for chunk in _chunks(jobs, e.batch_size):
            records += _score(pipeline, chunk, reals, meters, hooks, metrics, resolution)
        bar.update(len(group))
    bar.close()
    return records, counter[0]


def _generate(pipeline, captions, seeds, resolution):
    s = pipeline.encode(captions)  # (B, S)
    ws = pipeline.latents(s, seeds, truncation_of(pipeline.cfg))
    return resize_images(pipeline.synthesize(ws, len(seeds)), resolution)  # (B, 3, R, R)


def _per_image(metrics) -> list:
    return [m for m in registered().values() if m.kind == "per_image" and m.name in metrics]


def _score(pipeline, jobs, reals, meters, hooks, metrics, resolution) -> list[dict]:
    """One record per job, with each per-image metric's entry under the metric's name."""
    e = pipeline.cfg.eval
    captions = [caption for _, _, _, caption in jobs]
    fakes = _generate(pipeline, captions, [sample_seed(e.seed, key, c, 0) for _, key, c, _ in jobs], resolution)
    for meter in meters.values():
        meter.add_generated(fakes, [f"{key}#{c:04d}" for _, key, c, _ in jobs])
    paired = reals[[i for i, _, _, _ in jobs]]  # (B, 3, R, R): the real image of each caption

    def again():  # a second sample of each caption (other CA noise), made only if a metric asks
        return _generate(pipeline, captions, [sample_seed(e.seed, key, c, 1) for _, key, c, _ in jobs], resolution)

    generated = Generated(pipeline, fakes, captions, paired, again)
    out = [{"key": key, "caption_index": c, "caption": caption} for _, key, c, caption in jobs]
    for metric in _per_image(metrics):
        for row, entry in zip(out, metric.score(hooks.parts.get(metric.part_key), generated), strict=True):
            row[metric.name] = entry
    return out


def _combine(parts, meters, metrics, seed: int, protocol: str) -> tuple[dict, dict]:
    """Rank 0: (values, extra record keys) from every rank's records and moments, independent of rank order."""
    records = sorted((r for rs, _ in parts for r in rs), key=lambda r: (r["key"], r["caption_index"]))
    for name, meter in meters.items():
        meter.use_moments([moments[name] for _, moments in parts])
    values, details = {}, {}
    for metric in _feature_metrics(metrics):
        meter = meters[metric.part_key]
        if metric.kind == "fid":
            values[metric.name] = meter.compute()
        else:
            values.update(zip(metric.value_names, meter.kid(seed)))
    if protocol == "mmcelebahq":  # the draw, recorded: which caption of every image was used
        details["captions_drawn"] = {r["key"]: r["caption_index"] for r in records}
    for metric in _per_image(metrics):
        values.update(metric.summarise(records))
        if metric.details is not None:
            details.update(metric.details(records))
    return values, details


# ---------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2f eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="run directory (its latest checkpoint) or checkpoint directory (required to evaluate)")
    p.add_argument("--shards", help="shard directory (default: the checkpoint's data.shards)")
    p.add_argument("--split", help="split to evaluate (default: the checkpoint's data.eval_split)")
    p.add_argument("--metrics", help=f"comma list of {', '.join(registered())} and the metrics of the shards' "
                   "world (default: eval.metrics)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="also import MODULE, which registers metrics (e.g. t2f.toy.metrics); repeatable")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), help="caption protocol (default: eval.protocol = one; "
                   "mmcelebahq: the dataset maintainers', one random caption per test image at 256px)")
    p.add_argument("--max-images", type=int, help="first N test images only (default: eval.max_images, 0 = all)")
    p.add_argument("--out", help="metrics JSON path (default: CHECKPOINT/metrics.json)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--recaptioner-only", action="store_true",
                   help="only the recaptioner's BLEU-4 on real test images (is it fit to train through?)")
    p.add_argument("--table", nargs="*", metavar="RESULT",
                   help="print a Markdown table of evaluations (metrics.json files or checkpoint dirs; none: --ckpt's) "
                        "next to the paper's numbers, with each column's protocol; evaluates nothing")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.inception=/path eval.batch_size=32")
    return p


def _overrides(args) -> list[str]:
    flags = {"eval.metrics": args.metrics, "eval.protocol": args.protocol, "eval.max_images": args.max_images}
    return list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]


def main(argv=None) -> int:
    from accelerate import PartialState

    from t2f.checkpointing import CheckpointNotFound
    from t2f.config import ConfigError
    from t2f.eval.fid import InceptionWeightsMissing
    from t2f.eval.lpips import LpipsWeightsMissing
    from t2f.inference import PipelineError, load_pipeline
    from t2f.models.text_encoder import TextEncoderError

    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.table is not None:
        from t2f.eval.table import main as table_main

        return table_main(args.table or ([args.ckpt] if args.ckpt else []), args.out)
    if not args.ckpt:
        print("t2f eval: --ckpt RUN_OR_CHECKPOINT is required (or --table to print results)", file=sys.stderr)
        return 2
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("t2f eval: --device cuda but CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    device, main_process = ("cpu" if cpu else "cuda"), True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch` / torchrun: join the group
        state = PartialState(cpu=cpu)
        device, main_process = state.device, state.is_main_process
    try:
        load_plugins(args.plugin)
        pipeline = load_pipeline(args.ckpt, device=device, overrides=_overrides(args))
        out = args.out or pipeline.checkpoint / "metrics.json"
        if args.recaptioner_only:
            return _recaptioner_only(pipeline, args, out, main_process)
        evaluate(pipeline, shards=args.shards, split=args.split, out_path=out if main_process else None)
    except (CheckpointNotFound, PipelineError, ConfigError, TextEncoderError, InceptionWeightsMissing,
            LpipsWeightsMissing, FileNotFoundError, ValueError) as err:
        print(f"t2f eval: {err}", file=sys.stderr)
        return 2
    finally:
        leave_process_group()
    return 0


def _recaptioner_only(pipeline, args, out, main_process) -> int:
    from t2f.eval.captions import real_image_bleu4

    if not main_process:
        return 0  # a single pass over the split: no need for more than one process
    record = real_image_bleu4(pipeline, args.shards, args.split, args.max_images or 0)
    out = Path(args.out) if args.out else Path(out).with_name("recaptioner.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recaptioner BLEU-4 on {record['images']} real {record['split']} images: {record['recaptioner_bleu4']:.2f} "
          f"({record['protocol']}); wrote {out}")
    return 0


if __name__ == "__main__":
    from t2f.exit_status import exit_process

    exit_process(main())  # under accelerate launch: no teardown abort after a finished evaluation
