"""The paper presets at full size, on random-weight stand-ins in the real formats (`t2f standins`).

Default run (about a minute): the stand-ins are written and every one loads through t2f's own
loaders at its real size, and the `mmcelebahq` preset builds its models from them through the
T2F_* variables the README names.

`scale` tier (`./launch test -m scale`; about 8 minutes on a 2-core CPU): each paper preset the
way the README tells a user to run it: `t2f shards build`, `./launch train --config PRESET` for
three steps at batch 1 (CLIP ViT-B/32, StyleGAN2 FFHQ-1024 config-f, ResNet-101 at 448²),
SIGUSR1 after the first step, the same command again to resume, `t2f eval --max-images 4`, `t2f
generate`. Set T2F_STANDINS=DIR to keep the stand-ins (about 2 GB) between sessions.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2f.standins import DATASETS, NVLABS_PKL, ROSINALITY_PT, write_standins

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "The woman has blond hair and is smiling."
# A few steps at a small batch; one warm-up step (recaptioner only), then the joint step with the generator.
SHORT_RUN = ["data.batch_size=1", "data.num_workers=1", "train.steps=3", "train.recaptioner_warmup_steps=1",
             "train.ckpt_every=2", "train.log_every=1", "train.sample_captions=1", "train.samples_per_caption=1",
             "train.eval_every=0"]


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """(folder, environment) of a complete stand-in set, written once per session (or kept in $T2F_STANDINS)."""
    kept = os.environ.get("T2F_STANDINS")
    folder = Path(kept) if kept else tmp_path_factory.mktemp("standins")
    env = write_standins(folder, progress=False)
    yield folder, env
    if not kept:
        shutil.rmtree(folder, ignore_errors=True)  # 2 GB: not left in pytest's tmp folders


def test_t2f_standins_reuses_a_complete_set_and_prints_its_variables(standins, capsys):
    from t2f.cli import main

    folder, env = standins
    tic = time.monotonic()
    assert main(["standins", "--out", str(folder), "--print-env"]) == 0
    assert time.monotonic() - tic < 10  # reused, not rewritten
    assert capsys.readouterr().out.splitlines() == [f"export {k}={v}" for k, v in env.items()]
    assert main(["standins", "--out", "/proc/no-such-place"]) == 2  # bad input: one line, status 2
    assert capsys.readouterr().err.startswith("t2f standins: cannot write")


def test_standins_load_through_the_real_loaders_at_their_real_sizes(standins, monkeypatch):
    from t2f.config import load_config
    from t2f.data.sources import read_celebatext, read_mmcelebahq
    from t2f.eval.fid import InceptionFeatures
    from t2f.eval.lpips import load_lpips
    from t2f.inference import build_models
    from t2f.models.generator import architecture
    from t2f.models.weights import load_generator

    folder, env = standins
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config("mmcelebahq")
    assert (cfg.text.encoder, cfg.generator.checkpoint, cfg.recaptioner.encoder_weights) == (
        env["T2F_CLIP"], env["T2F_STYLEGAN2"], env["T2F_RESNET101"])
    text_encoder, generator, model = build_models(cfg, vocab_size=100, device="cpu")
    assert text_encoder.dim == 512 and len(text_encoder.tokenizer) == 49408
    assert text_encoder.encode([CAPTION, "A man with a beard."]).shape == (2, 512)
    arch = architecture(generator)
    assert (arch["img_resolution"], arch["num_ws"], arch["channels"]["1024"], arch["channels"]["64"]) == (1024, 18, 32, 512)
    assert sum(p.numel() for p in generator.parameters()) > 30_000_000
    rosinality = load_generator(folder / ROSINALITY_PT)  # the same network in rosinality's layout
    for key, value in generator.state_dict().items():
        if "resample_filter" not in key:
            assert torch.equal(rosinality.state_dict()[key].to(value.dtype), value), key
    for rel, megabytes in ((NVLABS_PKL, 360), (ROSINALITY_PT, 360), ("clip-vit-base-patch32/model.safetensors", 600),
                           ("torch/hub/checkpoints/resnet101-63fe2227.pth", 170)):
        assert (folder / rel).stat().st_size > megabytes * 1e6, rel
    encoder = model.recaptioner.encoder  # ImageNet-shaped ResNet-101 from the file, outside the state dict
    assert torch.equal(encoder.body[0].weight, torch.load(env["T2F_RESNET101"], weights_only=True)["conv1.weight"])
    assert not [k for k in model.state_dict() if ".encoder." in k]
    load_lpips(device="cpu")  # AlexNet from $TORCH_HOME
    assert InceptionFeatures(device="cpu")(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)  # from $T2F_CACHE
    for read, rel in ((read_mmcelebahq, DATASETS["mmcelebahq"]), (read_celebatext, DATASETS["celebatext"])):
        data = read(folder / rel)
        assert not data.bad and len(data.attribute_names) == 40
        assert sorted(s.split for s in data.samples).count("test") == 4 and len(data.samples) == 12
        assert all(len(s.captions) == 10 for s in data.samples)


def test_one_full_size_training_step_of_the_paper_preset(standins, monkeypatch):
    """CLIP ViT-B/32 -> CA -> mapper -> FFHQ-1024 synthesis -> ResNet-101 at 448² -> decoder, and back
    to the mapper: one joint step at batch 1 under the preset's bf16 autocast, with finite numbers."""
    from t2f.config import load_config
    from t2f.inference import build_models
    from t2f.trainer.loss import TrainingLoss

    for key, value in standins[1].items():
        monkeypatch.setenv(key, value)
    cfg = load_config("mmcelebahq")
    text_encoder, generator, model = build_models(cfg, vocab_size=200, device="cpu")
    tokens = torch.randint(4, 200, (1, cfg.data.max_caption_tokens), generator=torch.Generator().manual_seed(0))
    tokens[:, 0], tokens[:, -1] = 1, 2  # <bos> ... <eos>
    images = torch.rand(1, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = TrainingLoss(cfg.loss)(model.train(), text_encoder.encode([CAPTION]), tokens, images)
    loss.backward()
    assert torch.isfinite(loss) and {"kl", "trl", "recaptioner"} <= set(logs), logs
    assert model.mapping.fc0.weight.grad.abs().sum() > 0 and model.ca.fc.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in (*generator.parameters(), *model.recaptioner.encoder.body.parameters()))


