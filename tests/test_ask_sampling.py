"""`relat ask`'s sampling flags (penalties, --logit-bias ID=BIAS, --logprobs, --top-logprobs) and --logprob-shift, on
a local tiny model folder and against a server: the flags reach the request, a bias of 100 makes its token the
answer, and the logprobs table (with the base model's logprob and the shift) matches the result's numbers."""

from __future__ import annotations

import json
import re

import pytest
from relat_server.ask_options import print_logprobs, sampling_fields_from_arguments, wire
from relat_server.cli import build_parser, main

from relat_core import Engine

from .conftest import build_tiny
from .server_support import KEY, one_torch_thread, ready_server
from .test_cli import tiny_folder

QUESTION = "What is two plus two?"
TRAIN = ["--steps", "2", "--latent-steps", "2", "--lr", "0.05", "--gate", "none", "--answer-format", "text"]
ROW = re.compile(r"^\s*(\d+)  (\".*?\")\s+(-?\d+\.\d{4})(?:\s+(-?\d+\.\d{4})\s+([+-]\d+\.\d{4}))?")


def test_the_flags_become_sampling_fields_and_only_those_given():
    parse = build_parser().parse_args
    assert sampling_fields_from_arguments(parse(["ask", "q"])) == {}
    args = parse(["ask", "q", "--presence-penalty", "0.5", "--frequency-penalty", "-1", "--logit-bias", "198=-100",
                  "--logit-bias", "7=2.5", "--top-logprobs", "3"])
    fields = sampling_fields_from_arguments(args)
    assert fields == {"presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {198: -100.0, 7: 2.5},
                      "top_logprobs": 3, "logprobs": True}  # top_logprobs turns logprobs on
    assert wire(fields)["logit_bias"] == {"198": -100.0, "7": 2.5}
    assert sampling_fields_from_arguments(parse(["ask", "q", "--logprob-shift"])) == {"logprobs": True}
    assert sampling_fields_from_arguments(parse(["ask", "q", "--no-logprob-shift"])) == {}
    assert sampling_fields_from_arguments(parse(["ask", "q", "--logprobs"])) == {"logprobs": True}


@pytest.mark.parametrize("flag", ["x=1", "12", "=3", "5=high"])
def test_a_malformed_logit_bias_is_a_usage_error(flag, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["ask", "q", "--logit-bias", flag])
    assert exited.value.code == 2 and "TOKEN_ID=BIAS" in capsys.readouterr().err


def table_rows(err: str) -> list[tuple]:
    rows = []
    for line in err.splitlines():
        match = ROW.match(line)
        if match:
            position, token, logprob, base, shift = match.groups()
            rows.append((int(position), json.loads(token), float(logprob), base and float(base),
                         shift and float(shift)))
    return rows


def assert_table_matches(err: str, content: list[dict], shifted: bool) -> None:
    rows = table_rows(err)
    assert [row[0] for row in rows] == list(range(len(content))) and content
    for (_, token, logprob, base, shift), entry in zip(rows, content, strict=True):
        assert token == entry["token"] and logprob == pytest.approx(entry["logprob"], abs=1e-4)
        if shifted:
            assert base == pytest.approx(entry["relat_base_logprob"], abs=1e-4)
            assert shift == pytest.approx(entry["logprob"] - entry["relat_base_logprob"], abs=2e-4)
        else:
            assert base is None and "relat_base_logprob" not in entry


def test_ask_prints_the_logprobs_and_shifts_locally(tokenizer, tmp_path, capsys):
    model = tiny_folder(tokenizer, tmp_path)
    ask = ["ask", QUESTION, "--model", model, "--max-tokens", "4", *TRAIN, "--logprob-shift", "--top-logprobs", "2"]
    assert main([*ask, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    content = result["logprobs"]["content"]
    assert len(content) == result["usage"]["completion_tokens"] and all(len(e["top_logprobs"]) == 2 for e in content)
    assert result["trace"]["options"]["logprob_shift"] is True
    assert main(ask) == 0  # the same request (the adapter's seed is fixed): the same numbers, as a table
    out, err = capsys.readouterr()
    assert out.strip() == result["answer"].strip()
    assert "shift: logprob - base" in err and "mean shift" in err and "top: " in err
    assert_table_matches(err, content, shifted=True)
    assert main(["ask", QUESTION, "--model", model, "--max-tokens", "3", "--method", "direct"]) == 0
    assert "logprobs of the answer" not in capsys.readouterr().err  # not asked for: no table


def test_a_bias_of_100_makes_its_token_the_answer_and_bad_values_are_refused(tokenizer, tmp_path, capsys):
    model = tiny_folder(tokenizer, tmp_path)
    token = tokenizer.encode(" four")[0]
    assert main(["ask", QUESTION, "--model", model, "--method", "direct", "--max-tokens", "3", "--json",
                 "--logit-bias", f"{token}=100", "--frequency-penalty", "0.5", "--logprobs"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [entry["token"] for entry in result["logprobs"]["content"]] == [tokenizer.decode([token])] * 3
    assert main(["ask", QUESTION, "--model", model, "--logit-bias", f"{token}=300"]) == 2
    assert "logit_bias" in capsys.readouterr().err
    assert main(["ask", QUESTION, "--model", model, "--presence-penalty", "3"]) == 2
    assert "presence_penalty must be" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(tokenizer):
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1))) as served:
        yield served


def test_ask_url_sends_the_flags_and_prints_the_same_table(server, capsys):
    ask = ["ask", QUESTION, "--url", server.url, "--api-key", KEY, "--max-tokens", "4", *TRAIN]
    assert main([*ask, "--logprob-shift", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main([*ask, "--logprob-shift"]) == 0
    assert_table_matches(capsys.readouterr().err, result["logprobs"]["content"], shifted=True)
    assert main([*ask, "--logprobs"]) == 0  # the shift changes no answer: the same tokens, without the base column
    unshifted = [{key: value for key, value in entry.items() if key != "relat_base_logprob"}
                 for entry in result["logprobs"]["content"]]
    assert_table_matches(capsys.readouterr().err, unshifted, shifted=False)
    assert main([*ask, "--logit-bias", "5=300"]) == 1
    assert "server error 400" in capsys.readouterr().err


def test_the_table_shows_tokens_as_json_strings():
    import io

    stream = io.StringIO()
    print_logprobs([{"token": " a\n", "logprob": -0.5, "relat_base_logprob": -1.25, "top_logprobs": []},
                    {"token": "b", "logprob": -2.0, "relat_base_logprob": -1.0, "top_logprobs": []}], stream)
    rows = table_rows(stream.getvalue())
    assert rows == [(0, " a\n", -0.5, -1.25, 0.75), (1, "b", -2.0, -1.0, -1.0)]
    assert "mean shift -0.1250  largest -1.0000" in stream.getvalue()
