#!/usr/bin/env bash
# The figures of bench/RESULTS.md section 9 (issue 11): `relat eval` at the defaults on the embedded model, in
# two processes of one thread each (the development machine has 2 cores), eight requests batched per process.
#   bash bench/eval.sh a        knowledge (confirm halves: questions no choice of default saw), then choice
#   bash bench/eval.sh b        GSM8K (first 50), then the code tasks
#   bash bench/eval.sh report   rewrite the four reports from the records (no model)
set -euo pipefail
cd "$(dirname "$0")/.."
RELAT=${RELAT:-.venv/bin/relat}
OUT=bench/results/eval
VARIANTS=direct,latent,relat
export MALLOC_ARENA_MAX=2
common=(--variants "$VARIANTS" --batch 8 --threads 1)
knowledge=(--data bench/data/knowledge_dev.jsonl --data bench/data/knowledge_extra.jsonl
           --data bench/data/knowledge_kinds.jsonl --half confirm --out "$OUT/knowledge")
choice=(--data bench/data/choice.jsonl --out "$OUT/choice")
gsm8k=(--data bench/data/gsm8k_test_dev.jsonl --limit 50 --out "$OUT/gsm8k")
code=(--data bench/data/code_tasks.jsonl --data bench/data/code_mbpp_examples.jsonl --out "$OUT/code")
case "${1:-}" in
  a) "$RELAT" eval "${knowledge[@]}" "${common[@]}"; "$RELAT" eval "${choice[@]}" "${common[@]}" ;;
  b) "$RELAT" eval "${gsm8k[@]}" "${common[@]}"; "$RELAT" eval "${code[@]}" "${common[@]}" ;;
  report) for set in knowledge choice gsm8k code; do
            declare -n args=$set; "$RELAT" eval "${args[@]}" --variants "$VARIANTS" --report-only; done ;;
  *) echo "usage: bash bench/eval.sh a|b|report" >&2; exit 2 ;;
esac
