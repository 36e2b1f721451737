#!/bin/bash
# The rows of experiments/results/aot.md, one compile at a time: bash experiments/results/aot_rows.sh OUT_DIR [ROW...]
out=${1:-/tmp/aot_out}; shift; mkdir -p "$out"
G=configs/gsm8k_qwen2_5.py
declare -A ROWS=(
  [v5e8_scan]="--config=$G --topology=v5e-8 --set dtype=bfloat16"
  [v5e8_scan_step]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --programs=train_step"
  [v5e8_noscan]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --set scan_layers=False --programs=train_step"
  [v5e8_remat]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --set remat=full --programs=train_step"
  [v5e8_fused]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --set fused_loss=True --programs=train_step"
  [v5e8_fused_remat]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --set fused_loss=True --set remat=full --programs=train_step"
  [v5p8]="--config=$G --topology=v5p-8 --set dtype=bfloat16 --programs=train_step"
  [v4_8]="--config=$G --topology=v4-8 --set dtype=bfloat16 --programs=train_step"
  [v6e8]="--config=$G --topology=v6e-8 --set dtype=bfloat16 --programs=train_step"
  [sft_v5e8]="--config=configs/sft.py --topology=v5e-8 --set dtype=bfloat16 --programs=train_step"
  [teacher_server_v5e8]="--config=configs/teacher_server.py --topology=v5e-8 --set dtype=bfloat16 --programs=train_step"
  [opsd_v5e8]="--config=configs/opsd.py --topology=v5e-8 --set dtype=bfloat16 --set fused_loss=True --set remat=full --programs=train_step"
  [v5e64_7b]="--config=$G:7b --topology=v5e-64 --set dtype=bfloat16 --set batch_size=64 --programs=train_step"
  [v5e64_7b_fused_remat]="--config=$G:7b --topology=v5e-64 --set dtype=bfloat16 --set batch_size=64 --set fused_loss=True --set remat=full --programs=train_step"
  # Remat policies on the gsm8k step (after the scan-residual fix), then each recipe as shipped at the smallest
  # topology its docstring names, with only the flags of its TPU launch command. The recipes' table:
  #   bash experiments/results/aot_rows.sh OUT recipe_gsm8k recipe_gsm8k_7b gsm8k_7b_v5e16 recipe_opd recipe_opsd \
  #     recipe_sft recipe_teacher_server
  [v5e8_none]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --set remat=none --programs=train_step"
  [v5e8_dots]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --set remat=dots --programs=train_step"
  [v5e8_full]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --set remat=full --programs=train_step"
  [v5e8_offload]="--config=$G --topology=v5e-8 --set dtype=bfloat16 --set remat=offload --programs=train_step"
  [recipe_gsm8k]="--config=$G --topology=v5e-8 --set dtype=bfloat16"
  [recipe_gsm8k_7b]="--config=$G:7b --topology=v5e-8 --set dtype=bfloat16"
  [gsm8k_7b_v5e16]="--config=$G:7b --topology=v5e-16 --set dtype=bfloat16"
  [opsd_full_v5e8]="--config=configs/opsd.py --topology=v5e-8 --set dtype=bfloat16 --set remat=full --programs=train_step"
  [recipe_opsd]="--config=configs/opsd.py --topology=v5e-8 --set dtype=bfloat16"
  [recipe_sft]="--config=configs/sft.py --topology=v5e-8 --set dtype=bfloat16 --programs=train_step"
  [recipe_teacher_server]="--config=configs/teacher_server.py --topology=v5e-8 --set dtype=bfloat16"
  [recipe_opd]="--config=configs/on_policy_distillation.py --topology=v5e-8 --set dtype=bfloat16"
  # The vision-language recipe (InternVL3-8B -> InternVL3-2B): as shipped on v5e-8 (does not fit) and v5e-16, and
  # the settings tried on v5e-8 (mllm_accum2_none_v5e8 runs out of HBM: no row):
  #   bash experiments/results/aot_rows.sh OUT recipe_mllm mllm_v5e16 mllm_full_v5e8 mllm_batch8_v5e8 mllm_accum2_v5e8
  [recipe_mllm]="--config=configs/mllm_internvl.py --topology=v5e-8 --set dtype=bfloat16"
  [mllm_v5e16]="--config=configs/mllm_internvl.py --topology=v5e-16 --set dtype=bfloat16"
  [mllm_full_v5e8]="--config=configs/mllm_internvl.py --topology=v5e-8 --set dtype=bfloat16 --set remat=full --programs=train_step"
  [mllm_accum2_none_v5e8]="--config=configs/mllm_internvl.py --topology=v5e-8 --set dtype=bfloat16 --set grad_accum_steps=2 --set remat=none --programs=train_step"
  [mllm_accum2_v5e8]="--config=configs/mllm_internvl.py --topology=v5e-8 --set dtype=bfloat16 --set grad_accum_steps=2 --programs=train_step"
  [mllm_batch8_v5e8]="--config=configs/mllm_internvl.py --topology=v5e-8 --set dtype=bfloat16 --set batch_size=8 --programs=train_step"
)
for row in "$@"; do
  echo "== $row: python experiments/aot_compile.py ${ROWS[$row]}"
  timeout ${AOT_TIMEOUT:-1000} python experiments/aot_compile.py ${ROWS[$row]} --json="$out/$row.json" 2>&1 \
    | grep -v "^E0000\|Source Location\|libtpu_init\|^=== \|^WARNING: Logging\|TPU_ACC\|host bounds"
done
