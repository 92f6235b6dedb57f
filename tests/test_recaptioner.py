"""Recaptioner: overfits toy pairs, decodes them back, passes gradients to images, loads ResNet-101
offline (or random weights of its shapes) and any frozen CNN described beside its weights, such as
the toy world's backbone."""

import dataclasses
import json
import shutil
import time

import numpy as np
import pytest
import torch

from t2f.config import RecaptionerConfig
from t2f.data.vocab import Vocab
from t2f.eval.captions import bleu4, recaptioner_bleu4
from t2f.losses import text_reconstruction_loss
from t2f.models.image_encoders import RESNET101_FILES
from t2f.models.recaptioner import Recaptioner
from t2f.toy.classifier import BACKBONE, images_to_tensor, load_classifier
from t2f.toy.render import sample_batch

TINY = RecaptionerConfig(
    encoder="small", small_channels=16, feature_grid=4, input_size=32,
    embed_dim=32, hidden_dim=64, attention_dim=32, dropout=0.0,
)
COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1)}


def shape_image(colour: str, shape: str, size: int = 32) -> torch.Tensor:
    """A coloured square or circle on black, in [-1, 1]."""
    image = torch.full((3, size, size), -1.0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre, radius = size // 2, size * 5 // 16
    if shape == "circle":
        inside = (yy - centre) ** 2 + (xx - centre) ** 2 < radius**2
    else:
        inside = ((yy - centre).abs() < radius - 1) & ((xx - centre).abs() < radius - 1)
    for channel, value in enumerate(COLOURS[colour]):
        image[channel][inside] = value
    return image


def toy_pairs():
    """8 images whose captions (of two lengths, so batches are padded) depend on colour and shape."""
    pairs = []
    for colour in COLOURS:
        pairs.append((shape_image(colour, "square"), f"a {colour} square."))
        pairs.append((shape_image(colour, "circle"), f"a round {colour} circle in the middle."))
    images = torch.stack([image for image, _ in pairs])  # (8, 3, 32, 32)
    return images, [caption for _, caption in pairs]


@pytest.fixture(scope="module")
def overfit():
    """Train the tiny recaptioner on the 8 toy pairs with the full L_TRL; shared by several tests."""
    torch.manual_seed(0)
    images, captions = toy_pairs()
    vocab = Vocab.build(captions)
    tokens = vocab.pad_batch([vocab.encode(c) for c in captions])  # (8, T)
    model = Recaptioner(TINY, len(vocab))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start, steps = time.perf_counter(), 300
    for _ in range(steps):
        logits, alphas = model(images, tokens)
        loss, parts = text_reconstruction_loss(logits, tokens[:, 1:], alphas, attention_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"overfit: {steps} steps, ce {parts['ce'].item():.5f}, "
          f"attention {parts['attention'].item():.3f}, {time.perf_counter() - start:.1f}s")
    return model, vocab, images, captions, parts


def test_overfits_toy_pairs_and_greedy_reproduces_captions(overfit):
    model, vocab, images, captions, parts = overfit
    assert parts["ce"].item() < 0.01
    decoded = [vocab.decode(ids) for ids in model.greedy(images)]
    assert decoded == [vocab.decode(vocab.encode(c)) for c in captions]
    assert bleu4(decoded, [[c] for c in captions]) == pytest.approx(100.0)
    assert recaptioner_bleu4(model, images, [[c] for c in captions], vocab, beam=3, batch_size=5) == pytest.approx(100.0)


def test_beam_one_equals_greedy():
    torch.manual_seed(1)
    model = Recaptioner(TINY, vocab_size=12)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    greedy = model.greedy(images, max_len=9)
    assert model.beam_search(images, beam=1, max_len=9) == greedy
    assert all(len(ids) <= 9 for ids in greedy)


def test_beam_one_equals_greedy_on_trained_model(overfit):
    model, _, images, _, _ = overfit
    assert model.beam_search(images, beam=1) == model.greedy(images)


def test_shapes_any_resolution_and_gradients_reach_the_image():
    torch.manual_seed(0)
    model = Recaptioner(TINY, vocab_size=10)
    images = (torch.rand(2, 3, 48, 40) * 2 - 1).requires_grad_(True)
    tokens = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 2, 0, 0]])
    logits, alphas = model(images, tokens)
    assert logits.shape == (2, 4, 10) and alphas.shape == (2, 4, 16)
    assert torch.allclose(alphas.sum(-1), torch.ones(2, 4))
    loss, _ = text_reconstruction_loss(logits, tokens[:, 1:], alphas)
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_decoding_leaves_training_mode_alone():
    model = Recaptioner(TINY, vocab_size=10).train()
    model.greedy(torch.zeros(1, 3, 32, 32), max_len=3)
    assert model.training


def resnet_cfg(**kw):
    return RecaptionerConfig(encoder="resnet101", feature_grid=2, input_size=64, embed_dim=16,
                             hidden_dim=16, attention_dim=16, **kw)


