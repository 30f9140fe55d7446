"""The torch path: exact Parallax attention in PyTorch on any device (dense
score blocks kept or recomputed, `blockwise`), the training path where
Triton is not used."""
