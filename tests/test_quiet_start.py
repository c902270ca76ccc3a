"""A run without a 4-bit base prints nothing about bitsandbytes: peft imports it whenever it is installed, and its
known-harmless CPU kernel warning is filtered (that message only; another bitsandbytes warning still shows)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
import nemo_automodel.llm, peft
from nemo_automodel.peft import LoRA
assert "bitsandbytes" in __import__("sys").modules  # the case the filter is for: peft imported it
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
"""


def test_importing_the_package_and_peft_prints_no_bitsandbytes_kernel_warning():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels-community" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert "another bitsandbytes warning" in proc.stderr
