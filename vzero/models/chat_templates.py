"""Chat templates of the four Qwen-VL families, as Jinja strings (pure data: no imports).

The tiny model directories carry these (their tokenizer and processor files), so every prompt goes through the
same `apply_chat_template` path as a real checkpoint, whose own template ships in its directory. What differs
between the families (`vzero.models.families` records it per family):
- Qwen2-VL / Qwen2.5-VL (`QWEN2_VL`, Qwen/Qwen2-VL-7B-Instruct's chat_template.json unchanged): a conversation
  without a system turn gets "You are a helpful assistant." inserted by the template itself.
- Qwen3-VL (`QWEN3_VL`): no default system turn; `enable_thinking` is ignored (the Instruct template has none).
- Qwen3.5 (`QWEN3_5`): no default system turn; the generation prompt opens a reasoning block: `<think>\n` by default
  (the model thinks), `<think>\n\n</think>\n\n` with `enable_thinking=False` (an empty, closed block: it answers
  directly; the authors train like this).
The Qwen3 templates are reduced to what this project renders (system / user / assistant turns with text, image and
video parts, `add_vision_id`); the released ones also render tool calls and strip earlier reasoning.
"""

from __future__ import annotations

# Qwen2-VL-Instruct's chat template (chat_template.json of Qwen/Qwen2-VL-7B-Instruct), unchanged.
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL / Qwen3.5 turns: a system turn only when the conversation has one.
_QWEN3_TURNS = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' + image_count.value|string + ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' + video_count.value|string + ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
)

QWEN3_VL = _QWEN3_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"

QWEN3_5 = _QWEN3_TURNS + (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
    "{%- else %}{{- '<think>\n' }}{%- endif %}"
    "{%- endif %}"
)
