"""Evaluation: FID through clean-fid with cached real statistics, LPIPS from local weight files,
`t2f eval` end to end on a tiny checkpoint, in one process and in two under `accelerate launch`,
and metrics that plugins register (the toy world's, added on toy shards without being asked)."""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_generate import tiny_checkpoint

from t2f.eval.fid import FidMeter, InceptionFeatures, InceptionWeightsMissing, RealStatsCache, feature_extractor
from t2f.eval.lpips import LpipsWeightsMissing, load_lpips, lpips_distance

REPO = Path(__file__).resolve().parent.parent


def _images(seed: int, n: int = 24, shift: float = 0.0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)  # (N, 3, S, S)


def _counting_extractor():
    """Mean colour and pooled 2x2 grey levels (7-d), counting how many images it has seen."""
    seen = [0]

    def fn(images):
        seen[0] += images.shape[0]
        grey = torch.nn.functional.adaptive_avg_pool2d(images.mean(1, keepdim=True), 2).flatten(1)  # (B, 4)
        return torch.cat([images.mean((2, 3)), grey], dim=1)  # (B, 7)

    return feature_extractor("test-colour-7d", fn), seen


# ---------------------------------------------------------------------------- FID


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift(tmp_path):
    from cleanfid.fid import fid_from_feats

    extractor, _ = _counting_extractor()
    real = _images(0)
    scores = {}
    for name, generated in {"same": real, "near": _images(0, shift=0.05), "far": _images(0, shift=0.3)}.items():
        meter = FidMeter(extractor, {"data": "real-0"}, RealStatsCache(tmp_path / name))
        meter.add_real(real[:10])
        meter.add_real(real[10:])  # batch by batch, as the evaluation loop feeds it
        meter.add_generated(generated)
        scores[name] = meter.compute()
    assert abs(scores["same"]) < 1e-6
    assert 0.01 < scores["near"] < scores["far"]
    # the same number clean-fid gives for the whole feature stacks at once
    feats = lambda x: extractor(torch.from_numpy(np.asarray(x)).float()).double().numpy()  # noqa: E731
    quantized = lambda x: ((x + 1) * 127.5).round() / 127.5 - 1  # noqa: E731
    expected = fid_from_feats(feats(quantized(_images(0, shift=0.3))), feats(quantized(real)))
    assert scores["far"] == pytest.approx(expected, rel=1e-6)


def test_real_statistics_are_cached_and_reused(tmp_path):
    extractor, seen = _counting_extractor()
    cache = RealStatsCache(tmp_path / "stats")
    parts = {"split": "test", "shards": "abc", "resolution": 16, "max_images": 0, "protocol": "one"}
    first = FidMeter(extractor, parts, cache)
    assert first.needs_real
    first.add_real(_images(0))
    first.add_generated(_images(1))
    fid = first.compute()
    (stats_file,) = (tmp_path / "stats").glob("*.npz")
    mtime, seen_before = stats_file.stat().st_mtime_ns, seen[0]

    second = FidMeter(extractor, parts, cache)
    assert not second.needs_real and second.real_from_cache
    second.add_real(_images(0))  # ignored: the statistics come from the cache
    second.add_generated(_images(1))
    assert second.compute() == pytest.approx(fid, rel=1e-9)
    assert seen[0] - seen_before == 24  # only the generated images went through the extractor
    assert stats_file.stat().st_mtime_ns == mtime

    assert FidMeter(extractor, {**parts, "resolution": 32}, cache).needs_real  # another key: recomputed


def test_inception_file_missing_names_it_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("T2F_CACHE", str(tmp_path))
    monkeypatch.setattr("t2f.eval.fid.CLEANFID_CACHE", tmp_path / "cleanfid")
    with pytest.raises(InceptionWeightsMissing) as err:
        InceptionFeatures()
    message = str(err.value)
    assert "inception-2015-12-05.pt" in message and str(tmp_path) in message and "eval.inception=" in message


