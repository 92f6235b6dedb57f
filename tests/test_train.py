"""Training: `main([...])` on a tiny world. What a user relies on: losses go down, frozen parts
stay frozen, the recaptioner learns only from real pairs, a preempted or crashed run resumes
to exactly the weights of an uninterrupted one, and the run is readable without W&B."""

import copy
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_overrides

from t2f import train
from t2f.checkpointing import WEIGHTS, latest_checkpoint
from t2f.config import load_config
from t2f.trainer.loss import TrainingLoss
from t2f.trainer.optim import is_joint, make_optimizer, set_learning_rate


@pytest.fixture
def tiny(tmp_path):
    return lambda run="run", steps=4, *extra: tiny_overrides(tmp_path, tmp_path / run, steps) + list(extra)


def final_weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / WEIGHTS))


def test_a_short_run_writes_checkpoint_metrics_and_config(tiny, tmp_path):
    assert train.main(["--config", "toy", *tiny("run", 4)]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records)
    assert {"train/kl", "train/trl", "train/recaptioner", "train/attention", "train/lr"} <= set(records[0])
    weights = final_weights(run)
    assert any(k.startswith("mapping.") for k in weights) and any(k.startswith("ca.") for k in weights)
    assert not any(k.startswith("synthesis.") for k in weights)  # the frozen generator is never saved as trainable
    assert load_config(str(run / "config.yaml")).train.steps == 4


def _parts(tmp_path, overrides):
    cfg = load_config("toy", overrides)
    text_encoder, generator, vocab, model = train.build_parts(cfg, torch.device("cpu"))
    from t2f.data.loader import make_train_loader

    loader = make_train_loader(cfg.data.shards, "train", batch_size=4, resolution=32, vocab=vocab, seed=0)
    batch = next(iter(loader))
    return cfg, text_encoder.encode(batch["caption"]), batch, generator, model


