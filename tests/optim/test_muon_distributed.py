import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import parallax.optim.muon as muon_module
from parallax.optim import MuonWithAdamW
from parallax.optim.distributed import balanced_assignment

STEPS = 3
WORLD_SIZE = 2


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(12, 8)
        self.hidden = nn.ModuleList([nn.Linear(8, 24), nn.Linear(24, 8), nn.Linear(8, 8), nn.Linear(8, 16)])
        self.lm_head = nn.Linear(8, 12, bias=False)

    def forward(self, tokens):
        h = self.wte(tokens)
        h = torch.tanh(self.hidden[1](torch.tanh(self.hidden[0](h)))) + self.hidden[2](h)
        return self.lm_head(h + self.hidden[3](h)[..., :8])


def make_model_and_data():
    torch.manual_seed(0)
    model = SmallNet()
    tokens = torch.randint(0, 12, (STEPS, 4, 6), generator=torch.Generator().manual_seed(1))
    return model, tokens


def train(model, tokens, forward):
    optimizer = MuonWithAdamW.from_model(model, lr=0.05, adamw_lr=1e-2, weight_decay=0.01)
    for batch in tokens:
        optimizer.zero_grad()
        logits = forward(batch[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 12), batch[:, 1:].reshape(-1)).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)  # two ranks share the cores; oversubscription stalls gloo
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    calls = []
    original = muon_module.spectral_direction

    def counting(matrix, **options):
        calls.append(tuple(matrix.shape))
        return original(matrix, **options)

    muon_module.spectral_direction = counting
    model, tokens = make_model_and_data()
    # Every rank sees the same batch, so DDP's average is exactly the
    # single-process gradient and any difference would come from the sharding.
    ddp = nn.parallel.DistributedDataParallel(model)
    params = train(model, tokens, ddp)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    sharded = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
    try:
        MuonWithAdamW([{"params": [sharded], "use_muon": True}])
        dtensor_refused = False
    except TypeError as error:
        dtensor_refused = "FSDP2" in str(error)
    torch.save({"params": params, "calls": calls, "dtensor_refused": dtensor_refused}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_share_orthogonalization_and_match_one_process(tmp_path):
    model, tokens = make_model_and_data()
    reference = train(model, tokens, model)
    # fork reuses this process's imports (torch, dynamo), which spawn would redo per rank.
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(result["params"], reference))
        assert result["dtensor_refused"]

    matrices_per_step = 4
    counts = [len(result["calls"]) for result in results]
    assert sum(counts) == matrices_per_step * STEPS
    assert all(0 < count < matrices_per_step * STEPS for count in counts)


def test_balanced_assignment_spreads_work_deterministically():
    sizes = [100, 90, 10, 10, 5, 80]
    owners = balanced_assignment(sizes, 2)
    assert owners == balanced_assignment(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= max(sizes)
    assert balanced_assignment(sizes, 1) == [0] * len(sizes)
    assert sorted(set(balanced_assignment([1] * 7, 3))) == [0, 1, 2]
