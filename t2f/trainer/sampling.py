"""The trainer's sample grids and periodic evaluation, through the one generation path.

Both draw with `t2f.inference.Pipeline` over the live model in eval mode (with the EMA's text
path when the run keeps one), as `t2f generate` and `t2f eval` do from a checkpoint: a grid at
step N is what `t2f generate --ckpt RUN/checkpoints/step-N --seed <train.seed>` draws.
"""

import contextlib
from pathlib import Path


@contextlib.contextmanager
def generation_pipeline(cfg, accelerator, model, ema, generator, text_encoder, vocab):
    """The one generation path (t2f.inference.Pipeline) over the live model, in eval mode.

    With an EMA the pipeline draws with the averaged text path, as `t2f generate` does from the
    checkpoint, so a sample grid at step N is what `t2f generate --seed train.seed` gives.
    """
    from t2f.inference import Pipeline

    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    try:
        yield Pipeline.from_parts(cfg, ema.as_model(net) if ema else net, generator, text_encoder, vocab)
    finally:
        net.train(was_training)


def write_samples(cfg, monitor, step, pipeline, captions):
    from t2f.visual import caption_grid

    per = cfg.train.samples_per_caption
    images = pipeline.generate(captions, n=per, seed=cfg.train.seed, truncation_psi=cfg.generator.truncation_psi)
    decoded = pipeline.read_back(images)
    grid = caption_grid(images.cpu(), captions, per_row=per, subcaptions=decoded)
    monitor.log_samples(step, grid, captions, decoded)


def periodic_eval(cfg, monitor, step, pipeline, hooks):
    """`t2f eval`'s code on `eval.subset` test images; every rank takes part, rank 0 logs `eval/`."""
    from t2f.eval.evaluate import evaluate

    out = Path(cfg.train.run_dir) / "eval" / f"step-{step:08d}.json"
    return evaluate(pipeline, max_images=cfg.eval.subset, step=step, out_path=out, hooks=hooks, skip_missing=True,
                    log_fn=lambda scalars, s: monitor.log(s, scalars, prefix=""), progress=False)


def sample_captions(cfg, vocab, count: int) -> list[str]:
    from t2f.data.loader import make_eval_loader

    loader = make_eval_loader(cfg.data.shards, cfg.data.eval_split, batch_size=count, resolution=cfg.data.resolution, vocab=vocab)
    return list(next(iter(loader))["caption"])[:count]


def eval_hooks(cfg):
    """Feature extractors for the periodic evaluation, or None when it is off."""
    if not cfg.train.eval_every:
        return None
    from t2f.eval.hooks import EvalHooks

    return EvalHooks()  # filled on first use: Inception/LPIPS load once per run
