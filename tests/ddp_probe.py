"""Run by `accelerate launch` in test_train_distributed.py: trains through t2f.train.main and
records, per rank, the trainable weights after the run, how many batches the rank consumed and
the learning rates of every step the optimiser really took (under DeepSpeed, the step inside
the engine: our optimiser is the one ZeRO wraps around its flat partitions)."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from t2f import train
from t2f.exit_status import exit_process

captured = {"lrs": []}
make_optimizer, train_batches = train.make_optimizer, train.train_batches


def capture_model(cfg, model):
    captured["model"] = model  # the module DDP/DeepSpeed wraps shares these parameters
    optimizer = make_optimizer(cfg, model)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: captured["lrs"].append([g["lr"] for g in opt.param_groups]))
    return optimizer


def counting_batches(*args, **kwargs):
    for item in train_batches(*args, **kwargs):
        captured["batches"] = captured.get("batches", 0) + 1
        yield item


if __name__ == "__main__":
    train.make_optimizer, train.train_batches = capture_model, counting_batches
    out = Path(sys.argv[1])
    code = train.main(sys.argv[2:])
    rank = int(__import__("os").environ.get("RANK", 0))
    state = {k: v.detach().float().contiguous() for k, v in captured["model"].state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    record = {"batches": captured["batches"], "exit": code, "lrs": captured["lrs"]}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    exit_process(code)  # as t2f/train.py ends
