"""Guard against a oneDNN heap corruption that kills training on AVX-512 CPUs (see fedssl/__init__.py)."""

import os
import subprocess
import sys

# A narrow GroupNorm ResNet, channels_last, trained on odd-sized batches with two threads: the shapes of the last,
# partial batch of an epoch that crashed `fedssl bench compare` with SIGSEGV before the guard.
_SCRIPT = """
import fedssl, torch
from fedssl.models.resnet import ResNet
torch.set_num_threads(2)
torch.manual_seed(0)
model = ResNet(width=8, blocks_per_stage=(1, 1, 1, 1), norm="group")
for n in (13, 29, 13):
    x = torch.rand(n, 3, 32, 32).to(memory_format=torch.channels_last)
    model(x).mean().backward()
print(fedssl.__name__, "ok")
"""


def test_importing_fedssl_caps_onednn_isa_and_odd_batches_train() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"training crashed (exit {done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.strip().endswith("fedssl ok")


def test_a_user_choice_of_onednn_isa_is_kept() -> None:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}
    done = subprocess.run([sys.executable, "-c", "import os, fedssl; print(os.environ['ONEDNN_MAX_CPU_ISA'])"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "AVX2_VNNI"
