"""The chat template used when a model ships none (and by `mcserve init-model`): ChatML, with tools in
the Hermes convention.

Without tools it renders exactly plain ChatML (`<|im_start|>{role}\\n{content}<|im_end|>\\n` per
message). With `tools`, a system turn lists them as JSON (the conversation's own system message, if it
comes first, opens that turn) and says how to call one: a `<tool_call>` block holding
`{"name": ..., "arguments": {...}}`, the syntax server/api/tool_calls.py parses. An assistant turn
with `tool_calls` renders them as such blocks after its content; a `tool` message renders as a
`tool` turn wrapping its content in `<tool_response>`. `arguments` may be a JSON string (as OpenAI
sends it) or an object.
"""

from __future__ import annotations

DEFAULT_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou can call these functions (JSON Schema of each one\\'s arguments):\\n<tools>\\n' }}"
    "{%- for tool in tools %}"
    "{{- (tool['function'] if tool['function'] is defined else tool) | tojson }}{{- '\\n' }}"
    "{%- endfor %}"
    "{{- '</tools>\\n\\nTo call a function, answer with one block per call:\\n<tool_call>\\n'"
    " '{\"name\": \"<function name>\", \"arguments\": {<arguments as JSON>}}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + (message['content'] or '') + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set f = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (f['name'] | tojson) + ', \"arguments\": ' }}"
    "{{- f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
