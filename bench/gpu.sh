#!/usr/bin/env bash
# genieblue on one GPU in a few minutes, offline: the paper's Qwen2.5-3B stage-2 recipe at its real size
# through the CLI, training throughput per strategy (and on packed rows, sdpa against flex_attention),
# decode through the serving engine, `serve` under 1 and 16 clients, the recipe under FSDP2 (a
# checkpoint, --resume and a reload), the text path checked against the base on the GPU, a chat with an
# image, stage 0 (the tower's own pretraining) on the GPU, torch.compile'd decode (minutes of
# compiling), and last the recipe again with flex_attention, in that order (what matters most and a
# GPU has measured least comes first). Random-weight models, nothing downloaded: the recipe, serve, fsdp,
# exact, chat, stage0 and attn stages use bench/recipe_3b.py's (a Qwen2.5-3B-shaped base, a
# SigLIP-so400m-shaped tower); train and decode build bench/train_throughput.py's Qwen2.5-3B shape with a
# small SigLIP.
#
#   bench/gpu.sh [OUT]           # results in OUT (default gpu_out): *.log, *.json, summary.txt, report.md
#
# Environment: STAGES (default recipe,train,decode,serve,fsdp,exact,chat,stage0,compile,attn), MAX_S
# (seconds, for a device call's time limit: no stage starts with 30 s or less of them left and every
# command is cut to end by then), WORK (scratch, default /tmp/genieblue-gpu), TOKENIZER (a tokenizer folder; default: the
# built-in base's), WHEELS (a folder of wheels installed first into a private site, for a machine
# without a package index; bench/gpu_offline.sh makes it and the tokenizer folder), SMALL=1 (tiny
# shapes and few steps: a CPU rehearsal of this script, as tests/test_bench.py runs it). Relative
# paths are taken from the folder it is run from.
set -u -o pipefail
here=$PWD
abs() { [[ $1 == /* ]] && echo "$1" || echo "$here/$1"; }
OUT=$(abs "${1:-${OUT:-gpu_out}}") && mkdir -p "$OUT" || exit 1
WORK=$(abs "${WORK:-/tmp/genieblue-gpu}")
[[ -n ${TOKENIZER:-} ]] && TOKENIZER=$(abs "$TOKENIZER")
[[ -n ${WHEELS:-} ]] && WHEELS=$(abs "$WHEELS")
cd "$(dirname "$0")/.."
ALL=recipe,train,decode,serve,fsdp,exact,chat,stage0,compile,attn
STAGES=${STAGES:-$ALL}
for stage in ${STAGES//,/ }; do  # a mistyped stage would otherwise run nothing and say nothing
  [[ ,$ALL, == *,$stage,* ]] || { echo "error: unknown stage '$stage' in STAGES; the stages: $ALL" >&2; exit 2; }
done
SMALL=${SMALL:-}
# offline: no hub kernels either (transformers would fetch kernels-community ones for a model on a GPU)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 USE_HUB_KERNELS=NO TRANSFORMERS_VERBOSITY=error
export GENIEBLUE_CACHE=$WORK/cache
if [[ -n ${WHEELS:-} ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=$WORK/site:$PWD/src:${PYTHONPATH:-}
else
  export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
fi
t0=$(date +%s)
lap() { echo "== $1: ${2:-done} at $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"; }
left() { echo $(( ${MAX_S:-100000} - ($(date +%s) - t0) )); }  # seconds until MAX_S
has() {  # has STAGE: asked for, and time left for it
  [[ ,$STAGES, == *,$1,* ]] || return 1
  (( $(left) > 30 )) && return 0
  lap "$1" "skipped (MAX_S=$MAX_S reached)"
  return 1
}
run() {  # run NAME TIMEOUT CMD...: its output in OUT/NAME.log (errors and warnings: NAME.err), its status in summary.txt
  local name=$1 limit=$2; shift 2
  (( $(left) < limit )) && limit=$(left)
  if (( limit <= 0 )); then lap "$name" "skipped (MAX_S=$MAX_S reached)"; return 1; fi
  timeout "$limit" "$@" >"$OUT/$name.log" 2>"$OUT/$name.err"
  local rc=$?
  lap "$name" "rc=$rc"
  return $rc
}
http() {  # http SECONDS URL [JSON]: a GET, or a POST of JSON, cut after SECONDS; the body on stdout (in Python: a GPU image may have no curl)
  local limit=$1; shift
  (( limit > 0 )) || return 1
  timeout "$limit" python3 -c 'import sys, urllib.request as u
body = sys.argv[2].encode() if len(sys.argv) > 2 else None
print(u.urlopen(u.Request(sys.argv[1], body, {"content-type": "application/json"})).read().decode())' "$@"
}
finish() {  # the total time and the report (also when a stage the others need failed)
  lap total
  python3 bench/gpu_report.py "$OUT" >"$OUT/report.md" 2>"$OUT/report.err"  # the tables, each target beside its number
}
GB=(python3 -m genieblue.cli)
if [[ -n $SMALL ]]; then
  SHAPE=(--shape tiny) STEPS=2 FSDP=(--num_processes 2 --fsdp_sync_module_states false --mixed_precision no) TOKENS=8
else
  SHAPE=(--shape qwen2.5-3b) STEPS=4 FSDP=(--num_processes 1) TOKENS=64
fi
: >"$OUT/summary.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, '· transformers', transformers.__version__, '· accelerate', accelerate.__version__)"
  git log -1 --format='commit %h %cd' 2>/dev/null
  echo "stages $STAGES$([[ $STAGES == "$ALL" ]] && echo ' (all)')"; } | tee "$OUT/env.txt"
python3 bench/requirements.py check || exit 1  # genieblue's requirements, before the first stage spends GPU time

TOK=${TOKENIZER:-$WORK/tokenizer}
[[ -d $TOK ]] || python3 -c "from genieblue.model import load_tokenizer; load_tokenizer(None).save_pretrained('$TOK')"

if has recipe; then
  rm -rf "$WORK/llm" "$WORK/vision" "$WORK/runs" "$WORK/plain"
  run prepare 300 python3 bench/recipe_3b.py "$WORK" --tokenizer "$TOK" ${SMALL:+--small} || { finish; exit 1; }
  run train_plain 400 "${GB[@]}" train -c "$WORK/stage2.yaml" --max-steps $STEPS --output-dir "$WORK/plain"
  cp "$WORK/plain/metrics.jsonl" "$OUT/train_plain_metrics.jsonl" 2>/dev/null
fi
MODEL=$WORK/plain/final

if has train; then
  seq=$([[ -n $SMALL ]] && echo 256 || echo 4096)
  tt=(python3 bench/train_throughput.py "${SHAPE[@]}" --seq $seq --json)
  run train_throughput 400 "${tt[@]}" --precision amp --profile  # as `genieblue train` runs: fp32 weights, bf16 autocast
  run train_throughput_ckpt 400 "${tt[@]}" --precision amp --checkpointing --profile
  run train_throughput_bf16 300 "${tt[@]}" --precision bf16  # every weight and AdamW state in bf16 (the regime of the issue's H200 profile)
  # 4 samples packed in the row as the trainer packs them: sdpa's masked whole-row scores against
  # flex_attention's blocks (which have no CPU backward: the rehearsal runs sdpa alone, one strategy)
  attns=(sdpa flex_attention) packed=full,genieblue-skip; [[ -n $SMALL ]] && attns=(sdpa) packed=genieblue-skip
  for attn in "${attns[@]}"; do
    run train_packed_$attn 300 "${tt[@]}" --strategies $packed --samples 4 --attn $attn --precision amp
  done
fi

if has decode; then
  modes=generate,eager; [[ -z $SMALL ]] && modes=generate,graph
  run decode 400 python3 bench/decode.py "${SHAPE[@]}" --tokenizer "$TOK" --modes $modes --tokens $TOKENS --clients 16 --json
fi

if has serve; then
  port=$((8100 + RANDOM % 500))
  "${GB[@]}" serve -m "$MODEL" --port $port >"$OUT/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do  # up to ~5 minutes of loading, within MAX_S
    http 5 "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null && (( $(left) > 0 )) || break
    sleep 0.5
  done
  if http "$(left)" "http://127.0.0.1:$port/v1/chat/completions" \
    '{"model": "m", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}' >"$OUT/serve_request.json"; then
    lap serve_request "$(head -c 300 "$OUT/serve_request.json")"
  else
    lap serve_request "failed: no reply (see serve.log)"
  fi
  run serve_load 300 python3 bench/serve_load.py --url "http://127.0.0.1:$port" --clients 16 --requests 2 \
    --max-tokens $TOKENS --json
  kill $server; wait $server 2>/dev/null
fi

if has fsdp; then  # FSDP2 as shipped: a checkpoint at step 2, the final model at 3, then --resume from step 2
  rm -rf "$WORK/fsdp" "$WORK/fsdp-resume"
  launch=(python3 -m accelerate.commands.launch --config_file configs/accelerate/fsdp-8gpu.yaml "${FSDP[@]}" -m genieblue.cli)
  run train_fsdp 400 "${launch[@]}" train -c "$WORK/stage2-ckpt.yaml" --max-steps 3 --output-dir "$WORK/fsdp"
  mkdir -p "$WORK/fsdp-resume/checkpoints" && cp -r "$WORK/fsdp/checkpoints/step-0000002" "$WORK/fsdp-resume/checkpoints/"
  run train_fsdp_resume 400 "${launch[@]}" train -c "$WORK/stage2-ckpt.yaml" --max-steps 3 --output-dir "$WORK/fsdp-resume" --resume
  run fsdp_check 300 python3 - "$WORK" <<'EOF'
import json, sys, torch
from safetensors.torch import load_file
from genieblue import GenieBlueForConditionalGeneration
work = sys.argv[1]
full, resumed = load_file(f"{work}/fsdp/final/delta.safetensors"), load_file(f"{work}/fsdp-resume/final/delta.safetensors")
loss = lambda run: [json.loads(l)["loss"] for l in open(f"{work}/{run}/metrics.jsonl")]
loaded = GenieBlueForConditionalGeneration.from_pretrained(f"{work}/fsdp/final", dtype=torch.float32).delta_state_dict()
print(json.dumps({
    "delta_tensors": len(full), "delta_params": sum(t.numel() for t in full.values()),
    "resumed_max_abs_diff": max((full[k] - resumed[k]).abs().max().item() for k in full),
    "losses": loss("fsdp"), "resumed_losses": loss("fsdp-resume"),
    "reloaded_equal": all(torch.equal(loaded[k].cpu(), full[k]) for k in full),
}))
EOF
fi

if has exact; then  # the text path is the base's own on this device and dtype
  modes=eager; [[ -z $SMALL ]] && modes=eager,graph
  run text_exact 300 python3 bench/text_exact.py "$MODEL" --modes $modes --json
fi

if has chat; then
  python3 -c "from PIL import Image; Image.new('RGB', (384, 384), (200, 30, 30)).save('$WORK/red.png')"
  run chat_image 300 "${GB[@]}" chat -m "$MODEL" -i "$WORK/red.png" "What colour is the picture?" --max-new-tokens 16
fi

if has stage0; then  # stage 0 (a tower taught to spell before stage 1, as `genieblue demo` trains it) on the GPU
  rm -rf "$WORK/stage0"
  run train_stage0 300 "${GB[@]}" train -c "$WORK/stage0.yaml" --max-steps 1
  cp "$WORK/stage0/stage0.json" "$OUT/train_stage0.json" 2>/dev/null
fi

if has compile; then  # the compiled text path's tokens against the base compiled alike, then its speed
  run text_exact_compile 300 python3 bench/text_exact.py "$MODEL" --modes compile --json
  run decode_compile 500 python3 bench/decode.py "${SHAPE[@]}" --tokenizer "$TOK" --modes compile --tokens $TOKENS \
    --clients 16 --json
fi

if has attn; then  # the recipe through the trainer with flex_attention (the CPU rehearsal: eager; flex has no CPU backward)
  attn=flex_attention; [[ -n $SMALL ]] && attn=eager
  { cat "$WORK/stage2.yaml"; echo "attn_implementation: $attn"; } >"$WORK/stage2-attn.yaml"
  rm -rf "$WORK/attn"
  run train_attn 400 "${GB[@]}" train -c "$WORK/stage2-attn.yaml" --max-steps $STEPS --output-dir "$WORK/attn"
  cp "$WORK/attn/metrics.jsonl" "$OUT/train_attn_metrics.jsonl" 2>/dev/null
fi

finish
