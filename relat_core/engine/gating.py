"""The gate: whether a relat request trains at all (issue 26).

Query reconstruction signals latent-state fidelity (the seed paper's principle, and ReLAT's, arXiv 2606.06252): the
reconstruction loss through the base model's own thought, l0, says whether the thought still holds the question,
and where the base model is sure of its answer, training can only churn it. So before training, a gated request
measures its signals and either trains (then answers as relat) or keeps direct's answer, at direct's cost plus the
signal's, with no adapter:

- "fidelity" trains when l0 > threshold: one graph-free forward of the thought and the reconstruction, base model;
- "confidence" trains when the draft's confidence < threshold. The draft is direct's answer itself, decoded as a
  row of the decoding batch for its first draft_tokens tokens (their text held back): a request the gate keeps
  goes on decoding it, so its answer is direct's token for token; a request that trains drops it, and its sampler
  is put back as it was before the draft (so its answer is the one gate "none" gives);
- "auto" trains when a linear score over both (AUTO_WEIGHTS, fitted on search halves only) > threshold.

Every gated request's trace has `gated`, the gate's signal against its threshold (`gate`), and the signals it
measured (`signals`: l0, the draft's mean entropy, top-1 margin, mean logprob and confidence; after training, the
loss drop l0 - l_N and whether the adapted answer's first tokens agree with the draft). The gate applies to a
single model answering once without guidance (agents "single", n 1, guidance 1); other requests train as with
gate "none", and their trace's `gate` is None.
"""

from __future__ import annotations

import math
import time

import torch

from ..params import SamplingParams, TTTParams
from .context import EngineContext
from .rows import _Draft, _Sequence
from .training import Trainer

# Each gate's default threshold, used where a request leaves gate_threshold None: chosen on the search halves of
# four knowledge sets (235 questions; the code tasks' search half no worse than direct) by bench/gate.py, never on
# the halves that report them (bench/RESULTS.md, section 18). Measured on SmolLM2-135M: l0 and the draft's
# confidence are on the model's own scale.
DEFAULT_THRESHOLDS: dict[str, float] = {"fidelity": 3.7532, "confidence": 0.8834, "auto": 0.1199}
# auto's score, trained where score > threshold: a ridge regression of relat's gain over direct (+1, 0, -1) on the
# signals measured before training, fitted on the same search halves (bench/gate.py, fit_auto).
AUTO_WEIGHTS: dict[str, float] = {"bias": -0.6960, "l0": 0.0427, "draft_entropy": -0.0093, "draft_margin": 0.7052,
                                  "draft_logprob": -0.3467}
SIGNAL_OF = {"fidelity": "l0", "confidence": "draft_confidence", "auto": "auto_score"}


def applies(ttt: TTTParams, sampling: SamplingParams, scored: bool = False) -> bool:
    """Whether the request's gate runs: relat that trains, one model, one answer, no guidance.

    logprob_shift does not stop it, and is served in full: a kept answer is direct's, the base model's on the plain
    prompt, so its shift is 0 at every token, which is the truth (read from its own logits, no plain row: rows.py's
    needs_plain_row); a request the gate trains answers afresh after training with its plain row beside it."""
    # A request scoring continuations (completion.py) decodes no answer of its own: its n rows are its options,
    # whose one training the fidelity gate (the only gate it may have) decides from l0 alone.
    return ttt.trains and ttt.gate != "none" and ttt.agents == "single" and (sampling.n == 1 or scored) \
        and not ttt.guided


def threshold(ttt: TTTParams) -> float:
    return DEFAULT_THRESHOLDS[ttt.gate] if ttt.gate_threshold is None else ttt.gate_threshold


def auto_score(signals: dict[str, float]) -> float:
    return AUTO_WEIGHTS["bias"] + sum(weight * signals[name] for name, weight in AUTO_WEIGHTS.items()
                                      if name != "bias")


