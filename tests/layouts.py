"""Hypothesis building blocks shared by the property tests."""
from hypothesis import strategies as st


def packed_lengths(draw, max_length: int) -> tuple[list[int], int]:
    """1-3 packed sequences of 0..max_length tokens and their total T, at least 1
    (the last sequence takes the token an all-empty draw lacks)."""
    lengths = draw(st.lists(st.integers(0, max_length), min_size=1, max_size=3))
    T = max(1, sum(lengths))
    lengths[-1] += T - sum(lengths)
    return lengths, T
