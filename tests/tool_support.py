"""A chat template with tool support for the tiny test models (their tokenizer's, SmolLM2's, has none): ChatML with
tools written into the system turn and calls in Hermes' <tool_call> tags, as Qwen2.5's and Qwen3's templates do."""

from __future__ import annotations

import copy

from relat_core import LoadedModel

HERMES_TEMPLATE = """
{%- if tools -%}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' -%}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' and loop.first -%}
{%- elif message.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' -%}
<|im_start|>assistant
{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


def with_tool_template(loaded: LoadedModel) -> LoadedModel:
    """The same model, its tokenizer a copy with the Hermes template (the fixture's tokenizer is shared)."""
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.chat_template = HERMES_TEMPLATE
    return LoadedModel(model=loaded.model, tokenizer=tokenizer, name=loaded.name)
