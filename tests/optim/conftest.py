"""Fixtures of the optimizer tests: matrices of known spectrum, a tiny LM, a
training loop, and stepping optimizers side by side on the same gradients."""
import pytest
import torch


@pytest.fixture
def matrix_with_spectrum():
    """Build M = U diag(S) V^T from orthonormal U, V (QR of random matrices),
    returning (M, U, V) in float64 so singular values can be checked exactly."""

    def build(rows, cols, singular_values, seed=0):
        generator = torch.Generator().manual_seed(seed)
        rank = len(singular_values)
        U, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64))
        S = torch.tensor(singular_values, dtype=torch.float64)
        return (U * S) @ V.mT, U, V

    return build


class TinyLM(torch.nn.Module):
    """Embedding `wte`, one MLP block with a norm, head `lm_head` tied to wte."""

    def __init__(self, vocab=16, width=8, tied=True):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        h = self.wte(tokens)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.lm_head(self.norm(h))


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train_steps(model, optimizer, batches, scheduler=None):
    """One optimizer (and scheduler) step per batch of tokens on `model`'s
    next-token loss (`model` may be a DDP/FSDP wrapper); returns the losses."""
    losses = []
    for tokens in batches:
        optimizer.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def tiny_lm():
    def build(seed=0, **kwargs):
        torch.manual_seed(seed)
        return TinyLM(**kwargs)

    return build


@pytest.fixture
def token_batches():
    def build(count, batch=4, length=9, vocab=16, seed=1):
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (batch, length), generator=generator) for _ in range(count)]

    return build


@pytest.fixture
def loss_of():
    return lm_loss


def step_side_by_side(optimizers, param_lists, steps, grad_scale=1.0):
    """`steps` times: give the i-th parameter of every list in `param_lists` the
    same fresh random gradient (times grad_scale), then step every optimizer."""
    for _ in range(steps):
        for params in zip(*param_lists):
            grad = torch.randn_like(params[0]) * grad_scale
            for p in params:
                p.grad = grad.clone()
        for optimizer in optimizers:
            optimizer.step()
