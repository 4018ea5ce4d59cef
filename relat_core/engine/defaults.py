"""The engine's defaults: a request's TTT parameters per model size (bench/RESULTS.md, sections 3 and 7), a
recurrent-depth model's own recurrence options (Huginn, arXiv 2502.05171), and the seed adapters are drawn from.
"""

from __future__ import annotations

from ..models.huginn import HuginnForCausalLM
from ..params import TTTParams

DEFAULT_ADAPTER_SEED = 0  # adapters are drawn from the request's seed, else this: same request, same answer


def default_ttt_params(num_parameters: int) -> TTTParams:
    """The engine's default for a model of this size (bench/RESULTS.md, sections 3 and 7).

    Below 1B parameters: measured on SmolLM2-135M. L=4, N=2 and lr 5e-3 come from the first search; the second
    (issue 9), chosen on the search half of 319 knowledge questions and reported on the other half, answers from
    the question alone with the adapted model (answer_context "question"): this model reads its own latent thought
    badly (latent trails direct), and the thought then serves only to train the adapter. The third (issue 26),
    chosen the same way on 404 knowledge questions and kept no worse than direct on code, trains only where the
    base model's thought has lost the question (gate "fidelity": l0 above gating.DEFAULT_THRESHOLDS) and answers
    the rest as direct does (bench/RESULTS.md, section 18). l0's scale is the model's own: on another small
    model, measure its l0 (the trace's signals) before trusting the threshold.
    From 1B on, unmeasured here (no GPU, no large weights): the paper's published L=16 and N=5 (rank 8 is common to
    both), and no gate (a threshold measured on SmolLM2 means nothing there); of the choices the paper leaves open,
    the answer follows the thought, the adapter stays off while answering (an adapter trained to rebuild the
    question pulls answers toward repeating it, whatever the size), and the bridge replaces the restatement, which
    made up for a small model that reads its own latents badly.
    """
    if num_parameters < 1_000_000_000:
        return TTTParams(answer_context="question", gate="fidelity")
    return TTTParams(latent_steps=16, steps=5, follow_up="bridge")


def recurrence_defaults(model: HuginnForCausalLM) -> dict[str, object]:
    """A recurrent-depth model's own defaults for the options a request leaves None: its config's mean depth and
    truncation, Huginn's initial-state scale, no adaptive exit."""
    config = model.config
    return {"num_steps": config.mean_recurrence, "init_scale": 1.0, "exit_criterion": "none",
            "backprop_depth": config.mean_backprop_depth}
