"""`./launch demo`: the whole pipeline on the embedded toy world, on a CPU, in minutes.

    ./launch demo                  shards -> training (accelerate launch, toy preset) -> evaluation -> grid
    ./launch demo --ablation       the same again with loss.trl_weight=0 (no text reconstruction)
    ./launch demo --steps 40       a shortened run (what the test suite does)

Writes runs/demo/{samples.png, metrics.json} (plus the run's checkpoints, metrics.jsonl and W&B
offline logs) and prints a table. The number that says whether the method works is
`attribute_accuracy`: the shipped toy classifier reads the generated face of each held-out
caption, and we count how many of the 14 attributes agree with what the caption says.
`latent_accuracy` checks the same without any classifier (see `latent_accuracy`).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHOW_CAPTIONS = 6  # rows of the sample grid
SAMPLES_PER_CAPTION = 4


def _parser():
    p = argparse.ArgumentParser(prog="./launch demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--shards", default="shards/toy")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the toy preset's)")
    p.add_argument("--train-faces", type=int, default=1500)
    p.add_argument("--test-faces", type=int, default=250)
    p.add_argument("--ablation", action="store_true", help="also train with loss.trl_weight=0 and report both")
    p.add_argument("overrides", nargs="*", help="extra config overrides for training, e.g. optim.lr=3e-4")
    return p


def build_shards(args) -> None:
    from t2f.toy.dataset import build_toy_shards

    print(f"[demo] 1/4 toy shards -> {args.shards} ({args.train_faces} train, {args.test_faces} test faces)", flush=True)
    build_toy_shards(args.shards, train=args.train_faces, test=args.test_faces)


def train(args, run_dir: Path, extra=()) -> None:
    """The real entry point, launched the way users launch it (one CPU process here)."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts from scratch
    overrides = [f"data.shards={args.shards}", f"train.run_dir={run_dir}", "wandb.mode=offline", *args.overrides, *extra]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           str(ROOT / "t2f" / "train.py"), "--config", "toy", *overrides]
    print(f"[demo] 2/4 training: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def evaluate_run(run_dir: Path) -> dict:
    """Toy metrics on every held-out face, plus the recaptioner's BLEU-4 on real test images."""
    import t2f.toy.metrics  # noqa: F401  (registers attributes and toy_fid, whatever the shards' manifest says)
    from t2f.eval.captions import real_image_bleu4
    from t2f.eval.evaluate import evaluate
    from t2f.inference import load_pipeline
    from t2f.toy.diversity import CAPTIONS, sample_diversity

    print(f"[demo] 3/4 evaluation of {run_dir}", flush=True)
    pipeline = load_pipeline(run_dir, overrides=["eval.metrics=attributes,second_reader,toy_fid,diversity,bleu"])
    record = evaluate(pipeline, out_path=run_dir / "eval.json", skip_missing=True, progress=True)
    record["recaptioner_bleu4_real"] = real_image_bleu4(pipeline)["recaptioner_bleu4"]
    record["latent_accuracy"] = latent_accuracy(pipeline)
    record["sample_diversity"] = sample_diversity(pipeline, held_out_captions(pipeline, CAPTIONS))
    return record


def held_out_captions(pipeline, count: int) -> list:
    """The first `count` captions of the evaluation split, in the loader's fixed order."""
    from t2f.data.loader import make_eval_loader

    cfg = pipeline.cfg
    loader = make_eval_loader(cfg.data.shards, cfg.data.eval_split, batch_size=count,
                              resolution=cfg.data.resolution, vocab=pipeline.vocab)
    return list(next(iter(loader))["caption"])


def latent_accuracy(pipeline) -> float:
    """A check no classifier takes part in: the CA head's mean z for each held-out caption, read by
    the world's own latent map (params_from_latent), against the caption's attributes. It says
    whether training asks the generator for the right face, however well the generator draws it."""
    import numpy as np
    import torch

    from t2f.data.loader import make_eval_loader

    cfg = pipeline.cfg
    loader = make_eval_loader(cfg.data.shards, cfg.data.eval_split, batch_size=cfg.eval.batch_size,
                              resolution=cfg.data.resolution, vocab=pipeline.vocab)
    hits = []
    for batch in loader:
        with torch.no_grad():
            _, mu, _ = pipeline.model.ca(pipeline.encode(batch["caption"]), deterministic=True)  # (B, Z)
        hits.append(latent_agreement(mu.cpu().numpy(), batch["caption"]))
    return float(np.concatenate(hits).mean())


def latent_agreement(z, captions):
    """(B, A) bool: does latent z[i] mean attribute a of the face caption i describes?"""
    import numpy as np

    from t2f.toy.attributes import attribute_vector, params_from_latent
    from t2f.toy.captions import parse_caption

    asked = np.stack([attribute_vector(params_from_latent(row)[0]) for row in z])
    wanted = np.stack([attribute_vector(parse_caption(c)) for c in captions])
    return asked == wanted


def sample_grid(run_dir: Path, pipeline=None) -> Path:
    import torch

    from t2f.inference import load_pipeline
    from t2f.visual import caption_grid

    pipeline = pipeline or load_pipeline(run_dir)
    captions = held_out_captions(pipeline, SHOW_CAPTIONS)
    images = pipeline.generate(captions, n=SAMPLES_PER_CAPTION, seed=0)
    out = run_dir / "samples.png"
    read_back = pipeline.read_back(images)
    big = torch.nn.functional.interpolate(images.cpu(), scale_factor=2, mode="nearest")  # 64 px faces are hard to see
    caption_grid(big, captions, per_row=SAMPLES_PER_CAPTION, subcaptions=read_back).save(out)
    return out


def summarise(record: dict) -> dict:
    """The numbers the README reports, flattened from the evaluation record (t2f/eval/report.py)."""
    values = record["metrics"]
    return {
        "attribute_accuracy": values.get("attribute_accuracy"),
        "latent_accuracy": record.get("latent_accuracy"),
        "exact_match": values.get("attribute_exact_match"),
        "per_attribute": record.get("attribute_accuracy_per_attribute"),
        # The same faces read by a classifier no part of the pipeline saw (t2f/toy/metrics.py).
        "second_reader_accuracy": values.get("second_reader_accuracy"),
        "second_reader_exact_match": values.get("second_reader_exact_match"),
        "second_reader_per_attribute": record.get("second_reader_accuracy_per_attribute"),
        "diversity_nuisance_ratio": record["sample_diversity"]["nuisance"]["ratio"],
        "diversity_features_ratio": record["sample_diversity"]["features"]["ratio"],
        "sample_diversity": record["sample_diversity"],
        "fid_toy": values.get("toy_fid"),
        "lpips_diversity": values.get("lpips_diversity"),
        "recaptioner_bleu4": record.get("recaptioner_bleu4_real"),
        "generated_bleu4": values.get("bleu4"),
        "skipped": record.get("skipped", {}),
    }


def print_table(metrics: dict) -> None:
    rows = [("attribute_accuracy", "faces agree with the caption, mean over 14 attributes"),
            ("exact_match", "faces with all 14 attributes right"),
            ("second_reader_accuracy", "the same faces read by a classifier nothing else saw (seed 2)"),
            ("latent_accuracy", "the CA head's z read by the world's latent map (no classifier)"),
            ("diversity_nuisance_ratio", "nuisance spread of one caption's sampled z / random faces'"),
            ("diversity_features_ratio", "feature spread of one caption's faces / random faces' renders"),
            ("fid_toy", "FID on the toy classifier's features (lower is better)"),
            ("lpips_diversity", "LPIPS between two samples of one caption"),
            ("recaptioner_bleu4", "recaptioner BLEU-4 on real held-out faces"),
            ("generated_bleu4", "recaptioner BLEU-4 on generated faces vs their captions")]
    ablation = metrics.get("ablation")
    head = f"{'metric':<20}{'t2f':>10}" + (f"{'λ2 = 0':>10}" if ablation else "")
    print("\n" + head + "\n" + "-" * len(head))
    for key, what in rows:
        cells = [metrics.get(key)] + ([ablation.get(key)] if ablation else [])
        text = "".join(f"{v:>10.3f}" if isinstance(v, (int, float)) else f"{'n/a':>10}" for v in cells)
        print(f"{key:<20}{text}   {what}")
    for name, why in metrics.get("skipped", {}).items():
        print(f"(skipped {name}: {why})")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    run_dir = Path(args.out)
    build_shards(args)
    train(args, run_dir)
    metrics = summarise(evaluate_run(run_dir))
    if args.ablation:
        ablation_dir = run_dir.with_name(run_dir.name + "-ablation")
        train(args, ablation_dir, extra=("loss.trl_weight=0",))
        metrics["ablation"] = summarise(evaluate_run(ablation_dir))
    print("[demo] 4/4 sample grid", flush=True)
    grid = sample_grid(run_dir)
    metrics["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    metrics["minutes"] = round((time.perf_counter() - start) / 60, 1)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_table(metrics)
    print(f"\nwrote {grid}, {run_dir / 'metrics.json'} ({metrics['minutes']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
