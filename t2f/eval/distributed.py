"""The few collective calls evaluation needs: rank and world size, gather to rank 0, broadcast from it.

Outside `accelerate launch` / torchrun (no process group) every call is the one-process case, so
`evaluate()` runs the same code on one process and on many.
"""


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj, world: int) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj, world: int):
    """Rank 0's `obj` on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
