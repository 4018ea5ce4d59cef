#!/usr/bin/env bash
# Regenerates the reports behind the quality tables of bench/RESULTS.md sections 2 and 3 (the defaults of
# 2026-11-23) from their records in bench/results/defaults-2026-11-23/, with `relat eval --report-only`.
# Usage: bash bench/summarise.sh   (from the repository root; runs no model)
# The records were written by bench/quality.py, relat eval's predecessor (one request at a time, 1 thread, greedy,
# 32 tokens for knowledge and 256 for GSM8K), and converted to relat eval folders on 2026-12-01. A folder per set
# of questions the old summaries tabled together: knowledge-dev (all 76 of knowledge_dev), knowledge-dev-40-75 (held
# out from the search), knowledge-extra (62), search-0-39 (the search's questions, every variant) and gsm8k-50
# (the first 50 GSM8K problems). Each report pairs with direct; the reports paired with the open loop are in a
# folder's vs-latent4/ or vs-latent16/, whose records.jsonl and run.json are links to the folder's.
set -euo pipefail
cd "$(dirname "$0")/.."
RELAT=${RELAT:-.venv/bin/relat}
R=bench/results/defaults-2026-11-23
DIRECT=direct=direct
LATENT=latent4=latent
RELAT4=relat4=relat
L4B=l4-bridge=latent:latent_steps=4:follow_up=bridge
L16=latent16=latent:latent_steps=16:follow_up=bridge
NAIVE=relat-naive=relat:latent_steps=16:steps=5:adapter_during_answer=true:follow_up=bridge
STOP=r4-n5-stop1-restate-off=relat:latent_steps=4:steps=5:stop_loss=1.0:follow_up=restate:adapter_during_answer=false
BRIDGE=r4-n2-bridge-off=relat:latent_steps=4:steps=2:follow_up=bridge:adapter_during_answer=false
LR=r4-n2-lr1e-2-restate-off=relat:latent_steps=4:steps=2:lr=0.01:follow_up=restate:adapter_during_answer=false
MLP=r4-n2-mlp-restate-off=relat:latent_steps=4:steps=2:targets=q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj:follow_up=restate:adapter_during_answer=false
ON=r4-n2-restate-on=relat:latent_steps=4:steps=2:follow_up=restate:adapter_during_answer=true
L8=l8-restate=latent:latent_steps=8:follow_up=restate
R8=r8-n2-restate-off=relat:latent_steps=8:steps=2:follow_up=restate:adapter_during_answer=false
R16=r16-n5-stop1-bridge-off=relat:latent_steps=16:steps=5:stop_loss=1.0:follow_up=bridge:adapter_during_answer=false
KDEV=(--data bench/data/knowledge_dev.jsonl)
Q=("$RELAT" eval --report-only)

echo "## knowledge_dev, all 76 (relat and latent at the defaults)"
"${Q[@]}" "${KDEV[@]}" --out $R/knowledge-dev --variants $DIRECT,$LATENT,$RELAT4
echo "## the same, relat against latent"
"${Q[@]}" "${KDEV[@]}" --out $R/knowledge-dev/vs-latent4 --baseline latent4 --variants $LATENT,$RELAT4
echo "## held out: knowledge_dev 40-75"
"${Q[@]}" "${KDEV[@]}" --start 40 --out $R/knowledge-dev-40-75 --variants $DIRECT,$LATENT,$RELAT4
"${Q[@]}" "${KDEV[@]}" --start 40 --out $R/knowledge-dev-40-75/vs-latent4 --baseline latent4 --variants $LATENT,$RELAT4
echo "## knowledge_extra (62, written for this project)"
"${Q[@]}" --data bench/data/knowledge_extra.jsonl --out $R/knowledge-extra --variants $DIRECT,$LATENT,$RELAT4
"${Q[@]}" --data bench/data/knowledge_extra.jsonl --out $R/knowledge-extra/vs-latent4 --baseline latent4 \
   --variants $LATENT,$RELAT4
echo "## the search: knowledge_dev 0-39"
"${Q[@]}" "${KDEV[@]}" --limit 40 --out $R/search-0-39 \
   --variants $DIRECT,$RELAT4,$LATENT,$STOP,$BRIDGE,$L4B,$LR,$MLP,$ON,$L8,$R8,$R16,$L16,$NAIVE
"${Q[@]}" "${KDEV[@]}" --limit 40 --out $R/search-0-39/vs-latent4 --baseline latent4 --variants $LATENT,$RELAT4
echo "## at the paper's latent length L=16: open loop, closed loop with early stop, naive closed loop"
"${Q[@]}" "${KDEV[@]}" --limit 40 --out $R/search-0-39/vs-latent16 --baseline latent16 --variants $L16,$R16,$NAIVE
echo "## GSM8K, first 50"
"${Q[@]}" --data bench/data/gsm8k_test_dev.jsonl --limit 50 --out $R/gsm8k-50 \
   --variants $DIRECT,latent4=latent:latent_steps=4:follow_up=restate,$RELAT4
"${Q[@]}" --data bench/data/gsm8k_test_dev.jsonl --limit 50 --out $R/gsm8k-50/vs-latent4 --baseline latent4 \
   --variants latent4=latent:latent_steps=4:follow_up=restate,$RELAT4
