"""Train a small language model with Parallax attention and Muon.

    python train.py                      # stdlib sources, small model, ~6 min on 2 CPU cores
    python train.py --model tiny --steps 50 --attention softmax
    torchrun --nproc_per_node 2 train.py --model tiny --steps 20

See docs/training.md for every flag.
"""
import sys

from parallax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
