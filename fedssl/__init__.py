"""fedssl: federated self-supervised pre-training of vision encoders for weak clients."""

import os
import time

IMPORT_STARTED = time.time()  # when this process began importing fedssl (a fresh ClientApp's import time)
__version__ = "0.1.0"

# oneDNN's AVX-512 kernel for the backward pass of a 1x1 convolution (a ResNet's projection shortcut) corrupts
# the heap when several threads run it on a channels_last batch of odd size (seen with torch 2.13.0+cpu on an
# AVX-512 AMD EPYC: "double free or corruption", then SIGSEGV, at the last, partial batch of an epoch). Its AVX2
# kernels are correct and, for the narrow nets weak clients run, no slower. oneDNN reads this once, at its first
# convolution, so setting it here (before any model runs) is enough; a value the user set is kept.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

# The method registry: config validation asks it for the method names and each method's rules.
from fedssl import methods as _methods  # noqa: E402,F401
