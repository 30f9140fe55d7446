"""Train a small language model with Parallax attention and Muon.

    python train.py                      # stdlib sources, small model, ~2 min on 2 CPU cores
    python train.py --model tiny --steps 50 --attention softmax
    torchrun --nproc_per_node 2 train.py --model tiny --steps 20

See docs/training.md for every flag.
"""
import sys

if __name__ == "__main__":
    try:  # Ctrl-C while torch is still importing: one line, no traceback
        from parallax.cli import main
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
