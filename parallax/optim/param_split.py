"""Route a model's parameters: hidden matrices to Muon, everything else to AdamW."""

from torch import nn

# The one module name that means "vocabulary head" across GPT, Llama, T5, OPT...
HEAD_NAME = "lm_head"


def _vocabulary_heads(model):
    """Modules that map the model width to vocabulary logits.

    Found by structure, not by name (BERT's `attention.output.dense` is a hidden
    matrix): a Linear tied to an embedding, one named `lm_head`, or the model's
    last Linear when it maps the token embedding's width to its vocabulary size.
    """
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    embedding_weights = {id(m.weight) for m in embeddings}
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    heads = [m for name, m in linears
             if id(m.weight) in embedding_weights or name.rsplit(".", 1)[-1] == HEAD_NAME]
    if embeddings and linears:
        tokens = max(embeddings, key=lambda m: m.num_embeddings)  # the token (not position) embedding
        last = linears[-1][1]
        if (last.out_features, last.in_features) == (tokens.num_embeddings, tokens.embedding_dim):
            heads.append(last)
    return heads


def split_params(model):
    """(muon_params, adamw_params) of the trainable parameters of `model`.

    AdamW gets every embedding weight, the vocabulary head (tied or not; see
    `_vocabulary_heads`) and every 0/1-D parameter (norms, gains, biases); Muon
    gets every other >= 2-D parameter, whatever its module is called. A tied
    parameter appears once; each trainable parameter is in exactly one list,
    in model.parameters() order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    to_adamw = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for head in _vocabulary_heads(model):
        to_adamw.update(id(p) for p in head.parameters())

    muon_params, adamw_params = [], []
    for p in model.parameters():  # yields each shared Parameter once
        if not p.requires_grad:
            continue
        if id(p) in to_adamw or p.ndim < 2:
            adamw_params.append(p)
        else:
            muon_params.append(p)
    return muon_params, adamw_params
