#!/bin/bash
# The RLAIF measurements of docs/rlaif.md, in the toy world with habits (--habit-rate 0.6):
#   labeller  teach the feedback model more on its comparisons (the labeller of `labels`)
#   labels  an RM on AI labels against an RM on as many annotator labels (gold accuracy); LB: the labeller,
#           COMBINE: how it weighs the principles (rank --combine: first, principles, mean); RM_SEEDS:
#           train both RMs with each of these seeds (default 0 1 2 3 4)
#   rules   PPO with the preference RM plus the rule RM (weight RULE_WEIGHT) against the preference RM
#           alone, each with the PPO seeds PPO_SEEDS (default 0 1 2 3 4)
#   cai     a constitutional round: critique -> SFT on revisions -> DPO revised over first answers
#
#   PRE=runs/classic/sft OUT=runs/rlaif bench/rlaif.sh    # every part, then the tables
#   bench/rlaif.sh setup; bench/rlaif.sh rules & bench/rlaif.sh cai & ...   # parts after setup can run side by side
#
# PRE is the habit-free quickstart's SFT model (`rlhflab quickstart --world classic --out runs/classic`):
# SFT_STEPS more steps on the habits world's
# demonstrations give it the habits (to train from the base instead: PRE=.../pretrain
# SFT_STEPS=600 SFT_LR=1e-3). The defaults are the small settings measured in docs/rlaif.md.
# Finished stages are reused. RL: the rlhflab command (default .venv/bin/rlhflab).
set -e
OUT=${OUT:-runs/rlaif}
PRE=${PRE:-runs/classic/sft}
RL=${RL:-.venv/bin/rlhflab}
PY=${PY:-.venv/bin/python}
SIZE=${SIZE:-default}; WORLD_SEED=${WORLD_SEED:-0}
SFT_STEPS=${SFT_STEPS:-150}; SFT_LR=${SFT_LR:-5e-4}; FEEDBACK_STEPS=${FEEDBACK_STEPS:-250}; RM_STEPS=${RM_STEPS:-120}
PPO_STEPS=${PPO_STEPS:-60}; ROLLOUT=${ROLLOUT:-32}; PREF_RM_STEPS=${PREF_RM_STEPS:-600}; RULE_RM_STEPS=${RULE_RM_STEPS:-600}
RULE_WEIGHT=${RULE_WEIGHT:-2}; PPO_SEEDS=${PPO_SEEDS:-0 1 2 3 4}   # the rule RM's weight in the reward; PPO runs per side
LABEL_PROMPTS=${LABEL_PROMPTS:-300}; CAI_PROMPTS=${CAI_PROMPTS:-300}
PREF_HARDEN=${PREF_HARDEN:-empty,eos_only,whitespace,repeated,prompt_copy,ramble}   # the quickstart's degenerate answers
CAI_SFT_STEPS=${CAI_SFT_STEPS:-60}; CAI_DPO_STEPS=${CAI_DPO_STEPS:-100}; EVAL_N=${EVAL_N:-300}
COMBINE=${COMBINE:-first}   # how the labeller's principles make one verdict (rank --combine)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
W=$OUT/world
FB=${FB:-$OUT/feedback}    # the feedback model (critic and labeller)
FEEDBACK_ONLY=${FEEDBACK_ONLY:-1}   # 0: teach it on feedback.jsonl beside the SFT data
q=(--progress false)

done_() { [ -f "$1/summary.json" ]; }
judge() {   # judge NAME MODEL: greedy answers on the held-out prompts, scored, into $OUT/eval/NAME.jsonl
  mkdir -p "$OUT/eval"
  [ -f "$OUT/eval/$1.jsonl" ] || $RL judge --model "$2" --prompts "$OUT/eval$EVAL_N.jsonl" --out "$OUT/eval/$1.jsonl" > /dev/null
}

setup() {
  [ -f $W/manifest.json ] || $RL world export --out $W --seed $WORLD_SEED --size $SIZE --habit-rate 0.6 --constitution toy > /dev/null
  [ -f $OUT/eval$EVAL_N.jsonl ] || $PY -c "import json; from rlhflab.world import tasks
open('$OUT/eval$EVAL_N.jsonl', 'w').write(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in
tasks.make_prompts('eval', $EVAL_N, seed='0:eval-large')))"
  done_ $OUT/sft || $RL sft --model $PRE --data $W/sft.jsonl --out $OUT/sft --max-length 256 --batch-size 16 \
      --lr $SFT_LR --max-steps $SFT_STEPS "${q[@]}"
  # The feedback model: the SFT model taught to critique and revise (the critiques of feedback.jsonl;
  # FEEDBACK_ONLY=0: beside its SFT data).
  grep '"critique"' $W/feedback.jsonl > $OUT/feedback_critiques.jsonl
  if [ "$FEEDBACK_ONLY" = 1 ]; then cp $OUT/feedback_critiques.jsonl $OUT/feedback_data.jsonl
  else cat $W/sft.jsonl $OUT/feedback_critiques.jsonl > $OUT/feedback_data.jsonl; fi
  done_ $FB || $RL sft --model $OUT/sft --data $OUT/feedback_data.jsonl --out $FB \
      --max-length 320 --batch-size 16 --lr 1e-3 --max-steps $FEEDBACK_STEPS "${q[@]}"
  judge sft $OUT/sft
  judge $(basename $FB) $FB
}

