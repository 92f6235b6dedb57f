"""`./launch gpu-check`: everything that needs a GPU, run once, as one Markdown report for docs/BENCHMARKS.md.

    ./launch gpu-check                        # prints the report (8-minute budget; about 4 min on an H200)
    ./launch gpu-check --out gpu-check.md     # also writes it to a file
    ./launch gpu-check --plan                 # what it would run, without running it

The report opens with the GPU's name, driver and memory and the torch / CUDA / Triton versions.
Then the parts, in order, each a subprocess with its own time limit (one hang cannot eat the rest)
within a budget of 8 minutes for all of them (`--budget`):
  cuda-grid      the fused kernels' CUDA correctness grid: `pytest -m gpu` over the op and generator tests
  bench-ops      `t2f bench ops` (FFHQ-1024 layer shapes): bias_act >= 3x, upfirdn2d >= 1.5x forward+backward
  bench-ops-graphs  the same replayed from CUDA graphs: the kernels' own time (reported, no target)
  bench-gen      `t2f bench generator`: fp16 fused synthesis >= 1.3x fp16 reference, forward+backward
  bench-train    `t2f bench train --config mmcelebahq` at 256² and at 1024² (batch 12, random weights)
  toy-shards     a small toy data set (500 faces) for the next part
  toy-train      200 steps of the toy world on the GPU through `./launch train` (fp16 synthesis, bf16 autocast)

A part that fails, hangs, skips a test, runs unfused kernels, prints no numbers or misses its
target makes the whole check exit 1, and the last line names it: nothing is skipped quietly. On
a machine without CUDA it says so, checks that every part it would run exists (test ids,
benchmark entry points, presets and their overrides, the launcher) and exits 0.
"""

import argparse
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/test_ops.py", "tests/test_ops_integration.py", "tests/test_generator.py"]
TRAIN_BENCH_OVERRIDES = ["recaptioner.encoder_weights=random"]  # random weights of the real shapes: no file needed
TOY_STEPS = 200
# The preset's recaptioner warm-up (400 steps) would leave all 200 steps without the generator: the first
# H200 run trained only the recaptioner. 50 warm-up steps leave 150 joint steps through the fp16 synthesis.
TOY_OVERRIDES = [f"train.steps={TOY_STEPS}", "train.recaptioner_warmup_steps=50", "train.mixed_precision=bf16",
                 "generator.num_fp16_res=2",
                 "generator.conv_clamp=256", "train.log_every=50", "train.sample_every=0", f"train.ckpt_every={TOY_STEPS}",
                 "wandb.mode=disabled"]  # fp16 synthesis on the top two of its four resolutions, bf16 autocast elsewhere
BUDGET = 480  # seconds for all parts together: the 8 minutes on one H100/H200


@dataclasses.dataclass
class Part:
    name: str
    what: str
    argv: list
    timeout: int  # seconds
    check: object  # output -> list of problems (empty: passed)
    env: dict = dataclasses.field(default_factory=dict)


