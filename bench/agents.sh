#!/usr/bin/env bash
# Multi-agent collaboration (issue 10) on the embedded model: direct / latent / relat x single / sequential, on
# knowledge questions and on the first 50 GSM8K problems (bench/RESULTS.md, section 8).
#
# Usage (from the repository root; one thread per process suits a 2-core machine; MINUTES bounds a run's time):
#   bash bench/agents.sh knowledge & bash bench/agents.sh gsm8k-head & wait; bash bench/agents.sh gsm8k-tail
#   bash bench/agents.sh summary     # reports only, runs no model
# Knowledge: the confirm half (odd indices) of knowledge_dev and knowledge_extra, which the choice of the relat
# defaults (issue 9, search half) never saw; nothing here is chosen, so nothing needs a half of its own. GSM8K: the
# first 50 problems, never used for a choice, in two ranges (0-37 and 38-49) into one folder, so that two
# processes could share the work. Decoding is greedy; answers get 48 tokens (knowledge) or 256 (GSM8K), TextMAS
# agents 64 or 128 before the judger. Every variant spells out the settings it depends on.
# Each run goes through `relat eval` into $OUT/knowledge or $OUT/gsm8k (records, run.json, report.md and plots).
# It goes question by question through all variants, so a stopped run leaves every variant on the same questions
# (the report pairs them), and a rerun resumes where the records stop. The summary rewrites both reports against
# direct, and the knowledge one against latent too, in knowledge/vs-latent/ (its records.jsonl and run.json are
# links to knowledge/'s).
# As run on 2026-12-01, with bench/quality.py, relat eval's predecessor (its records were converted to these
# folders the same day): the six combinations only (a first try with the hierarchical team and relat answering
# after its memory ran 18 requests in 7 minutes, too slow for this machine; its records are in the folders, and
# the summary leaves them out); GSM8K ran at batch 8 (0-37) and 4 (38-49) to stay within memory beside the
# knowledge run (a relat team's training step on eight GSM8K prompts holds about 11 GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
RELAT=${RELAT:-.venv/bin/relat}
OUT=${OUT:-bench/results/agents}

R=relat:latent_steps=4:steps=2:follow_up=restate:mapping=norm:lr=5e-3:adapter_during_answer=false
variants() {  # $1: the TextMAS agents' token budget; one --variants value
  local v=(direct=direct
           latent=latent:latent_steps=4:follow_up=restate:mapping=norm
           "relat=$R:answer_context=question"
           "text-seq=direct:agents=sequential:agent_max_tokens=$1"
           latent-seq=latent:agents=sequential:latent_steps=4:mapping=norm
           "relat-seq=$R:answer_context=question:agents=sequential")
  local IFS=,
  echo "${v[*]}"
}
LIMIT=(${MINUTES:+--max-minutes "$MINUTES"})
KNOWLEDGE=("$RELAT" eval --data bench/data/knowledge_dev.jsonl --data bench/data/knowledge_extra.jsonl
           --half confirm --max-tokens 48 --batch 8 --threads 1)
GSM8K=("$RELAT" eval --data bench/data/gsm8k_test_dev.jsonl --max-tokens 256 --threads 1)

case "${1:-}" in
  knowledge) "${KNOWLEDGE[@]}" --out "$OUT/knowledge" "${LIMIT[@]}" --variants "$(variants 64)" ;;
  gsm8k-head) "${GSM8K[@]}" --limit 38 --batch 8 --out "$OUT/gsm8k" "${LIMIT[@]}" --variants "$(variants 128)" ;;
  gsm8k-tail) "${GSM8K[@]}" --start 38 --limit 12 --batch 4 --out "$OUT/gsm8k" "${LIMIT[@]}" \
                --variants "$(variants 128)" ;;
  summary)
    "${KNOWLEDGE[@]}" --report-only --variants "$(variants 64)" --out "$OUT/knowledge"
    "${KNOWLEDGE[@]}" --report-only --variants "$(variants 64)" --baseline latent --out "$OUT/knowledge/vs-latent"
    "${GSM8K[@]}" --limit 50 --report-only --variants "$(variants 128)" --out "$OUT/gsm8k" ;;
  *) echo "usage: $0 knowledge|gsm8k-head|gsm8k-tail|summary" >&2; exit 2 ;;
esac
