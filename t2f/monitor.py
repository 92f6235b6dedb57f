"""What a training run reports: scalars, sample grids, a progress bar.

Everything goes to the run directory (`metrics.jsonl`, `samples/step-XXXXXXXX.png`), so a run
is readable without W&B, and to Weights & Biases through Accelerate's tracker. W&B is
offline unless credentials exist (WANDB_API_KEY or a netrc entry); the log then says how to
sync. The run id is kept in the run directory so a resumed or requeued job continues the same
W&B run. On resume, `metrics.jsonl` loses the lines past the checkpoint's step (written after
it by a run that then died), so each step appears once. Only the main process writes. No
secret is ever logged: the config holds none, and the environment is not logged.
"""

import json
import netrc
import os
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from t2f.config import to_dict

WANDB_ID_FILE = "wandb_id.txt"


def wandb_mode(requested: str) -> str:
    """'auto' -> online when credentials are configured, offline otherwise."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def _run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created once and reused on resume."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def init_tracking(accelerator, cfg, run_dir: Path) -> str:
    """Start the W&B tracker (all ranks must call; only the main one logs). Returns the mode."""
    mode = wandb_mode(cfg.wandb.mode)
    if mode == "disabled" or not accelerator.is_main_process:
        return mode
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    init = {"dir": str(run_dir), "id": _run_id(run_dir), "resume": "allow", "name": run_dir.name}
    if cfg.wandb.entity:
        init["entity"] = cfg.wandb.entity
    accelerator.init_trackers(cfg.wandb.project, config=to_dict(cfg), init_kwargs={"wandb": init})
    if mode == "offline":
        print(f"[t2f] W&B is offline (no credentials found); to upload later: wandb sync {run_dir}/wandb/offline-run-*")
    return mode


def drop_metrics_after(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` (and drop torn lines); atomic. Returns how many were dropped."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    """The step of a metrics record; None for a line a killed writer left half-written."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class Monitor:
    """Per-step scalars, sample grids and a progress bar for the main process."""

    def __init__(self, accelerator, run_dir: Path, total_steps: int, start_step: int, wandb_on: bool):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.main = accelerator.is_main_process
        self.wandb_on = wandb_on and self.main
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=not self.main)
        if self.main:
            drop_metrics_after(run_dir / "metrics.jsonl", start_step)

    def step(self, step: int) -> None:
        self.bar.update(1)

    def log(self, step: int, scalars: dict, prefix: str = "train/") -> None:
        if not self.main:
            return
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in scalars.items() if k in ("loss", "trl", "recaptioner")})
        record = {"step": step, **{prefix + k: float(v) for k, v in scalars.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_on:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_samples(self, step: int, grid, captions: list[str], decoded: list[str]) -> None:
        """A grid PNG (captions under rows) plus a table of input vs read-back captions."""
        if not self.main:
            return
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        grid.save(folder / f"step-{step:08d}.png")
        with open(folder / f"step-{step:08d}.json", "w") as f:
            json.dump({"captions": captions, "read_back": decoded}, f, indent=1)
        if self.wandb_on:
            import wandb

            table = wandb.Table(columns=["caption", "read back"], data=[[c, d] for c, d in zip(captions, decoded)])
            self.accelerator.log({"samples/grid": wandb.Image(grid), "samples/captions": table}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.wandb_on:
            self.accelerator.end_training()