def parts(work: Path) -> list[Part]:
    py, t2f = [sys.executable], [sys.executable, "-m", "t2f.cli"]
    shards, run_dir = work / "toy-shards", work / "toy-run"
    toy = [str(ROOT / "launch"), "train", "--config", "toy", f"data.shards={shards}", f"train.run_dir={run_dir}", *TOY_OVERRIDES]
    return [
        Part("cuda-grid", "CUDA correctness grid of the fused kernels (`pytest -m gpu`)",
             py + ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", *GPU_TESTS], 180, check_pytest),
        Part("bench-ops", "`t2f bench ops` (FFHQ-1024 layer shapes, batch 8, fp16)", t2f + ["bench", "ops"], 120, check_ops),
        Part("bench-ops-graphs", "`t2f bench ops --cuda-graphs`: the same, the kernels' time without host launch work",
             t2f + ["bench", "ops", "--cuda-graphs"], 120, check_ops_rows),
        Part("bench-gen", "`t2f bench generator` (FFHQ-1024 synthesis, batch 8)", t2f + ["bench", "generator"], 90,
             check_generator),
        Part("bench-train-256", "`t2f bench train --config mmcelebahq` at 256²",
             t2f + ["bench", "train", "--config", "mmcelebahq", "--steps", "5", "generator.resolution=256",
                    *TRAIN_BENCH_OVERRIDES], 90, check_train),
        Part("bench-train-1024", "`t2f bench train --config mmcelebahq` at 1024², batch 12",
             t2f + ["bench", "train", "--config", "mmcelebahq", "--steps", "5", *TRAIN_BENCH_OVERRIDES], 150, check_train),
        Part("toy-shards", "toy shards for the toy run (`t2f toy shards`)",
             t2f + ["toy", "shards", "--out", str(shards), "--train", "500", "--test", "50", "--no-text-features",
                    "--workers", "8"], 90, check_nothing),
        Part("toy-train", f"{TOY_STEPS} toy training steps through `./launch train` (fp16 synthesis, bf16 autocast)",
             toy, 180, lambda out: check_toy(out, run_dir)),
    ]


# ---------------------------------------------------------------------------- what each part must show


def check_nothing(output: str) -> list[str]:
    return []


def check_pytest(output: str) -> list[str]:
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", output)}
    problems = [f"{counts[w]} {w}" for w in ("failed", "error", "errors", "skipped") if counts.get(w)]
    if not counts.get("passed"):
        problems.append("no test passed")
    return problems


def ops_ratios(output: str) -> dict:
    """{op: forward+backward speed-up} from `t2f bench ops`' per-pass summary."""
    rows = re.findall(r"^\| (bias_act|upfirdn2d) \|(?: [\d.]+ \|){5} ([\d.]+) \| >=", output, re.MULTILINE)
    return {op: float(ratio) for op, ratio in rows}


def check_ops(output: str) -> list[str]:
    from t2f.ops.benchmark import TARGETS

    ratios, problems = ops_ratios(output), _unfused(output)
    for op, target in TARGETS.items():
        if op not in ratios:
            problems.append(f"no {op} summary row")
        elif ratios[op] < target:
            problems.append(f"{op} forward+backward {ratios[op]:.2f}x < target {target}x")
    return problems


def check_ops_rows(output: str) -> list[str]:
    """Both ops timed, fused; no target: the targets are on eager calls, what a training step makes."""
    from t2f.ops.benchmark import TARGETS

    return _unfused(output) + [f"no {op} summary row" for op in TARGETS if op not in ops_ratios(output)]


def check_generator(output: str) -> list[str]:
    from t2f.models.benchmark import TARGET

    match = re.search(r"fp16 fused / fp16 reference, forward\+backward: ([\d.]+)x", output)
    problems = _unfused(output)
    if not match:
        return problems + ["no fused / reference ratio printed"]
    if float(match.group(1)) < TARGET:
        problems.append(f"fp16 fused synthesis {float(match.group(1)):.2f}x < target {TARGET}x")
    return problems


def check_train(output: str) -> list[str]:
    rows = re.findall(r"^(fp16 \+ fused \(Triton\)|fp32 \+ reference)\s+([\d.]+)\s+([\d.]+)$", output, re.MULTILINE)
    return [] if len(rows) == 2 else [f"expected both generator modes' samples/s and peak GiB, found {len(rows)}"]


def check_toy(output: str, run_dir: Path) -> list[str]:
    import json

    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    last = next((r for r in reversed(records) if "train/loss" in r), None)
    if last is None or last.get("step") != TOY_STEPS:
        return [f"{metrics} has no loss at step {TOY_STEPS}"]
    if "train/trl" not in last:  # still in the recaptioner warm-up: the generator never ran
        return [f"no joint step (train/trl) at step {TOY_STEPS}: the run never rendered through the generator"]
    if not all(isinstance(v, (int, float)) and v == v for k, v in last.items() if k.startswith("train/")):
        return [f"non-finite losses at step {TOY_STEPS}: {last}"]
    return []


def toy_losses(run_dir: Path) -> str:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "train/loss" in r][-1]
    keys = [k for k in ("train/loss", "train/kl", "train/trl", "train/recaptioner", "train/attention", "train/gpu_mem_gb")
            if k in last]
    return ("| step | " + " | ".join(k.split("/")[1] for k in keys) + " |\n" + "|---" * (len(keys) + 1) + "|\n"
            + f"| {last['step']} | " + " | ".join(f"{last[k]:.4f}" for k in keys) + " |\n")