def test_inception_features_go_through_clean_fid_resize(tmp_path):
    """A stand-in TorchScript file in clean-fid's format: 2048-d features of 299x299 clean-resized images."""
    weights = _fake_inception(tmp_path)
    extractor = InceptionFeatures(str(weights))
    feats = extractor(_images(0, n=2))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def _fake_inception(folder: Path) -> Path:
    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 4 * 4, 2048)

        def forward(self, x):
            assert x.shape[-1] == 299  # clean-fid resized it
            return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Net()).save(str(folder / "inception-2015-12-05.pt"))
    return folder / "inception-2015-12-05.pt"


# ---------------------------------------------------------------------------- LPIPS


def _lpips_files(folder: Path) -> tuple[Path, Path]:
    """A random torchvision AlexNet and random LPIPS linear layers, saved like the real files."""
    import torchvision

    torch.manual_seed(0)
    alex = folder / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet().state_dict(), alex)
    linear = folder / "alex.pth"
    layers = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(layers, linear)
    return alex, linear


def test_lpips_from_local_files_is_zero_for_identical_images(tmp_path):
    alex, linear = _lpips_files(tmp_path)
    model = load_lpips(str(alex), str(linear))
    assert torch.equal(model.lin1.model[1].weight, torch.load(linear, weights_only=True)["lin1.model.1.weight"])
    a, b = _images(0, n=3, size=32), _images(1, n=3, size=32)
    assert torch.allclose(lpips_distance(model, a, a), torch.zeros(3), atol=1e-7)
    assert (lpips_distance(model, a, b) > 1e-3).all()
    with pytest.raises(ValueError, match="at least 32x32"):
        lpips_distance(model, a[..., :16, :16], b[..., :16, :16])


def test_lpips_missing_alexnet_names_the_file(tmp_path):
    with pytest.raises(LpipsWeightsMissing) as err:
        load_lpips(str(tmp_path / "nothing.pth"))
    assert "nothing.pth" in str(err.value) and "alexnet-owt-7be5be79.pth" in str(err.value)


# ---------------------------------------------------------------------------- t2f eval end to end


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    from t2f.toy.classifier import AttributeClassifier, save_classifier

    tmp = tmp_path_factory.mktemp("eval")
    run = tiny_checkpoint(tmp)
    alex, linear = _lpips_files(tmp)
    classifier = save_classifier(_calibrated_classifier(AttributeClassifier(width=8, feature_dim=4)), tmp / "toy", {})
    args = ["--ckpt", str(run), "--device", "cpu", "--plugin", "t2f.toy.metrics",
            "--metrics", "toy_fid,attributes,lpips,diversity,bleu",
            f"eval.lpips_alexnet={alex}", f"eval.lpips_linear={linear}", f"eval.toy_classifier={classifier}",
            "eval.batch_size=3"]
    return tmp, args