def test_loss_decreases_on_a_fixed_batch_and_the_generator_stays_frozen(tiny, tmp_path):
    cfg, s, batch, generator, model = _parts(tmp_path, tiny("run", 4, "optim.lr=5e-3"))
    frozen_before = {k: v.clone() for k, v in generator.state_dict().items()}
    optimizer = make_optimizer(cfg, model)
    losses = []
    for _ in range(30):
        loss, _ = TrainingLoss(cfg.loss)(model, s, batch["tokens"], batch["image"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and all(torch.isfinite(torch.tensor(losses))), losses
    for key, value in generator.state_dict().items():
        assert torch.equal(value, frozen_before[key]), f"frozen generator changed: {key}"


def test_without_text_reconstruction_no_face_is_generated_and_the_rest_is_unchanged(tiny, tmp_path):
    """The λ2 = 0 ablation learns nothing from the generated face: the step skips the synthesis and its
    reading (the costly part of a step) and its loss is the full step's without the TRL term."""
    cfg, s, batch, generator, model = _parts(tmp_path, tiny("run", 4))
    calls = []
    generator.synthesis.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(0)  # the same CA noise for both losses
    full, full_logs = TrainingLoss(cfg.loss)(model, s, batch["tokens"], batch["image"])
    assert calls == [1]
    weight = cfg.loss.trl_weight
    torch.manual_seed(0)
    ablation, logs = TrainingLoss(dataclasses.replace(cfg.loss, trl_weight=0.0))(model, s, batch["tokens"], batch["image"])
    assert calls == [1], "the ablation rendered a face it does not learn from"
    assert "trl" not in logs and logs["kl"] == full_logs["kl"]
    assert ablation.item() == pytest.approx((full - weight * full_logs["trl"]).item(), rel=1e-6)
    ablation.backward()
    assert all(p.grad is not None for p in model.mapping.parameters())  # in the graph (DDP), with zero gradient
    assert all(p.grad.abs().max() == 0 for p in model.mapping.parameters())


def _mapper_step(tmp_path, overrides):
    """How far one AdamW step moves the mapper's and the CA head's weights (mean |change|)."""
    cfg, s, batch, generator, model = _parts(tmp_path, overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(cfg, model)
    set_learning_rate(cfg, optimizer, step=10_000)  # past any warm-up
    loss, _ = TrainingLoss(cfg.loss)(model, s, batch["tokens"], batch["image"])
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    return [(after[k] - before[k]).abs().mean().item() for k in ("mapping.fc0.weight", "ca.fc.weight")]


def test_mapper_lr_scale_speeds_up_only_the_mapper(tiny, tmp_path):
    base = ["optim.name=adamw", "optim.lr=1e-3", "optim.grad_clip=0"]
    mapper_1, ca_1 = _mapper_step(tmp_path, tiny("run", 4, *base))
    mapper_100, ca_100 = _mapper_step(tmp_path, tiny("run", 4, *base, "optim.mapper_lr_scale=100"))
    assert mapper_100 == pytest.approx(100 * mapper_1, rel=0.05)  # Adam: the step is the learning rate
    assert ca_100 == pytest.approx(ca_1, rel=1e-3)


def test_w_regulariser_measures_only_the_mappers_drift(tiny, tmp_path):
    cfg, s, batch, generator, model = _parts(tmp_path, tiny("run", 4, "loss.w_reg_weight=1"))
    _, z, _, _ = model.latents(s)  # sampled z, CA noise included
    assert model.w_regulariser(z).item() == 0.0  # an untrained mapper is the pretrained mapping, whatever z
    with torch.no_grad():
        model.mapping.fc0.bias.add_(1.0)
    _, z, _, _ = model.latents(s)
    drift = model.w_regulariser(z)
    assert drift.item() > 0
    drift.backward()
    assert model.mapping.fc0.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.ca.parameters())  # the CA head is left to the KL term


def test_generated_image_loss_never_updates_the_recaptioner(tiny, tmp_path):
    cfg, s, batch, generator, model = _parts(tmp_path, tiny())
    buffers = {name: b.clone() for name, b in model.recaptioner.named_buffers()}
    assert any("running_mean" in name for name in buffers)  # the toy encoder has batch norm
    ws, *_ = model.latents(s)
    images = generator.synthesis(ws, noise_mode="const", force_fp32=True)
    logits, alphas = model.read_generated(images, batch["tokens"])
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in model.recaptioner.parameters())  # weights untouched ...
    assert model.recaptioner.training  # (the generated pass leaves it in train mode)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mapping.parameters())  # ... the mapper learns

    for name, b in model.recaptioner.named_buffers():  # nor its batch-norm statistics
        assert torch.equal(b, buffers[name]), f"recaptioner.{name} changed on generated images"

    # In the full step the recaptioner's gradient is exactly that of its real-pair loss.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    total, _ = TrainingLoss(cfg.loss)(model, s, batch["tokens"], batch["image"])
    total.backward()
    joint = {n: p.grad.clone() for n, p in model.recaptioner.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    real, _ = TrainingLoss(cfg.loss)(model, s, batch["tokens"], batch["image"], joint=False)
    real.backward()
    for name, p in model.recaptioner.named_parameters():
        if name in joint:
            torch.testing.assert_close(joint[name], p.grad, msg=f"recaptioner.{name} got gradient from generated images")


def test_preempted_run_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    assert train.main(["--config", "toy", *tiny("straight", 6)]) == 0

    original_step = train.Monitor.step

    def preempt_at_3(self, step):
        original_step(self, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm sends before it preempts

    monkeypatch.setattr(train.Monitor, "step", preempt_at_3)
    assert train.main(["--config", "toy", *tiny("preempted", 6)]) == train.REQUEUE_EXIT_CODE
    # Ranks agree on a stop at the next step's all-reduce: step 4 completes, then the checkpoint.
    assert latest_checkpoint(tmp_path / "preempted").name == "step-00000004"
    monkeypatch.setattr(train.Monitor, "step", original_step)
    assert train.main(["--config", "toy", *tiny("preempted", 6)]) == 0  # resumes from latest by default

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "preempted")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "preempted" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step lost, none done twice


def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(tiny, tmp_path, monkeypatch):
    import t2f.checkpointing as ckpt

    real_save = ckpt.save_file
    calls = {"n": 0}

    def crash_on_second(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", "toy", *tiny("crash", 4), "train.ckpt_every=2"])
    latest = latest_checkpoint(tmp_path / "crash")
    assert latest.name == "step-00000002" and (latest / WEIGHTS).is_file()
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert train.main(["--config", "toy", *tiny("crash", 4), "train.ckpt_every=2"]) == 0
    assert latest_checkpoint(tmp_path / "crash").name == "step-00000004"


def test_non_finite_losses_are_skipped_then_stop_the_run(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "text_features",
                        lambda cfg, batch, enc, dev: torch.full((len(batch["caption"]), enc.dim), float("nan")))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row.*metrics.jsonl"):
        train.main(["--config", "toy", *tiny("nan", 4), "train.max_bad_steps=3"])
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/skipped_steps"] == 3  # every skip is logged before the stop


def test_wandb_offline_run_is_kept_in_the_run_directory(tiny, tmp_path):
    assert train.main(["--config", "toy", *tiny("wb", 2), "wandb.mode=offline", "train.sample_every=2"]) == 0
    run = tmp_path / "wb"
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run directory"
    assert (run / "wandb_id.txt").is_file()
    assert (run / "samples" / "step-00000002.png").is_file()


def test_bench_train_runs_the_real_step_on_cpu(capsys):
    from t2f.bench import main as bench

    assert bench(["train", "--cpu-smoke", "--config", "toy", "--steps", "1", "--batch-size", "2",
                  "generator.resolution=32", "generator.channel_base=128", "generator.channel_max=16",
                  "generator.z_dim=16", "generator.w_dim=16"]) == 0
    out = capsys.readouterr().out
    rate = float(out.split("fp32 + reference")[1].split()[0])
    assert rate > 0


def test_periodic_evaluation_logs_eval_metrics(tiny, tmp_path):
    # Inception and AlexNet are not on this machine: those metrics are skipped, BLEU-4 still runs.
    assert train.main(["--config", "toy", *tiny("ev", 2), "train.eval_every=2", "eval.subset=4", "eval.batch_size=4"]) == 0
    records = [json.loads(line) for line in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert len(evals) == 1 and evals[0]["step"] == 2 and "eval/bleu4" in evals[0], evals
    assert (tmp_path / "ev" / "eval" / "step-00000002.json").is_file()


def _text_path(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(("ca.", "mapping."))}


def _train_steps(cfg, model, optimizer, s, batch, steps):
    """The trainer's order of calls: rate first (DeepSpeed steps inside backward), then the step."""
    for step in steps:
        set_learning_rate(cfg, optimizer, step)
        torch.manual_seed(step)  # the same CA noise for the same step, whatever ran before
        loss, _ = TrainingLoss(cfg.loss)(model, s, batch["tokens"], batch["image"], joint=is_joint(cfg, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("optim", [["optim.name=sgd", "optim.momentum=0.9"], ["optim.name=adamw"]])
def test_recaptioner_warm_up_leaves_the_text_path_exactly_untouched(tiny, tmp_path, optim):
    overrides = tiny("run", 4, *optim, "optim.lr=1e-2", "optim.weight_decay=0.1", "optim.grad_clip=0",
                     "train.recaptioner_warmup_steps=3")
    cfg, s, batch, generator, model = _parts(tmp_path, overrides)
    before = _text_path(model)
    optimizer = make_optimizer(cfg, model)
    _train_steps(cfg, model, optimizer, s, batch, range(3))  # warm-up: the recaptioner alone
    for key, value in _text_path(model).items():
        assert torch.equal(value, before[key]), f"warm-up moved {key}"  # no momentum, decay or Adam drift

    fresh = copy.deepcopy(model)  # same weights, an optimiser that has never stepped
    _train_steps(cfg, model, optimizer, s, batch, [3])
    _train_steps(cfg, fresh, make_optimizer(cfg, fresh), s, batch, [3])
    moved = _text_path(model)
    assert any(not torch.equal(moved[k], before[k]) for k in moved)  # the joint step does train the text path
    for key, value in _text_path(fresh).items():
        torch.testing.assert_close(moved[key], value, rtol=0, atol=0,
                                   msg=f"first joint update of {key} is not a fresh optimiser's")


def test_training_renders_with_the_configured_noise_mode(tiny, tmp_path):
    cfg, s, batch, generator, model = _parts(tmp_path, tiny("run", 4, "generator.noise_mode=random"))
    seen = []
    generator.synthesis.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["noise_mode"]),
                                                  with_kwargs=True)
    TrainingLoss(cfg.loss)(model, s, batch["tokens"], batch["image"])
    assert seen == ["random"]


def _saved_generator(tmp_path, overrides):
    """The tiny random generator saved as a file, so `t2f generate` draws with the same one."""
    from t2f.models.generator import architecture_from_config, build_generator
    from t2f.models.weights import save_generator

    torch.manual_seed(0)
    generator = build_generator(architecture_from_config(load_config("toy", overrides).generator), impl="ref")
    weights, _ = save_generator(generator, tmp_path / "generator")
    return [f"generator.checkpoint={weights}", "generator.impl=ref"]


def test_a_sample_grid_is_what_t2f_generate_draws_from_that_checkpoint(tiny, tmp_path):
    from PIL import Image

    from t2f import generate

    overrides = tiny("grid", 2)
    overrides += _saved_generator(tmp_path, overrides) + [
        "train.sample_every=2", "train.sample_captions=2", "train.samples_per_caption=2", "train.seed=3",
        "train.ema_decay=0.5", "generator.truncation_psi=0.6", "optim.lr=5e-2"]
    assert train.main(["--config", "toy", *overrides]) == 0
    run = tmp_path / "grid"
    captions = json.loads((run / "samples" / "step-00000002.json").read_text())["captions"]
    out = tmp_path / "generated.png"
    # --truncation defaults to the checkpoint's generator.truncation_psi; the EMA is used by default.
    assert generate.main(["--ckpt", str(run), *captions, "--n", "2", "--seed", "3", "--read-back",
                          "--device", "cpu", "--out", str(out)]) == 0
    trained = np.asarray(Image.open(run / "samples" / "step-00000002.png"))
    assert np.array_equal(np.asarray(Image.open(out)), trained)
    assert generate.main(["--ckpt", str(run), *captions, "--n", "2", "--seed", "3", "--read-back", "--no-ema",
                          "--device", "cpu", "--out", str(out)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), trained)  # the grid did use the EMA


def test_the_ema_is_saved_resumed_exactly_and_lags_the_weights(tiny, tmp_path, monkeypatch):
    ema = ["train.ema_decay=0.9", "train.ckpt_every=3", "optim.lr=1e-2"]
    assert train.main(["--config", "toy", *tiny("straight", 6), *ema]) == 0
    original_step = train.Monitor.step

    def crash_at_4(self, step):
        original_step(self, step)
        if step == 4:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train.Monitor, "step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", "toy", *tiny("crashed", 6), *ema])
    monkeypatch.setattr(train.Monitor, "step", original_step)
    assert train.main(["--config", "toy", *tiny("crashed", 6), *ema]) == 0  # resumes from step 3

    straight = load_file(str(latest_checkpoint(tmp_path / "straight") / "ema.safetensors"))
    resumed = load_file(str(latest_checkpoint(tmp_path / "crashed") / "ema.safetensors"))
    assert straight.keys() == resumed.keys() and any(k.startswith("mapping.") for k in straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    live = final_weights(tmp_path / "straight")
    assert not torch.equal(straight["ca.fc.weight"], live["ca.fc.weight"])  # an average, not a copy


@pytest.mark.parametrize("bad", [
    ["train.nope=1"],  # unknown key
    ["train.steps=many"],  # wrong type
    ["--config", "no-such-preset"],
    ["data.shards=/no/such/shards"],
    ["data.train_split=nosuch"],  # a split the shards do not have: nothing to train on
    ["generator.checkpoint=/no/such/ffhq.pkl"],
    ["text.encoder=/no/such/encoder"],
    ["data.max_bad_fraction=3"],
    ["train.dist_timeout_s=-5"],
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, capsys, bad):
    config = bad[1] if bad[0] == "--config" else "toy"
    overrides = tiny("bad", 2) + [o for o in bad if o != "--config" and o != config]
    capsys.readouterr()  # the fixture's own output
    assert train.main(["--config", config, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t2f train: ") and "Traceback" not in err[0], err
    assert not (tmp_path / "bad").exists()  # the run directory is made only once the input checked out


def test_bench_train_on_a_paper_preset_needs_no_weight_files(capsys, tmp_path, monkeypatch):
    from t2f.bench import main as bench

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))  # no ResNet-101 file anywhere
    monkeypatch.delenv("T2F_RESNET101", raising=False)
    assert bench(["train", "--cpu-smoke", "--config", "mmcelebahq", "--steps", "1", "--batch-size", "1",
                  "data.resolution=32", "recaptioner.input_size=64", "recaptioner.feature_grid=2",
                  "generator.resolution=32", "generator.channel_base=128", "generator.channel_max=16",
                  "generator.z_dim=16", "generator.w_dim=16", "generator.mapping_layers=2"]) == 0
    out = capsys.readouterr().out
    assert "timing with random weights of the same shapes" in out
    assert float(out.split("fp32 + reference")[1].split()[0]) > 0
