"""Collectives of a distributed Muon step.

Data parallel (DDP, plain tensors): every rank holds the same averaged
gradient (one that only some ranks hold is averaged over them first); the
rank that owns a matrix keeps its momentum, computes its direction, and one
all_gather hands every rank all directions.

FSDP2 (DTensor parameters sharded along one dim): every rank updates the
momentum of its shards; one all_to_all gathers each whole matrix on its owner,
the owner computes the direction, and a second all_to_all returns each rank
its shards of every direction.

Directions travel in the narrowest dtype that holds them exactly (bf16 for
the bf16 Newton-Schulz iteration) unless a comm_dtype is asked for. Owners are
assigned once per list of Muon parameters, so a matrix's state stays on one
rank, and balanced by the cost of orthogonalizing it.
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
    parameter, how many ranks hold a gradient for it.

    signature: one (shape, dtype) description per parameter. Ranks that hold
    different matrices (pipeline or tensor parallelism) must not share a
    process group: a mismatch raises ValueError instead of a wrong result or
    a hang.
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
    counts = torch.tensor(has_grad, dtype=torch.int64, device=device)
    dist.all_reduce(counts, group=process_group)
    return counts.tolist()


def average_partial_gradients(grads, shapes, counts, device, process_group):
    """The gradients that only some ranks hold (`grads[i]` None elsewhere),
    averaged over the ranks that hold one, so the owner of a matrix steps it
    with the gradient whichever rank computed it. One all_reduce (float32, or
    float64 if any gradient is) for all of them; returns {index: gradient}."""
    _, world_size = group_world(process_group)
    partial = [i for i, count in enumerate(counts) if 0 < count < world_size]
    if not partial:
        return {}
    dtype = torch.float32
    for grad in grads:
        if grad is not None:
            dtype = torch.promote_types(dtype, grad.dtype)
    sizes = [torch.Size(shapes[i]).numel() for i in partial]
    buffer = torch.cat([grads[i].reshape(-1).to(dtype) if grads[i] is not None
                        else torch.zeros(size, dtype=dtype, device=device) for i, size in zip(partial, sizes)])
    dist.all_reduce(buffer, group=process_group)
    return {i: (chunk / counts[i]).reshape(shapes[i]) for i, chunk in zip(partial, buffer.split(sizes))}


# Narrower dtypes a direction may travel in when it holds no more precision:
# Newton-Schulz and Polar Express iterate in bfloat16, Gram Newton-Schulz in float16.
NARROW_WIRE_DTYPES = (torch.bfloat16, torch.float16)


def _exact_wire_code(tensor, device):
    """Index into NARROW_WIRE_DTYPES of the first dtype that holds `tensor`
    exactly, or len(NARROW_WIRE_DTYPES): its own dtype. A 0-dim tensor on
    `device`, so that deciding costs no host sync per matrix."""
    code = torch.tensor(len(NARROW_WIRE_DTYPES), device=device)
    for candidate in reversed(range(len(NARROW_WIRE_DTYPES))):  # the narrowest exact one wins
        dtype = NARROW_WIRE_DTYPES[candidate]
        if dtype.itemsize < tensor.dtype.itemsize:
            exact = torch.eq(tensor.to(dtype).to(tensor.dtype), tensor).all().to(device)
            code = torch.where(exact, candidate, code)
    return code


def wire_dtypes(local, dtypes, comm_dtype, device, process_group):
    """The dtype each result travels in. comm_dtype set: that one (it rounds
    what it cannot hold, as asked). None: the narrowest of bfloat16, float16
    and the result's own dtype (dtypes[i]) that holds it exactly, decided by
    its owner (local: {index: result}) and shared with one all_reduce."""
    if comm_dtype is not None:
        return [comm_dtype] * len(dtypes)
    codes = torch.zeros(len(dtypes), dtype=torch.int64, device=device)
    for i, result in local.items():
        codes[i] = _exact_wire_code(result, device)
    if group_world(process_group)[1] > 1:
        dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=process_group)  # others sent 0: the owner's code wins
    return [NARROW_WIRE_DTYPES[code] if code < len(NARROW_WIRE_DTYPES) else dtype
            for code, dtype in zip(codes.tolist(), dtypes)]


def _by_dtype(wire):
    """Indices grouped by wire dtype, in an order every rank agrees on."""
    groups = {}
    for i, dtype in enumerate(wire):
        groups.setdefault(dtype, []).append(i)
    return [groups[dtype] for dtype in sorted(groups, key=str)]


def gather_from_owners(local, owners, shapes, dtypes, wire, device, process_group):
    """Every rank's list of all results, given each owner's own results.

    local: {index: tensor of shapes[index]} for the indices this rank owns.
    Results travel in wire[index] (`wire_dtypes`), one flat buffer per rank
    and wire dtype, and come back in dtypes[index].
    """
    rank, world_size = group_world(process_group)
    numels = [torch.Size(shape).numel() for shape in shapes]
    results = [None] * len(shapes)
    for indices in _by_dtype(wire):
        wire_dtype = wire[indices[0]]
        loads = [sum(numels[i] for i in indices if owners[i] == r) for r in range(world_size)]
        buffer = torch.zeros(max(loads), dtype=wire_dtype, device=device)
        mine = [local[i].reshape(-1).to(wire_dtype) for i in indices if owners[i] == rank]
        if mine:
            flat = torch.cat(mine)
            buffer[: flat.numel()] = flat
        gathered = [torch.empty_like(buffer) for _ in range(world_size)]
        dist.all_gather(gathered, buffer, group=process_group)
        offsets = [0] * world_size
        for i in indices:
            start = offsets[owners[i]]
            offsets[owners[i]] += numels[i]
            results[i] = gathered[owners[i]][start : start + numels[i]].reshape(shapes[i]).to(dtypes[i])
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


def owners_to_shards(wholes, owners, shapes, dim, dtypes, wire, device, process_group):
    """Inverse of shards_to_owners: every rank's shards of every tensor.

    wholes: {i: whole tensor of shapes[i]} on its owner. Returns this rank's
    shard of each tensor, sent in wire[i] (`wire_dtypes`), one all_to_all per
    wire dtype, and returned in dtypes[i].
    """
    rank, world_size = group_world(process_group)
    sizes = [shard_sizes(shape[dim], world_size) for shape in shapes]
    results = [None] * len(shapes)
    for indices in _by_dtype(wire):
        wire_dtype = wire[indices[0]]
        send_counts, send = [0] * world_size, []
        mine = [i for i in indices if owners[i] == rank]
        for dst in range(world_size):
            for i in mine:
                piece = wholes[i].reshape(shapes[i]).split(sizes[i], dim=dim)[dst]
                send.append(piece.reshape(-1).to(wire_dtype))
                send_counts[dst] += piece.numel()
        receive_counts = [
            sum(torch.Size(_shard_shape(shapes[i], dim, sizes[i][rank])).numel() for i in indices if owners[i] == src)
            for src in range(world_size)
        ]
        inputs = torch.cat(send) if send else torch.empty(0, dtype=wire_dtype, device=device)
        output = torch.empty(sum(receive_counts), dtype=wire_dtype, device=device)
        dist.all_to_all_single(output, inputs, output_split_sizes=receive_counts, input_split_sizes=send_counts,
                               group=process_group)
        offset = 0
        for src in range(world_size):
            for i in indices:
                if owners[i] != src:
                    continue
                shape = _shard_shape(shapes[i], dim, sizes[i][rank])
                count = torch.Size(shape).numel()
                results[i] = output[offset : offset + count].reshape(shape).to(dtypes[i])
                offset += count
    return results