def _calibrated_classifier(model):
    """Random weights, batch-norm statistics of random images: features that vary from image to image."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # plain average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(32, 3, 64, 64) * 2 - 1)
    return model.eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_in_two_processes_matches_one_process(eval_setup):
    """Every metric, the mmcelebahq caption draw included, on a CLIP text encoder (both towers): 1 == 2 ranks."""
    from test_eval_clip import tiny_clip

    from t2f.eval import evaluate

    tmp, args = eval_setup
    # KID goes through clean-fid's Inception wrapper (a stand-in file); FID on its 2048-d features would
    # spend half a minute in a matrix square root on a small CPU, and toy_fid covers FID's merging of ranks
    args = args + [f"text.encoder={tiny_clip(tmp / 'clip')}", "text.pooling=clip", f"eval.inception={_fake_inception(tmp)}",
                   "--metrics", "toy_fid,attributes,lpips,diversity,bleu,kid,clip_score,r_precision",
                   "--protocol", "mmcelebahq"]
    two, one = tmp / "two.json", tmp / "one.json"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "t2f.eval.evaluate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(launch + args + ["--out", str(two), f"eval.stats_cache={tmp / 'cache-two'}"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clean-fid's sqrtm on tiny covariances
        assert evaluate.main(args + ["--out", str(one), f"eval.stats_cache={tmp / 'cache-one'}"]) == 0

    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert set(a["metrics"]) == {"toy_fid", "lpips_paired", "lpips_diversity", "bleu4", "attribute_accuracy",
                                 "attribute_exact_match", "kid", "kid_std", "clip_score", "clip_score_real",
                                 "r_precision", "r_precision_real"}
    for name, value in a["metrics"].items():
        assert b["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert a["protocol"] == b["protocol"] and a["protocol"]["test_images"] == 8
    assert a["captions_drawn"] == b["captions_drawn"] and len(a["captions_drawn"]) == 8
    m = a["metrics"]
    assert 0 <= m["clip_score"] <= 100 and 0 <= m["clip_score_real"] <= 100 and m["kid_std"] > 0
    assert 0 <= m["r_precision"] <= 1 and 0 <= m["r_precision_real"] <= 1 and a["r_precision_candidates"] >= 2
    assert "random" in a["protocol"]["captions"] and "LPIPS v0.1 AlexNet" in a["protocol"]["lpips"]
    assert "100 x max(cos" in a["protocol"]["clip_score"] and "99" in a["protocol"]["r_precision"]
    assert a["protocol"]["clip_checkpoint"] == str(tmp / "clip")  # the text encoder's own CLIP
    assert a["step"] == 4 and a["config_hash"] == b["config_hash"]
    assert not a["real_stats"]["toy_fid"]["from_cache"] and Path(a["real_stats"]["toy_fid"]["path"]).is_file()


def test_eval_protocol_all_and_bad_checkpoint(eval_setup, tmp_path, capsys):
    from t2f.eval import evaluate

    tmp, args = eval_setup
    out = tmp_path / "all.json"
    extra = ["--metrics", "bleu", "--protocol", "all", "--max-images", "3", "--out", str(out)]
    assert evaluate.main(args + extra) == 0
    record = json.loads(out.read_text())
    assert record["protocol"]["test_images"] == 3 and record["protocol"]["generated_images"] == 6  # 2 captions each
    assert "every caption" in record["protocol"]["captions"]
    assert "bleu4" in capsys.readouterr().out

    assert evaluate.main(["--ckpt", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "no t2f checkpoint here" in capsys.readouterr().err


def test_periodic_eval_skips_missing_weights_logs_and_keeps_its_hooks(eval_setup, tmp_path):
    """The trainer's call: live pipeline, a subset, log_fn, hooks kept between calls, missing weights skipped."""
    from t2f.eval.evaluate import evaluate
    from t2f.eval.hooks import EvalHooks
    from t2f.inference import load_pipeline

    tmp, _ = eval_setup
    pipe = load_pipeline(tmp / "run", overrides=["eval.metrics=lpips,bleu", f"eval.lpips_alexnet={tmp_path / 'none.pth'}"])
    hooks, logged = EvalHooks(), []
    with pytest.warns(UserWarning, match="skipping lpips"):
        result = evaluate(pipe, max_images=2, step=7, hooks=hooks, skip_missing=True, progress=False,
                          log_fn=lambda scalars, step: logged.append((scalars, step)))
    assert "none.pth" in result["skipped"]["lpips"] and "lpips" in hooks.skipped
    assert set(result["metrics"]) == {"bleu4"} and result["protocol"]["test_images"] == 2
    assert logged == [({"eval/bleu4": result["metrics"]["bleu4"]}, 7)]
    again = evaluate(pipe, max_images=2, step=8, hooks=hooks, skip_missing=True, progress=False)  # no new warning
    assert again["metrics"] == result["metrics"] and again["step"] == 8


