"""`relat ask` on a local model folder."""

from __future__ import annotations

import json
from pathlib import Path

from relat_server.cli import build_parser, main
from relat_server.settings import TTT_FIELDS, ttt_fields_from_arguments

from .conftest import build_tiny
from .huginn_support import published_tensors, write_checkpoint


def tiny_folder(tokenizer, folder: Path, architecture: str = "qwen3") -> str:
    tiny = build_tiny(architecture, tokenizer)
    tiny.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_ask_has_a_flag_for_every_ttt_option_and_sends_only_those_given():
    args = build_parser().parse_args(["ask", "q"])
    assert all(getattr(args, name) is None for name in TTT_FIELDS) and ttt_fields_from_arguments(args) == {}
    args = build_parser().parse_args(["ask", "q", "--agents", "sequential", "--agent-max-tokens", "7",
                                      "--answer-format", "boxed", "--targets", "q_proj,v_proj",
                                      "--no-adapter-during-answer", "--lr", "0.01"])
    assert ttt_fields_from_arguments(args) == {"agents": "sequential", "agent_max_tokens": 7, "answer_format": "boxed",
                                               "targets": ("q_proj", "v_proj"), "adapter_during_answer": False,
                                               "lr": 0.01}


def test_ask_streams_answer_and_prints_trace(tokenizer, tmp_path, capsys):
    model = tiny_folder(tokenizer, tmp_path)
    code = main(["ask", "What is two plus two?", "--model", model, "--steps", "2", "--latent-steps", "3",
                 "--max-tokens", "4", "--mapping", "soft", "--soft-top-k", "20", "--guidance", "0.5",
                 "--contrastive-eta", "0.25", "--answer-context", "thought"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip(), "the answer is printed"
    assert "step 1: loss" in err and "step 2: loss" in err and "reconstruction loss" in err
    assert "answer_context=thought guidance=0.5 contrastive_eta=0.25" in err

    code = main(["ask", "What is two plus two?", "--model", model, "--method", "direct", "--json",
                 "--max-tokens", "3"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["trace"]["method"] == "direct" and result["usage"]["completion_tokens"] <= 3


def test_ask_refuses_bad_parameters(tokenizer, tmp_path, capsys):
    model = tiny_folder(tokenizer, tmp_path, "qwen2")
    assert main(["ask", "hi", "--model", model, "--steps", "-3"]) == 2
    assert "steps must be" in capsys.readouterr().err


def test_ask_with_agents_prints_a_line_per_agent_and_the_turns(tokenizer, tmp_path, capsys):
    model = tiny_folder(tokenizer, tmp_path)
    code = main(["ask", "What is two plus two?", "--model", model, "--agents", "sequential", "--method", "latent",
                 "--latent-steps", "2", "--max-tokens", "3", "--answer-format", "boxed"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip()
    for role in ("planner", "critic", "refiner"):
        assert f"[{role}] latent, " in err and ", 2 latent positions, " in err  # as each agent finishes
        assert f"  agent {role}: latent, " in err  # and in the trace
    assert "agents=sequential answer_format=boxed" in err and "  agent judger: answer, " in err

    code = main(["ask", "What is two plus two?", "--model", model, "--agents", "hierarchical", "--method", "direct",
                 "--agent-max-tokens", "3", "--max-tokens", "2"])
    err = capsys.readouterr().err
    lines = {line.split("]")[0][1:]: line for line in err.splitlines() if line.startswith("[")}
    assert code == 0 and set(lines) == {"maths", "science", "code"}
    assert all(", 3 tokens, " in line and "s: " in line for line in lines.values())  # the start of each text


def test_ask_agent_prompts_change_the_agents_turns_and_a_bad_file_is_refused(tokenizer, tmp_path, capsys):
    model = tiny_folder(tokenizer, tmp_path / "model")
    ask = ["ask", "What is two plus two?", "--model", model, "--agents", "sequential", "--method", "latent",
           "--latent-steps", "1", "--max-tokens", "1", "--json"]

    def planner_and_critic_prompt_tokens(*flags: str) -> list[int]:
        assert main([*ask, *flags]) == 0
        turns = json.loads(capsys.readouterr().out)["trace"]["agent_turns"]
        return [turn["prompt_tokens"] for turn in turns[:2]]

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"roles": {"planner": "{question}"}}))  # the bare question: a shorter turn
    default = planner_and_critic_prompt_tokens()
    custom = planner_and_critic_prompt_tokens("--agent-prompts", str(prompts))
    assert custom[0] < default[0] and custom[1] == default[1]

    prompts.write_text(json.dumps({"roles": {"planner": "no placeholder"}}))
    assert main([*ask, "--agent-prompts", str(prompts)]) == 2
    assert "--agent-prompts" in capsys.readouterr().err
    # A server's prompts are its own setting: refused before any request is sent (nothing listens there).
    assert main(["ask", "hi", "--url", "http://127.0.0.1:9", "--agent-prompts", str(prompts)]) == 2
    assert "relat serve --agent-prompts" in capsys.readouterr().err


def test_the_trace_says_whether_the_adapter_came_from_the_cache():
    import io

    from relat_server.cli import print_trace

    trace = {"method": "relat", "latent_steps": 2, "adapter_during_answer": False, "answer_context": "question",
             "guidance": 1.0, "contrastive_eta": 0.0, "steps": [{"step": 1, "loss": 2.0, "grad_norm": 1.0,
                                                                   "seconds": 0.5}]}
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    shown = {}
    for cache in ("hit", "miss", None):
        stream = io.StringIO()
        print_trace({**trace, "cache": cache}, usage, stream)
        shown[cache] = stream.getvalue()
    assert "adapter cache: hit (no training ran" in shown["hit"] and "adapter cache: miss" in shown["miss"]
    assert "adapter cache" not in shown[None]


def test_ask_runs_a_huginn_folder_at_the_depth_it_is_given(tokenizer, tmp_path, capsys):
    folder = write_checkpoint(tmp_path / "raven", published_tensors(len(tokenizer)), len(tokenizer))
    tokenizer.save_pretrained(folder)
    code = main(["ask", "What is two plus two?", "--model", str(folder), "--method", "latent", "--latent-steps", "2",
                 "--num-steps", "3", "--max-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 0 and "recurrences per answer position: mean 3.0  min 3  max 3  (num_steps 3, exit none)" in err
    assert main(["ask", "hi", "--model", tiny_folder(tokenizer, tmp_path / "qwen"), "--num-steps", "3"]) == 2
    assert "num_steps applies to recurrent-depth models" in capsys.readouterr().err
