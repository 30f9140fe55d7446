"""Update rules: maps of a momentum matrix M = U S V^T to the direction that
replaces Muon's U V^T. Each module of this package holds one rule (an options
dataclass and a direction function) and registers it in UPDATE_RULES;
importing the package imports every module in it, so a new rule is one new file."""

import importlib
import pkgutil

from .registry import UPDATE_RULES, UpdateRule, register_update_rule

_SHARED = {"registry", "spectrum"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["UPDATE_RULES", "UpdateRule", "register_update_rule"]
