"""GPT: a decoder-only transformer of pre-norm ParallaxAttention + SwiGLU blocks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import KVCache, ParallaxAttention
from .config import GPTConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd)
        self.attn = ParallaxAttention(
            config.n_embd, config.n_head, num_kv_heads=config.kv_heads, kind=config.attention,
            window_size=config.window_size, qk_norm=config.qk_norm, rope_theta=config.rope_theta,
            backend=config.backend, deterministic=config.deterministic,
        )
        self.mlp_norm = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config.n_embd, config.resolved_mlp_hidden())

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Token embedding `wte` -> blocks -> RMSNorm -> `lm_head`.

    Positions come from RoPE inside each attention layer, so there is no
    position embedding. Init is nanoGPT's: N(0, 0.02) everywhere, residual
    output projections (attention o_proj, MLP down_proj) scaled by
    1 / sqrt(2 * n_layer); the Parallax probe W_R then starts at zero (the
    layer's own `reset_probe`), so the model starts as a softmax transformer.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            block.attn.reset_probe()

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights count once
        if exclude_embeddings:
            n -= self.wte.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def new_caches(self, batch_size: int, max_seqlen: int | None = None) -> list[KVCache]:
        """One KV cache per layer, holding up to max_seqlen (default block_size) tokens."""
        n = self.config.block_size if max_seqlen is None else max_seqlen
        return [block.attn.new_cache(batch_size, n) for block in self.blocks]

    def hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, n_embd] of tokens idx [B, T]."""
        if idx.ndim != 2:
            raise ValueError(f"idx must be [batch, seq], got shape {tuple(idx.shape)}")
        past = 0 if caches is None else int(caches[0].seqlens.max())
        if past + idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {past + idx.shape[1]} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: int64 [B, T] -> (logits [B, T, vocab], mean cross-entropy or None).

        Targets equal to -1 are ignored.
        """
        logits = self.lm_head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx [B, T]; returns [B, T + max_new_tokens].

        temperature=0 is greedy decoding; top_k keeps the k most likely tokens.
        With use_cache the prompt is prefilled into per-layer KV caches and
        each new token costs one position; without it the whole (cropped)
        context is recomputed every step. Both give the same tokens: once the
        sequence outgrows block_size the cache is refilled with the last
        block_size tokens, exactly the context the recompute path sees.
        """
        _check_generate_args(idx, max_new_tokens, temperature, top_k, self.config.vocab_size)
        was_training = self.training
        self.eval()
        try:
            return self._generate(idx, max_new_tokens, temperature, top_k, use_cache, generator)
        finally:
            self.train(was_training)

    def _generate(self, idx, max_new_tokens, temperature, top_k, use_cache, generator) -> torch.Tensor:
        block = self.config.block_size
        caches = self.new_caches(idx.shape[0]) if use_cache else None
        pending = idx  # tokens not yet in the cache
        for _ in range(max_new_tokens):
            if caches is None:
                h = self.hidden_states(idx[:, -block:])
            else:
                if int(caches[0].seqlens.max()) + pending.shape[1] > block:
                    for cache in caches:
                        cache.reset()
                    pending = idx[:, -block:]
                h = self.hidden_states(pending, caches)
            logits = self.lm_head(h[:, -1]).float()
            nxt = _sample(logits, temperature, top_k, generator)
            idx = torch.cat((idx, nxt), dim=1)
            pending = nxt
        return idx


def _check_generate_args(idx, max_new_tokens, temperature, top_k, vocab_size: int) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be an int64 or int32 tensor of token ids, got dtype {idx.dtype}")
    if idx.ndim != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must be a non-empty prompt of shape [batch, seq] (batch, seq >= 1), "
                         f"got shape {tuple(idx.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= vocab_size:
        raise ValueError(f"idx must hold token ids in [0, {vocab_size}), got ids in [{int(idx.min())}, {int(idx.max())}]")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
