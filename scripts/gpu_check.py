"""`student gpu-check` on a machine where this project is not installed (the bare GPU device machine).

    python scripts/gpu_check.py --out gpu-check.json

Runs `python -m server.gpu_check.runner` with the same arguments from the repository root (which
`-m` puts on the import path), so the checks, table, JSON and exit code are `student gpu-check`'s.
Relative paths such as `--out` are taken from the repository root. See docs/gpu-validation.md.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[1])
    os.execv(sys.executable, [sys.executable, "-m", "server.gpu_check.runner", *sys.argv[1:]])
