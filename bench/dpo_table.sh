#!/bin/bash
# The DPO table of the README: every variant on one SFT model, same data, steps and LoRA, and
# iterative DPO beside them; gold score on held-out prompts and training time, one row each.
#
#   QS=runs/habits OUT=runs/habits-dpo EVAL=eval1000.jsonl bench/dpo_table.sh [variant ...]
#
# QS is a quickstart run (its sft/ and world/), EVAL a prompts file (default: the run's 200
# held-out prompts). Finished runs are reused; name variants to run only those (two shells can
# share the work). Variants: dpo ipo cdpo simpo rpo rpo-a0.3 online-annotators online-judge.
set -e
QS=${QS:-runs/quickstart}
OUT=${OUT:-runs/dpo-table}
EVAL=${EVAL:-$QS/world/eval_prompts.jsonl}
STEPS=${STEPS:-600}
RL=${RL:-.venv/bin/rlhflab}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
common=(--policy "$QS/sft" --lora --lora-r 32 --lora-alpha 64 --data "$QS/world/prefs.jsonl" --lr 5e-4
        --batch-size 8 --progress false --log-every 50)
online=(--prompts "$QS/world/prompts.jsonl" --rounds 2 --k 4 --round-prompts 512 --max-steps $((STEPS / 2)))

options() {
  case $1 in
    dpo) echo --loss dpo --beta 0.1 --max-steps "$STEPS" ;;
    ipo) echo --loss ipo --beta 0.1 --max-steps "$STEPS" ;;
    cdpo) echo --loss cdpo --beta 0.1 --label-smoothing 0.1 --max-steps "$STEPS" ;;
    simpo) echo --loss simpo --beta 2.0 --simpo-gamma 0.5 --max-steps "$STEPS" ;;
    rpo) echo --loss rpo --beta 0.1 --rpo-alpha 1.0 --max-steps "$STEPS" ;;
    rpo-a0.3) echo --loss rpo --beta 0.1 --rpo-alpha 0.3 --max-steps "$STEPS" ;;
    online-annotators) echo --loss rpo --rpo-alpha 1.0 "${online[@]}" --rank-by annotators ;;
    online-judge) echo --loss rpo --rpo-alpha 1.0 "${online[@]}" --rank-by judge ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

variants=${*:-dpo ipo cdpo simpo rpo rpo-a0.3 online-annotators online-judge}
for name in $variants; do options "$name" > /dev/null; done   # an unknown name stops before any work

score() {   # score MODEL FILE: the gold score on $EVAL, written only when the judge succeeded
  local text
  text=$($RL judge --model "$1" --prompts "$EVAL" 2> "$2.err") || { cat "$2.err" >&2; exit 1; }
  echo "$text" | awk '/^score/ {print $2}' > "$2.tmp" && [ -s "$2.tmp" ] && mv "$2.tmp" "$2" && rm -f "$2.err" \
    || { echo "no score in the judge's output for $1" >&2; exit 1; }
}

[ -s "$OUT/sft.score" ] || score "$QS/sft" "$OUT/sft.score"
echo "| variant | options | held-out gold | vs SFT $(cat "$OUT/sft.score") | training s | wall s |"
echo "|---|---|---|---|---|---|"
for name in $variants; do
  out=$OUT/$name
  opts=$(options "$name")
  # shellcheck disable=SC2086
  [ -f "$out/summary.json" ] || $RL dpo "${common[@]}" $opts --out "$out" > "$out.log" 2>&1 \
    || { echo "dpo $name failed: see $out.log" >&2; exit 1; }
  [ -s "$out.score" ] || score "$out" "$out.score"
  seconds=$(grep -o '"train_time_s": [0-9.]*' "$out/summary.json" | awk '{printf "%.0f", $2}')
  wall=$(grep -o '"wall_time_s": [0-9.]*' "$out/summary.json" | awk '{printf "%.0f", $2}')
  echo "| $name | \`$opts\` | $(cat "$out.score") | $(awk -v a="$(cat "$out.score")" -v b="$(cat "$OUT/sft.score")" \
    'BEGIN {printf "%+.3f", a - b}') | $seconds | $wall |"
done