# ---------------------------------------------------------------------------- the scale tier


def command(env, *args, timeout=1800) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args[:4]))} ... exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def train_until_stopped(env, preset, tmp_path) -> int:
    """`./launch train`, SIGUSR1 once step 1 is logged; returns its exit status."""
    metrics = Path(env["T2F_RUN_DIR"]) / "metrics.jsonl"
    with open(tmp_path / "train-1.out", "w") as out:
        proc = subprocess.Popen([str(ROOT / "launch"), "train", "--config", preset, *SHORT_RUN], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 1800
        while not (metrics.is_file() and metrics.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"./launch train ended or hung before step 1:\n{(tmp_path / 'train-1.out').read_text()[-4000:]}")
            time.sleep(1)
        proc.send_signal(signal.SIGUSR1)
        return proc.wait(timeout=1800)


@pytest.mark.scale
@pytest.mark.parametrize("preset", ["mmcelebahq", "celebatext"])
def test_a_paper_preset_runs_end_to_end_at_full_size(preset, standins, tmp_path):
    from t2f.checkpointing import complete_checkpoints, latest_checkpoint, read_state

    folder, standin_env = standins
    run_dir, shards = tmp_path / "run", tmp_path / "shards"
    env = {**os.environ, **standin_env, "T2F_SHARDS": str(shards), "T2F_RUN_DIR": str(run_dir), "WANDB_MODE": "offline"}
    t2f = [sys.executable, "-m", "t2f.cli"]
    command(env, *t2f, "shards", "build", "--source", preset, "--root", folder / DATASETS[preset], "--out", shards,
            "--resolution", "256")

    assert train_until_stopped(env, preset, tmp_path) == 75, (tmp_path / "train-1.out").read_text()[-4000:]
    stopped_at = read_state(latest_checkpoint(run_dir))["step"]
    assert stopped_at == 2  # the step running when the signal came, then its checkpoint
    resumed = command(env, ROOT / "launch", "train", "--config", preset, *SHORT_RUN)
    assert f"at step {stopped_at}" in resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step-00000003" and [c.name for c in complete_checkpoints(run_dir)] == ["step-00000002", ckpt.name]
    for name in ("t2f.safetensors", "ema.safetensors", "config.yaml", "vocab.json", "state.json", "model.safetensors"):
        assert (ckpt / name).is_file(), name
    assert not [k for k in load_file(str(ckpt / "t2f.safetensors")) if ".encoder." in k]  # no frozen ResNet-101
    assert (run_dir / "samples" / "step-00000003.png").is_file() and (run_dir / "config.yaml").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no W&B offline run in the run directory"

    command(env, *t2f, "eval", "--ckpt", run_dir, "--max-images", "4")
    values = json.loads((ckpt / "metrics.json").read_text())["metrics"]
    for key in ("fid", "lpips_paired", "lpips_diversity", "bleu4"):
        assert math.isfinite(values.get(key, math.nan)), f"metrics.json has no number for {key}: {values}"
    grid = tmp_path / "grid.png"
    command(env, *t2f, "generate", "--ckpt", run_dir, CAPTION, "--n", "1", "--out", grid)
    from PIL import Image

    assert Image.open(grid).width >= 1024  # one 1024² face with its caption
