#!/usr/bin/env bash
# Reruns the usage reference (docs/usage.md) command by command, as written, on a model of a non-default
# shape (2 layers, 128 wide, untied embeddings, PQ block size 4, --tokens-per-sample 64, its own YAML
# schedule), a few updates each. The README's "..." become a short budget; nothing else is added.
# Every command's exit status and key output line go to the log; the first failure stops the run.
#
# The venv is activated the way the README tells a user to (`source .venv/bin/activate`), nothing else.
#
#     bash scripts/readme_usage_rerun.sh [WORK_DIR]   (~10 min on 2 cores, after `make test` or `make demo`)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-$(mktemp -d)}
mkdir -p "$W"
cd "$REPO"
# shellcheck disable=SC1091
source .venv/bin/activate
P=quant_noise_plugin
SHORT=(--optimizer adam --lr 0.0005 --lr-scheduler inverse_sqrt --warmup-updates 10 --max-tokens 1024 --cpu
       --no-epoch-checkpoints --log-format simple --log-interval 10 --num-workers 0)
SHAPE=(--decoder-layers 2 --decoder-embed-dim 128 --decoder-ffn-embed-dim 256 --decoder-attention-heads 4)
N=0
# The README's recipe, verbatim: the bash block of "The recipe"
python - > "$W/readme_quickstart.sh" <<'PY'
import re
section = open("README.md", encoding="utf-8").read().split("## The recipe", 1)[1].split("\n## ", 1)[0]
print(re.findall(r"```bash\n(.*?)```", section, re.S)[0])
PY
# run TITLE PATTERN CMD...: runs CMD (its full output in $W/step-N.log), prints the lines matching PATTERN
run() {
    local title=$1 pattern=$2; shift 2; N=$((N + 1))
    local shown="$*"; shown=${shown//$W/\$W}; shown=${shown//$REPO/\$PWD}   # no machine's path in the log
    echo; echo "### $N. $title"; echo "\$ $shown"
    local rc=0; "$@" > "$W/step-$N.log" 2>&1 || rc=$?
    if [ $rc -ne 0 ]; then echo "FAILED (exit $rc):"; tail -20 "$W/step-$N.log"; exit 1; fi
    grep -E "$pattern" "$W/step-$N.log" | tail -"${SHOWN:-4}" | sed -e "s#$W#\$W#g" -e "s#$REPO#\$PWD#g" || true
}

SHOWN=12 run "README recipe, verbatim" "Perplexity|done training|^packed |ipq stage .* quantized|predicted for a target|compressed size|on disk|In the beginning" \
    bash -e "$W/readme_quickstart.sh"
run "Quant-Noise training, plugin arch" "quant-noise:|num. model params|done training" \
    fairseq-train data/lm/bin --user-dir $P --task language_modeling --tokens-per-sample 64 \
    --arch qn_transformer_lm "${SHAPE[@]}" --quant-noise-pq 0.1 --quant-noise-pq-block-size 4 \
    "${SHORT[@]}" --max-update 40 --save-dir "$W/lm"
run "any architecture through the criterion (lstm_lm)" "quant-noise:|done training" \
    fairseq-train data/lm/bin --user-dir $P --task language_modeling --arch lstm_lm --tokens-per-sample 64 --decoder-embed-dim 128 \
    --decoder-hidden-size 128 --decoder-out-embed-dim 128 \
    --criterion qn_cross_entropy --quant-noise-pq 0.1 --quant-noise-scalar 0.5 --quant-noise-scalar-bits 4 \
    --quant-noise-pq-block-size 4 "${SHORT[@]}" --max-update 5 --save-dir "$W/lstm"
run "translation through the criterion" "quant-noise:|done training" \
    fairseq-train data/mt/bin --user-dir $P --task translation --arch transformer --encoder-layers 1 --decoder-layers 1 \
    --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256 \
    --criterion qn_label_smoothed_cross_entropy --label-smoothing 0.1 --quant-noise-pq 0.1 --quant-noise-pq-block-size 4 \
    "${SHORT[@]}" --max-update 20 --save-dir "$W/mt"
run "hydra" "quant-noise:|done training" \
    fairseq-hydra-train --config-dir configs/hydra --config-name kjv_lm_quant_noise \
    task.data=$PWD/data/lm/bin common.user_dir=$PWD/$P optimization.max_update=3 checkpoint.save_dir="$W/hydra" \
    hydra.run.dir="$W/hydra-run"

cat > "$W/my_schedule.yaml" <<'YAML'
defaults:
  Linear: {block_size: 4, n_centroids: 64}
  Embedding: {block_size: 4, n_centroids: 64}
stages:
  - {name: ffn, layers: 'decoder\.layers\.\d+\.fc[12]', updates: 10}
  - {name: embeddings, layers: 'decoder\.(embed_tokens|output_projection)', updates: 10}
  - name: attention
    layers: 'decoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj'
    updates: 10
final_scalar_bits: 8
YAML
run "iPQ schedule preview" "." quant-noise schedule "$W/lm/checkpoint_last.pt" "$W/my_schedule.yaml"
run "iPQ, one command" "ipq stage [0-9]|done training" \
    fairseq-train data/lm/bin --user-dir $P --task ipq_language_modeling --tokens-per-sample 64 \
    --ipq-config "$W/my_schedule.yaml" --finetune-from-model "$W/lm/checkpoint_last.pt" \
    --arch qn_transformer_lm "${SHAPE[@]}" --max-update 30 "${SHORT[@]}" --lr 2e-4 --save-dir "$W/ipq"
run "eval-lm on the iPQ checkpoint (the model's own --tokens-per-sample)" "Evaluated|Perplexity" \
    fairseq-eval-lm data/lm/bin --user-dir $P --path "$W/ipq/checkpoint_last.pt" --tokens-per-sample 64 --context-window 32 --cpu
echo; echo "### eval-lm with eval-lm's default --tokens-per-sample: must stop in one line"
if fairseq-eval-lm data/lm/bin --user-dir $P --path "$W/ipq/checkpoint_last.pt" --cpu > "$W/guard.log" 2>&1; then
    echo "UNEXPECTED: exit 0"; tail -3 "$W/guard.log"; exit 1; fi
tail -1 "$W/guard.log" | sed -e "s#$W#\$W#g" -e "s#$REPO#\$PWD#g"
run "generate on the translation checkpoint" "BLEU|Generate test" \
    fairseq-generate data/mt/bin --user-dir $P --path "$W/mt/checkpoint_last.pt" --bpe sentencepiece \
    --sentencepiece-model data/mt/spm.bpe.model --beam 2 --batch-size 64 --cpu --max-len-b 20
run "pack" "." quant-noise pack "$W/ipq/checkpoint_last.pt" "$W/model.packed.pt" --scalar-bits 8
run "size" "size|x[0-9]" quant-noise size "$W/model.packed.pt"
run "unpack" "." quant-noise unpack "$W/model.packed.pt" "$W/dense.pt"
run "stock fairseq on the unpacked file, no plugin" "Perplexity" \
    fairseq-eval-lm data/lm/bin --path "$W/dense.pt" --tokens-per-sample 64 --context-window 32 --cpu
cat > "$W/hub.py" <<'PY'
import sys
from fairseq.models.transformer_lm import TransformerLanguageModel
lm = TransformerLanguageModel.from_pretrained(sys.argv[1], "model.packed.pt", data_name_or_path="data/lm/bin",
                                              user_dir="quant_noise_plugin")
print("score:", lm.score("And God said , Let there be light")["positional_scores"].mean().item())
print("sample:", lm.sample("In the beginning", sampling=True, sampling_topk=10, max_len_b=10))
PY
run "hub: score and sample on the packed file" "score:|sample:" python "$W/hub.py" "$W"
run "w8a8 pack" "." quant-noise pack "$W/ipq/checkpoint_last.pt" "$W/model.w8a8.pt" --scalar-bits 8 --activation-bits 8 \
    --calibrate data/lm/bin --calibration-batches 8 --observer mse
run "w8a8 eval-lm" "Perplexity" \
    fairseq-eval-lm data/lm/bin --user-dir $P --path "$W/model.w8a8.pt" --tokens-per-sample 64 --context-window 32 --cpu
run "w8a8 size (activation scales listed)" "scale|size" quant-noise size "$W/model.w8a8.pt"
echo; echo "ALL COMMANDS RAN"
