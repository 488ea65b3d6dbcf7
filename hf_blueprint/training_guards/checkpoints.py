"""Checkpoint integrity and agreement: a half-written checkpoint is never resumed from, a checkpoint of another model
config is refused by field, and a tokenizer must fit the model's vocabulary."""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile



logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Files written with torch.save (zip archives): optimizer.pt, scheduler.pt, scaler.pt, rng_state[_N].pth, ...
TORCH_ZIP_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHTS_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHTS_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """Why the Trainer checkpoint folder `path` cannot be resumed from; an empty list when it is complete.

    Complete means: `trainer_state.json` exists and parses (the Trainer writes it after everything else), its
    `global_step` matches the folder's number, a weights file exists and is whole (safetensors header covering
    the file, or a readable zip archive; every shard of a sharded index), and each torch.save file present
    (optimizer, scheduler, scaler, RNG states) is a whole zip archive. A file cut short by a kill or a full disk
    fails these checks; corruption inside a whole file (flipped bits) does not, as the Trainer writes no checksums.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [f"{path} is not a folder"]
    problems = []
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_file):
        problems.append(f"no {TRAINER_STATE_NAME} (the Trainer writes it last: the save did not finish)")
    else:
        try:
            with open(state_file, encoding="utf-8") as f:
                state = json.load(f)
            match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
            if not isinstance(state, dict):
                problems.append(f"{TRAINER_STATE_NAME} is not a JSON object")
            elif match and state.get("global_step") != int(match.group(1)):
                problems.append(f"{TRAINER_STATE_NAME} has global_step {state.get('global_step')!r}, "
                                f"expected {int(match.group(1))} for this folder")
        except (OSError, ValueError) as error:
            problems.append(f"{TRAINER_STATE_NAME} is unreadable ({error})")

    weights = [name for name in WEIGHTS_FILES + WEIGHTS_INDEX_FILES if os.path.isfile(os.path.join(path, name))]
    # DeepSpeed (global_step*/) and FSDP (pytorch_model_fsdp_*/) keep their own sharded layouts: past
    # trainer_state.json, which still gates them, their files are theirs to check.
    engine_layout = any(name.startswith(("global_step", "pytorch_model_fsdp")) for name in os.listdir(path))
    if not weights and not engine_layout:
        problems.append(f"no weights file (none of {list(WEIGHTS_FILES + WEIGHTS_INDEX_FILES)})")
    for name in weights:
        problems.extend(_weights_file_problems(path, name))
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.endswith(TORCH_ZIP_SUFFIXES) and name not in weights and os.path.isfile(file):
            problem = _zip_problem(file)
            if problem:
                problems.append(f"{name} {problem}")
    return problems


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return not checkpoint_problems(path)


def last_good_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that is complete (see `checkpoint_problems`), or None.

    Each newer folder that is skipped is logged with the reason, so a resume after a crash says which checkpoint it
    did not trust and why."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    candidates = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            candidates.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(candidates, reverse=True):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning(f"Not resuming from {path}: {'; '.join(problems)}.")
    return None


def resolve_resume_checkpoint(value, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint to pass to `Trainer.train(resume_from_checkpoint=...)` for a `--resume_from_checkpoint` value.

    `None`/`False`: no resume. `True`, `"true"` or `"last"`: the newest complete checkpoint in `output_dir` (a
    ValueError if there is none, as transformers does). A path: that folder, which must be complete."""
    if value is None or value is False or str(value).lower() in ("false", "none", ""):
        return None
    if value is True or str(value).lower() in ("true", "last"):
        found = last_good_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {output_dir} "
                             f"(incomplete ones, if any, are logged above with the reason).")
        return found
    problems = checkpoint_problems(value)
    if problems:
        raise ValueError(f"--resume_from_checkpoint {value}: cannot resume from this folder: {'; '.join(problems)}.")
    return os.fspath(value)


# Fields a save adds or rewrites without changing the model (where it was loaded from, the library version, dtype,
# the class names), and run-time switches (the Trainer saves use_cache=False while it trains); private `_` fields too.
CONFIG_FIELDS_NOT_COMPARED = ("transformers_version", "architectures", "dtype", "torch_dtype", "auto_map",
                              "use_cache", "output_attentions", "output_hidden_states", "return_dict")
# Fields the model fills in while it trains when the run leaves them unset: a sequence classifier's first loss sets
# `problem_type` from the labels, so every checkpoint of a run that did not set it holds one.
CONFIG_FIELDS_SET_BY_TRAINING = ("problem_type",)


