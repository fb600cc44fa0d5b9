"""``--chat`` with OpenAI-style tool use: a request's / example's ``"tools"`` (function schemas)
given to the chat template as ``apply_chat_template(..., tools=tools)`` does, assistant turns
that are tool calls (``content`` null, ``tool_calls``), tool messages with their results."""
import json

import pytest

from prefix_attn.serve import RequestError, read_requests
from test_serve_chat import _write

# Hermes / Qwen-like: the tools written into the system part, tool calls as <tool_call> JSON
TOOLS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>' }}{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}"
    "{% elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}{{ '<tool_call>\n' + ({'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson) + '\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif m['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + m['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|im_start|>user\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_TURN = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"}]


def test_tool_calls_and_tool_messages_are_taken_as_they_are(tmp_path):
    """An assistant turn that is a tool call (content null, or left out) and the tool's result
    (with tool_call_id / name) go to the template untouched."""
    no_content = [TOOL_TURN[0], {"role": "assistant", "tool_calls": [CALL]}, TOOL_TURN[2]]
    f = _write(tmp_path / "r.jsonl", [json.dumps({"messages": TOOL_TURN}), json.dumps({"messages": no_content})])
    requests = read_requests(f)
    assert [r.messages for r in requests] == [TOOL_TURN, no_content]


@pytest.mark.parametrize("message, pattern", [
    ({"role": "assistant", "content": None}, r"messages\[1\]: 'content' must be a string; got null \(null or left "
                                             r"out only with a non-empty 'tool_calls'\)"),
    ({"role": "assistant", "content": None, "tool_calls": []}, r"messages\[1\]: 'content' must be a string; got null"),
    ({"role": "assistant", "tool_calls": {"a": 1}}, r"messages\[1\]: 'tool_calls' must be an array of objects .*got an object"),
    ({"role": "assistant", "tool_calls": [CALL, "x"]},
     r"messages\[1\]: 'tool_calls' must be an array of objects .*got an array holding a string"),
    ({"role": "user", "content": "a", "tool_calls": [CALL]}, r"messages\[1\]: 'tool_calls' only on an assistant message"),
])
def test_bad_tool_calls_are_refused_naming_file_and_line(tmp_path, message, pattern):
    line = {"messages": [TOOL_TURN[0], message, TOOL_TURN[2]]}
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "ok"}', json.dumps(line)])
    with pytest.raises(RequestError, match="r.jsonl:2: " + pattern):
        read_requests(f)
