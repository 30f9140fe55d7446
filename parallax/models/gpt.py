"""GPT: a decoder-only transformer of pre-norm ParallaxAttention + SwiGLU blocks."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import KVCache, ParallaxAttention
from .config import GPTConfig
from .cuda_graphs import graphed_decoding
from .generation import DecodeState, Sampling, cache_capacity, decode, run_eagerly, sample_next


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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, *, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache=cache, positions=positions, cu_seqlens=cu_seqlens)
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
        self._graphed_decoding = None  # generate()'s CUDA graphs, kept for the next call
        self.reset_parameters()

    def __getstate__(self):
        # Copies and pickles leave out generate()'s CUDA graphs (per device, rebuilt on demand).
        state = super().__getstate__()
        state["_graphed_decoding"] = None
        return state

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
        check_token_ids("idx", idx, self.config.vocab_size)
        if idx.ndim != 2:
            raise ValueError(f"idx must be [batch, seq], got shape {tuple(idx.shape)}")
        past = 0 if caches is None else int(caches[0].seqlens.max())
        if past + idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {past + idx.shape[1]} exceeds block_size {self.config.block_size}")
        return self._hidden_states(idx, caches)

    def _hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
        """hidden_states without its checks, which read the cache lengths back
        from the device: for callers that know them (generate, a CUDA graph)."""
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: int64 [B, T] -> (logits [B, T, vocab], mean cross-entropy or None).

        Targets equal to -1 are ignored.
        """
        if targets is not None:
            check_token_ids("targets", targets, self.config.vocab_size, ignore_index=-1, dtypes=(torch.int64,))
            if isinstance(idx, torch.Tensor) and targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        logits = self.lm_head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx [B, T]; returns [B, T + max_new_tokens].

        temperature=0 is greedy decoding; top_k keeps the k most likely tokens;
        sampling draws from `generator` (default: torch's). With use_cache the
        prompt is prefilled into per-layer KV caches of T + max_new_tokens
        positions (at most block_size) and each new token costs one position;
        without it the whole (cropped) context is recomputed every step. Both
        give the same tokens: once the sequence outgrows block_size the cache
        is refilled with the last block_size tokens, exactly the context the
        recompute path sees.

        Nothing is read back from the device per token. On CUDA the decode
        step (and the refill past block_size) runs from a CUDA graph
        (cuda_graph=None or True; False: eagerly, the same tokens under greedy
        decoding); the graphs and their caches are kept on the model for the
        next call with the same batch size, cache size and sampling settings,
        until `free_generation_graphs()`.
        """
        _check_generate_args(idx, max_new_tokens, temperature, top_k, use_cache, self.config.vocab_size)
        device = self.lm_head.weight.device
        _check_generator(generator, device)
        if cuda_graph is None:
            cuda_graph = use_cache and device.type == "cuda"
        elif not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
        elif cuda_graph and (device.type != "cuda" or not use_cache):
            raise ValueError("cuda_graph=True needs the model on a CUDA device and use_cache=True, "
                             f"got {device.type} and use_cache={use_cache}")
        if max_new_tokens == 0:
            return idx
        sampling = Sampling(temperature, top_k, generator)
        was_training = self.training
        self.eval()
        try:
            if not use_cache:
                return self._generate_recomputing(idx, max_new_tokens, sampling)
            B, T = idx.shape
            capacity = cache_capacity(T, max_new_tokens, self.config.block_size)
            if cuda_graph and max_new_tokens > 1:
                graphs = graphed_decoding(self, B, capacity, T + max_new_tokens, sampling)
                decode(graphs.state, idx, max_new_tokens, graphs.run)
                return graphs.state.tokens[:, :T + max_new_tokens].clone()
            state = DecodeState(self, B, capacity, T + max_new_tokens, sampling)
            decode(state, idx, max_new_tokens, run_eagerly)
            return state.tokens
        finally:
            self.train(was_training)

    def free_generation_graphs(self) -> None:
        """Release the CUDA graphs and caches that generate() keeps for its next call."""
        self._graphed_decoding = None

    def _generate_recomputing(self, idx, max_new_tokens: int, sampling: Sampling) -> torch.Tensor:
        for _ in range(max_new_tokens):
            h = self.hidden_states(idx[:, -self.config.block_size:])
            idx = torch.cat((idx, sample_next(self.lm_head(h[:, -1]).float(), sampling)), dim=1)
        return idx


def check_token_ids(name: str, ids, vocab_size: int, *, ignore_index: int | None = None,
                    dtypes=(torch.int64, torch.int32), read_values: bool | None = None) -> None:
    """A tensor of token ids in [0, vocab_size) (or `ignore_index`). By default
    the values are read on CPU only: elsewhere reading them would wait for the
    device, and an id out of range there stops at the embedding's own device assert."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in dtypes:
        kinds = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be an {kinds} tensor of token ids, got dtype {ids.dtype}")
    if read_values is None:
        read_values = ids.device.type == "cpu" and not torch.compiler.is_compiling()
    if not read_values or ids.numel() == 0:
        return
    valid = (ids >= 0) & (ids < vocab_size)
    if ignore_index is not None:
        valid |= ids == ignore_index
    if not bool(valid.all()):
        bad = int(ids[~valid][0])
        allowed = f"[0, {vocab_size})" + (f" or {ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"{name} must hold token ids in {allowed}, got {bad}")


def _check_generate_args(idx, max_new_tokens, temperature, top_k, use_cache, vocab_size: int) -> None:
    check_token_ids("idx", idx, vocab_size, read_values=True)  # generation waits for the device anyway
    if idx.ndim != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must be a non-empty prompt of shape [batch, seq] (batch, seq >= 1), "
                         f"got shape {tuple(idx.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0 <= temperature <= sys.float_info.max):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on the model's device type ({device.type}), got {generator.device}")
