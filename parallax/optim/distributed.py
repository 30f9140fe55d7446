"""Collectives of a distributed Muon step.

Data parallel (DDP, plain tensors): every rank holds the same averaged
gradient; the rank that owns a matrix keeps its momentum, computes its
direction, and one all_gather hands every rank all directions.

FSDP2 (DTensor parameters sharded along one dim): every rank updates the
momentum of its shards; one all_to_all gathers each whole matrix on its owner,
the owner computes the direction, and a second all_to_all returns each rank
its shards of every direction.

Owners are assigned once per list of Muon parameters, so a matrix's state
stays on one rank, and balanced by the cost of orthogonalizing it.
"""

import zlib

import torch
import torch.distributed as dist


def balanced_assignment(costs, world_size):
    """Owner rank of each item: largest first onto the least loaded rank.
    Deterministic, so every rank derives the same assignment independently."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    loads = [0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def orthogonalization_cost(batch, rows, cols):
    """Flops of Newton-Schulz on `batch` matrices rows x cols, up to a constant:
    every product involves the smaller Gram side, so m n min(m, n)."""
    return batch * rows * cols * min(rows, cols)


def group_world(process_group):
    """(rank, world_size) within `process_group`; (0, 1) for None."""
    if process_group is None:
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def agree_on_parameters(signature, has_grad, process_group, device):
    """Check that every rank steps the same Muon parameters and return, per
    parameter, whether any rank has a gradient for it.

    signature: one (shape, dtype) description per parameter. Ranks that hold
    different matrices (pipeline or tensor parallelism) must not share a
    process group: a mismatch raises ValueError instead of a wrong result or
    a hang. A parameter whose grad is None on some ranks only is stepped on
    every rank (with a zero gradient where it is missing), so all ranks take
    part in the same collectives.
    """
    digest = zlib.crc32(repr(signature).encode())
    # A fixed-size check first: ranks that disagree may not even agree on a length.
    digests = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(digests, op=dist.ReduceOp.MAX, group=process_group)
    if digests[0].item() != digest or -digests[1].item() != digest:
        signatures = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(signatures, signature, group=process_group)
        differing = [rank for rank, other in enumerate(signatures) if other != signature]
        raise ValueError(
            "ranks of the Muon process group hold different matrices (ranks "
            f"{differing} differ from rank {dist.get_rank(process_group)}: {len(signatures[differing[0]])} vs "
            f"{len(signature)} parameters, first shapes {signatures[differing[0]][:3]} vs {signature[:3]}); "
            "pass a process_group whose ranks hold the same parameters (the data-parallel group), "
            "or process_group=None"
        )
    flags = torch.tensor(has_grad, dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=process_group)
    return [bool(flag) for flag in flags.tolist()]


def gather_from_owners(local, owners, shapes, dtypes, comm_dtype, device, process_group):
    """Every rank's list of all results, given each owner's own results.

    local: {index: tensor of shapes[index]} for the indices this rank owns.
    Results travel in comm_dtype (None: the promoted result dtype) as one flat
    buffer per rank and come back in dtypes[index].
    """
    rank, world_size = group_world(process_group)
    numels = [torch.Size(shape).numel() for shape in shapes]
    wire_dtype = comm_dtype
    if wire_dtype is None:
        wire_dtype = dtypes[0]
        for dtype in dtypes[1:]:
            wire_dtype = torch.promote_types(wire_dtype, dtype)
    loads = [sum(n for n, owner in zip(numels, owners) if owner == r) for r in range(world_size)]
    buffer = torch.zeros(max(loads), dtype=wire_dtype, device=device)
    mine = [local[i].reshape(-1).to(wire_dtype) for i in range(len(shapes)) if owners[i] == rank]
    if mine:
        flat = torch.cat(mine)
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


def shard_sizes(length, world_size):
    """Sizes along the sharded dim of each rank's shard: torch.chunk's split,
    which FSDP2's Shard placement uses (trailing ranks may get 0)."""
    chunk = -(-length // world_size)
    return [max(0, min(chunk, length - r * chunk)) for r in range(world_size)]


def _shard_shape(shape, dim, size):
    shape = list(shape)
    shape[dim] = size
    return shape


def shards_to_owners(shards, owners, shapes, dim, process_group):
    """Whole tensors on their owners from every rank's shards.

    shards[i]: this rank's shard (along `dim`) of tensor i of global shape
    shapes[i]. Returns {i: whole tensor} for the i this rank owns.
    """
    rank, world_size = group_world(process_group)
    dtype = shards[0].dtype
    for shard in shards[1:]:
        dtype = torch.promote_types(dtype, shard.dtype)
    send = [[] for _ in range(world_size)]
    for i, owner in enumerate(owners):
        send[owner].append(shards[i].reshape(-1).to(dtype))
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    sizes = {i: shard_sizes(shapes[i][dim], world_size) for i in mine}
    receive_counts = [
        sum(torch.Size(_shard_shape(shapes[i], dim, sizes[i][src])).numel() for i in mine) for src in range(world_size)
    ]
    inputs = torch.cat([t for chunk in send for t in chunk]) if any(send) else shards[0].new_empty(0, dtype=dtype)
    output = inputs.new_empty(sum(receive_counts))
    dist.all_to_all_single(output, inputs, output_split_sizes=receive_counts,
                           input_split_sizes=[sum(t.numel() for t in chunk) for chunk in send], group=process_group)
    pieces = {i: [] for i in mine}
    offset = 0
    for src in range(world_size):
        for i in mine:
            shape = _shard_shape(shapes[i], dim, sizes[i][src])
            count = torch.Size(shape).numel()
            pieces[i].append(output[offset : offset + count].reshape(shape))
            offset += count
    return {i: torch.cat(pieces[i], dim=dim) for i in mine}


def owners_to_shards(wholes, owners, shapes, dim, dtypes, comm_dtype, device, process_group):
    """Inverse of shards_to_owners: every rank's shards of every tensor.

    wholes: {i: whole tensor of shapes[i]} on its owner. Returns this rank's
    shard of each tensor, sent in comm_dtype (None: exact) and returned in dtypes[i].
    """
    rank, world_size = group_world(process_group)
    wire_dtype = comm_dtype or torch.float32
    if comm_dtype is None:
        for dtype in dtypes:
            wire_dtype = torch.promote_types(wire_dtype, dtype)
    sizes = [shard_sizes(shape[dim], world_size) for shape in shapes]
    send_counts, send = [0] * world_size, [[] for _ in range(world_size)]
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    for dst in range(world_size):
        for i in mine:
            piece = wholes[i].reshape(shapes[i]).split(sizes[i], dim=dim)[dst]
            send[dst].append(piece.reshape(-1).to(wire_dtype))
            send_counts[dst] += piece.numel()
    receive_counts = [
        sum(torch.Size(_shard_shape(shapes[i], dim, sizes[i][rank])).numel() for i, owner in enumerate(owners)
            if owner == src)
        for src in range(world_size)
    ]
    flat = [t for chunk in send for t in chunk]
    inputs = torch.cat(flat) if flat else torch.empty(0, dtype=wire_dtype, device=device)
    output = torch.empty(sum(receive_counts), dtype=wire_dtype, device=device)
    dist.all_to_all_single(output, inputs, output_split_sizes=receive_counts, input_split_sizes=send_counts,
                           group=process_group)
    starts = [sum(receive_counts[:src]) for src in range(world_size)]
    results = [None] * len(shapes)
    for src in range(world_size):
        offset = starts[src]
        for i, owner in enumerate(owners):
            if owner != src:
                continue
            shape = _shard_shape(shapes[i], dim, sizes[i][rank])
            count = torch.Size(shape).numel()
            results[i] = output[offset : offset + count].reshape(shape).to(dtypes[i])
            offset += count
    return results
