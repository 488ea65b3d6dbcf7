"""A default chat template for Blueprint language models, and how to install one on a tokenizer.

Tokenizers trained by the recipes have no chat template, so `apply_chat_template`, `transformers chat` and a server's
`/v1/chat/completions` refuse them. `DEFAULT_CHAT_TEMPLATE` writes a conversation as plain role-tagged lines, text
that any tokenizer trained on ordinary text can encode (no special tokens needed), and ends with the generation
prompt:

    System: You are a helpful assistant.
    User: Who are you?
    Assistant: A small model.</s>
    User: Say more.
    Assistant:

Each assistant turn ends with the tokenizer's EOS token when it has one, so that a model fine-tuned on conversations
learns to stop there. A message's content is a string, or a list of OpenAI-style parts whose `text` parts are joined
with spaces.

    from hf_blueprint.chat import install_chat_template
    install_chat_template(tokenizer)                       # the default template
    install_chat_template(tokenizer, "my_template.jinja")  # a Jinja file (or the template text itself)
    tokenizer.save_pretrained(folder)                      # saved with it (chat_template.jinja)

    python -m hf_blueprint.chat FOLDER [--template FILE]   # installs it into a saved model's tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


__all__ = ["DEFAULT_CHAT_TEMPLATE", "install_chat_template", "main", "read_chat_template"]

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{{- message['role'] | capitalize + ': ' + text | trim -}}"
    "{%- if message['role'] == 'assistant' and eos_token -%}{{- eos_token -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

# A conversation that every template must render: one turn of each role, with the generation prompt.
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "A small model."},
    {"role": "user", "content": "Say more."},
]


def read_chat_template(template: str | os.PathLike | None) -> str:
    """The template text: `DEFAULT_CHAT_TEMPLATE` for None; a string with Jinja markup (`{{` or `{%`) as it is; any
    other string or path names a file to read."""
    if template is None:
        return DEFAULT_CHAT_TEMPLATE
    if isinstance(template, str) and ("{{" in template or "{%" in template):
        return template
    path = Path(template)
    if not path.is_file():
        raise FileNotFoundError(f"chat template: {str(path)!r} is neither a file nor Jinja text (no {{{{ or {{% in "
                                f"it).")
    return path.read_text(encoding="utf-8")


def install_chat_template(tokenizer, template: str | os.PathLike | None = None):
    """Sets `tokenizer.chat_template` to `template` (see `read_chat_template`; default `DEFAULT_CHAT_TEMPLATE`)
    after rendering a sample conversation with it, so that a broken template fails here and not at the first chat
    request. Warns when the rendered role tags encode to the unknown token (a vocabulary without those characters).
    Returns the tokenizer."""
    text = read_chat_template(template)
    try:
        rendered = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, chat_template=text, add_generation_prompt=True,
                                                 tokenize=False)
    except Exception as error:  # jinja2's TemplateError and what the template itself raises
        raise ValueError(f"chat template: it does not render a sample conversation ({type(error).__name__}: "
                         f"{error}).") from None
    unknown = tokenizer.unk_token_id
    if unknown is not None and unknown in tokenizer(rendered, add_special_tokens=False)["input_ids"]:
        warnings.warn(f"chat template: the tokenizer encodes part of a rendered conversation as the unknown token "
                      f"{tokenizer.unk_token!r} (its vocabulary lacks some characters of the role tags); the model "
                      f"will not tell the roles apart well.", stacklevel=2)
    tokenizer.chat_template = text
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_blueprint.chat",
        description="Install a chat template (default: hf_blueprint.chat.DEFAULT_CHAT_TEMPLATE) into the tokenizer "
                    "of a saved model folder, so that apply_chat_template, `transformers chat` and "
                    "`python -m hf_blueprint.serve` can chat with it.",
    )
    parser.add_argument("folder", metavar="FOLDER", help="a model folder with its tokenizer files")
    parser.add_argument("--template", help="a Jinja file to install instead of the default template")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"error: FOLDER {folder} is not a folder.", file=sys.stderr)
        return 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        install_chat_template(tokenizer, Path(args.template) if args.template else None)
    except (OSError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    tokenizer.save_pretrained(folder)
    print(f"installed the chat template into {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
