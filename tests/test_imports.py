"""Importing arzoo must not import optional kernels or metric back-ends."""

from __future__ import annotations

import subprocess
import sys

# (scipy is not listed: scikit-learn, a core dependency, needs it.)
OPTIONAL = ("flash_attn", "mamba_ssm", "causal_conv1d", "torch_fidelity", "torchvision")


def test_import_arzoo_pulls_no_optional_package():
    code = (
        "import sys, arzoo, arzoo.cli, arzoo.data, arzoo.tokenizers, arzoo.metrics, "
        "arzoo.interop.llamagen, arzoo.interop.var\n"
        f"print(','.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"optional packages imported: {out.stdout.strip()}"
