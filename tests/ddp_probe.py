"""Run by `accelerate launch` in test_train_distributed.py: trains through t2f.train.main and
records, per rank, the trainable weights after the run and how many batches the rank consumed."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from t2f import train

captured = {}
make_optimizer, train_batches = train.make_optimizer, train.train_batches


def capture_model(cfg, model):
    captured["model"] = model  # the module DDP/DeepSpeed wraps shares these parameters
    return make_optimizer(cfg, model)


def counting_batches(*args, **kwargs):
    for item in train_batches(*args, **kwargs):
        captured["batches"] = captured.get("batches", 0) + 1
        yield item


if __name__ == "__main__":
    train.make_optimizer, train.train_batches = capture_model, counting_batches
    out = Path(sys.argv[1])
    import torch.distributed as dist

    code = train.main(sys.argv[2:])
    rank = int(__import__("os").environ.get("RANK", 0))
    state = {k: v.detach().float().contiguous() for k, v in captured["model"].state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"batches": captured["batches"], "exit": code}))
    sys.exit(code)
