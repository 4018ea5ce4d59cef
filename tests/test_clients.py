"""Structured outputs and tools through real clients (issue 27), each pinned in constraints.txt, against a served
tiny random Qwen3 with a Hermes chat template: the openai SDK's `chat.completions.parse` with a pydantic model,
pydantic-ai's Agent with a structured output (its tool-call output mode: tool_choice required), and
langchain-openai's `with_structured_output` and `bind_tools`. A random model writes nonsense, so each answer is
valid only because the grammar made it so: the clients' own parsing and validation are the check."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from relat_core import Engine

from .conftest import build_tiny
from .server_support import KEY, ready_server
from .tool_support import with_tool_template

RELAT = {"method": "relat", "latent_steps": 1, "steps": 1, "gate": "none"}


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)


class GetWeather(BaseModel):
    """The weather in a city for the next days."""

    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def server(tokenizer):
    engine = Engine(with_tool_template(build_tiny("qwen3", tokenizer)), max_rank=8, num_slots=2)
    with ready_server(engine) as served:
        yield served


def test_openai_sdk_parse(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    completion = client.chat.completions.parse(
        model=server.model, messages=[{"role": "user", "content": "Who is Ann?"}], response_format=Person,
        max_completion_tokens=60, temperature=0, extra_body={"relat": RELAT})
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person) and completion.choices[0].finish_reason == "stop"


def test_openai_sdk_tool_call(server):
    from openai import OpenAI, pydantic_function_tool

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    completion = client.chat.completions.parse(
        model=server.model, messages=[{"role": "user", "content": "Register Ann."}],
        tools=[pydantic_function_tool(Person, name="register")], tool_choice="required", parallel_tool_calls=False,
        max_completion_tokens=80, temperature=0)
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "register" and isinstance(call.function.parsed_arguments, Person)


def test_pydantic_ai_agent_structured_output(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(server.model, provider=OpenAIProvider(base_url=f"{server.url}/v1", api_key=KEY))
    agent = Agent(model, output_type=Person, retries=0,
                  model_settings={"temperature": 0, "max_tokens": 80, "parallel_tool_calls": False,
                                  "extra_body": {"relat": RELAT}})
    result = agent.run_sync("Who is Ann?")
    assert isinstance(result.output, Person)


def test_langchain_with_structured_output_and_bound_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=server.model, base_url=f"{server.url}/v1", api_key=KEY, temperature=0, max_tokens=80,
                     extra_body={"relat": RELAT})
    person = llm.with_structured_output(Person).invoke("Who is Ann?")
    assert isinstance(person, Person)

    # A random model fills an unbounded string until the length limit: the tool's arguments are bounded.
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Paris?")
    assert not message.invalid_tool_calls, message
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather" and GetWeather(**call["args"])
