"""`t2f bench train --memory`: the GPU memory of a training step, computed on the CPU from parameter sizes
and the activations autograd keeps. Its extrapolation from two small batches is checked against a
measurement at a larger one, on the paper preset's structure at a small size."""

from t2f.bench import main as bench
from t2f.config import load_config
from t2f.models.generator import generator_from_config
from t2f.trainer.benchmark import build_model, synthetic_batch
from t2f.trainer.memory import PHASES, saved_for_backward

SMALL = ["generator.checkpoint=", "generator.resolution=32", "generator.channel_base=256", "generator.channel_max=16",
         "generator.z_dim=16", "generator.w_dim=16", "generator.mapping_layers=2", "data.resolution=32",
         "recaptioner.encoder_weights=random", "recaptioner.input_size=64", "recaptioner.feature_grid=2",
         "recaptioner.embed_dim=32", "recaptioner.hidden_dim=32", "recaptioner.attention_dim=32"]


def test_activations_grow_linearly_with_the_batch_so_two_probes_predict_a_third():
    # the paper preset's structure (fp16 synthesis blocks, bf16 autocast), small: a small CNN for the ResNet
    cfg = load_config("mmcelebahq", SMALL + ["recaptioner.encoder=small", "recaptioner.small_channels=16"])
    generator = generator_from_config(cfg.generator).requires_grad_(False).eval()
    generator.synthesis.fp16_on_cpu = True
    model = build_model(cfg, 512, generator, vocab_size=200)
    saved = {b: saved_for_backward(cfg, model, generator, synthetic_batch(cfg, b, 200, 512, "cpu"))[0] for b in (2, 3, 5)}
    for phase in PHASES:
        predicted = saved[2][phase] + (saved[3][phase] - saved[2][phase]) * 3
        assert abs(predicted - saved[5][phase]) <= 0.02 * saved[5][phase] + 4096, phase
    assert saved[5]["synthesis"] > 0 and saved[5]["recaptioner, generated face"] > saved[5]["recaptioner, real image"]


def test_bench_train_memory_prints_the_estimate(capsys):
    assert bench(["train", "--memory", "--config", "mmcelebahq", "--batch-size", "12", "--vocab-size", "200", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "| synthesis |" in out and "| frozen image encoder | 0.16 |" in out  # ResNet-101: 42.6 M values
    total = float(out.split("max_memory_allocated)** | **")[1].split("**")[0])
    assert 0.5 < total < 5
