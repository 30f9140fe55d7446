"""Muon on two gloo ranks: DDP sharing (opt-in), its safety checks, and FSDP2."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallax.optim import MuonWithAdamW
from parallax.optim.direction import DirectionPlan
from parallax.optim.distributed import balanced_assignment

from .conftest import train_steps
from .ranks import run_ranks

STEPS = 3
WORLD_SIZE = 2


class SmallNet(nn.Module):
    """Embedding, four hidden Linears (one 13 rows: uneven FSDP shards), three
    experts [3, 8, 5] (a batch of matrices, declared by num_experts), tied head."""

    num_experts = 3

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(12, 8)
        self.hidden = nn.ModuleList([nn.Linear(8, 13), nn.Linear(13, 8), nn.Linear(8, 8), nn.Linear(8, 16)])
        self.experts = nn.Parameter(torch.randn(self.num_experts, 8, 5) / 3)
        self.lm_head = nn.Linear(8, 12, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        h = self.wte(tokens)
        h = torch.tanh(self.hidden[1](torch.tanh(self.hidden[0](h)))) + self.hidden[2](h)
        h = h + self.hidden[3](h)[..., :8] + torch.einsum("btd,edk->btk", h, self.experts).sum(-1, keepdim=True)
        return self.lm_head(h)


def make_model_and_data(batches_per_step=1):
    torch.manual_seed(0)
    model = SmallNet()
    tokens = torch.randint(0, 12, (STEPS, batches_per_step * 4, 6), generator=torch.Generator().manual_seed(1))
    return model, tokens


def train(model, tokens, forward, **options):
    """MuonWithAdamW.from_model(model) trained through `forward` (model or its wrapper)."""
    optimizer = MuonWithAdamW.from_model(model, lr=0.05, adamw_lr=1e-2, weight_decay=0.01, **options)
    train_steps(forward, optimizer, tokens)
    return optimizer


def count_directions():
    """Record the matrices this (worker) process computes directions of."""
    calls = []
    original = DirectionPlan.direction

    def counting(plan, matrix):
        calls.append(tuple(matrix.shape))
        return original(plan, matrix)

    DirectionPlan.direction = counting
    return calls


def _ddp_worker(rank, world_size, out_dir):
    calls = count_directions()
    model, tokens = make_model_and_data()
    # Every rank sees the same batch, so DDP's average is exactly the
    # single-process gradient and any difference comes from the sharing.
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = train(model, tokens, ddp, process_group=dist.group.WORLD)
    sharing_calls = list(calls)
    owned = [p.shape for p in model.parameters() if "momentum_buffer" in optimizer.state.get(p, {})]
    full = optimizer.full_state_dict()

    # Without a process group nothing is shared, even though dist is initialised.
    calls.clear()
    plain, _ = make_model_and_data()
    train(plain, tokens, plain)
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "calls": sharing_calls,
                "owned": owned, "full": full, "unshared_calls": len(calls),
                "unshared": [p.detach().clone() for p in plain.parameters()]}, f"{out_dir}/rank{rank}.pt")


def test_ddp_sharing_is_opt_in_owner_only_and_equals_one_process(tmp_path):
    model, tokens = make_model_and_data()
    reference = train(model, tokens, model)
    run_ranks(_ddp_worker, WORLD_SIZE, str(tmp_path), timeout=60)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for result in results:
        # Directions travel in bf16, which the bf16 Newton-Schulz result already is: exact.
        assert all(torch.equal(a, b) for a, b in zip(result["params"], model.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(result["unshared"], model.parameters()))
        assert result["unshared_calls"] > 0
    matrices_per_step = 5  # four Linear weights and the expert batch
    counts = [len(result["calls"]) for result in results]
    assert sum(counts) == matrices_per_step * STEPS and all(0 < count for count in counts)
    # Momentum lives on the owner only, and full_state_dict brings it all together.
    owned = [result["owned"] for result in results]
    assert len(owned[0]) + len(owned[1]) == matrices_per_step and not set(map(tuple, owned[0])) & set(map(tuple, owned[1]))
    expected = reference.state_dict()["state"]
    for result in results:
        full = result["full"]["state"]
        assert sorted(full) == sorted(expected)
        for index, state in expected.items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(full[index][key]), torch.as_tensor(value)), (index, key)


def _full_checkpoint_worker(rank, world_size, out_dir):
    """Resume from a full checkpoint on two ranks == never stopping."""
    model, tokens = make_model_and_data()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = MuonWithAdamW.from_model(model, lr=0.05, adamw_lr=1e-2, update_rule="normuon",
                                         process_group=dist.group.WORLD)
    train_steps(ddp, optimizer, tokens[:2])
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optim": optimizer.full_state_dict()}
    train_steps(ddp, optimizer, tokens[2:])

    resumed, _ = make_model_and_data()
    resumed.load_state_dict(checkpoint["model"])
    resumed_ddp = nn.parallel.DistributedDataParallel(resumed)
    resumed_optimizer = MuonWithAdamW.from_model(resumed, lr=0.05, adamw_lr=1e-2, update_rule="normuon",
                                                 process_group=dist.group.WORLD)
    resumed_optimizer.load_state_dict(checkpoint["optim"])
    train_steps(resumed_ddp, resumed_optimizer, tokens[2:])
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    torch.save(same, f"{out_dir}/rank{rank}.pt")


def test_ddp_resume_from_full_state_dict_is_bit_identical(tmp_path):
    run_ranks(_full_checkpoint_worker, WORLD_SIZE, str(tmp_path), timeout=60)
    assert all(torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE))


def _mismatch_worker(rank, world_size, out_dir):
    """Ranks with different matrices (as under pipeline parallelism) get a clear error."""
    torch.manual_seed(rank)
    matrices = [nn.Parameter(torch.randn(4, 6))] if rank == 0 else [nn.Parameter(torch.randn(6, 4)),
                                                                     nn.Parameter(torch.randn(3, 3))]
    optimizer = MuonWithAdamW([{"params": matrices, "use_muon": True}], process_group=dist.group.WORLD)
    for p in matrices:
        p.grad = torch.randn_like(p)
    try:
        optimizer.step()
        message = None
    except ValueError as error:
        message = str(error)
    torch.save(message, f"{out_dir}/rank{rank}.pt")


def test_ranks_holding_different_matrices_raise_instead_of_hanging(tmp_path):
    run_ranks(_mismatch_worker, WORLD_SIZE, str(tmp_path), timeout=60)
    for r in range(WORLD_SIZE):
        message = torch.load(tmp_path / f"rank{r}.pt")
        assert message is not None and "different matrices" in message and "process_group" in message


# One matrix per shape: a rank then stacks the same matrices as one process does.
SHAPES = [(8, 8), (6, 10), (4, 12), (12, 4)]


def step_matrices(optimizer, matrices, step, missing=lambda i, step: False):
    """The same seeded gradients on every rank; missing(i, step): no gradient."""
    torch.manual_seed(10 + step)
    for i, p in enumerate(matrices):
        p.grad = torch.randn_like(p)
        if missing(i, step):
            p.grad = None
    optimizer.step()


def fresh_matrices():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(s)) for s in SHAPES]


def _missing_grad_worker(rank, world_size, out_dir):
    """Matrix 1 has a gradient on one rank only (rank 1, then rank 0): its owner
    must step it with that gradient, whichever rank holds it."""
    matrices = fresh_matrices()
    optimizer = MuonWithAdamW([{"params": matrices, "use_muon": True}], lr=0.1, process_group=dist.group.WORLD)
    for step in range(2):
        step_matrices(optimizer, matrices, step, missing=lambda i, step: i == 1 and rank == step % 2)
    torch.save([p.detach().clone() for p in matrices], f"{out_dir}/rank{rank}.pt")


def test_a_gradient_held_by_some_ranks_reaches_the_owner(tmp_path):
    run_ranks(_missing_grad_worker, WORLD_SIZE, str(tmp_path), timeout=60)
    reference = fresh_matrices()  # one process that holds every gradient
    optimizer = MuonWithAdamW([{"params": reference, "use_muon": True}], lr=0.1)
    for step in range(2):
        step_matrices(optimizer, reference, step)
    for r in range(WORLD_SIZE):
        assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / f"rank{r}.pt"), reference))


# (options, comm_dtype): NorMuon, SVD, MuCon and Kaon directions hold float32
# values, Gram Newton-Schulz's float16 ones, Newton-Schulz's bfloat16 ones.
WIRE_CASES = [({}, None), ({"update_rule": "normuon"}, None), ({"orthogonalizer": "svd"}, None),
              ({"update_rule": "mucon"}, None), ({"update_rule": "kaon"}, None),
              ({"orthogonalizer": "gram_newton_schulz"}, None), ({"update_rule": "normuon"}, torch.bfloat16)]


def train_matrices(options, **distributed):
    matrices = fresh_matrices()
    optimizer = MuonWithAdamW([{"params": matrices, "use_muon": True}], **options, **distributed)
    for step in range(2):
        step_matrices(optimizer, matrices, step)
    return [p.detach().clone() for p in matrices]


def _wire_worker(rank, world_size, out_dir):
    results = [train_matrices(options, process_group=dist.group.WORLD, comm_dtype=comm_dtype)
               for options, comm_dtype in WIRE_CASES]
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_directions_travel_exactly_unless_a_comm_dtype_is_asked_for(tmp_path):
    run_ranks(_wire_worker, WORLD_SIZE, str(tmp_path), timeout=60)
    shared = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for case, (options, comm_dtype) in enumerate(WIRE_CASES):
        reference = train_matrices(options)
        for result in shared:
            if comm_dtype is None:
                assert all(torch.equal(a, b) for a, b in zip(result[case], reference)), options
            else:  # asked for: float32 directions rounded to bf16, a relative 2^-9 of an lr = 0.02 step
                differences = [(a - b).abs().max() for a, b in zip(result[case], reference)]
                assert max(differences) > 0 and all(d < 0.02 * 2**-7 for d in differences)


def _fsdp_worker(rank, world_size, out_dir, options):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    model, tokens = make_model_and_data(batches_per_step=world_size)
    for layer in model.hidden:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    # Each rank trains on its half of every batch; FSDP averages the gradients.
    local = tokens.chunk(world_size, dim=1)[rank]
    optimizer = train(model, local, model, **options)
    full = optimizer.full_state_dict()
    torch.save({"params": [p.full_tensor() for p in model.parameters()], "full": full}, f"{out_dir}/rank{rank}.pt")


# Directions travel exactly (float32 for SVD and NorMuon, bf16 for Newton-Schulz);
# what is left is the order of float32 sums over shards.
@pytest.mark.parametrize("options, tolerance", [
    ({"orthogonalizer": "svd"}, 1e-5),
    ({}, 1e-5),
    ({"update_rule": "normuon", "flatten": True, "orthogonalizer": "svd"}, 1e-5),
])
def test_fsdp2_muon_equals_single_process(tmp_path, options, tolerance):
    model, tokens = make_model_and_data(batches_per_step=WORLD_SIZE)
    reference = train(model, tokens, model, **options)
    run_ranks(_fsdp_worker, WORLD_SIZE, str(tmp_path), options, timeout=60)
    expected_state = reference.state_dict()["state"]
    for r in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for got, want in zip(result["params"], model.parameters()):
            assert (got - want).abs().max() < tolerance
        for index, state in expected_state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert torch.allclose(result["full"]["state"][index][key], value, atol=tolerance), (index, key)


def test_balanced_assignment_spreads_work_deterministically():
    costs = [100, 90, 10, 10, 5, 80]
    owners = balanced_assignment(costs, 2)
    assert owners == balanced_assignment(costs, 2)
    loads = [sum(s for s, o in zip(costs, owners) if o == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= max(costs)
    assert balanced_assignment(costs, 1) == [0] * len(costs)
    assert sorted(set(balanced_assignment([1] * 7, 3))) == [0, 1, 2]


def test_work_is_balanced_by_orthogonalization_cost_not_element_count():
    from parallax.optim.distributed import orthogonalization_cost

    # A 64 x 64 matrix costs 64^3; a 4 x 1024 one, with as many elements, 4^2 x 1024.
    assert orthogonalization_cost(1, 64, 64) == 64 * 64 * 64
    assert orthogonalization_cost(1, 4, 1024) == orthogonalization_cost(1, 1024, 4) == 4 * 4 * 1024
    assert orthogonalization_cost(3, 8, 5) == 3 * 8 * 5 * 5
    optimizer = MuonWithAdamW([{"params": [nn.Parameter(torch.zeros(s)) for s in
                                           [(64, 64), (4, 1024), (4, 1024), (4, 1024)]], "use_muon": True}])
    entries = [(p, optimizer.param_groups[0]) for p in optimizer.param_groups[0]["params"]]
    # By element count the square matrix would share a rank with one thin matrix.
    assert optimizer._owners(entries, 2) == [0, 1, 1, 1]


def test_shard_sizes_follow_torch_chunk():
    from parallax.optim.distributed import shard_sizes

    for length in (13, 8, 3, 1):
        for world in (1, 2, 3, 4):
            expected = [chunk.shape[0] for chunk in torch.arange(length).chunk(world)]
            assert shard_sizes(length, world)[: len(expected)] == expected
            assert sum(shard_sizes(length, world)) == length