labeller() {   # the feedback model taught to compare (the comparisons of feedback.jsonl): the labeller of `labels`
  grep '"comparison"' $W/feedback.jsonl > $OUT/feedback_comparisons.jsonl
  done_ $OUT/labeller || $RL sft --model $FB --data $OUT/feedback_comparisons.jsonl --out $OUT/labeller \
      --max-length 320 --batch-size 16 --lr 1e-3 --max-steps ${LABELLER_STEPS:-2400} "${q[@]}"
}

labels() {   # COMBINE other than first keeps its own files beside: ai_pairs_$COMBINE.jsonl, rm_ai_$COMBINE ...
  s=${COMBINE/#first/}; s=${s:+_$s}
  head -n $LABEL_PROMPTS $W/rankings.jsonl > $OUT/label_rankings.jsonl
  tail -n 300 $W/rankings.jsonl > $OUT/heldout_rankings.jsonl
  [ -f $OUT/ai_pairs$s.jsonl ] || $RL rank --data $OUT/label_rankings.jsonl --by model:${LB:-$OUT/labeller} \
      --combine $COMBINE --format pairs --ranked-input --out $OUT/ai_pairs$s.jsonl \
      --judgments $OUT/ai_judgments$s.jsonl 2> $OUT/ai_rank$s.log
  n=$(wc -l < $OUT/ai_pairs$s.jsonl)
  for seed in ${RM_SEEDS:-0 1 2 3 4}; do   # reward models on a few hundred pairs vary by seed: train each kind on several
    common=(--model $OUT/sft --eval-data $OUT/heldout_rankings.jsonl --batch-size 8 --lr 1e-3 --max-steps $RM_STEPS
            --seed $seed "${q[@]}")
    done_ $OUT/rm_ai$s/seed-$seed || $RL rm --data $OUT/ai_pairs$s.jsonl --out $OUT/rm_ai$s/seed-$seed "${common[@]}"
    done_ $OUT/rm_annotators/n$n-seed-$seed || $RL rm --data $W/prefs.jsonl --max-rows $n \
        --out $OUT/rm_annotators/n$n-seed-$seed "${common[@]}"
  done
  echo $n > $OUT/ai_pairs$s.count
}

rules() {   # the preference RM and PPO as the quickstart's recipe had them for the published figures; the rule RM on rules.jsonl
  done_ $OUT/rm || $RL rm --model $OUT/sft --data $W/rankings.jsonl --loss ranking --harden --harden-kinds 0 \
      --harden-only $PREF_HARDEN --batch-size 16 --lr 1e-3 \
      --max-steps $PREF_RM_STEPS "${q[@]}" --out $OUT/rm
  done_ $OUT/rules || $RL rm --rules --model $OUT/sft --data $W/rules.jsonl --batch-size 16 --lr 1e-3 \
      --max-steps $RULE_RM_STEPS "${q[@]}" --out $OUT/rules
  ppo=(--policy $OUT/sft --prompts $W/prompts.jsonl --lr 1e-4 --kl-coef 0.2 --rollout-prompts $ROLLOUT --mini-batch 16
       --critic shared --max-steps $PPO_STEPS --probe-every 0 "${q[@]}")
  for seed in $PPO_SEEDS; do
    done_ $OUT/ppo_rm-seed$seed || $RL ppo "${ppo[@]}" --seed $seed --reward rm:$OUT/rm --out $OUT/ppo_rm-seed$seed
    done_ $OUT/ppo_rm_rules-seed$seed || $RL ppo "${ppo[@]}" --seed $seed --reward rm:$OUT/rm \
        --reward rules:$OUT/rules:$RULE_WEIGHT --out $OUT/ppo_rm_rules-seed$seed
    judge ppo_rm-seed$seed $OUT/ppo_rm-seed$seed
    judge ppo_rm_rules-seed$seed $OUT/ppo_rm_rules-seed$seed
  done
}

cai() {
  done_ $OUT/cai || $RL critique --model $FB --prompts $W/prompts.jsonl --rounds 2 --temperature 0.7 \
      --max-rows $CAI_PROMPTS --out $OUT/cai
  done_ $OUT/cai_sft || $RL sft --model $FB --data $OUT/cai/sft.jsonl --out $OUT/cai_sft --batch-size 16 \
      --lr 5e-4 --max-steps $CAI_SFT_STEPS "${q[@]}"
  done_ $OUT/cai_dpo || $RL dpo --policy $OUT/cai_sft --lora --lora-r 32 --lora-alpha 64 --data $OUT/cai/prefs.jsonl \
      --loss rpo --lr 5e-4 --batch-size 8 --max-steps $CAI_DPO_STEPS "${q[@]}" --out $OUT/cai_dpo
  judge cai_sft $OUT/cai_sft
  judge cai_dpo $OUT/cai_dpo
}

table() { $PY bench/rlaif_table.py $OUT; }

for part in ${*:-setup labeller labels rules cai table}; do
  case $part in setup|labeller|labels|rules|cai|table) $part ;; *) echo "unknown part $part" >&2; exit 2 ;; esac
done