class Gate:
    """Runs the gate of the requests that have one: l0 in the "gate" phase, then the draft in the decoding batch
    (`settle`, called by the Answerer when a draft is complete); a request leaves for training or stays direct."""

    def __init__(self, context: EngineContext, trainer: Trainer):
        self.context = context
        self.trainer = trainer

    def start(self, sequence: _Sequence, slot: int) -> None:
        """A gated request joins with its leased slot, kept until the gate decides: it measures l0 first
        ("gate" phase) or goes straight to its draft."""
        sequence.slot = slot
        sequence.trace.gate = {"kind": sequence.ttt.gate, "signal": SIGNAL_OF[sequence.ttt.gate],
                               "threshold": threshold(sequence.ttt)}
        if sequence.ttt.gate == "confidence":
            self._draft(sequence)
        else:
            sequence.phase = "gate"

    def run(self, rows: list[_Sequence]) -> list:
        """l0 of every row as one graph-free batch through the base model: the whole latent thought, then the
        question rebuilt from it (the loss a first training step would report). fidelity decides here; auto
        goes on to its draft. Nothing changes until the forward has succeeded."""
        context = self.context
        start = time.perf_counter()
        with torch.no_grad(), context._bind(rows, [False] * len(rows)):
            state, _ = self.trainer._think(rows)  # the thought a first training step runs, without its graph
            losses = context._reconstruction(rows, state).tolist()
        seconds = time.perf_counter() - start
        for row, loss in zip(rows, losses, strict=True):
            row.trace.signals["l0"] = loss
            row.trace.timings["gate_s"] = seconds
            if row.ttt.gate == "fidelity":
                self._decide(row, train=not math.isfinite(loss) or loss > threshold(row.ttt))
            else:
                self._draft(row)
        return []

    def _draft(self, row: _Sequence) -> None:
        """Decode direct's answer for draft_tokens tokens (the Thinker prefills the prompt without an adapter)."""
        row.gate_draft = _Draft(row.ttt.draft_tokens, row.generator.get_state(), time.perf_counter())
        row.phase = "think"

    def settle(self, row: _Sequence) -> bool:
        """The draft is complete (draft_tokens tokens, or direct's answer ended sooner): decide. Returns True when
        the request keeps direct's answer (its held text is released and it goes on decoding), False when it
        trains (it leaves the decoding batch; its answer starts again after training)."""
        draft = row.gate_draft
        signals = row.trace.signals
        signals.update(draft.statistics())
        row.trace.timings["gate_s"] = row.trace.timings.get("gate_s", 0.0) + time.perf_counter() - draft.start
        if row.ttt.gate == "auto":
            signals["auto_score"] = auto_score(signals)
        value = signals[SIGNAL_OF[row.ttt.gate]]
        train = value < threshold(row.ttt) if row.ttt.gate == "confidence" else value > threshold(row.ttt)
        draft.tokens = list(row.tokens)
        draft.settled = True
        if train:
            row.generator.set_state(draft.generator_state)
            row.tokens, row.detokenizer, row.prompt_tokens, draft.held = [], None, 0, []
            row.logprobs, row.unsent_logprobs = [], []
            for phase in ("train_s", "think_s", "first_token_s"):  # measured again on the way to the answer
                row.trace.timings.pop(phase, None)
        self._decide(row, train)
        return not train

    def _decide(self, row: _Sequence, train: bool) -> None:
        """Train (the slot goes to the trainer: fresh, or the adapter cache's) or keep direct (the slot goes back).
        A row kept after its l0 alone (fidelity) answers as direct: prompt alone, no adapter."""
        trace = row.trace
        trace.gated = not train
        trace.gate["value"] = trace.signals[SIGNAL_OF[row.ttt.gate]]
        trace.gate["gated"] = not train
        slot, row.slot = row.slot, None
        if train:
            self.trainer.start(row, slot)  # gives the slot back itself if it fails
            return
        self.context.bank.release(slot)
        trace.answer_context, trace.latent_steps, trace.contrastive_eta = "question", 0, 0.0
        if row.phase == "gate":
            row.phase = "think"
