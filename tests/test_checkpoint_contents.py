"""Checkpoints hold only what trains: a frozen image encoder (the paper's ResNet-101, ~170 MB; the toy
world's backbone) is reloaded from its source, never saved, yet a run resumes to the same weights and
draws the same faces, and checkpoints written before the change still load."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_overrides

import t2f
from t2f import train
from t2f.checkpointing import WEIGHTS, complete_checkpoints, latest_checkpoint
from t2f.config import RecaptionerConfig
from t2f.inference import load_pipeline
from t2f.models.recaptioner import Recaptioner

BACKBONE = Path(t2f.__file__).parent / "toy" / "assets" / "backbone" / "classifier.safetensors"
FROZEN_ENCODER = ["recaptioner.encoder=frozen_cnn", f"recaptioner.encoder_weights={BACKBONE}", "recaptioner.feature_grid=4"]
CAPTIONS = ["the woman has blond hair .", "a smiling man with black hair ."]


def saved_keys(ckpt: Path) -> dict:
    """{file name: tensor names} of every weights file in a checkpoint (ours and Accelerate's)."""
    found = {}
    for path in ckpt.iterdir():
        if path.suffix == ".safetensors":
            found[path.name] = set(load_file(str(path)))
        elif path.suffix == ".bin" and path.name.startswith("pytorch_model"):
            found[path.name] = set(torch.load(path, map_location="cpu", weights_only=True))
    return found


def saved_generator(tmp_path, overrides) -> list[str]:
    """A generator file, so every load draws with the same one (a random one is new at each load)."""
    from t2f.config import load_config
    from t2f.models.generator import architecture_from_config, build_generator
    from t2f.models.weights import save_generator

    torch.manual_seed(0)
    generator = build_generator(architecture_from_config(load_config("toy", overrides).generator))
    return [f"generator.checkpoint={save_generator(generator, tmp_path / 'generator')[0]}"]


def test_checkpoints_hold_no_frozen_encoder_and_a_resumed_run_draws_the_same_faces(tmp_path, monkeypatch):
    def run(name):
        overrides = tiny_overrides(tmp_path, tmp_path / name, steps=4) + FROZEN_ENCODER
        overrides += saved_generator(tmp_path, overrides) + ["train.ckpt_every=2", "train.ema_decay=0.5"]
        return train.main(["--config", "toy", *overrides])

    assert run("straight") == 0
    original_step = train.Monitor.step

    def preempt_at_1(self, step):
        original_step(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(train.Monitor, "step", preempt_at_1)
    assert run("preempted") == train.REQUEUE_EXIT_CODE
    assert latest_checkpoint(tmp_path / "preempted").name == "step-00000002"
    monkeypatch.setattr(train.Monitor, "step", original_step)
    assert run("preempted") == 0

    for ckpt in complete_checkpoints(tmp_path / "straight") + complete_checkpoints(tmp_path / "preempted"):
        files = saved_keys(ckpt)
        assert WEIGHTS in files and len(files) >= 2, f"{ckpt}: expected ours and Accelerate's weights, found {files}"
        for name, keys in files.items():
            frozen = sorted(k for k in keys if ".encoder." in k)
            assert not frozen, f"{ckpt.name}/{name} carries frozen encoder weights: {frozen[:3]}"
        assert any(k.startswith("recaptioner.lstm.") for k in files[WEIGHTS])  # the trained decoder is there

    straight, resumed = (load_file(str(latest_checkpoint(tmp_path / r) / WEIGHTS)) for r in ("straight", "preempted"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    faces = [load_pipeline(tmp_path / r).generate(CAPTIONS, n=2, seed=0) for r in ("straight", "preempted")]
    assert torch.equal(faces[0], faces[1])
    pipe = load_pipeline(tmp_path / "straight")  # strict loading: the frozen encoder came from its file
    assert torch.equal(pipe.model.recaptioner.encoder.body[0].weight, load_file(str(BACKBONE))["convs.0.weight"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "preempted" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def resnet(**kw) -> Recaptioner:
    cfg = RecaptionerConfig(encoder="resnet101", encoder_weights="random", feature_grid=2, input_size=64, embed_dim=16,
                            hidden_dim=16, attention_dim=16, **kw)
    return Recaptioner(cfg, vocab_size=10)


def test_a_finetuned_top_block_is_saved_and_trained_the_frozen_rest_is_not():
    frozen, tuned = resnet(), resnet(finetune_encoder=True)
    assert not [k for k in frozen.state_dict() if k.startswith("encoder.")]
    encoder_keys = [k for k in tuned.state_dict() if k.startswith("encoder.")]
    layer4 = tuned.encoder.body[7].state_dict()
    assert sorted(encoder_keys) == sorted(f"encoder.trainable.7.{k}" for k in layer4)
    trained = {id(p) for p in tuned.parameters() if p.requires_grad}
    assert {id(p) for p in tuned.encoder.body[7].parameters()} <= trained
    assert not {id(p) for p in tuned.encoder.body[:7].parameters()} & trained
    # 42.5 M frozen values outside the module tree: DDP, DeepSpeed and save_state never see them
    assert sum(p.numel() for p in frozen.parameters()) < 10_000_000
    frozen.double()  # .to() / .half() / .double() still reach the frozen body
    assert frozen.encoder.body[0].weight.dtype == torch.float64
    images = torch.rand(1, 3, 64, 64, dtype=torch.float64) * 2 - 1
    assert frozen.encode_images(images).shape == (1, 4, 2048)


def test_random_resnet_weights_are_the_same_every_time():
    """They are never saved, so a resumed run and `t2f generate` must rebuild the very same ones."""
    torch.manual_seed(1)
    a = resnet()
    torch.manual_seed(2)
    b = resnet()
    assert torch.equal(a.encoder.body[0].weight, b.encoder.body[0].weight)


@pytest.mark.parametrize("finetune", [False, True])
def test_checkpoints_written_with_the_frozen_encoder_inside_still_load(finetune):
    model = resnet(finetune_encoder=finetune)
    old = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    for key, value in model.encoder.body.state_dict().items():  # the layout before: encoder.body.<i>.*
        old[f"encoder.body.{key}"] = value + 1.0 if value.is_floating_point() else value
    fresh = resnet(finetune_encoder=finetune)
    fresh.load_state_dict(old, strict=True)
    layer4 = fresh.encoder.body[7].state_dict()
    for key, value in model.encoder.body[7].state_dict().items():
        if value.is_floating_point():  # a trained top block comes from the checkpoint, a frozen one from its source
            assert torch.equal(layer4[key], value + 1.0 if finetune else value), key
    assert torch.equal(fresh.encoder.body[0].weight, model.encoder.body[0].weight)