def checkpoint_config_differences(checkpoint: str | os.PathLike, config) -> dict[str, tuple]:
    """The model config fields whose value in `checkpoint/config.json` differs from `config`'s, as
    {field: (checkpoint's value, config's value)}; {} when they agree or the folder has no config.json."""
    file = os.path.join(os.fspath(checkpoint), "config.json")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("model_type") != config.model_type:
        return {"model_type": (saved.get("model_type"), config.model_type)}
    # The saved file holds only the fields that differ from the defaults: read it back through the config class for
    # every field, then compare both in their JSON form (int keys of id2label, tuples and lists alike).
    saved = type(config).from_json_file(file).to_dict()
    ours = config.to_dict()

    def normal(value):
        return json.loads(json.dumps(value, sort_keys=True, default=str))

    missing = "(not set)"
    return {key: (saved.get(key, missing), ours.get(key, missing)) for key in sorted(set(saved) | set(ours))
            if key not in CONFIG_FIELDS_NOT_COMPARED and not key.startswith("_")
            and not (key in CONFIG_FIELDS_SET_BY_TRAINING and ours.get(key) is None)
            and normal(saved.get(key, missing)) != normal(ours.get(key, missing))}


class CheckpointMismatchError(ValueError):
    """A checkpoint holds a model of another config than the run that would resume from (or rotate) it."""


def check_checkpoint_config(checkpoint: str | os.PathLike, config) -> None:
    """Raises `CheckpointMismatchError` naming the checkpoint and each differing field when the checkpoint's model
    config is not `config`: resuming would load weights of another shape or meaning, and the checkpoint rotation
    would delete another run's checkpoints."""
    differences = checkpoint_config_differences(checkpoint, config)
    if differences:
        shown = "; ".join(f"{key}: {theirs!r} in the checkpoint, {ours!r} in this run"
                          for key, (theirs, ours) in differences.items())
        raise CheckpointMismatchError(
            f"{os.fspath(checkpoint)} holds a model of another configuration than this run's ({shown}). It belongs to "
            f"another run: resume with that run's settings, or train into a new --output_dir."
        )


def _weights_file_problems(folder: str, name: str) -> list[str]:
    file = os.path.join(folder, name)
    if name.endswith(".index.json"):
        try:
            with open(file, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            return [f"{name} is unreadable ({error})"]
        problems = []
        for shard in shards:
            if not os.path.isfile(os.path.join(folder, shard)):
                problems.append(f"shard {shard} listed in {name} is missing")
            else:
                problems.extend(_weights_file_problems(folder, shard))
        return problems
    if name.endswith(".safetensors"):
        problem = _safetensors_problem(file)
    else:
        problem = _zip_problem(file)
    return [f"{name} {problem}"] if problem else []


def _safetensors_problem(file: str) -> str | None:
    """None when the header parses and its tensors exactly cover the file (safetensors checks both on open)."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
    except Exception as error:  # SafetensorError, OSError: the exact class depends on the safetensors version
        return f"is not a whole safetensors file ({error})"
    return None


def _zip_problem(file: str) -> str | None:
    """None when `file` is a zip archive whose central directory (written at the very end) is intact."""
    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"is not a whole torch.save archive ({error})"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and model agreement
# ---------------------------------------------------------------------------------------------------------------------


def check_tokenizer_fits_model(tokenizer, model_or_config) -> None:
    """Raise a ValueError when the tokenizer can produce ids the model has no embedding for.

    A tokenizer smaller than the model's vocabulary is fine (tables are often padded to a multiple of 64); a larger
    one fails only at the first batch that contains one of the extra ids, possibly hours into a run."""
    config = getattr(model_or_config, "config", model_or_config)
    vocab_size = config.vocab_size
    embeddings = getattr(model_or_config, "get_input_embeddings", None)
    if callable(embeddings) and embeddings() is not None:
        vocab_size = embeddings().num_embeddings
    size = len(tokenizer)
    if size > vocab_size:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        model_name = getattr(config, "_name_or_path", "") or type(config).__name__
        raise ValueError(
            f"The tokenizer ({tokenizer_name}) has {size} tokens (ids 0..{size - 1}) but the model ({model_name}) "
            f"embeds only vocab_size={vocab_size} ids: any id >= {vocab_size} would fail at the first batch that "
            f"contains it. Use the model's own tokenizer, or grow the model with "
            f"model.resize_token_embeddings(len(tokenizer)) before training."
        )

