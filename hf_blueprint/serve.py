"""Serve a Blueprint causal LM with an OpenAI-compatible API: transformers' own server (`transformers serve`), with
the Blueprint classes made visible where that server looks for them.

    python -m hf_blueprint.serve MODEL [transformers serve options: --host, --port, --device, --dtype, ...]
    python -m hf_blueprint.serve out/shakespeare --host 127.0.0.1 --port 8000

MODEL is a saved Blueprint causal LM folder or a Hub repo id; every option after it is `transformers serve`'s own
(`python -m hf_blueprint.serve --help` lists them). The endpoints are the server's: POST /v1/completions,
POST /v1/chat/completions (the tokenizer needs a chat template: see `hf_blueprint.chat`), streaming with
`"stream": true`, GET /v1/models, GET /health. `"temperature": 0` decodes greedily, as `generate(do_sample=False)`.

Why not `transformers serve MODEL` itself: its loader (`cli/serving/model_manager.py`, `ModelLoader._load_model`)
finds the model class as `getattr(transformers, config.architectures[0])`. A model outside transformers is not an
attribute of the `transformers` module, so the server fails with `module transformers has no attribute
BlueprintDecoderForCausalLM` even with `--trust-remote-code` (without it, it refuses the remote code first). This
command imports hf_blueprint (which registers the Blueprint configs and models with the Auto classes, so no remote
code runs) and sets each Blueprint model class as an attribute of the `transformers` module before the server
starts. transformers 5.25 loads the model in a process of its own, started with "spawn": that process imports this
module again (as `__mp_main__`, multiprocessing's rule for a program started with `python -m`), which sets the
attributes there too.
"""

from __future__ import annotations

import sys

import transformers
from transformers import AutoConfig, AutoTokenizer

import hf_blueprint

from .modeling_blueprint import BlueprintPreTrainedModel


__all__ = ["check_servable", "expose_blueprint_classes", "main"]

SERVED_ARCHITECTURE = "BlueprintDecoderForCausalLM"
INSTALL_HINT = 'pip install "transformers[serving]" (or: pip install "hf_blueprint[use]")'


def expose_blueprint_classes() -> list[str]:
    """Sets every Blueprint model class as an attribute of the `transformers` module, where transformers' server
    looks a config's architecture up. A name transformers already has is left alone. Returns the names set."""
    names = []
    for name in dir(hf_blueprint):
        value = getattr(hf_blueprint, name)
        is_model_class = isinstance(value, type) and issubclass(value, BlueprintPreTrainedModel)
        if not (is_model_class and name.startswith("Blueprint")):
            continue
        if getattr(transformers, name, value) is value:
            setattr(transformers, name, value)
            names.append(name)
    return names


def check_servable(model: str) -> None:
    """Raises a ValueError naming MODEL unless it is a Blueprint causal LM: the server generates text, which the
    encoders and classifiers do not, and its prompt handling is that of decoder-only models (an encoder-decoder's
    output does not start with the prompt)."""
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(f"MODEL {model}: cannot read its config ({' '.join(str(error).split())}).") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures or architectures[0] != SERVED_ARCHITECTURE:
        raise ValueError(f"MODEL {model}: model_type {config.model_type!r}, architectures {architectures}; "
                         f"hf_blueprint.serve serves a Blueprint causal LM ({SERVED_ARCHITECTURE}).")


def has_chat_template(model: str) -> bool:
    try:
        return AutoTokenizer.from_pretrained(model).chat_template is not None
    except (OSError, ValueError):
        return False


def _serve_app():
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError(f"serving needs fastapi, uvicorn and openai: {INSTALL_HINT}")
    from transformers.cli.transformers import app

    return app


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m hf_blueprint.serve MODEL [transformers serve options]"
    try:
        app = _serve_app()
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{usage}\n\n{__doc__.split(chr(10) + chr(10))[0]}\n\nThe options of transformers serve:\n")
        app(["serve", "--help"], prog_name="python -m hf_blueprint.serve", standalone_mode=False)
        return 0
    model = argv[0]
    if model.startswith("-"):
        print(f"error: the first argument must be MODEL, got the option {model!r}.\n{usage}", file=sys.stderr)
        return 2
    try:
        check_servable(model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not has_chat_template(model):
        print(f"note: the tokenizer of {model} has no chat template: /v1/chat/completions will answer 400 "
              f"(install one with `python -m hf_blueprint.chat {model}`); /v1/completions works.", file=sys.stderr)
    app(["serve", *argv], prog_name="python -m hf_blueprint.serve")  # runs until stopped; exits the process
    return 0


# Here, not under __main__: the model's process imports this module as __mp_main__ and needs the classes too.
expose_blueprint_classes()

if __name__ == "__main__":
    sys.exit(main())
