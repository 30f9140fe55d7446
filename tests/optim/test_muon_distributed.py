"""Muon on two gloo ranks: DDP sharing (opt-in), its safety checks, and FSDP2."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import parallax.optim.muon as muon_module
from parallax.optim import MuonWithAdamW
from parallax.optim.distributed import balanced_assignment

from .ranks import run_ranks

STEPS = 3
WORLD_SIZE = 2


class SmallNet(nn.Module):
    """Embedding, four hidden Linears (one 13 rows: uneven FSDP shards), three
    experts [3, 8, 5] (a batch of matrices), tied head."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(12, 8)
        self.hidden = nn.ModuleList([nn.Linear(8, 13), nn.Linear(13, 8), nn.Linear(8, 8), nn.Linear(8, 16)])
        self.experts = nn.Parameter(torch.randn(3, 8, 5) / 3)
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


def loss_of(forward, batch):
    logits = forward(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 12), batch[:, 1:].reshape(-1))


def train(model, tokens, forward, **options):
    optimizer = MuonWithAdamW.from_model(model, lr=0.05, adamw_lr=1e-2, weight_decay=0.01, **options)
    for batch in tokens:
        optimizer.zero_grad()
        loss_of(forward, batch).backward()
        optimizer.step()
    return optimizer


def count_directions(monkeypatch_target=muon_module):
    """Patch spectral_direction to record the matrices this process orthogonalizes."""
    calls = []
    original = monkeypatch_target.spectral_direction

    def counting(matrix, **options):
        calls.append(tuple(matrix.shape))
        return original(matrix, **options)

    monkeypatch_target.spectral_direction = counting
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
    for batch in tokens[:2]:
        optimizer.zero_grad()
        loss_of(ddp, batch).backward()
        optimizer.step()
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optim": optimizer.full_state_dict()}
    optimizer.zero_grad()
    loss_of(ddp, tokens[2]).backward()
    optimizer.step()

    resumed, _ = make_model_and_data()
    resumed.load_state_dict(checkpoint["model"])
    resumed_ddp = nn.parallel.DistributedDataParallel(resumed)
    resumed_optimizer = MuonWithAdamW.from_model(resumed, lr=0.05, adamw_lr=1e-2, update_rule="normuon",
                                                 process_group=dist.group.WORLD)
    resumed_optimizer.load_state_dict(checkpoint["optim"])
    resumed_optimizer.zero_grad()
    loss_of(resumed_ddp, tokens[2]).backward()
    resumed_optimizer.step()
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


def _missing_grad_worker(rank, world_size, out_dir):
    """A grad that is None on one rank only: both ranks step it alike."""
    torch.manual_seed(0)
    matrices = [nn.Parameter(torch.randn(s)) for s in [(8, 8), (8, 8), (4, 12)]]
    optimizer = MuonWithAdamW([{"params": matrices, "use_muon": True}], lr=0.1, process_group=dist.group.WORLD)
    for step in range(2):
        torch.manual_seed(10 + step)
        for i, p in enumerate(matrices):
            p.grad = torch.randn_like(p)
            if i == 1 and rank == step % 2:
                p.grad = None
        optimizer.step()
    torch.save([p.detach().clone() for p in matrices], f"{out_dir}/rank{rank}.pt")


def test_grad_missing_on_one_rank_is_stepped_alike_without_hanging(tmp_path):
    run_ranks(_missing_grad_worker, WORLD_SIZE, str(tmp_path), timeout=60)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


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


@pytest.mark.parametrize("options, tolerance", [
    ({"orthogonalizer": "svd", "comm_dtype": None}, 1e-5),  # float32 directions on the wire
    ({}, 2e-3),  # bf16 Newton-Schulz: one bf16 rounding of a direction moves a weight by ~lr * 2^-8
    ({"update_rule": "normuon", "flatten": True, "orthogonalizer": "svd", "comm_dtype": None}, 1e-5),
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
