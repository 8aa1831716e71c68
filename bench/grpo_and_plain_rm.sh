#!/bin/bash
mkdir -p ${OUT:-runs/variants}
# GRPO and a reward model without --harden, on a quickstart run (QS); the DPO table is bench/dpo_table.sh.
QS=${QS:-runs/quickstart}
RL=${RL:-.venv/bin/rlhflab}
export OMP_NUM_THREADS=1
# GRPO beside PPO: same prompts, 32 responses per step (8 prompts x 4), same steps and lr.
out=${OUT:-runs/variants}/grpo
[ -f $out/summary.json ] || $RL ppo --policy $QS/sft --reward $QS/rm --prompts $QS/world/prompts.jsonl --out $out --estimator grpo --n-samples 4 --rollout-prompts 8 --mini-batch 16 --max-steps 40 --lr 1e-4 --kl-coef 0.2 --log-every 1 --probe-every 0 --progress false > $out.log 2>&1
$RL judge --model $out --prompts $QS/world/eval_prompts.jsonl 2>/dev/null | grep -E "^score" | sed "s/^/grpo /"
grep -o '"wall_time_s": [0-9.]*\|"final_gold": [0-9.]*\|"final_kl_k1": [0-9.]*' $out/summary.json
# Reward model without --harden: what the audit finds.
out=${OUT:-runs/variants}/rm-plain
[ -f $out/summary.json ] || $RL rm --model $QS/sft --data $QS/world/rankings.jsonl --loss ranking --out $out --batch-size 4 --lr 1e-3 --max-steps 200 --progress false > $out.log 2>&1
grep -o '"eval_gold_accuracy": [0-9.]*\|"eval_accuracy": [0-9.]*' $out/summary.json
$RL rm audit --model $out --prompts $QS/world/eval_prompts.jsonl --max-rows 100 2>/dev/null | grep -v "^report"
