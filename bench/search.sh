#!/usr/bin/env bash
# The search for the small-model defaults (issue 9), done so that it holds on new questions: every variant runs on
# the search half (even line indices) of the three knowledge sets; the defaults are chosen there alone; the chosen
# variant and the baselines then run on the confirm half (odd indices), which no choice has seen.
#
# Usage (from the repository root, the embedded model; two processes of one thread each, since a 2-core machine
# gets more from two batches than from one batch on two threads):
#   bash bench/search.sh search-a & bash bench/search.sh search-b & wait   # stage 1: every variant
#   bash bench/search.sh leaders-a & bash bench/search.sh leaders-b & wait # stage 2: baselines and leaders to the end
#   bash bench/search.sh confirm-a; bash bench/search.sh confirm-b & bash bench/search.sh confirm-c & wait
#                                                                          # the confirm half: baselines, chosen
#   bash bench/search.sh control-a & bash bench/search.sh control-b & wait # a control, after the choice
#   bash bench/search.sh summary                                           # reports only, runs no model
# Every run goes through `relat eval` into one folder per half, $OUT/search-half and $OUT/confirm-half (records,
# run.json, report.md and plots); the two processes of a pair write into the same folder at once, each appending
# whole records of its own variants (or, for the control, its own data files), so neither reruns the other's. The
# summary rewrites each half's report against direct, and a second one against latent in its vs-latent/ folder
# (whose records.jsonl and run.json are links to the half's).
# What was run on 2026-12-01 (bench/RESULTS.md, section 7), with bench/quality.py, relat eval's predecessor (its
# records were converted to these folders the same day): stage 1 was stopped after 86-88 (search-a) and 70-71
# (search-b) of the 160 search questions, for time; the baselines and the variants still in the running went on
# to all 160 in stage 2 (a run resumes where the records stop), with two variants the first results suggested.
# Every variant spells out all the settings it depends on, so that it keeps its meaning when the defaults change.
set -euo pipefail
cd "$(dirname "$0")/.."
RELAT=${RELAT:-.venv/bin/relat}
OUT=${OUT:-bench/results/search}
SEARCH=$OUT/search-half
CONFIRM=$OUT/confirm-half
DATA=(--data bench/data/knowledge_dev.jsonl --data bench/data/knowledge_extra.jsonl
      --data bench/data/knowledge_kinds.jsonl)
RUN=("$RELAT" eval --max-tokens 48 --batch 8 --threads 1)
BASE=relat:latent_steps=4:steps=2:follow_up=restate:mapping=norm  # the defaults before issue 9

DIRECT=direct=direct
LATENT=latent=latent:latent_steps=4:follow_up=restate
RELAT_OLD=relat=$BASE:lr=5e-3:adapter_during_answer=false
# Gentle updates: the learning rate from the paper's 2e-5 to 1e-2, the adapter off and on while answering.
OFF_2E5=off-lr2e-5=$BASE:lr=2e-5:adapter_during_answer=false
OFF_1E2=off-lr1e-2=$BASE:lr=1e-2:adapter_during_answer=false
ON_2E5=on-lr2e-5=$BASE:lr=2e-5:adapter_during_answer=true
ON_1E3=on-lr1e-3=$BASE:lr=1e-3:adapter_during_answer=true
ON_5E3=on-lr5e-3=$BASE:lr=5e-3:adapter_during_answer=true
# Soft latent tokens, the answer from the question alone, guidance, contrastive feedback, residual mixing.
SOFT=soft-t1=relat:latent_steps=4:steps=2:follow_up=restate:mapping=soft:soft_temperature=1.0:lr=5e-3:adapter_during_answer=false
SOFT_K=soft-t05-k20=relat:latent_steps=4:steps=2:follow_up=restate:mapping=soft:soft_temperature=0.5:soft_top_k=20:lr=5e-3:adapter_during_answer=false
QUESTION=question-lr1e-3=$BASE:lr=1e-3:answer_context=question
GUIDE=guide05=$BASE:lr=5e-3:adapter_during_answer=false:guidance=0.5
CONTRAST=contrast05=$BASE:lr=5e-3:adapter_during_answer=false:contrastive_eta=0.5
RESIDUAL=residual05=$BASE:lr=5e-3:adapter_during_answer=false:residual_alpha=0.5
# Stage 2, suggested by stage 1: the answer from the question alone with a stronger update; gentler guidance.
QUESTION_5E3=question-lr5e-3=$BASE:lr=5e-3:answer_context=question
GUIDE03=guide03=$BASE:lr=5e-3:adapter_during_answer=false:guidance=0.3

