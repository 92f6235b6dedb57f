"""`t2f serve`: a web page (Gradio) to try a trained checkpoint, with the recaptioner's attention.

    t2f serve                                    # after ./launch demo: runs/demo on http://127.0.0.1:7860
    t2f serve --ckpt runs/mmcelebahq --device cuda --host 0.0.0.0 --port 8080

Type a caption (or pick one of the test split's), choose the number of faces, seed, truncation
and CA noise; the page shows the faces with what the recaptioner reads back under each, and for
a chosen face where it looked for each word (t2f/attention.py). The grid and a JSON of the
settings download from the page; the JSON's `command` draws the same faces with `t2f generate`.
Scripts use the same endpoint: `gradio_client.Client(url).predict(caption, faces, seed, truncation,
ca_noise, api_name="/generate")` (offline: HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False).

Requests wait in Gradio's queue and run one at a time; one that runs past --time-limit stops
with a message, and bad input gets a message on the page: the server stays up. It binds to
127.0.0.1 (this machine only) unless --host says otherwise, and works offline: Gradio's analytics
and version check are off and the page loads nothing from outside the server.
"""

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

DEFAULT_RUN = Path("runs/demo")  # where ./launch demo trains
EXAMPLES = 6


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2f serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help=f"run directory (its latest checkpoint) or checkpoint directory (default: {DEFAULT_RUN})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: only this machine; "
                                                       "0.0.0.0 lets other machines in)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860, Gradio's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--time-limit", type=float, default=120.0, metavar="SECONDS",
                   help="stop a request that runs longer than this (default 120)")
    p.add_argument("--no-ema", action="store_true", help="draw with the trained CA head and mapper, not their EMA")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. --set text.encoder=/models/clip (repeatable)")
    return p


def main(argv=None) -> int:
    from t2f.checkpointing import CheckpointNotFound
    from t2f.config import ConfigError
    from t2f.generate import UsageError, resolve_device
    from t2f.inference import PipelineError, load_pipeline
    from t2f.models.text_encoder import TextEncoderError
    from t2f.models.weights import CheckpointError

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    offline_gradio()  # before the models load: huggingface_hub reads its telemetry switch when imported
    try:
        ckpt = _checkpoint_arg(args.ckpt)
        _check_address(args)
        device = resolve_device(args.device)
        pipeline = load_pipeline(ckpt, device=device, overrides=args.set, use_ema=not args.no_ema)
    except (UsageError, CheckpointNotFound, PipelineError, ConfigError, TextEncoderError, CheckpointError,
            FileNotFoundError) as err:
        print(f"t2f serve: {err}", file=sys.stderr)
        return 2
    from t2f.serving import Studio

    studio = Studio(pipeline, time_limit=args.time_limit, use_ema=not args.no_ema, overrides=args.set, device=device)
    return serve(studio, args.host, args.port, _examples(pipeline))


def _checkpoint_arg(ckpt):
    from t2f.generate import UsageError

    if ckpt:
        return ckpt
    if not DEFAULT_RUN.is_dir():
        raise UsageError(f"no --ckpt given and there is no {DEFAULT_RUN} here; run ./launch demo first "
                         "(it trains runs/demo) or give --ckpt RUN_OR_CHECKPOINT")
    return DEFAULT_RUN


def _check_address(args) -> None:
    """Refuse a bad port, time limit or taken address before the models load (a minute on big ones)."""
    from t2f.generate import UsageError

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be from 1 to 65535, got {args.port}")
    if not args.time_limit > 0:
        raise UsageError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    try:
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as err:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); "
                         "choose another --port (or --host)") from None


def _examples(pipeline) -> list[str]:
    from t2f.serving import example_captions

    try:
        return example_captions(pipeline, EXAMPLES)
    except Exception as err:  # examples are a convenience: a page without them still works
        print(f"t2f serve: no example captions ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
              file=sys.stderr)
        return []


def serve(studio, host: str, port: int, examples: list[str]) -> int:
    """Build the page, listen on host:port, say where, and serve until Ctrl-C."""
    offline_gradio()
    from t2f.serve_page import build_page

    downloads = Path(tempfile.mkdtemp(prefix="t2f-serve-"))
    page = build_page(studio, examples, downloads)
    try:
        page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, show_error=True,
                    allowed_paths=[str(downloads)])
    except OSError as err:
        print(f"t2f serve: cannot listen on {host}:{port} ({err}); choose another --port", file=sys.stderr)
        return 2
    local = host in ("127.0.0.1", "localhost", "::1")
    reach = "only this machine can open it (--host 0.0.0.0 lets others in)" if local else "other machines can open it"
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    print(f"t2f serve: {studio.pipeline.checkpoint} at {url}, bound to {host}: {reach}. Ctrl-C stops it.", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        page.block_thread()  # returns on Ctrl-C, after closing the server
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def offline_gradio() -> None:
    """Gradio must not phone home: no analytics, no version check, no Hugging Face telemetry.

    Set before gradio is imported, because it reads them at import time."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_SSR_MODE", "False")  # server-side rendering would start Node.js


if __name__ == "__main__":
    sys.exit(main())