def _unfused(output: str) -> list[str]:
    return ["Triton was disabled: the fused rows ran the reference"] if "Triton was disabled" in output else []


# ---------------------------------------------------------------------------- without a GPU: does every part exist?


class MissingPart(Exception):
    """A part the GPU check would run is not there; the message names it."""


def part_exists(part: Part) -> str:
    """A one-line description of what `part` would run, or MissingPart."""
    if part.name == "cuda-grid":
        return _gpu_test_ids()
    if part.name.startswith("bench-"):
        return _benchmark(part.argv[part.argv.index("bench") + 1], part.argv)
    if part.name == "toy-shards":
        from t2f.toy import dataset

        parser = argparse.ArgumentParser()
        dataset.add_arguments(parser)
        parser.parse_args(part.argv[part.argv.index("shards") + 1:])
        return "t2f toy shards accepts " + " ".join(part.argv[part.argv.index("shards") + 1:])
    if part.name == "toy-train":
        launch = ROOT / "launch"
        if not os.access(launch, os.X_OK) or "  train)" not in launch.read_text():
            raise MissingPart(f"{launch} is missing, not executable, or has no `train` command")
        return _preset("toy", [a for a in part.argv if "=" in a])
    raise MissingPart(f"no existence check for part {part.name!r}")


def _gpu_test_ids() -> str:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    if done.returncode != 0 or not ids:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise MissingPart(f"`pytest -m gpu {' '.join(GPU_TESTS)}` collects no test (status {done.returncode}): "
                          f"{' / '.join(tail)}")
    return f"{len(ids)} test ids marked gpu in {', '.join(GPU_TESTS)}"


def _benchmark(name: str, argv: list) -> str:
    import importlib

    from t2f.bench import BENCHMARKS

    if name not in BENCHMARKS:
        raise MissingPart(f"`t2f bench {name}` does not exist (t2f/bench.py lists {', '.join(BENCHMARKS)})")
    module = importlib.import_module(BENCHMARKS[name][0])
    if not callable(getattr(module, "main", None)):
        raise MissingPart(f"{module.__name__} has no main(argv)")
    detail = _preset(argv[argv.index("--config") + 1], [a for a in argv if "=" in a]) if "--config" in argv else ""
    return f"t2f bench {name} -> {module.__name__}.main" + (f"; {detail}" if detail else "")


def _preset(name: str, overrides: list) -> str:
    from t2f.config import ConfigError, load_config

    try:
        load_config(name, overrides)
    except ConfigError as err:
        raise MissingPart(f"preset {name} with {' '.join(overrides)}: {err}") from None
    return f"preset {name} takes {' '.join(overrides)}"


def check_without_gpu(work: Path) -> int:
    import torch

    print(f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__} sees none), so nothing was measured.\n"
          "Checked that every part a GPU run would run exists:")
    missing = []
    for part in parts(work):
        try:
            print(f"  ok       {part.name:<17} {part_exists(part)}")
        except (MissingPart, SystemExit, ImportError, OSError, subprocess.TimeoutExpired) as err:
            print(f"  MISSING  {part.name:<17} {err}")
            missing.append(part.name)
    if missing:
        print(f"gpu-check: FAILED: missing part(s): {', '.join(missing)}")
        return 1
    print("Run `./launch gpu-check` on a machine with a CUDA GPU for the report (docs/BENCHMARKS.md).")
    return 0


# ---------------------------------------------------------------------------- with a GPU: run and report


def environment_lines() -> list[str]:
    import torch

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return [f"- GPU: {torch.cuda.get_device_name()} ({smi.stdout.strip() or 'nvidia-smi: ' + smi.stderr.strip()})",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton_version}, Python {sys.version.split()[0]}",
            f"- t2f commit {commit or 'unknown'}; `./launch gpu-check`, {time.strftime('%Y-%m-%d %H:%M %Z')}"]


