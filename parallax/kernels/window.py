"""The attention window as the masks and the Triton kernels take it.

Everywhere above the kernels a window is `window_size`: None (every visible
key) or W >= 1 (the W most recent visible keys, the query's own included;
`checks.check_window` validates it, `reference.visible_keys` draws the mask).
A window of at least as many keys as there are hides none: the torch paths
take it as None (`spanning_window`), and the kernels compare key positions
with one int32 (`kernel_window`).
"""
from __future__ import annotations


def kernel_window(window_size: int | None, keys: int) -> int:
    """W capped at `keys`, the most keys a query can see (a longer window drops
    nothing, and the cap keeps it in int32); `keys` for no window, which kernels
    without a HAS_WINDOW flag (decode) then compare with like any window."""
    return keys if window_size is None else min(window_size, keys)


def spanning_window(window_size: int | None, keys: int) -> int | None:
    """None for a window of at least `keys` (any int, 10**30 included, then
    stays out of the masks' int64 arithmetic); W otherwise."""
    return None if window_size is None or window_size >= keys else window_size
