#!/usr/bin/env bash
# The GPU check (`make gpu-check`): one prepared script for a machine lent with one GPU, torch,
# transformers, peft and tensorboard, and no network and no vLLM. It installs nothing: a missing package is
# named and the check stops. It builds the project's own offline tiny model (the 50m preset) and runs
#
#   1. the bf16 quickstart through the trainer (MGPO, a few steps, the hf backend),
#   2. the same with long turns (256 new tokens a turn: episodes 4x longer, memory dominated by activations),
#   3. LoRA (peft) on the language model, the frozen base as the KL reference,
#   4. the FSDP2 path on one rank: `torchrun --nproc_per_node=1 -m zoomgym.algorithms.cli train ...` (under
#      torchrun the trainer shards by itself; FSDP_OVERRIDES adds `distributed.*` keys, e.g. cpu_offload),
#
# measuring each step's time and peak memory (torch.cuda.max_memory_allocated in 1-3, nvidia-smi in 4) and
# setting 1-3 against the pre-flight estimate of the same config, as a markdown table (also written to
# $GPU_CHECK_DIR/table.md). Under 8 minutes on one H200; each step has its own time limit and a failed
# step is a table row, not the end of the check.
#
#   bash scripts/gpu_check.sh          # on the GPU machine
#   bash scripts/gpu_check.sh --cpu    # the same steps, tiny (1m model, float32, B=2, G=2) on CPU: the dry run
#
# Environment: PYTHON (default python3), GPU_CHECK_DIR (default a fresh /tmp folder), FSDP_OVERRIDES.
set -uo pipefail

# Extra overrides of step 4 (the `distributed:` section, docs/training.md); the defaults shard with FSDP2 in
# bf16 compute with fp32 reduction.
FSDP_OVERRIDES="${FSDP_OVERRIDES:-distributed.mixed_precision=true}"

