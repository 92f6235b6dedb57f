"""`./launch gpu-check`: without a GPU it says so, checks that every part exists and exits 0; a missing
part, a failed or hung part, a skipped test or a missed target makes it exit 1 naming the part.
The GPU path itself runs only where CUDA is; here its runner and its readers of the benchmarks'
output are driven with stand-in parts and with the real benchmarks' report code on a stand-in timer."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from t2f import gpu_check
from t2f.models import benchmark as generator_benchmark
from t2f.ops import benchmark as ops_benchmark

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("cuda-grid", "bench-ops", "bench-ops-graphs", "bench-gen", "bench-train-256", "bench-train-1024", "toy-shards",
         "toy-train")


def test_without_a_gpu_it_says_so_checks_every_part_and_exits_0():
    done = subprocess.run([str(ROOT / "launch"), "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, also on a machine that has one
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "no CUDA GPU on this machine" in done.stdout
    for name in PARTS:
        assert any(line.split()[:2] == ["ok", name] for line in done.stdout.splitlines()), f"{name} not checked:\n{done.stdout}"
    collected = next(line for line in done.stdout.splitlines() if " cuda-grid " in line)
    assert int(collected.split()[2]) >= 30  # the [cuda] ids of the fused-op grid


def test_a_missing_part_is_named_and_fails_the_check(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "GPU_TESTS", ["tests/test_ca.py"])  # no test there is marked gpu
    monkeypatch.setattr(gpu_check, "TOY_OVERRIDES", [*gpu_check.TOY_OVERRIDES, "train.no_such_key=1"])
    assert gpu_check.main(["--work", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    missing = [line.split()[1] for line in out.splitlines() if line.strip().startswith("MISSING")]
    assert missing == ["cuda-grid", "toy-train"]
    assert "no_such_key" in out and out.strip().splitlines()[-1] == "gpu-check: FAILED: missing part(s): cuda-grid, toy-train"


def test_the_plan_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "t2f.gpu_check", "--plan"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == list(PARTS)
    assert "-m gpu" in done.stdout and "bench ops" in done.stdout and "train.steps=200" in done.stdout


# ---------------------------------------------------------------------------- the GPU path, with stand-in parts


def stand_in(name, code, timeout=60, check=gpu_check.check_nothing):
    return gpu_check.Part(name, f"stand-in {name}", [sys.executable, "-c", code], timeout, check)


def test_the_report_names_failed_and_hung_parts_and_exits_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "environment_lines", lambda: ["- GPU: stand-in"])
    parts = [stand_in("fine", "print('| a | table |')"),
             stand_in("crashes", "import sys; print('boom'); sys.exit(3)"),
             stand_in("hangs", "import subprocess; subprocess.run(['sleep', '60'])", timeout=2),  # a child too
             stand_in("misses", "print('40 passed, 1 skipped')", check=gpu_check.check_pytest)]
    monkeypatch.setattr(gpu_check, "parts", lambda work: parts)
    tic = time.monotonic()
    assert gpu_check.run_on_gpu(tmp_path, tmp_path / "report.md") == 1
    assert time.monotonic() - tic < 30  # the hung part and its child were killed at its limit
    out = capsys.readouterr().out
    assert "| fine | ok |" in out and "| a | table |" in out
    assert "| crashes | FAILED: exit status 3 |" in out and "| hangs | FAILED: timed out after 2 s |" in out
    assert "| misses | FAILED: 1 skipped |" in out
    assert out.strip().splitlines()[-1].startswith("gpu-check: FAILED: crashes, hangs, misses")
    assert (tmp_path / "report.md").read_text().startswith("# GPU check") and (tmp_path / "crashes.log").read_text()


def _timer(fn, warmup, repeats):
    fn()
    return 1.0


def test_benchmark_output_is_read_and_a_missed_target_fails(monkeypatch, capsys):
    """The real benchmarks' report code (stand-in timer: every op 1 ms, so fused = reference)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops_benchmark, "cuda_median_ms", _timer)
    monkeypatch.setattr(generator_benchmark, "cuda_median_ms", _timer)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    args = dict(batch=1, resolution=8, channel_base=64, channel_max=8, warmup=0, repeats=1)
    ops_benchmark.report(ops_benchmark.argparse.Namespace(**args, dtype="fp32", cuda_graphs=False), torch.device("cpu"))
    ops = capsys.readouterr().out
    assert gpu_check.ops_ratios(ops) == {"bias_act": 1.0, "upfirdn2d": 1.0}
    assert gpu_check.check_ops(ops) == ["bias_act forward+backward 1.00x < target 3.0x",
                                        "upfirdn2d forward+backward 1.00x < target 1.5x"]
    met = ops.replace("| 1.00 | >= 3.0", "| 3.20 | >= 3.0").replace("| 1.00 | >= 1.5", "| 1.70 | >= 1.5")
    assert gpu_check.check_ops(met) == []
    assert gpu_check.check_ops(met + "\nWARNING: Triton was disabled in this process (x)") != []
    assert gpu_check.check_ops_rows(ops) == []  # --cuda-graphs: reported, no target
    assert gpu_check.check_ops_rows("") == ["no bias_act summary row", "no upfirdn2d summary row"]
    generator_benchmark.report(generator_benchmark.argparse.Namespace(**args), torch.device("cpu"))
    assert gpu_check.check_generator(capsys.readouterr().out) == ["fp16 fused synthesis 1.00x < target 1.3x"]


@pytest.mark.parametrize("text, problems", [
    ("41 passed in 80.1s", []),
    ("40 passed, 1 skipped in 80.1s", ["1 skipped"]),
    ("39 passed, 2 failed in 80.1s", ["2 failed"]),
    ("no tests ran in 1.0s", ["no test passed"]),
])
def test_the_correctness_grid_passes_only_when_every_test_ran_and_passed(text, problems):
    assert gpu_check.check_pytest(text) == problems


def test_bench_train_output_is_read():
    from t2f.trainer.benchmark import format_rows

    both = format_rows([("fp16 + fused (Triton)", 40.5, 21.3), ("fp32 + reference", 12.0, 52.8)])
    assert gpu_check.check_train(both) == []
    one = format_rows([("fp32 + reference", 0.4, float("nan"))])  # what --cpu-smoke prints
    assert gpu_check.check_train(one) == ["expected both generator modes' samples/s and peak GiB, found 0"]


def test_the_toy_run_must_reach_joint_steps_and_its_losses_make_one_table(tmp_path):
    import json

    warmup = {"step": gpu_check.TOY_STEPS, "train/loss": 0.67, "train/recaptioner": 0.67, "train/gpu_mem_gb": 0.18}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(warmup) + "\n")
    assert gpu_check.check_toy("", tmp_path) == [  # the first H200 run: 200 steps, all recaptioner warm-up
        f"no joint step (train/trl) at step {gpu_check.TOY_STEPS}: the run never rendered through the generator"]
    joint = {**warmup, "train/kl": 0.02, "train/trl": 0.9}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(warmup) + "\n" + json.dumps(joint) + "\n")
    assert gpu_check.check_toy("", tmp_path) == []
    header, rule, row = gpu_check.toy_losses(tmp_path).splitlines()
    assert header == "| step | loss | kl | trl | recaptioner | gpu_mem_gb |"
    assert rule == "|---" * 6 + "|" and row.startswith(f"| {gpu_check.TOY_STEPS} | 0.6700 | 0.0200 | 0.9000 |")