def test_resnet101_loads_local_file_and_hub_cache(tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet101(weights=None).state_dict()
    weights = tmp_path / "imagenet.pth"
    torch.save(reference, weights)

    model = Recaptioner(resnet_cfg(encoder_weights=str(weights)), vocab_size=10).train()
    assert torch.equal(model.encoder.body[0].weight, reference["conv1.weight"])
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not model.encoder.body.training  # ImageNet batch-norm statistics stay frozen
    images = (torch.rand(1, 3, 80, 80) * 2 - 1).requires_grad_(True)
    feats = model.encode_images(images)
    assert feats.shape == (1, 4, 2048)
    feats.sum().backward()
    assert images.grad.abs().sum() > 0

    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / RESNET101_FILES[0]).symlink_to(weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    tuned = Recaptioner(resnet_cfg(finetune_encoder=True), vocab_size=10)
    assert torch.equal(tuned.encoder.body[0].weight, reference["conv1.weight"])
    trainable = {name.split(".")[1] for name, p in tuned.encoder.named_parameters() if p.requires_grad}
    assert trainable == {"7"}  # layer4 only


def test_resnet101_missing_weights_error_names_files_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        Recaptioner(resnet_cfg(), vocab_size=10)
    message = str(err.value)
    assert all(name in message for name in RESNET101_FILES)
    assert "IMAGENET1K_V1" in message and "encoder_weights" in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        Recaptioner(resnet_cfg(encoder_weights=str(tmp_path / "nowhere.pth")), vocab_size=10)


def test_resnet101_random_weights_need_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no hub cache either
    model = Recaptioner(resnet_cfg(encoder_weights="random"), vocab_size=10)
    assert model.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1).shape == (1, 4, 2048)
    assert not any(p.requires_grad for p in model.encoder.parameters())


def frozen_cfg(weights) -> RecaptionerConfig:
    return RecaptionerConfig(encoder="frozen_cnn", encoder_weights=str(weights), feature_grid=4, input_size=64,
                             embed_dim=16, hidden_dim=16, attention_dim=16)


def test_toy_preset_encoder_is_the_frozen_backbone_not_the_judge():
    from t2f.config import load_config

    cfg = load_config("toy").recaptioner
    assert (cfg.encoder, cfg.encoder_weights) == ("frozen_cnn", str(BACKBONE))
    model = Recaptioner(dataclasses.replace(cfg, embed_dim=16, hidden_dim=16, attention_dim=16), vocab_size=10).train()
    backbone, judge = load_classifier(BACKBONE), load_classifier()
    conv = model.encoder.body[0].weight
    assert torch.equal(conv, backbone.convs[0].weight) and not torch.equal(conv, judge.convs[0].weight)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not model.encoder.body.training  # batch-norm statistics of the pretraining stay frozen

    # It sees what the classifier sees: images in [-1, 1] reach the convolutions unchanged.
    images = images_to_tensor(sample_batch(np.random.default_rng(0), 2)[0])  # (2, 3, 64, 64)
    assert torch.allclose(model.preprocess(images), images, atol=1e-6)
    images.requires_grad_(True)
    feats = model.encode_images(images)
    assert feats.shape == (2, 16, backbone.hidden.in_features)
    assert torch.allclose(feats, backbone.convs(images.detach()).flatten(2).transpose(1, 2), atol=1e-5)
    feats.sum().backward()
    assert images.grad.abs().sum() > 0  # the mapper learns through it


def test_frozen_cnn_initialises_the_decoder_as_the_whole_classifier_did():
    """The demo's numbers depend on the random stream: the decoder after the encoder must start the
    same as when the toy encoder was built by constructing the whole toy classifier."""
    from t2f.toy.classifier import AttributeClassifier

    torch.manual_seed(0)
    AttributeClassifier()  # what the toy encoder used to build before the decoder
    expected = torch.nn.Embedding(10, 16).weight  # the decoder's first layer
    torch.manual_seed(0)
    model = Recaptioner(frozen_cfg(BACKBONE), vocab_size=10)
    assert torch.equal(model.embed.weight, expected)


def test_frozen_cnn_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="encoder_weights=<file>.safetensors"):
        Recaptioner(frozen_cfg(""), vocab_size=10)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        Recaptioner(frozen_cfg(tmp_path / "nowhere.safetensors"), vocab_size=10)
    weights = tmp_path / "cnn.safetensors"
    shutil.copy(BACKBONE, weights)
    with pytest.raises(ValueError, match="cnn.json: missing"):  # no description beside the weights
        Recaptioner(frozen_cfg(weights), vocab_size=10)
    info = json.loads(BACKBONE.with_suffix(".json").read_text())
    info["frozen_cnn"]["heads"] = ["hidden"]  # the file also holds "head": it does not match
    weights.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="do not match"):
        Recaptioner(frozen_cfg(weights), vocab_size=10)
    with pytest.raises(ValueError, match="'toy' is now frozen_cnn"):  # configs saved before the rename
        Recaptioner(dataclasses.replace(frozen_cfg(weights), encoder="toy"), vocab_size=10)
