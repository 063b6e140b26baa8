"""Evaluation prompts, following LLaVA-1.5's evaluation scripts, and the LLaVA-1.5 chat format.

ScienceQA: context, question, lettered options, then "Answer with the option's letter from the given
choices directly."; VizWiz: question, then the unanswerable instruction and "Answer the question using a
single word or phrase."; MM-Vet and LLaVA-Bench: the question as is.

Conversation formats (:data:`PROMPT_FORMATS`), one user turn with the image and the assistant cue:

* ``vicuna_v1``: ``{system} USER: <image>\\n{prompt} ASSISTANT:`` with :data:`VICUNA_V1_SYSTEM`. LLaVA-1.5's
  evaluation scripts (haotian-liu/LLaVA ``scripts/v1_5/eval/*.sh``: ``--conv-mode vicuna_v1``) build it with
  ``llava/conversation.py`` ``conv_vicuna_v1`` (``SeparatorStyle.TWO``: system, ``" "``, then ``ROLE: message``
  turns separated by ``" "``, the open assistant turn as ``ASSISTANT:``), the image token first in the user
  message (``model_vqa_loader.py``: ``"<image>\\n" + question``). The real benchmarks' default.
* ``llava_v1``: the same layout with ``conv_llava_v1``'s system line (:data:`LLAVA_V1_SYSTEM`: "human" where
  vicuna_v1 says "user"; the default ``--conv-mode`` of ``model_vqa.py``, not what the v1.5 scripts pass).
* ``hf``: ``USER: <image>\\n{prompt} ASSISTANT:``, llava-hf/llava-1.5-7b-hf's chat template (no system line);
  the synthetic suites and the kit's own models are trained on it.
"""

from __future__ import annotations

from ellava_lib.core.schema import OPTION_LETTERS, Sample

SQA_SUFFIX = "Answer with the option's letter from the given choices directly."
VIZWIZ_SUFFIX = ("When the provided information is insufficient, respond with 'Unanswerable'.\n"
                 "Answer the question using a single word or phrase.")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
#: Conversation format -> its system line ("" = none).
SYSTEM_LINES: dict[str, str] = {"vicuna_v1": VICUNA_V1_SYSTEM, "llava_v1": LLAVA_V1_SYSTEM, "hf": ""}
PROMPT_FORMATS: tuple[str, ...] = tuple(SYSTEM_LINES)
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


def default_prompt_format(data: str) -> str:
    """``vicuna_v1`` (LLaVA-1.5's evaluation) for the real benchmarks, ``hf`` for the synthetic suites."""
    return "vicuna_v1" if data == "real" else "hf"


def chat_prompt(text: str, with_image: bool = True, fmt: str = "hf") -> str:
    """One user turn followed by the assistant cue: ``USER: <image>\\n{text} ASSISTANT:``, preceded by the
    format's system line and one space (``vicuna_v1`` / ``llava_v1``; see the module docstring)."""
    if fmt not in SYSTEM_LINES:
        raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    image = "<image>\n" if with_image else ""
    turn = f"USER: {image}{text} ASSISTANT:"
    return f"{SYSTEM_LINES[fmt]} {turn}" if SYSTEM_LINES[fmt] else turn


def sample_prompt(sample: Sample, fmt: str = "hf") -> str:
    """The full generation prompt of a sample in conversation format ``fmt``."""
    return chat_prompt(question_text(sample), with_image=sample.image is not None, fmt=fmt)