def run_part(part: Part, work: Path, seconds_left: float) -> tuple[list[str], str, float]:
    """(problems, output, seconds) of one part, limited to its own timeout and the time left."""
    limit = min(part.timeout, seconds_left)
    if limit <= 0:
        return ["not started: the time budget for all parts is spent (--budget)"], "", 0.0
    print(f"[gpu-check] {part.name}: {part.what} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    output, status = _run_limited(part.argv, limit, {**os.environ, "PYTHONUNBUFFERED": "1", **part.env})
    seconds = time.perf_counter() - tic
    (work / f"{part.name}.log").write_text(output)
    problems = [f"timed out after {limit:.0f} s"] if status is None else [f"exit status {status}"] if status else []
    if status == 0:
        problems += part.check(output)
    print(f"[gpu-check] {part.name}: {'ok' if not problems else 'FAILED: ' + '; '.join(problems)} ({seconds:.0f} s)",
          file=sys.stderr, flush=True)
    return problems, output, seconds


def _run_limited(argv: list, limit: float, env: dict) -> tuple[str, int | None]:
    """(stdout + stderr, exit status or None when killed at `limit` seconds). The part runs in its own
    session, so a timeout ends every process it started (`./launch train` starts several)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        return proc.communicate(timeout=limit)[0], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return (proc.communicate()[0] or "") + f"\n(killed after {limit:.0f} s)", None


def section(part: Part, output: str, work: Path) -> str:
    """The part's numbers as Markdown: the tables it printed, or its summary."""
    if part.name == "cuda-grid":
        summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        return f"`{' '.join(part.argv[1:])}`: {summary[-1].strip('= ') if summary else 'no summary'}\n"
    if part.name == "toy-train":
        return toy_losses(work / "toy-run") if (work / "toy-run" / "metrics.jsonl").is_file() else "no metrics\n"
    if part.name == "toy-shards":
        return ""
    keep = [line for line in output.splitlines() if line.startswith(("|", "GPU:", "config ", "fp16 fused /", "speed-up",
                                                                      "WARNING", "fp16 + fused", "fp32 + reference",
                                                                      "generator mode"))]
    return "```\n" + "\n".join(keep) + "\n```\n" if part.name.startswith("bench-train") else "\n".join(keep) + "\n"


def run_on_gpu(work: Path, out: Path | None, budget: float = BUDGET) -> int:
    start, failed, report = time.perf_counter(), [], ["# GPU check", "", *environment_lines(), ""]
    summary = ["| part | result | seconds |", "|---|---|---|"]
    shutil.rmtree(work / "toy-run", ignore_errors=True)  # a fresh run: the check must train, not resume an old one
    for part in parts(work):
        problems, output, seconds = run_part(part, work, budget - (time.perf_counter() - start))
        summary.append(f"| {part.name} | {'ok' if not problems else 'FAILED: ' + '; '.join(problems)} | {seconds:.0f} |")
        if output:
            report += [f"## {part.name}: {part.what}", "", section(part, output, work)]
        if problems:
            failed.append(part.name)
    report += ["## Summary", "", *summary, "",
               f"Total {time.perf_counter() - start:.0f} s; logs of every part in {work}."]
    text = "\n".join(report) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)} (see the summary above and {work}/<part>.log)")
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="./launch gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--work", type=Path, help="folder for the toy shards, run and logs (default: a temporary one)")
    parser.add_argument("--plan", action="store_true", help="print the commands it would run and exit")
    parser.add_argument("--budget", type=float, default=BUDGET, help=f"seconds for all parts (default {BUDGET})")
    args = parser.parse_args(argv)
    import torch

    if args.plan or not torch.cuda.is_available():  # nothing is written: no work folder is made
        work = args.work or Path(tempfile.gettempdir()) / "t2f-gpu-check"
        if args.plan:
            print("\n".join(f"{p.name:<17} {' '.join(p.argv)}  (limit {p.timeout} s)" for p in parts(work)))
            return 0
        return check_without_gpu(work)
    work = args.work or Path(tempfile.mkdtemp(prefix="t2f-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    return run_on_gpu(work, args.out, args.budget)


if __name__ == "__main__":
    sys.exit(main())