STAGE1_A=("$DIRECT" "$LATENT" "$RELAT_OLD" "$OFF_2E5" "$OFF_1E2" "$ON_2E5" "$ON_1E3")
STAGE1_B=("$ON_5E3" "$SOFT" "$SOFT_K" "$QUESTION" "$GUIDE" "$CONTRAST" "$RESIDUAL")
LEADERS_A=("$DIRECT" "$LATENT" "$RELAT_OLD" "$GUIDE03")
LEADERS_B=("$ON_5E3" "$QUESTION" "$GUIDE" "$QUESTION_5E3")
# The confirm half. Each variant pins what later defaults could change: latent and the old relat default are
# the plain methods (the search's variants ran when these were the defaults); the chosen one is question-lr5e-3.
C_LATENT=latent=latent:latent_steps=4:follow_up=restate:guidance=1.0
C_RELAT=relat=$BASE:lr=5e-3:adapter_during_answer=false:answer_context=thought
CHOSEN=$QUESTION_5E3
# A control, after the choice, on the search half: the chosen setting with a one-step thought.
CONTROL=question-l1-lr5e-3=relat:latent_steps=1:steps=2:follow_up=restate:mapping=norm:lr=5e-3:answer_context=question

variants() { local IFS=,; echo "$*"; }  # one --variants value: the variants, comma-separated

case "${1:-summary}" in
  search-a) "${RUN[@]}" "${DATA[@]}" --half search --variants "$(variants "${STAGE1_A[@]}")" --out "$SEARCH" ;;
  search-b) "${RUN[@]}" "${DATA[@]}" --half search --variants "$(variants "${STAGE1_B[@]}")" --out "$SEARCH" ;;
  leaders-a) "${RUN[@]}" "${DATA[@]}" --half search --variants "$(variants "${LEADERS_A[@]}")" --out "$SEARCH" ;;
  leaders-b) "${RUN[@]}" "${DATA[@]}" --half search --variants "$(variants "${LEADERS_B[@]}")" --out "$SEARCH" ;;
  confirm-a) "${RUN[@]}" "${DATA[@]}" --half confirm --variants "$DIRECT,$C_LATENT" --out "$CONFIRM" ;;
  confirm-b) "${RUN[@]}" "${DATA[@]}" --half confirm --variants "$C_RELAT" --out "$CONFIRM" ;;
  confirm-c) "${RUN[@]}" "${DATA[@]}" --half confirm --variants "$CHOSEN" --out "$CONFIRM" ;;
  control-a) "${RUN[@]}" --data bench/data/knowledge_kinds.jsonl --half search --variants "$CONTROL" \
      --out "$SEARCH" ;;
  control-b) "${RUN[@]}" "${DATA[@]:0:4}" --half search --variants "$CONTROL" --out "$SEARCH" ;;
  summary)
    V=$(variants "${STAGE1_A[@]}" "$GUIDE03" "${STAGE1_B[@]}" "$QUESTION_5E3" "$CONTROL")
    "$RELAT" eval "${DATA[@]}" --half search --report-only --variants "$V" --out "$SEARCH"
    "$RELAT" eval "${DATA[@]}" --half search --report-only --variants "$V" --baseline latent --out "$SEARCH/vs-latent"
    V=$(variants "$DIRECT" "$C_LATENT" "$C_RELAT" "$CHOSEN")
    "$RELAT" eval "${DATA[@]}" --half confirm --report-only --variants "$V" --out "$CONFIRM"
    "$RELAT" eval "${DATA[@]}" --half confirm --report-only --variants "$V" --baseline latent \
      --out "$CONFIRM/vs-latent" ;;
  *) echo "usage: $0 search-a|search-b|leaders-a|leaders-b|confirm-a|confirm-b|confirm-c|control-a|control-b|summary" >&2
     exit 2 ;;
esac
