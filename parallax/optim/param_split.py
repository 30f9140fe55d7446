"""Route a model's parameters by role, as Muon's own guidance asks
(github.com/KellerJordan/Muon): Muon for the hidden weight matrices, AdamW for
embeddings, output heads, the input layer, norms, biases and scalars."""

import fnmatch
from collections import Counter
from typing import NamedTuple

from torch import nn

# The one module name that means "vocabulary head" across GPT, Llama, T5, OPT...
HEAD_NAME = "lm_head"
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ParamRoute(NamedTuple):
    """Where one trainable parameter goes, and why."""

    name: str
    param: nn.Parameter
    use_muon: bool
    reason: str


class Routes(list):
    """A list of ParamRoute that prints as a table, one parameter a line."""

    def __str__(self):
        rows = [(route.name, str(tuple(route.param.shape)), "muon" if route.use_muon else "adamw", route.reason)
                for route in self]
        widths = [max([len(header)] + [len(row[i]) for row in rows])
                  for i, header in enumerate(("parameter", "shape", "optimizer"))]
        lines = [f"{'parameter':<{widths[0]}}  {'shape':<{widths[1]}}  {'optimizer':<{widths[2]}}  reason"]
        lines += [f"{name:<{widths[0]}}  {shape:<{widths[1]}}  {optimizer:<{widths[2]}}  {reason}"
                  for name, shape, optimizer, reason in rows]
        return "\n".join(lines)


def _is_layer(module):
    """A layer whose `weight` maps features to features: nn.Linear, the
    convolutions, and transformers' Conv1D (GPT-2; matched by name so that
    transformers need not be installed)."""
    return isinstance(module, (nn.Linear,) + _CONVOLUTIONS) or type(module).__name__ == "Conv1D"


def in_stacks(model):
    """ids of the modules inside a stack of blocks: the children of an
    nn.ModuleList, or repeated (non-leaf) children of an nn.Sequential."""
    inside = set()
    for container in model.modules():
        children = list(container.children())
        if isinstance(container, nn.Sequential):
            repeated = Counter(type(child) for child in children if next(child.children(), None) is not None)
            children = [child for child in children if repeated[type(child)] >= 2]
        elif not isinstance(container, nn.ModuleList):
            continue
        for child in children:
            inside.update(id(module) for module in child.modules())
    return inside


def special_layers(model):
    """(output heads, input layer) as sets of module ids.

    Output heads: a layer tied to an embedding or named `lm_head`; in a
    transformers model its output embeddings and the last layer of each task
    head outside its base model (BERT's classifier, ViT's classifier); and the
    last layer outside the stacks of blocks, wherever it is registered. Input
    layer (models without an embedding table): the first such layer, e.g. ViT's
    patch projection or a ConvNet's stem ("all the convolutional filters except
    the first one" go to Muon).
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, _EMBEDDINGS)}
    layers = [(name, m) for name, m in model.named_modules() if _is_layer(m)]
    heads = {id(m) for name, m in layers
             if id(m.weight) in embedding_weights or name.rsplit(".", 1)[-1] == HEAD_NAME}
    for module in model.modules():
        base = getattr(module, "base_model", None)
        if not (isinstance(base, nn.Module) and callable(getattr(module, "get_output_embeddings", None))):
            continue
        output = module.get_output_embeddings()
        if isinstance(output, nn.Module):
            heads.add(id(output))
        for child in module.children() if base is not module else ():
            if child is not base:
                heads.update(id(m) for m in [m for m in child.modules() if _is_layer(m)][-1:])
    stacked = in_stacks(model)
    outside = [m for _, m in layers if id(m) not in stacked]
    heads.update(id(m) for m in outside[-1:])
    inputs = {id(outside[0])} if outside and not embedding_weights else set()
    return heads, inputs


def _role(p, owners, heads, inputs):
    """(use_muon, reason) for parameter `p`, held by owners [(module, attribute)]."""
    if p.ndim < 2:
        return False, "bias, norm gain or scalar"
    modules = [module for module, _ in owners]
    if any(isinstance(m, _EMBEDDINGS) for m in modules):
        return False, "embedding" + (" (tied to the output head)" if any(id(m) in heads for m in modules) else "")
    if any(id(m) in heads for m in modules):
        return False, "output head"
    if any(id(m) in inputs for m in modules):
        return False, "input layer"
    module, attribute = owners[0]
    if _is_layer(module) and attribute == "weight":
        return True, f"hidden {type(module).__name__} weight"
    if p.ndim == 3 and getattr(module, "num_experts", None) == p.shape[0]:
        return True, f"expert stack ({p.shape[0]} experts)"
    if p.ndim == 2 and (attribute == "weight" or attribute.endswith("_weight")):
        return True, f"weight matrix of a {type(module).__name__}"
    return False, "free parameter: position/class token or other embedding"


def _matches(pattern, name):
    """fnmatch on the parameter name, or `pattern` names a module holding it."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def _patterns(value, argument):
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(f"{argument} must be a name pattern or a sequence of them, got {value!r}")
    return patterns


def route_params(model, *, exclude=(), muon=()):
    """The route of every trainable parameter of `model`, in
    model.parameters() order (a tied parameter once). Print it for a table.

    Muon: the weights of linear and convolution layers (nn.Linear, nn.ConvNd,
    transformers' Conv1D), expert stacks (a 3-D parameter of a module whose
    `num_experts` is its first dim), and 2-D `weight` parameters of custom
    layers (a MoE router). AdamW: embedding tables and free parameters used as
    position or class tokens, output heads and the input layer (see
    `special_layers`), biases, norm gains and scalars.

    exclude: name patterns (fnmatch, or a module's name) sent to AdamW;
    muon: patterns whose >= 2-D parameters go to Muon. A pattern that matches
    nothing, or a parameter matched by both, is an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exclude, muon = _patterns(exclude, "exclude"), _patterns(muon, "muon")
    owners = {}
    for module in model.modules():
        for attribute, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, attribute))
    heads, inputs = special_layers(model)
    routes = Routes()
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        to_muon = [pattern for pattern in muon if _matches(pattern, name) and p.ndim >= 2]
        to_adamw = [pattern for pattern in exclude if _matches(pattern, name)]
        if to_muon and to_adamw:
            raise ValueError(f"parameter {name!r} is matched by muon={to_muon[0]!r} and exclude={to_adamw[0]!r}")
        used.update(to_muon + to_adamw)
        if to_muon:
            routes.append(ParamRoute(name, p, True, f"muon={to_muon[0]!r}"))
        elif to_adamw:
            routes.append(ParamRoute(name, p, False, f"exclude={to_adamw[0]!r}"))
        else:
            routes.append(ParamRoute(name, p, *_role(p, owners[id(p)], heads, inputs)))
    for argument, patterns in (("exclude", exclude), ("muon", muon)):
        unused = [pattern for pattern in patterns if pattern not in used]
        if unused:
            what = "trainable parameter" if argument == "exclude" else "trainable parameter of >= 2 dims"
            raise ValueError(f"{argument}={unused[0]!r} matches no {what} of the model")
    return routes


def split_params(model, *, exclude=(), muon=()):
    """(muon_params, adamw_params) of the trainable parameters of `model`, by
    `route_params(model, exclude=..., muon=...)`: each trainable parameter in
    exactly one list, in model.parameters() order."""
    routes = route_params(model, exclude=exclude, muon=muon)
    return [r.param for r in routes if r.use_muon], [r.param for r in routes if not r.use_muon]
