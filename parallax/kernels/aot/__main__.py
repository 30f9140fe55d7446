"""`python -m parallax.kernels.aot`: see the package docstring."""
import sys

from . import main

sys.exit(main())
