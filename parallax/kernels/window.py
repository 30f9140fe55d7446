"""The attention window as the Triton kernels take it.

Everywhere above the kernels a window is `window_size`: None (every visible
key) or W >= 1 (the W most recent visible keys, the query's own included;
`checks.check_window` validates it, `reference.visible_keys` draws the mask).
The kernels compare key positions with one int32, made here.
"""
from __future__ import annotations


def kernel_window(window_size: int | None, keys: int) -> int:
    """W capped at `keys`, the most keys a query can see (a longer window drops
    nothing, and the cap keeps it in int32); `keys` for no window, which kernels
    without a HAS_WINDOW flag (decode) then compare with like any window."""
    return keys if window_size is None else min(window_size, keys)