def test_recaptioner_only_scores_real_test_images(eval_setup, tmp_path, capsys):
    from t2f.eval import evaluate

    tmp, args = eval_setup
    out = tmp_path / "recap.json"
    assert evaluate.main(args + ["--recaptioner-only", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["images"] == 8 and 0 <= record["recaptioner_bleu4"] <= 100
    assert "real images" in record["protocol"] and len(record["examples"]) == 5
    assert "recaptioner BLEU-4 on 8 real test images" in capsys.readouterr().out


def test_toy_attribute_metric_comes_with_a_per_attribute_breakdown(eval_setup, tmp_path):
    from t2f.eval import evaluate
    from t2f.toy.attributes import ATTRIBUTES

    tmp, args = eval_setup
    out = tmp_path / "attrs.json"
    assert evaluate.main(args + ["--metrics", "attributes", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    breakdown = record["attribute_accuracy_per_attribute"]
    assert list(breakdown) == list(ATTRIBUTES)
    assert sum(breakdown.values()) / len(breakdown) == pytest.approx(record["metrics"]["attribute_accuracy"])


# ---------------------------------------------------------------------------- metrics registered by plugins


@pytest.fixture
def builtin_metrics_only(monkeypatch):
    """A registry as in a fresh `t2f eval` process: built-in metrics only, the toy plugin not imported yet."""
    import sys

    from t2f.eval import hooks

    builtin = {name: m for name, m in hooks.registered().items()
               if name in ("fid", "kid", "lpips", "diversity", "bleu", "clip_score", "r_precision")}
    monkeypatch.setattr(hooks, "_REGISTRY", builtin)
    monkeypatch.delitem(sys.modules, "t2f.toy.metrics", raising=False)


def _as_toy_shards(shards: Path, out: Path) -> Path:
    """A copy of `shards` whose manifest says what toy shards say: source toy, the toy metrics' plugin."""
    import shutil

    from t2f.toy.dataset import METRICS_PLUGIN

    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"], manifest["options"] = "toy", {"eval_plugins": [METRICS_PLUGIN]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_toy_shards_bring_their_metrics_to_t2f_eval(eval_setup, tmp_path, builtin_metrics_only):
    from t2f.eval import evaluate

    tmp, args = eval_setup
    shards = _as_toy_shards(tmp / "shards", tmp_path / "toy-shards")
    plain = [a for a in args if a not in ("--plugin", "t2f.toy.metrics")]
    out = tmp_path / "toy.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clean-fid's sqrtm on tiny covariances
        assert evaluate.main(plain + ["--metrics", "bleu", "--shards", str(shards), "--out", str(out),
                                      f"eval.stats_cache={tmp_path / 'cache'}"]) == 0
    record = json.loads(out.read_text())
    assert set(record["metrics"]) == {"bleu4", "attribute_accuracy", "attribute_exact_match", "toy_fid",
                                      "second_reader_accuracy", "second_reader_exact_match"}
    assert "toy classifier" in record["protocol"]["attributes"] and record["attribute_accuracy_per_attribute"]
    assert "seen by no part of the pipeline" in record["protocol"]["second_reader"]
    assert record["second_reader_accuracy_per_attribute"]


def test_a_worlds_metric_without_its_plugin_is_a_one_line_error(eval_setup, capsys, builtin_metrics_only):
    from t2f.eval import evaluate

    tmp, args = eval_setup
    plain = [a for a in args if a not in ("--plugin", "t2f.toy.metrics")]
    assert evaluate.main(plain + ["--metrics", "attributes"]) == 2  # tiny shards: not toy shards
    err = capsys.readouterr().err
    assert "unknown metric(s) ['attributes']" in err and "--plugin MODULE" in err and "Traceback" not in err
    assert evaluate.main(plain + ["--plugin", "t2f.nowhere"]) == 2
    assert "eval plugin 't2f.nowhere' cannot be imported" in capsys.readouterr().err


def test_eval_truncation_defaults_to_the_generators_and_is_recorded():
    from t2f.config import load_config
    from t2f.eval.report import truncation_of

    assert truncation_of(load_config("toy", ["generator.truncation_psi=0.7"])) == 0.7
    assert truncation_of(load_config("toy", ["generator.truncation_psi=0.7", "eval.truncation_psi=1.0"])) == 1.0
