"""Route a model's parameters: hidden matrices to Muon, everything else to AdamW."""

from torch import nn

HEAD_NAMES = ("lm_head", "head", "output")


def split_params(model):
    """(muon_params, adamw_params) of the trainable parameters of `model`.

    AdamW gets nn.Embedding weights, output heads (modules named lm_head / head /
    output, and any nn.Linear whose weight is an embedding's weight) and every
    0/1-D parameter; Muon gets the remaining >= 2-D parameters. A tied parameter
    appears once; each trainable parameter is in exactly one list, in
    model.parameters() order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    to_adamw = set(embedding_weights)
    for name, module in model.named_modules():
        is_named_head = name.rsplit(".", 1)[-1] in HEAD_NAMES
        is_tied_head = isinstance(module, nn.Linear) and id(module.weight) in embedding_weights
        if is_named_head or is_tied_head:
            to_adamw.update(id(p) for p in module.parameters())

    muon_params, adamw_params = [], []
    for p in model.parameters():  # yields each shared Parameter once
        if not p.requires_grad:
            continue
        if id(p) in to_adamw or p.ndim < 2:
            adamw_params.append(p)
        else:
            muon_params.append(p)
    return muon_params, adamw_params
