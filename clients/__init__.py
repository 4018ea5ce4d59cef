"""relat_client: a small httpx client for the relat server (depends on neither relat_core nor relat_server).

    from relat_client import AgentTurn, RelatClient, TrainStep, Token, Done

    with RelatClient("http://127.0.0.1:8000", api_key="sk-...") as client:
        for event in client.stream("Why is the sky blue?", steps=3, agents="sequential"):
            if isinstance(event, TrainStep):
                print(f"step {event.step}/{event.steps} loss {event.loss:.3f}")
            elif isinstance(event, AgentTurn):
                print(f"[{event.role} done: {event.kind}]")
            elif isinstance(event, Token):
                print(event.text, end="", flush=True)
            elif isinstance(event, Done):
                print(event.result["trace"]["recon_loss_after"])

`AsyncRelatClient` has the same methods as coroutines and async iterators. For the OpenAI Chat Completions
endpoint, the official `openai` package works as is (the `relat` options go in `extra_body`).
"""

from .client import (
    AgentTurn,
    AsyncRelatClient,
    Done,
    Event,
    RelatClient,
    RelatError,
    Token,
    TrainStep,
)

__all__ = ["AgentTurn", "AsyncRelatClient", "Done", "Event", "RelatClient", "RelatError", "Token", "TrainStep"]
