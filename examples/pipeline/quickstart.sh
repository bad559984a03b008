#!/usr/bin/env bash
# The quickstart alignment pipeline on CPU (a few minutes): SFT, then a reward model, DPO and
# GRPO from the SFT model, each followed by a held-out score; writes results/quickstart/report.md
# with a plot. Run from the repository root, after the README's install:
#     bash examples/pipeline/quickstart.sh
# Shorter (the test uses these): SFT_EPOCHS=2 OUT=/tmp/qs bash examples/pipeline/quickstart.sh
set -euo pipefail
OUT=${OUT:-results/quickstart}
SFT_EPOCHS=${SFT_EPOCHS:-4}
RL_STEPS=${RL_STEPS:-100}
PREF_EPOCHS=${PREF_EPOCHS:-1}
EXTRA=${EXTRA:-}   # overrides for every stage (e.g. a smaller model)
GPT=examples/nlp/gpt
SCORE="python examples/pipeline/evaluate.py"
# Every stage is scored on the same held-out task: counting the words of unseen prompts.
HELD_OUT=data/quickstart/rl_val.jsonl
PAIRS="model.data.data_prefix.train=data/quickstart/count_preference_train.jsonl model.data.data_prefix.validation=data/quickstart/count_preference_val.jsonl"
FRESH="exp_manager.resume_if_exists=false exp_manager.overwrite=true"

python $GPT/train_gpt_sft.py trainer.sft.max_epochs=$SFT_EPOCHS exp_manager.explicit_log_dir=$OUT/sft $FRESH $EXTRA
SFT=$OUT/sft/final_model
$SCORE answers --name sft --model $SFT --prompts $HELD_OUT --out $OUT/scores/sft.json

# Preference stages at lr 3e-4: at 1e-4 (one epoch of the 1024 counting pairs) DPO gained 0.05 over a
# 2-epoch SFT model on an AVX-512 machine (0.31 -> 0.37) and the reward model ranked 55% of held-out
# pairs; from the same SFT model, DPO at 2e-4 / 3e-4 / 5e-4 reached 0.67 / 0.64 / 0.64, the RM 79% at 3e-4.
# A reward model and DPO from the SFT model, on pairs with the right count chosen and a wrong one rejected.
python $GPT/train_reward_model.py pretrained_checkpoint.restore_from_path=$SFT trainer.rm.max_epochs=$PREF_EPOCHS $PAIRS \
    model.optim.lr=3e-4 model.optim.sched.min_lr=3e-5 exp_manager.explicit_log_dir=$OUT/rm $FRESH $EXTRA
python $GPT/score_reward_model.py pretrained_checkpoint.restore_from_path=$OUT/rm/final_model \
    input_file=data/quickstart/count_preference_val.jsonl output_file=$OUT/rm_val_scored.jsonl
$SCORE pairs --name rm --scored $OUT/rm_val_scored.jsonl --out $OUT/scores/rm.json

# DPO with the chosen answer's NLL added (RPO-style), which keeps its likelihood from falling.
python $GPT/train_gpt_dpo.py pretrained_checkpoint.restore_from_path=$SFT trainer.dpo.max_epochs=$PREF_EPOCHS $PAIRS \
    model.dpo.sft_loss_weight=1.0 model.optim.lr=3e-4 model.optim.sched.min_lr=3e-5 \
    exp_manager.explicit_log_dir=$OUT/dpo $FRESH $EXTRA
$SCORE answers --name dpo --model $OUT/dpo/final_model --prompts $HELD_OUT --out $OUT/scores/dpo.json

# GRPO from the SFT model with the exact-answer reward.
python $GPT/train_gpt_grpo.py pretrained_checkpoint.restore_from_path=$SFT trainer.grpo.max_steps=$RL_STEPS \
    exp_manager.explicit_log_dir=$OUT/grpo $FRESH $EXTRA
$SCORE answers --name grpo --model $OUT/grpo/final_model --prompts $HELD_OUT --out $OUT/scores/grpo.json

python examples/pipeline/report.py --out $OUT