PYTHON="${PYTHON:-python3}"
if [[ "$PYTHON" == */* ]]; then PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"; fi  # we cd below
MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${GPU_CHECK_DIR:-$(mktemp -d /tmp/zoomgym-gpu-check.XXXXXX)}"
mkdir -p "$WORK"
ROWS="$WORK/rows.jsonl"
: > "$ROWS"
# Python runs from the work folder: from the repository root, its zoomgym/ folder (without the subpackages
# an install maps in) would shadow the package that the set-up below puts on the path.
cd "$WORK" || exit 1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
echo "gpu_check: mode $MODE, work folder $WORK"

# ---- set-up: the packages zoomgym imports, and zoomgym itself without installing anything ------------------
missing="$("$PYTHON" - <<'EOF'
import importlib.util
needed = {"torch": "torch", "transformers": "transformers", "peft": "peft", "tensorboard": "tensorboard",
          "gymnasium": "gymnasium", "PIL": "pillow", "numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm",
          "safetensors": "safetensors", "tokenizers": "tokenizers"}
print(" ".join(package for module, package in needed.items() if importlib.util.find_spec(module) is None))
EOF
)"
if [[ -n "$missing" ]]; then
  echo "gpu_check: missing Python packages: $missing (pyproject.toml lists them; this check installs nothing" \
       "from the network: install them from a local wheel folder, e.g. pip install --no-index --find-links DIR $missing)" >&2
  exit 3
fi
# The repository's envs/, agents/, algorithms/ are the zoomgym.* subpackages only through an install; without
# one, a folder of links gives Python the same layout (nothing is written outside $WORK).
if ! "$PYTHON" -c "import zoomgym.algorithms" 2>/dev/null; then
  mkdir -p "$WORK/pkg/zoomgym"
  cp "$ROOT"/zoomgym/*.py "$WORK/pkg/zoomgym/"
  for part in envs agents algorithms; do ln -sfn "$ROOT/$part" "$WORK/pkg/zoomgym/$part"; done
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" - <<'EOF' || exit 3
import torch, transformers, peft, zoomgym.algorithms
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, zoomgym from {zoomgym.algorithms.__file__.rsplit('/', 2)[0]}")
EOF

if [[ "$MODE" == gpu ]]; then
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (bash scripts/gpu_check.sh --cpu runs the dry run)" >&2
    exit 4
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  SIZE=50m; DEVICE=cuda; DTYPE=bfloat16; STEPS=3; LIMIT=150
  BATCH=(trainer.prompts_per_step=8 trainer.mini_batch_prompts=8 rollout.group_size=8 trainer.micro_batch_size=16)
  LONG=(rollout.max_new_tokens=256 trainer.micro_batch_size=8)
else
  SIZE=1m; DEVICE=cpu; DTYPE=float32; STEPS=2; LIMIT=300
  BATCH=(trainer.prompts_per_step=2 trainer.mini_batch_prompts=2 rollout.group_size=2 trainer.micro_batch_size=2
         rollout.max_new_tokens=8)
  LONG=(rollout.max_new_tokens=32 trainer.micro_batch_size=1)
fi

MODEL="$WORK/model-$SIZE"
timeout "$LIMIT" "$PYTHON" -m zoomgym.algorithms.cli tiny-model "$MODEL" --size "$SIZE" || exit 5
# The quickstart config on the tiny model: the synthetic "cpu" preset's view (168..224 px, 64 visual tokens
# at most per image), the model's own dtype and device, no validation (the steps are what is measured).
COMMON=("$ROOT/configs/quickstart.yaml" "model.path=$MODEL" model.build.builder=null "model.dtype=$DTYPE"
        model.min_pixels=28224 model.max_pixels=50176 "trainer.device=$DEVICE" trainer.val_before_train=false
        "data.val=[]" data.train.options.n=64 trainer.save_every=0 logging.render_every=0 logging.progress_bar=false "${BATCH[@]}")

step() {  # step LABEL NOTE OVERRIDES...
  local label="$1" note="$2"; shift 2
  echo; echo "== $label"
  timeout "$LIMIT" "$PYTHON" "$ROOT/scripts/gpu_check.py" step --label "$label" --note "$note" --steps "$STEPS" \
    --rows "$ROWS" -- "${COMMON[@]}" "$@" \
    || { [[ $? == 124 ]] && echo "{\"label\": \"$label\", \"failed\": \"over ${LIMIT} s\"}" >> "$ROWS"; }
}

step "$DTYPE quickstart (MGPO, tiny $SIZE)" ""
step "$DTYPE long turns (MGPO, tiny $SIZE)" "" "${LONG[@]}"
step "LoRA r16 (MGPO, tiny $SIZE)" "reference: base with adapters off" model.lora.enabled=true model.lora.rank=16

# ---- 4. the FSDP2 path on one rank, through torchrun and `zoomgym train` (its pre-flight gate included) ----
label="torchrun 1 rank (tiny $SIZE)"
note="FSDP2, one rank: ${FSDP_OVERRIDES:-defaults}"
echo; echo "== $label: torchrun --standalone --nproc_per_node=1 -m zoomgym.algorithms.cli train ... $FSDP_OVERRIDES"
SMI_LOG="$WORK/nvidia-smi.csv"
SMI_PID=""
if [[ "$MODE" == gpu ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$SMI_LOG" &
  SMI_PID=$!
fi
start=$SECONDS
# shellcheck disable=SC2086  # FSDP_OVERRIDES is a list of key=value words
timeout "$LIMIT" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m zoomgym.algorithms.cli \
  train "${COMMON[@]}" "trainer.steps=$STEPS" "logging.run_dir=$WORK/torchrun-run" $FSDP_OVERRIDES
status=$?
wall=$((SECONDS - start))
if [[ -n "$SMI_PID" ]]; then kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; fi
smi_peak=()
if [[ -s "$SMI_LOG" ]]; then smi_peak=(--smi-peak-mib "$(sort -n "$SMI_LOG" | tail -1)"); fi
if [[ $status == 0 ]]; then
  "$PYTHON" "$ROOT/scripts/gpu_check.py" run-row --label "$label" --device "$DEVICE" --run-dir "$WORK/torchrun-run" \
    --rows "$ROWS" --wall-s "$wall" --note "$note" "${smi_peak[@]}"
else
  echo "{\"label\": \"$label\", \"device\": \"$DEVICE\", \"failed\": \"exit status $status; $note\"}" >> "$ROWS"
fi

echo; echo "== results ($MODE; rows in $ROWS)"
"$PYTHON" "$ROOT/scripts/gpu_check.py" table "$ROWS" | tee "$WORK/table.md"
! grep -q '"failed"' "$ROWS"
