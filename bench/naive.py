"""The naive baseline of issue 4: ReLAT written straight on transformers + peft, one request after another.

What it measures and why: issue 4 asks the batched engine for 5x the throughput of "a straightforward
transformers + peft loop" and a third of its single-request latency. This is that loop, written the way a
competent person writes it first: neither sandbagged nor optimised. Per request:

  1. wrap the base model in a fresh peft LoRA adapter (`LoraConfig` r=8, alpha=16 on q/k/v/o, dropout 0, peft's
     own init: A kaiming-uniform, B = 0, so step 1 is the base model); `torch.optim.AdamW` (lr 5e-3) over its
     parameters, gradients clipped to norm 1.0;
  2. N=5 times: prefill the chat-templated question (`model(..., use_cache=True)`); L=16 latent steps, each
     feeding the last layer's final-norm hidden state (`hidden_states[-1][:, -1]`), rescaled to the mean
     input-embedding norm (relat_core.latent.LatentMap "norm"), back as `inputs_embeds`; the reconstruction pass
     over the instruction + question with the question's prompt positions masked out of attention (a 2-D
     `attention_mask` with zeros there and explicit `position_ids`); loss = cross-entropy on the question's
     tokens; backward; clip; step;
  3. with the adapted weights and no graph: prefill and think again, the follow-up segment ("bridge"), then
     greedy decoding of exactly 64 answer tokens with the adapter on (the paper setting,
     adapter_during_answer=True), one `model(...)` call per token through `past_key_values`. EOS is ignored so
     that every request does the same work (the engine stops at EOS: compare tokens/s as well as requests/s);
  4. `unload()` the adapter, leaving the base model as loaded (checked once with a SHA-256 of every weight).

The token sequences are the engine's own: `relat_core.chat.ChatFormat(tokenizer).segments(...)` gives the prompt,
the question's first prompt position, the reconstruction ids and labels and the follow-up. Being naive, every
`model(...)` call computes the logits of every position it is given (also in latent steps, where none are used)
and returns all hidden states. The adapter's A is drawn from the global RNG (seeded per request), so later losses
differ from the engine's, whose A comes from its own generator; the first loss is the base model's in both and
must agree: `--check` asserts it to 1e-4 against the engine for the same question, and the checksum.

    python bench/naive.py [--requests 2] [--threads 1] [--check]
    python bench/naive.py --requests 1 --latent-steps 2 --steps 1 --max-tokens 4 --check   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from relat_core import load_model
from relat_core.chat import ChatFormat
from relat_core.loading import LoadedModel
from relat_core.params import RECONSTRUCTION_INSTRUCTION

DATA = Path(__file__).resolve().parent / "data" / "knowledge_dev.jsonl"
LATENT_STEPS, STEPS, ANSWER_TOKENS = 16, 5, 64  # the paper's L and N; the benchmark's answer length
LR, MAX_GRAD_NORM = 5e-3, 1.0
# peft asks transformers a deprecated question on every get_peft_model; the warning would split the table.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def lora_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def think(model: torch.nn.Module, prompt: torch.Tensor, latent_steps: int, target_norm: torch.Tensor):
    """Prefill the prompt (1, P) and run the latent thought; returns the KV cache and the last hidden state (1, d)."""
    out = model(input_ids=prompt, use_cache=True, output_hidden_states=True)
    cache, hidden = out.past_key_values, out.hidden_states[-1][:, -1]
    for _ in range(latent_steps):
        embed = hidden * (target_norm / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-6))  # (1, d)
        out = model(inputs_embeds=embed[:, None], past_key_values=cache, use_cache=True, output_hidden_states=True)
        cache, hidden = out.past_key_values, out.hidden_states[-1][:, -1]
    return cache, hidden


def reconstruction_loss(model: torch.nn.Module, cache, prompt_length: int, question_start: int,
                        recon: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of rebuilding the question after the latent thought, its prompt positions hidden."""
    past = cache.get_seq_length()
    mask = torch.ones(1, past + recon.shape[1], dtype=torch.long)
    mask[0, question_start:prompt_length] = 0  # the question and what follows it in the prompt: not visible
    positions = torch.arange(past, past + recon.shape[1])[None]
    out = model(input_ids=recon, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return F.cross_entropy(out.logits[0].float(), labels[0], ignore_index=-100)


def naive_request(loaded: LoadedModel, question: str, *, latent_steps: int = LATENT_STEPS, steps: int = STEPS,
                  max_tokens: int = ANSWER_TOKENS, seed: int = 0) -> dict:
    """One ReLAT request, start to end; returns seconds (total), first_token_s, train_s, losses (before each
    step) and the answer's tokens (always `max_tokens` of them: EOS is ignored)."""
    start = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    segments = ChatFormat(tokenizer).segments([{"role": "user", "content": question}], RECONSTRUCTION_INSTRUCTION,
                                              "bridge", latent=True)
    prompt = torch.tensor([segments.prompt_ids])
    recon = torch.tensor([segments.recon_ids])
    labels = torch.tensor([segments.recon_labels])
    target_norm = model.get_input_embeddings().weight.norm(dim=1).mean()

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config())
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            cache, _ = think(peft_model, prompt, latent_steps, target_norm)
            loss = reconstruction_loss(peft_model, cache, prompt.shape[1], segments.question_start, recon, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            losses.append(loss.item())
            del cache, loss
        train_s = time.perf_counter() - start

        tokens: list[int] = []
        first_token_s = None
        with torch.no_grad():
            cache, _ = think(peft_model, prompt, latent_steps, target_norm)
            out = peft_model(input_ids=torch.tensor([segments.follow_ids]), past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
            while len(tokens) < max_tokens:
                token = int(logits.argmax(-1))
                tokens.append(token)
                if first_token_s is None:
                    first_token_s = time.perf_counter() - start
                if len(tokens) < max_tokens:
                    out = peft_model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                    logits = out.logits[:, -1]
    finally:
        peft_model.unload()  # removes the LoRA layers; the base model's modules are put back as they were
    return {"seconds": time.perf_counter() - start, "first_token_s": first_token_s, "train_s": train_s,
            "losses": losses, "tokens": tokens}


# -- the smoke check --------------------------------------------------------------------------------------------

def weights_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def engine_first_loss(loaded: LoadedModel, question: str, latent_steps: int, steps: int) -> float:
    """The engine's step-1 reconstruction loss for the same question and setting (its first TrainStep)."""
    from relat_core import Engine, Request, SamplingParams, TrainStep, TTTParams

    engine = Engine(loaded)
    ttt = TTTParams(latent_steps=latent_steps, steps=steps, follow_up="bridge", adapter_during_answer=True)
    request = Request([{"role": "user", "content": question}], ttt, SamplingParams(max_tokens=1))
    if hasattr(engine, "generate"):
        events = engine.generate(request)
        try:
            return next(e.loss for e in events if isinstance(e, TrainStep))
        finally:
            events.close()
    engine.add_request("check", request)  # the step() API of issue 4
    while engine.has_unfinished_requests:
        for _, event in engine.step():
            if isinstance(event, TrainStep):
                engine.abort_request("check")
                return event.loss
    raise AssertionError("the engine finished without a training step")


def check(loaded: LoadedModel, question: str, latent_steps: int, steps: int, first_loss: float) -> dict:
    """Step-1 loss against the engine's (the base model in both); returns the figures for the report."""
    reference = engine_first_loss(loaded, question, latent_steps, steps)
    assert abs(first_loss - reference) < 1e-4, f"step-1 loss {first_loss:.6f} != engine's {reference:.6f}"
    return {"naive_step1": first_loss, "engine_step1": reference, "difference": abs(first_loss - reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2, help="questions, the first K of knowledge_dev.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latent-steps", type=int, default=LATENT_STEPS, help="L (smoke runs only)")
    parser.add_argument("--steps", type=int, default=STEPS, help="N (smoke runs only)")
    parser.add_argument("--max-tokens", type=int, default=ANSWER_TOKENS, help="answer tokens (smoke runs only)")
    parser.add_argument("--check", action="store_true",
                        help="assert the base weights unchanged and the step-1 loss equal to the engine's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from phases import machine_info  # bench/phases.py, beside this file

    questions = [json.loads(line)["question"] for line in DATA.open()][:args.requests]
    loaded = load_model(pack_weights=False)  # the plain transformers model: torch's linear, as users run it
    before = weights_checksum(loaded.model) if args.check else None
    print(" · ".join(f"{key}: {value}" for key, value in machine_info(args.threads).items()) + "\n")
    print(f"naive transformers + peft loop: L={args.latent_steps}, N={args.steps}, {args.max_tokens} answer tokens "
          "(EOS ignored), greedy, adapter on while answering\n")
    print("| # | question | total s | train s | first token s | ms/token | losses | answer |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for index, question in enumerate(questions):
        result = naive_request(loaded, question, latent_steps=args.latent_steps, steps=args.steps,
                               max_tokens=args.max_tokens)
        results.append(result)
        decode = result["seconds"] - result["first_token_s"]
        per_token = 1000 * decode / max(len(result["tokens"]) - 1, 1)
        answer = loaded.tokenizer.decode(result["tokens"], skip_special_tokens=True).replace("\n", " ")[:60]
        print(f"| {index} | {question[:40]} | {result['seconds']:.2f} | {result['train_s']:.2f} | "
              f"{result['first_token_s']:.2f} | {per_token:.0f} | {' '.join(f'{x:.3f}' for x in result['losses'])} "
              f"| {answer} |", flush=True)
    if args.check:
        assert weights_checksum(loaded.model) == before, "the base weights changed"
        print("\nbase weights unchanged (SHA-256 of every tensor before and after)")
        if results and args.steps:
            figures = check(loaded, questions[0], args.latent_steps, args.steps, results[0]["losses"][0])
            print(f"step-1 loss: naive {figures['naive_step1']:.6f}, engine {figures['engine_step1']:.6f}, "
                  f"|difference| {figures['difference']:.1e} (< 1e-4)")


if __name__ == "__main__":
    main()
