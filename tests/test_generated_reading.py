"""Reading the generated face under autocast (bf16 on the paper presets) keeps one low-precision copy of
the recaptioner's weights for the backward pass, not one per decoding step: 2.2 GiB of GPU memory at
the paper's 30 000-word vocabulary, whatever the batch. Values and gradients are autocast's own."""

import torch
from torch.func import functional_call

from t2f.config import RecaptionerConfig
from t2f.models.mapping import MappingNetwork
from t2f.models.recaptioner import Recaptioner
from t2f.models.text_to_face import TextToFace

VOCAB, STEPS = 3000, 40


def model() -> TextToFace:
    torch.manual_seed(0)
    cfg = RecaptionerConfig(encoder="small", small_channels=8, feature_grid=4, input_size=32, embed_dim=64,
                            hidden_dim=64, attention_dim=32, dropout=0.0)
    return TextToFace(16, MappingNetwork(16, 0, 16, 4, num_layers=2), Recaptioner(cfg, VOCAB)).eval()


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs (each storage once)."""
    seen, total = set(), [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_the_generated_face_is_read_with_one_bf16_copy_of_the_weights():
    net = model()
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    tokens = torch.randint(4, VOCAB, (2, STEPS + 1))
    weights = sum(p.numel() * 2 for p in net.recaptioner.parameters())  # all of them in bf16
    outputs = {}

    def read(name, reader):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, alphas = reader(images, tokens)
        outputs[name] = (logits, alphas, torch.autograd.grad(logits.float().sum() + alphas.float().sum(), images)[0])

    def per_step_casts(x, t):  # what autocast does with detached weights left in fp32
        return functional_call(net.recaptioner, {n: p.detach() for n, p in net.recaptioner.named_parameters()}, (x, t))

    assert saved_bytes(lambda: read("per step", per_step_casts)) > 10 * weights  # the cost being avoided
    assert saved_bytes(lambda: read("once", net.read_generated)) < 2 * weights
    for once, per_step in zip(outputs["once"], outputs["per step"]):
        torch.testing.assert_close(once, per_step, rtol=0, atol=0)  # the same numbers autocast gives
    assert not any(p.grad is not None for p in net.recaptioner.parameters())  # still never trains it


def test_without_autocast_the_weights_stay_as_they_are():
    net = model()
    images = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    logits, _ = net.read_generated(images, torch.randint(4, VOCAB, (1, 5)))
    assert logits.dtype == torch.float32
