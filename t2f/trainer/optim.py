"""Optimiser, learning-rate schedule and the recaptioner warm-up, for every Accelerate backend.

Three parameter groups: the recaptioner, the CA head and the mapper (the last two are the "text
path"; the mapper learns at `optim.mapper_lr_scale` x the rate). The rate is a pure function of
the step, set *before* the forward pass: under DeepSpeed `accelerator.backward` already runs the
engine's step, so a rate set after it would apply one step late.

Warm-up (`train.recaptioner_warmup_steps`): only the recaptioner learns. The text path's groups
run at rate 0, so neither momentum nor weight decay can move them, and at the first joint step
their optimiser state (momentum buffers, Adam moments and step counts) is cleared, so the first
joint update is exactly a fresh optimiser's.
"""

import torch

TEXT_PATH = "text_path"  # param-group flag: CA head and mapper


def make_optimizer(cfg, model) -> torch.optim.Optimizer:
    """SGD or AdamW over the recaptioner, the CA head and the mapper (frozen parameters stay out)."""
    o = cfg.optim

    def trainable(module):
        return [p for p in module.parameters() if p.requires_grad]

    groups = [{"params": trainable(model.recaptioner), "lr_scale": 1.0, TEXT_PATH: False},
              {"params": trainable(model.ca), "lr_scale": 1.0, TEXT_PATH: True},
              {"params": trainable(model.mapping), "lr_scale": o.mapper_lr_scale, TEXT_PATH: True}]
    owned = sum(len(g["params"]) for g in groups)
    assert owned == len(trainable(model)), "a trainable parameter is outside the recaptioner, CA head and mapper"
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {o.name!r}")


def learning_rate(cfg, step: int) -> float:
    """Linear warm-up to optim.lr over optim.warmup_steps, then constant; resume needs no state."""
    warmup = cfg.optim.warmup_steps
    return cfg.optim.lr * min(1.0, (step + 1) / warmup) if warmup > 0 else cfg.optim.lr


def is_joint(cfg, step: int) -> bool:
    """False during the recaptioner warm-up, when the text path must not move."""
    return step >= cfg.train.recaptioner_warmup_steps


def set_learning_rate(cfg, optimizer, step: int) -> None:
    """The rates of step `step` (0-based), on every group; call before that step's forward."""
    base, joint = learning_rate(cfg, step), is_joint(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = base * group["lr_scale"] if joint or not group[TEXT_PATH] else 0.0
    if step == cfg.train.recaptioner_warmup_steps > 0:
        reset_text_path_state(optimizer)


def reset_text_path_state(optimizer) -> None:
    """Forget the text path's optimiser state, in the optimiser that really steps.

    Accelerate wraps the optimiser, and DeepSpeed wraps ours around flat partitions of each
    group; both keep the group order, so the innermost optimiser's groups line up with ours.
    """
    inner = innermost_optimizer(optimizer)
    for group in inner.param_groups:
        if group.get(TEXT_PATH):
            for p in group["params"]:
                inner.state.pop(p, None)


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    while hasattr(optimizer, "optimizer"):  # AcceleratedOptimizer -> (DeepSpeed ZeRO) -> torch
        optimizer = optimizer.optimizer
    return optimizer
