"""Evaluation prompts, following LLaVA-1.5's evaluation scripts, and the LLaVA-1.5 chat format.

ScienceQA: context, question, lettered options, then "Answer with the option's letter from the given
choices directly."; VizWiz: question, then the unanswerable instruction and "Answer the question using a
single word or phrase."; MM-Vet and LLaVA-Bench: the question as is. The chat turn is
``USER: <image>\\n{prompt} ASSISTANT:`` (llava-hf/llava-1.5-7b-hf's template).
"""

from __future__ import annotations

from ellava_lib.core.schema import OPTION_LETTERS, Sample

SQA_SUFFIX = "Answer with the option's letter from the given choices directly."
VIZWIZ_SUFFIX = ("When the provided information is insufficient, respond with 'Unanswerable'.\n"
                 "Answer the question using a single word or phrase.")
# Jinja chat template in the llava-hf layout (a user turn holds an image entry and a text entry).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def question_text(sample: Sample) -> str:
    """The benchmark prompt for one sample (without the chat wrapper)."""
    if sample.suite == "sqa":
        options = "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(sample.choices))
        context = f"Context: {sample.context}\n" if sample.context else ""
        return f"{context}{sample.question}\n{options}\n{SQA_SUFFIX}"
    if sample.suite == "vizwiz":
        return f"{sample.question}\n{VIZWIZ_SUFFIX}"
    return sample.question


def chat_prompt(text: str, with_image: bool = True) -> str:
    """One LLaVA-1.5 user turn followed by the assistant cue: ``USER: <image>\\n{text} ASSISTANT:``."""
    image = "<image>\n" if with_image else ""
    return f"USER: {image}{text} ASSISTANT:"


def sample_prompt(sample: Sample) -> str:
    """The full generation prompt of a sample."""
    return chat_prompt(question_text(sample), with_image=sample.image is not None)
