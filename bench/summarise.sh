#!/usr/bin/env bash
# Regenerates the quality tables of bench/RESULTS.md from the raw results committed in bench/results/.
# Usage: bash bench/summarise.sh   (from the repository root; runs no model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
Q="$PY bench/quality.py --summary-only --latent latent4"
R=bench/results
DIRECT=direct:method=direct
LATENT=latent4:method=latent
RELAT=relat4:method=relat
L4B=l4-bridge:method=latent,latent_steps=4,follow_up=bridge
L16=latent16:method=latent,latent_steps=16,follow_up=bridge
NAIVE=relat-naive:method=relat,latent_steps=16,steps=5,adapter_during_answer=true,follow_up=bridge
STOP=r4-n5-stop1-restate-off:method=relat,latent_steps=4,steps=5,stop_loss=1.0,follow_up=restate,adapter_during_answer=false
BRIDGE=r4-n2-bridge-off:method=relat,latent_steps=4,steps=2,follow_up=bridge,adapter_during_answer=false
LR=r4-n2-lr1e-2-restate-off:method=relat,latent_steps=4,steps=2,lr=0.01,follow_up=restate,adapter_during_answer=false
MLP=r4-n2-mlp-restate-off:method=relat,latent_steps=4,steps=2,targets=q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj,follow_up=restate,adapter_during_answer=false
ON=r4-n2-restate-on:method=relat,latent_steps=4,steps=2,follow_up=restate,adapter_during_answer=true
L8=l8-restate:method=latent,latent_steps=8,follow_up=restate
R8=r8-n2-restate-off:method=relat,latent_steps=8,steps=2,follow_up=restate,adapter_during_answer=false
R16=r16-n5-stop1-bridge-off:method=relat,latent_steps=16,steps=5,stop_loss=1.0,follow_up=bridge,adapter_during_answer=false
KDEV=../shared/data/knowledge_dev.jsonl

echo "## knowledge_dev, all 76 (relat and latent at the defaults)"
$Q --data $KDEV --out $R/knowledge_dev_0_39.jsonl --also $R/knowledge_dev_40_75.jsonl \
   --variant $DIRECT --variant $LATENT --variant $RELAT
echo "## the same, relat against latent"
$Q --data $KDEV --out $R/knowledge_dev_0_39.jsonl --also $R/knowledge_dev_40_75.jsonl --variant $LATENT --variant $RELAT
echo "## held out: knowledge_dev 40-75"
$Q --data $KDEV --start 40 --out $R/knowledge_dev_40_75.jsonl --variant $DIRECT --variant $LATENT --variant $RELAT
echo "## knowledge_extra (62, written for this project)"
$Q --data bench/data/knowledge_extra.jsonl --out $R/knowledge_extra.jsonl --variant $DIRECT --variant $LATENT --variant $RELAT
echo "## the search: knowledge_dev 0-39"
$Q --data $KDEV --limit 40 --out $R/knowledge_dev_0_39.jsonl --also $R/search_0_39.jsonl --also $R/search2_0_39.jsonl \
   --variant $DIRECT --variant $RELAT --variant $LATENT --variant $STOP --variant $BRIDGE --variant $L4B --variant $LR \
   --variant $MLP --variant $ON --variant $L8 --variant $R8 --variant $R16 --variant $L16 --variant $NAIVE
echo "## at the paper's latent length L=16: open loop, closed loop with early stop, naive closed loop"
$Q --data $KDEV --limit 40 --out $R/knowledge_dev_0_39.jsonl --also $R/search_0_39.jsonl \
   --variant $L16 --variant $R16 --variant $NAIVE
echo "## GSM8K, first 50"
$Q --data ../shared/data/gsm8k_test_dev.jsonl --limit 50 --out $R/gsm8k_50.jsonl --also $R/gsm8k_50_relat.jsonl \
   --variant $DIRECT --variant "latent4:method=latent,latent_steps=4,follow_up=restate" --variant $RELAT
