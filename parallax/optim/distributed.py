"""Share the orthogonalization work of a step across data-parallel ranks.

Every rank holds identical gradients (DDP averaged them) and hence identical
momentum, so each rank computes the directions of its share of the matrices
and one all_gather hands every rank all the directions."""

import torch
import torch.distributed as dist


def balanced_assignment(sizes, world_size):
    """Owner rank of each item: largest first onto the least loaded rank.
    Deterministic, so every rank derives the same assignment independently."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


def world(process_group=None):
    """(rank, world_size) of the active process group, or (0, 1) without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def sharded_map(compute, shapes, dtypes, device, process_group=None):
    """[compute(i) for i in range(len(shapes))], each computed on one rank only.

    compute(i) must return a tensor of shapes[i]; the result on every rank is
    the full list, in dtypes[i].
    """
    rank, world_size = world(process_group)
    if world_size == 1 or not shapes:
        return [compute(i) for i in range(len(shapes))]

    numels = [torch.Size(shape).numel() for shape in shapes]
    owners = balanced_assignment(numels, world_size)
    # One flat buffer per rank in a dtype every item converts to exactly.
    wire_dtype = dtypes[0]
    for dtype in dtypes[1:]:
        wire_dtype = torch.promote_types(wire_dtype, dtype)
    loads = [sum(n for n, owner in zip(numels, owners) if owner == r) for r in range(world_size)]
    local = [compute(i).reshape(-1).to(wire_dtype) for i in range(len(shapes)) if owners[i] == rank]
    buffer = torch.zeros(max(loads), dtype=wire_dtype, device=device)
    if local:
        flat = torch.cat(local)
        buffer[: flat.numel()] = flat
    gathered = [torch.empty_like(buffer) for _ in range(world_size)]
    dist.all_gather(gathered, buffer, group=process_group)

    offsets = [0] * world_size
    results = []
    for i, owner in enumerate(owners):
        start = offsets[owner]
        offsets[owner] += numels[i]
        results.append(gathered[owner][start : start + numels[i]].reshape(shapes[i]).to(dtypes[i]))
    return results
