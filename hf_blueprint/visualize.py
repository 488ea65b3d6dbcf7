"""Look inside a Blueprint model: attention maps, training curves and a model summary, as pictures.

    pip install 'hf_blueprint[viz]'                                   # matplotlib, the one extra dependency

    python -m hf_blueprint.visualize attention out/quickstart --text "ROMEO: But soft"   # per head, mean, rollout
    python -m hf_blueprint.visualize curves out/quickstart            # trainer_state.json -> training_curves.png
    python -m hf_blueprint.visualize summary out/quickstart           # switches, parameters, one block drawn

From Python, the data and the drawing are separate functions, so the numbers behind every picture can be checked
(and plotted with anything else):

    from hf_blueprint import visualize as viz
    tokens, attentions = viz.attention_data(model, tokenizer, "the cat sat")   # (layers, heads, q, k)
    viz.plot_attention(tokens, attentions, layers=[0, 1], heads=[0, 3], output="att.png")   # also .svg
    viz.plot_attention(tokens, attentions, view="rollout", output="rollout.png")
    viz.plot_training_curves("out/quickstart", output="curves.png")
    viz.model_summary(model)                     # dict: switches, parameters per component, the block's layout
    viz.plot_model_summary(model, output="summary.png")

Every `plot_*` function returns a matplotlib `Figure` built without pyplot: nothing opens a window, no display
or GUI backend is needed (PNG goes through Agg), and no global matplotlib state changes. matplotlib is imported
only when a picture is drawn, so `import hf_blueprint.visualize` and the data functions work without it; drawing
without it raises an ImportError that names the extra to install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .paths import safe_join


__all__ = [
    "AttentionData",
    "INSTALL_HINT",
    "TRAINING_CURVES_FILENAME",
    "add_training_curves",
    "attention_data",
    "attention_maps",
    "attention_rollout",
    "block_layout",
    "format_model_summary",
    "head_average",
    "link_training_curves",
    "load_model",
    "load_trainer_state",
    "main",
    "masked_positions",
    "model_summary",
    "plot_attention",
    "plot_model_summary",
    "plot_training_curves",
    "save_figure",
    "token_labels",
    "training_curves_data",
    "write_attention_map",
    "write_training_curves",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'hf_blueprint[viz]'"
TRAINING_CURVES_FILENAME = "training_curves.png"
ATTENTION_VIEWS = ("heads", "mean", "rollout")
CURVE_PANELS = ("loss", "perplexity", "accuracy", "learning_rate", "grad_norm")
IMAGE_FORMATS = ("png", "svg", "pdf")
DEFAULT_DPI = 100

MASKED_COLOR = "#e6e6e6"  # cells a mask forbids (causal future, padding, outside a sliding window)
ATTENTION_CMAP = "viridis"


# ---------------------------------------------------------------------------------------------------------------------
# matplotlib, lazily
# ---------------------------------------------------------------------------------------------------------------------


def _require_matplotlib():
    """Imports matplotlib on first use, or fails with the command that installs it."""
    try:
        import matplotlib
        import matplotlib.colors  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "hf_blueprint.visualize draws its pictures with matplotlib, which is not installed. Install the "
            f"optional extra with:  {INSTALL_HINT}  (or: pip install matplotlib)"
        ) from error
    return matplotlib


def _new_figure(width: float, height: float, dpi: int | None = None):
    """A Figure detached from pyplot: no window, no backend selection, garbage-collected like any object."""
    matplotlib = _require_matplotlib()
    return matplotlib.figure.Figure(figsize=(width, height), dpi=dpi or DEFAULT_DPI, layout="constrained")


def save_figure(figure, output: str | Path, formats: Sequence[str] | None = None, dpi: int | None = None) -> list[Path]:
    """Writes `figure` to `output`; `formats` (e.g. `["png", "svg"]`) replaces its extension with each of them.
    Without `formats` the extension of `output` decides (PNG when it has none). Returns the paths written."""
    output = Path(output)
    suffix = output.suffix.lower().lstrip(".")
    if formats is None:
        formats = [suffix if suffix in IMAGE_FORMATS else "png"]
    paths = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in IMAGE_FORMATS:
            raise ValueError(f"Unsupported image format {fmt!r}; choose from {list(IMAGE_FORMATS)}.")
        path = output.with_suffix(f".{fmt}") if suffix in IMAGE_FORMATS or not output.suffix else \
            output.with_name(f"{output.name}.{fmt}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # Tokens of any script end up in tick labels; a missing glyph draws a box instead of failing.
            warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
            warnings.filterwarnings("ignore", message=r"Matplotlib currently does not support")
            figure.savefig(path, format=fmt, dpi=dpi or figure.dpi)
        paths.append(path)
    return paths


def _finish(figure, output, formats, dpi):
    if output is not None:
        save_figure(figure, output, formats=formats, dpi=dpi)
    return figure


def _escape(text: str) -> str:
    """Plain text for matplotlib: a `$` would otherwise start math mode."""
    return text.replace("$", r"\$")


# ---------------------------------------------------------------------------------------------------------------------
# Loading a model folder
# ---------------------------------------------------------------------------------------------------------------------


def _import_blueprint():
    import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes)


def load_model(path: str | Path, trust_remote_code: bool = False, **kwargs):
    """(model, tokenizer) from a saved folder or Hub id, in eval mode. The model is the folder's own head class
    (its `architectures`), falling back to the base `AutoModel`; every head returns the trunk's attentions."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    import hf_blueprint  # registers the Blueprint models with the Auto classes

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model_class = AutoModel
    for name in getattr(config, "architectures", None) or []:
        candidate = getattr(hf_blueprint, name, None) or getattr(transformers, name, None)
        if candidate is not None:
            model_class = candidate
            break
    model = model_class.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Attention: the data
# ---------------------------------------------------------------------------------------------------------------------


class AttentionData(NamedTuple):
    """What `attention_data` returns: unpack it as `tokens, attentions = attention_data(...)`."""

    tokens: list[str]
    """One display label per position (whitespace made visible)."""
    attentions: torch.Tensor
    """float32 on the CPU, shape (layers, heads, query, key): the model's `output_attentions` for the text. Each row
    sums to 1; positions a mask forbids (the causal future, padding, outside a sliding window) are exactly 0."""


def _visible(text: str) -> str:
    replaced = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    if replaced.strip() == "":
        return replaced.replace(" ", "\u2423") or "\u2205"  # ␣ for spaces, ∅ for an empty piece
    return replaced.strip(" ")


def token_labels(tokenizer, input_ids: Sequence[int]) -> list[str]:
    """Readable labels for token ids: each id decoded on its own (byte-level BPE's `Ġ` becomes a space), special
    tokens by name, whitespace-only tokens as `␣` / `\\n`."""
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    labels = []
    for token_id in (int(i) for i in input_ids):
        if token_id in special_ids:
            text = tokenizer.convert_ids_to_tokens(token_id)
        else:
            text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            if text == "":
                text = tokenizer.convert_ids_to_tokens(token_id) or ""
        labels.append(_visible(str(text)))
    return labels


@torch.no_grad()
def attention_data(model, tokenizer, text: str, *, max_length: int | None = None, pad_to: int | None = None,
                   add_special_tokens: bool = True) -> AttentionData:
    """Runs `model` on `text` with `output_attentions=True` and returns the tokens and the attention weights of
    every layer and head for it, shape (layers, heads, query, key).

    The model runs in eval mode (no attention dropout) and is put back in its previous mode. Any head class works
    (base model, LM, classifier). `max_length` truncates; models with a position table (`learned`,
    `sinusoidal`) are truncated to `max_position_embeddings` anyway. `pad_to` right-pads the text to that many
    tokens with the tokenizer's pad token and passes the attention mask: the padding then appears in the tokens and
    receives exactly zero attention, as the mask says.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("attention_data needs a non-empty text.")
    config = model.config
    if getattr(config, "position_embedding_type", None) in ("learned", "sinusoidal"):
        limit = config.max_position_embeddings
        if max_length is None or max_length > limit:
            max_length = limit
    if pad_to is not None and max_length is not None and pad_to > max_length:
        raise ValueError(f"pad_to={pad_to} is longer than the model accepts ({max_length} tokens).")
    if pad_to is not None and tokenizer.pad_token_id is None:
        raise ValueError("pad_to needs a tokenizer with a pad token.")

    padding_side = getattr(tokenizer, "padding_side", "right")
    try:
        tokenizer.padding_side = "right"
        encoding = tokenizer(
            text,
            return_tensors="pt",
            add_special_tokens=add_special_tokens,
            truncation=max_length is not None,
            max_length=pad_to if pad_to is not None else max_length,
            padding="max_length" if pad_to is not None else False,
        )
    finally:
        tokenizer.padding_side = padding_side
    input_ids = encoding["input_ids"]
    if input_ids.shape[1] == 0:
        raise ValueError(f"The tokenizer produced no tokens for {text!r}.")

    inputs = {"input_ids": input_ids.to(model.device)}
    if pad_to is not None:
        inputs["attention_mask"] = encoding["attention_mask"].to(model.device)
    if "token_type_ids" in encoding and getattr(config, "type_vocab_size", 0):
        inputs["token_type_ids"] = encoding["token_type_ids"].to(model.device)

    was_training = model.training
    model.eval()
    try:
        outputs = model(**inputs, output_attentions=True, return_dict=True)
    finally:
        model.train(was_training)
    layers = getattr(outputs, "attentions", None)
    if not layers or any(layer is None for layer in layers):
        raise ValueError(
            f"{type(model).__name__} returned no attention weights for output_attentions=True; load it with "
            "attn_implementation='eager'."
        )
    attentions = torch.stack([layer[0].detach().float().cpu() for layer in layers])
    return AttentionData(token_labels(tokenizer, input_ids[0].tolist()), attentions)


def head_average(attentions: torch.Tensor) -> torch.Tensor:
    """(layers, heads, q, k) -> (layers, q, k): the mean over heads of each layer (rows still sum to 1)."""
    attentions = torch.as_tensor(attentions)
    if attentions.dim() != 4:
        raise ValueError(f"Expected attentions of shape (layers, heads, q, k), got {tuple(attentions.shape)}.")
    return attentions.float().mean(dim=1)


def attention_rollout(attentions: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each input token flows into each position after every
    layer, accounting for the residual connections.

    Per layer, A = residual * I + (1 - residual) * mean over heads of the attention, rows renormalized; the rollout
    after layer l is A_l @ ... @ A_1. Takes (layers, heads, q, k) (or already head-averaged (layers, q, k)) and
    returns (layers, q, k): entry l is the rollout up to and including layer l, the last one the full rollout.
    Rows sum to 1; a causal model's rollout stays lower-triangular, and padding keys stay at zero.
    """
    attentions = torch.as_tensor(attentions).float()
    if attentions.dim() == 4:
        attentions = attentions.mean(dim=1)
    if attentions.dim() != 3 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"Expected square attentions (layers, [heads,] q, q), got {tuple(attentions.shape)}.")
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual must be in [0, 1), got {residual}.")
    identity = torch.eye(attentions.shape[-1], dtype=attentions.dtype)
    rollout = identity
    result = []
    for layer in attentions:
        mixed = residual * identity + (1.0 - residual) * layer
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
        result.append(rollout)
    return torch.stack(result)


def masked_positions(attentions: torch.Tensor) -> torch.Tensor:
    """(q, k) bool: the cells every layer and head gives exactly zero weight, i.e. the ones a mask forbids (a
    softmax never returns an exact 0 otherwise, let alone in every head of every layer)."""
    attentions = torch.as_tensor(attentions)
    return (attentions == 0).reshape(-1, *attentions.shape[-2:]).all(dim=0)


# ---------------------------------------------------------------------------------------------------------------------
# Attention: the pictures
# ---------------------------------------------------------------------------------------------------------------------


def _select(requested, available: int, what: str) -> list[int]:
    if requested is None:
        return list(range(available))
    if isinstance(requested, int):
        requested = [requested]
    chosen = []
    for index in requested:
        position = index + available if index < 0 else index
        if not 0 <= position < available:
            raise ValueError(f"{what} {index} does not exist; the model has {available} ({what}s 0..{available - 1}).")
        chosen.append(position)
    return chosen


def _draw_heatmap(ax, matrix, mask, tokens, show_x: bool, show_y: bool, cmap, norm, cell_inches: float):
    import numpy as np

    data = np.ma.masked_array(np.asarray(matrix, dtype=float), mask=np.asarray(mask, dtype=bool))
    ax.imshow(data, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    n = len(tokens)
    step = max(1, math.ceil(n / 64))  # at most 64 labels per axis
    ticks = list(range(0, n, step))
    font = max(4.0, min(9.0, 0.75 * 72 * cell_inches * step))
    labels = [_escape(tokens[i]) for i in ticks]
    rotation = 0 if all(len(tokens[i]) <= 1 for i in ticks) else 90  # single characters stay upright
    ax.set_xticks(ticks, labels if show_x else [], rotation=rotation, fontsize=font)
    ax.set_yticks(ticks, labels if show_y else [], fontsize=font)
    ax.tick_params(length=0, pad=1.5)
    if show_x:
        ax.set_xlabel("key (attended to)", fontsize=7)
    if show_y:
        ax.set_ylabel("query", fontsize=7)


def plot_attention(tokens: Sequence[str], attentions: torch.Tensor, *, view: str = "heads",
                   layers: int | Sequence[int] | None = None, heads: int | Sequence[int] | None = None,
                   residual: float = 0.5, title: str | None = None, output: str | Path | None = None,
                   formats: Sequence[str] | None = None, dpi: int | None = None):
    """Draws attention heatmaps, query tokens down the rows and key tokens along the columns, one panel each:

    - `view="heads"`: a grid, one row per layer and one column per head (`layers` x `heads` panels);
    - `view="mean"`: the head-averaged attention, one panel per layer;
    - `view="rollout"`: attention rollout (see `attention_rollout`) after each requested layer.

    `layers` / `heads` pick indices (negative counts from the end; default all). Colours run from 0 to 1 on a
    square-root scale, the same in every panel; cells a mask forbids (a decoder's causal upper triangle, padding,
    outside a sliding window) are drawn light grey, apart from any weight. Returns the Figure; `output` also saves
    it (`formats`, e.g. `["png", "svg"]`, writes several).
    """
    matplotlib = _require_matplotlib()
    attentions = torch.as_tensor(attentions).float()
    if attentions.dim() != 4:
        raise ValueError(f"Expected attentions of shape (layers, heads, q, k), got {tuple(attentions.shape)}.")
    num_layers, num_heads, q_len, k_len = attentions.shape
    if len(tokens) != k_len:
        raise ValueError(f"{len(tokens)} tokens for attentions over {k_len} keys.")
    if view not in ATTENTION_VIEWS:
        raise ValueError(f"view={view!r}: choose one of {list(ATTENTION_VIEWS)}.")
    layer_ids = _select(layers, num_layers, "layer")
    forbidden = masked_positions(attentions)

    if view == "heads":
        head_ids = _select(heads, num_heads, "head")
        panels = [(row, col, attentions[l, h], f"layer {l} · head {h}")
                  for row, l in enumerate(layer_ids) for col, h in enumerate(head_ids)]
        rows, cols = len(layer_ids), len(head_ids)
    else:
        if heads is not None:
            raise ValueError(f"view={view!r} averages over heads; `heads` applies to view='heads' only.")
        maps = head_average(attentions) if view == "mean" else attention_rollout(attentions, residual=residual)
        name = "mean over heads" if view == "mean" else "rollout to"
        cols = len(layer_ids) if len(layer_ids) <= 3 else math.ceil(math.sqrt(len(layer_ids)))
        rows = math.ceil(len(layer_ids) / cols)
        panels = [(i // cols, i % cols, maps[l], f"layer {l} · {name}" if view == "mean" else f"{name} layer {l}")
                  for i, l in enumerate(layer_ids)]

    largest = 8.0 if len(panels) <= 2 else 6.0 if len(panels) <= 4 else 4.2
    panel_inches = min(largest, max(2.0, 0.13 * q_len + 1.0))
    figure = _new_figure(cols * panel_inches + 0.3, rows * panel_inches + 0.7, dpi)
    cmap = matplotlib.colormaps[ATTENTION_CMAP].with_extremes(bad=MASKED_COLOR)
    norm = matplotlib.colors.PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    for index, (row, col, matrix, label) in enumerate(panels):
        ax = figure.add_subplot(rows, cols, row * cols + col + 1)
        last_in_column = row == rows - 1 or (index + cols >= len(panels))
        _draw_heatmap(ax, matrix, forbidden, tokens, show_x=last_in_column, show_y=col == 0, cmap=cmap, norm=norm,
                      cell_inches=(panel_inches - 0.6) / max(q_len, 1))
        ax.set_title(label, fontsize=8)
    if title is None:
        what = {"heads": "Attention per layer and head", "mean": "Attention averaged over heads",
                "rollout": f"Attention rollout (residual {residual:g})"}[view]
        masked = int(forbidden.sum())
        note = f"; grey = masked ({masked} cells)" if masked else ""
        title = f"{what}: rows attend to columns, colour sqrt-scaled 0..1{note}"
    figure.suptitle(_escape(title), fontsize=9)
    return _finish(figure, output, formats, dpi)


def attention_maps(model, tokenizer, text: str, output: str | Path, *, views: Sequence[str] = ATTENTION_VIEWS,
                   layers=None, heads=None, formats: Sequence[str] | None = None, dpi: int | None = None,
                   max_length: int | None = None) -> list[Path]:
    """Writes the attention pictures of `text`: one file per view (`output` with `_heads`, `_mean`, `_rollout`
    before the extension when there are several views, `output` itself for one). Returns the paths written."""
    tokens, attentions = attention_data(model, tokenizer, text, max_length=max_length)
    output = Path(output)
    suffix = output.suffix if output.suffix.lower().lstrip(".") in IMAGE_FORMATS else ".png"
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    paths = []
    for view in views:
        target = output.with_name(f"{stem}_{view}{suffix}") if len(views) > 1 else output.with_name(stem + suffix)
        figure = plot_attention(tokens, attentions, view=view, layers=layers, heads=heads if view == "heads" else None,
                                dpi=dpi)
        paths += save_figure(figure, target, formats=formats, dpi=dpi)
    return paths


def write_attention_map(model, tokenizer, text: str, output: str | Path, *, view: str = "mean",
                        dpi: int | None = None) -> Path | None:
    """For recipes: writes one attention picture of `text` (`view` as in `plot_attention`) and returns its path,
    or logs a warning and returns None when matplotlib is missing, so that a picture never fails a run."""
    try:
        tokens, attentions = attention_data(model, tokenizer, text)
        figure = plot_attention(tokens, attentions, view=view, dpi=dpi)
    except (ImportError, ValueError) as error:
        logger.warning(f"Skipping the attention picture: {error}")
        return None
    return save_figure(figure, output, dpi=dpi)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Training curves: the data
# ---------------------------------------------------------------------------------------------------------------------


def _trainer_state_file(folder: Path) -> Path:
    direct = folder / "trainer_state.json"
    if direct.is_file():
        return direct
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*/trainer_state.json") if p.parent.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.parent.name.split("-")[-1]),
    )
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(
        f"No trainer_state.json in {folder} (nor in a checkpoint-* folder inside it). The Trainer writes it with "
        "trainer.save_state() and at every checkpoint."
    )


def load_trainer_state(source) -> dict:
    """The Trainer state as a dict with a `log_history` list, from: a `trainer_state.json` path; a Trainer output
    folder (its `trainer_state.json`, else the latest `checkpoint-*/trainer_state.json`); a `TrainerState`; a
    `Trainer`; a dict; or a bare log-history list."""
    if hasattr(source, "state") and hasattr(source.state, "log_history"):  # a Trainer
        source = source.state
    if hasattr(source, "log_history") and not isinstance(source, dict):  # a TrainerState
        return dataclasses.asdict(source) if dataclasses.is_dataclass(source) else {"log_history": source.log_history}
    if isinstance(source, list):
        return {"log_history": source}
    if isinstance(source, dict):
        if "log_history" not in source:
            raise ValueError("A trainer state dict needs a 'log_history' list.")
        return source
    path = Path(source)
    if path.is_dir():
        path = _trainer_state_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a Trainer output folder or its trainer_state.json.")
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{path} is not a Trainer state: it has no 'log_history' list.")
    state["_path"] = str(path)  # where it was read, whatever the file says
    return state


_LM_SUFFIXES = ("ForCausalLM", "ForMaskedLM", "LMHeadModel", "ForPreTraining")
_CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice")


def _task_of_architecture(name: str | None) -> str | None:
    if not name:
        return None
    if name.endswith(_LM_SUFFIXES):
        return "lm"
    if name.endswith(_CLASSIFIER_SUFFIXES):
        return "classification"
    return None


def _detect_task(state: dict, source) -> str:
    folder = None
    if isinstance(source, (str, Path)):
        folder = Path(source) if Path(source).is_dir() else Path(source).parent
    if folder is not None:
        for candidate in (folder / "config.json", folder.parent / "config.json"):
            if candidate.is_file():
                try:
                    architectures = json.loads(candidate.read_text(encoding="utf-8")).get("architectures") or []
                except (OSError, ValueError):
                    architectures = []
                for name in architectures:
                    if task := _task_of_architecture(name):
                        return task
    keys = {key for entry in state["log_history"] for key in entry}
    if any("perplexity" in key for key in keys):
        return "lm"
    if any(key.endswith(("accuracy", "_f1", "matthews_correlation")) for key in keys):
        return "classification"
    return "other"


def _safe_exp(value: float) -> float:
    return math.exp(value) if value < 700 else float("inf")


def training_curves_data(source, task: str = "auto") -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """The series behind `plot_training_curves`: `{panel: {label: (steps, values)}}` in panel order, from the
    Trainer's `log_history` (see `load_trainer_state` for the accepted sources).

    Panels: `loss` (train `loss` and `eval_loss`); `perplexity` for language models (the logged
    `eval_perplexity` when there is one, else exp of the loss); `accuracy` when an accuracy is logged (for
    classifiers; a language model's token accuracy too); `learning_rate`; `grad_norm` (kept in the data, drawn only
    when asked for). `task`: `"lm"`, `"classification"`, or `"auto"` (the folder's config.json
    `architectures`, else the logged metric names). The Trainer's end-of-training summary entry is skipped.
    """
    state = load_trainer_state(source)
    if task == "auto":
        task = _detect_task(state, source)
    if task not in ("lm", "classification", "other"):
        raise ValueError(f"task={task!r}: choose 'auto', 'lm' or 'classification'.")
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {panel: {} for panel in CURVE_PANELS}

    def add(panel, label, step, value):
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return
        steps, values = series[panel].setdefault(label, ([], []))
        steps.append(step)
        values.append(float(value))

    for entry in state["log_history"]:
        if "step" not in entry or "train_runtime" in entry:  # the end-of-training summary, not a curve point
            continue
        step = entry["step"]
        if "loss" in entry:
            add("loss", "train", step, entry["loss"])
            if task == "lm":
                add("perplexity", "train", step, _safe_exp(entry["loss"]))
        if "eval_loss" in entry:
            add("loss", "eval", step, entry["eval_loss"])
            if task == "lm":
                perplexity = entry.get("eval_perplexity")
                add("perplexity", "eval", step, perplexity if perplexity is not None else _safe_exp(entry["eval_loss"]))
        for key, value in entry.items():
            if key.endswith("accuracy") and not key.endswith("_runtime"):
                label = "train" if key == "accuracy" else key.removeprefix("eval_").replace("_", " ")
                label = "eval" if label == "accuracy" else f"eval {label}" if key.startswith("eval_") else label
                add("accuracy", label, step, value)
        if "learning_rate" in entry:
            add("learning_rate", "learning rate", step, entry["learning_rate"])
        if "grad_norm" in entry:
            add("grad_norm", "grad norm", step, entry["grad_norm"])
    return {panel: curves for panel, curves in series.items() if curves}


# ---------------------------------------------------------------------------------------------------------------------
# Training curves: the picture, and the recipes' hook
# ---------------------------------------------------------------------------------------------------------------------


_PANEL_TITLES = {"loss": "loss", "perplexity": "perplexity", "accuracy": "accuracy",
                 "learning_rate": "learning rate", "grad_norm": "gradient norm"}


def plot_training_curves(source, output: str | Path | None = None, *, task: str = "auto",
                         panels: Sequence[str] | None = None, title: str | None = None,
                         formats: Sequence[str] | None = None, dpi: int | None = None):
    """Draws the training curves of a Trainer run against the optimizer step, one panel each: loss (train and
    eval), perplexity for language models, accuracy for classifiers, learning rate. `source`: a Trainer output
    folder, a `trainer_state.json`, a `TrainerState` or a `Trainer`. `panels` picks and orders them (from
    `loss`, `perplexity`, `accuracy`, `learning_rate`, `grad_norm`); by default every one with data except
    `grad_norm`, and except `accuracy` for language models (their token accuracy). Returns the Figure; `output`
    also saves it."""
    _require_matplotlib()
    from matplotlib import ticker

    if task == "auto":
        task = _detect_task(load_trainer_state(source), source)
    data = training_curves_data(source, task=task)
    if panels is None:
        hidden = {"grad_norm"} | ({"accuracy"} if task == "lm" else set())  # an LM's token accuracy: on request
        panels = [panel for panel in data if panel not in hidden]
    else:
        unknown = [panel for panel in panels if panel not in CURVE_PANELS]
        if unknown:
            raise ValueError(f"Unknown panels {unknown}; choose from {list(CURVE_PANELS)}.")
        missing = [panel for panel in panels if panel not in data]
        if missing:
            raise ValueError(f"No logged values for panel(s) {missing}; the log has {list(data)}.")
    if not panels:
        raise ValueError(
            "The trainer state has no logged loss or learning rate to draw: the run ended before the first "
            "logging step (lower --logging_steps)."
        )
    cols = len(panels) if len(panels) <= 3 else 2
    rows = math.ceil(len(panels) / cols)
    figure = _new_figure(4.2 * cols, 3.1 * rows + 0.4, dpi)
    colors = {"train": "#1f77b4", "eval": "#d62728", "learning rate": "#2ca02c", "grad norm": "#9467bd"}
    for index, panel in enumerate(panels):
        ax = figure.add_subplot(rows, cols, index + 1)
        for n, (label, (steps, values)) in enumerate(data[panel].items()):
            color = colors.get(label, f"C{n + 3}")
            marker = "o" if label.startswith("eval") or len(steps) <= 12 else None
            ax.plot(steps, values, marker=marker, markersize=3.5, linewidth=1.4, color=color,
                    label=f"{label}: {values[-1]:.4g}")
        values = [v for _, series_values in data[panel].values() for v in series_values if v > 0 and v != float("inf")]
        log_scale = panel == "perplexity" and values and max(values) / min(values) > 20
        ax.set_title(_PANEL_TITLES[panel] + (" (log scale)" if log_scale else ""), fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(which="both", labelsize=8)
        ax.grid(True, alpha=0.3)
        if log_scale:  # early perplexities are orders of magnitude above the final ones
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(
                lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else ""))
        if panel == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=7.5, title="last value", title_fontsize=7.5)
    if title is None:
        state = load_trainer_state(source)
        last = max((e.get("step", 0) for e in state["log_history"]), default=0)
        epoch = max((e.get("epoch", 0) or 0 for e in state["log_history"]), default=0)
        where = Path(state["_path"]).parent.name if "_path" in state else ""
        title = f"Training curves{f' of {where}' if where else ''}: {last} steps, {epoch:.3g} epochs"
    figure.suptitle(_escape(title), fontsize=11)
    return _finish(figure, output, formats, dpi)


def write_training_curves(source, output: str | Path | None = None, *, task: str = "auto",
                          dpi: int | None = None) -> Path | None:
    """For recipes: writes `training_curves.png` (into the source folder unless `output` says otherwise) and
    returns its path, or logs a warning and returns None when matplotlib is missing or nothing was logged yet, so
    that a missing picture never fails a training run."""
    if output is None:
        if not isinstance(source, (str, Path)):
            raise ValueError("write_training_curves needs `output` when the source is not a folder or file.")
        folder = Path(source) if Path(source).is_dir() else Path(source).parent
        output = folder / TRAINING_CURVES_FILENAME
    try:
        figure = plot_training_curves(source, task=task, dpi=dpi)
    except ImportError as error:
        logger.warning(f"Skipping the training-curve picture: {error}")
        return None
    except ValueError as error:
        logger.warning(f"Skipping the training-curve picture: {error}")
        return None
    return save_figure(figure, output, dpi=dpi)[0]


_CARD_HEADING = "## Training curves"


def link_training_curves(folder: str | Path, image: str = TRAINING_CURVES_FILENAME) -> bool:
    """Appends a "Training curves" section that shows `image` (a path relative to the folder, as the Hub resolves
    it) to the model card `README.md` in `folder`. Idempotent; returns whether the card links the image now. An
    image outside the folder (absolute, `..`, a link out) is refused with an UnsafePathError."""
    card = Path(folder) / "README.md"
    if not card.is_file() or not safe_join(folder, image, "the training-curves picture").is_file():
        return False
    text = card.read_text(encoding="utf-8")
    if f"]({image})" in text:
        return True
    section = (f"\n{_CARD_HEADING}\n\n![Training curves: loss, perplexity or accuracy, and learning rate against "
               f"steps]({image})\n")
    card.write_text(text.rstrip("\n") + "\n" + section, encoding="utf-8")
    return True


def add_training_curves(trainer, output_dir: str | Path | None = None) -> Path | None:
    """For the recipes, after training: writes `training_curves.png` into the output folder from the Trainer's
    log history, and makes the Trainer's model card (`create_model_card`, also what `push_to_hub` writes and
    uploads) link it. On the main process only; returns the picture's path, or None (with a warning) when
    matplotlib is missing."""
    if hasattr(trainer, "is_world_process_zero") and not trainer.is_world_process_zero():
        return None
    folder = Path(output_dir or trainer.args.output_dir)
    model = getattr(trainer, "model", None)
    task = _task_of_architecture(type(model).__name__ if model is not None else None) or "auto"
    path = write_training_curves(trainer, folder / TRAINING_CURVES_FILENAME, task=task)
    if path is None:
        return None
    create_model_card = trainer.create_model_card
    if not getattr(create_model_card, "_links_training_curves", False):
        def create_model_card_with_curves(*args, **kwargs):
            result = create_model_card(*args, **kwargs)
            link_training_curves(trainer.args.output_dir, path.name)
            return result

        create_model_card_with_curves._links_training_curves = True
        trainer.create_model_card = create_model_card_with_curves
    link_training_curves(folder, path.name)  # a card that already exists
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Model summary: the data
# ---------------------------------------------------------------------------------------------------------------------


def _documented_switches(config) -> list[tuple[str, str, str]]:
    """(group, field, description) for each field the config class documents in its "Group:\\n    field: text"
    docstring, in the documented order (BlueprintConfig documents every switch that way)."""
    for cls in type(config).__mro__:
        doc = cls.__dict__.get("__doc__") or ""
        if re.search(r"^\s{4}[A-Z][\w ,]*:\s*$", doc, flags=re.M):
            break
    else:
        return []
    rows, group = [], None
    for line in doc.splitlines():
        if match := re.match(r"^    ([A-Z][\w ,]*):\s*$", line):
            group = match.group(1)
        elif group and (match := re.match(r"^        (\w+): (.*)$", line)):
            rows.append([group, match.group(1), match.group(2).strip()])
        elif group and rows and re.match(r"^            \S", line):
            rows[-1][2] += " " + line.strip()
    return [tuple(row) for row in rows if hasattr(config, row[1])]


def _short(description: str, limit: int = 60) -> str:
    sentence = re.split(r"(?<=[.;])\s", description, maxsplit=1)[0].rstrip(".;")
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def _meaning(description: str, value: Any, limit: int = 60) -> str:
    """The part of a switch's documentation that describes its current value (for `"rope"`, the clause about
    rope), else its first clause; without Markdown backticks."""
    text = description.replace("`", "")
    if isinstance(value, str):
        for clause in re.split(r";\s+", text):
            clause = clause.strip()
            if clause.startswith(f'"{value}"'):
                rest = re.sub(r"^(is|are)\s+", "", clause[len(value) + 2:].strip(" :"))
                return _short(f"{value}: {rest}", limit)
    return _short(text, limit)


def _family(config) -> str:
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_causal", False) or "decoder" in model_type:
        return "decoder"
    return "encoder"


def _model_from(source, trust_remote_code: bool = False):
    """A model to summarize: the model itself, or one built on the meta device (no memory, no weights) from a
    config, a config dict, or a folder's config.json with the head named in its `architectures`."""
    if isinstance(source, torch.nn.Module):
        return source
    _import_blueprint()
    import transformers
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    import hf_blueprint

    config = source
    if isinstance(source, (str, Path)):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"Cannot summarize a {type(source).__name__}: pass a model, a config or a model folder.")
    model_class = None
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(hf_blueprint, name, None) or getattr(transformers, name, None)
        if model_class is not None:
            break
    with torch.device("meta"):
        if model_class is not None:
            return model_class(config)
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


_COMPONENTS = [  # (pattern on the parameter name, component), first match wins
    (r"(^|\.)embed_tokens\.", "token embeddings"),
    (r"(^|\.)token_type_embeddings\.", "token-type embeddings"),
    (r"(^|\.)embed_positions\.", "position embeddings"),
    (r"(^|\.)embedding_norm\.", "embedding norm"),
    (r"(^|\.)layers\.\d+\.self_attn\.", "attention"),
    (r"(^|\.)layers\.\d+\.mlp\.", "feed-forward"),
    (r"(^|\.)layers\.\d+\.\w*norm\.", "block norms"),
    (r"^(model\.)?norm\.", "final norm"),
    (r"(^|\.)pooler\.", "pooler"),
    (r"(^|\.)mlm_transform\.", "MLM transform"),
    (r"(^|\.)lm_head\.", "LM head"),
    (r"(^|\.)classifier\.", "classifier"),
]


def _component(name: str) -> str:
    for pattern, component in _COMPONENTS:
        if re.search(pattern, name):
            return component
    return "other"


def block_layout(config) -> list[dict]:
    """The operations of one Transformer block in execution order, as configured: each a dict with `kind`
    (`norm`, `attention`, `ffn`, `add`), `label` and `detail`; `add` steps also have `residual_from`, the index of
    the step whose output the residual carries (-1: the block's input). Post-LN: attention, add, norm, FFN, add,
    norm. Pre-LN: norm, attention, add, norm, FFN, add (then one final norm after the last block)."""
    norm = "RMSNorm" if getattr(config, "norm_type", "layernorm") == "rmsnorm" else "LayerNorm"
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kind = "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else f"GQA, {kv_heads} kv heads"
    causal = "causal" if _family(config) == "decoder" else "bidirectional"
    position = getattr(config, "position_embedding_type", "")
    extras = {"rope": "; RoPE on q, k", "alibi": "; ALiBi bias"}.get(position, "")
    if getattr(config, "sliding_window", None):
        extras += f"; window {config.sliding_window}"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = {"kind": "attention", "label": f"{'Masked ' if causal == 'causal' else ''}multi-head self-attention",
                 "detail": f"{heads} heads ({kind}), d_head {head_dim}, {causal}{extras}"}
    act = getattr(config, "hidden_act", "relu")
    inner = config.intermediate_size
    if getattr(config, "ffn_type", "mlp") == "glu":
        ffn = {"kind": "ffn", "label": "Feed-forward (GLU)", "detail": f"down({act}(gate x) * up x), d_ff {inner}"}
    else:
        ffn = {"kind": "ffn", "label": "Feed-forward (MLP)", "detail": f"down({act}(up x)), d_ff {inner}"}
    dropout = getattr(config, "hidden_dropout_prob", 0.0)
    add = {"kind": "add", "label": "Add", "detail": f"x + dropout({dropout:g})(sub-layer)" if dropout else "x + sub-layer"}
    norm_step = {"kind": "norm", "label": norm, "detail": f"eps {getattr(config, 'layer_norm_eps', 1e-5):g}"}
    if getattr(config, "norm_position", "post") == "pre":
        return [dict(norm_step), attention, dict(add, residual_from=-1), dict(norm_step), ffn, dict(add, residual_from=2)]
    return [attention, dict(add, residual_from=-1), dict(norm_step), ffn, dict(add, residual_from=2), dict(norm_step)]


def model_summary(source, trust_remote_code: bool = False) -> dict:
    """What a model is, as data: `source` is a model, a config, or a model folder / Hub id (built on the meta
    device from its config.json, without loading weights).

    Returns a dict with `model` (class), `model_type`, `family`, `architecture` (one row per documented config
    switch: group, switch, value, description), `parameters` (one row per component: token/position embeddings,
    attention, feed-forward, norms, heads; counted once when tied), `total_parameters`, `trainable_parameters`,
    `tied_embeddings` and `block` (see `block_layout`)."""
    model = _model_from(source, trust_remote_code=trust_remote_code)
    config = model.config
    architecture = [{"group": "Model", "switch": "model_type", "value": getattr(config, "model_type", "?"),
                     "description": f"{_family(config)} family"}]
    documented = _documented_switches(config)
    for group, field, description in documented:
        architecture.append({"group": group, "switch": field, "value": getattr(config, field),
                             "description": description})
    if not documented:  # not a Blueprint config: its own fields
        for field in sorted(config.to_diff_dict()):
            if not field.startswith("_") and field not in ("architectures", "transformers_version"):
                architecture.append({"group": "Config", "switch": field, "value": getattr(config, field, None),
                                     "description": ""})

    counts: dict[str, int] = {}
    total = trainable = 0
    for name, parameter in model.named_parameters():  # tied parameters come once
        component = _component(name)
        counts[component] = counts.get(component, 0) + parameter.numel()
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    tied = bool(getattr(config, "tie_word_embeddings", False)) and hasattr(model, "lm_head")
    order = [component for _, component in _COMPONENTS] + ["other"]
    layers = config.num_hidden_layers
    per_block = {"attention", "feed-forward", "block norms"}
    parameters = []
    for component in sorted(counts, key=order.index):
        label = f"{component} ({layers} blocks)" if component in per_block else component
        if component == "LM head" and tied:
            label = "LM head (weight tied to token embeddings)"
        parameters.append({"component": label, "parameters": counts[component],
                           "share": counts[component] / total if total else 0.0})
    if tied and "LM head" not in counts:
        parameters.append({"component": "LM head (tied to token embeddings)", "parameters": 0, "share": 0.0})
    return {
        "model": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "family": _family(config),
        "architecture": architecture,
        "parameters": parameters,
        "total_parameters": total,
        "trainable_parameters": trainable,
        "tied_embeddings": tied,
        "block": block_layout(config),
        "norm_position": getattr(config, "norm_position", None),
    }


def format_model_summary(summary: dict) -> str:
    """The summary as Markdown tables (what the command line prints)."""
    lines = [f"# {summary['model']} ({summary['model_type']}, {summary['family']})", "",
             "| group | switch | value | meaning |", "| --- | --- | --- | --- |"]
    for row in summary["architecture"]:
        lines.append(f"| {row['group']} | `{row['switch']}` | `{row['value']!r}` | "
                     f"{_meaning(row['description'], row['value'], 90)} |")
    lines += ["", "| component | parameters | share |", "| --- | ---: | ---: |"]
    for row in summary["parameters"]:
        lines.append(f"| {row['component']} | {row['parameters']:,} | {100 * row['share']:.1f}% |")
    lines.append(f"| **total** | **{summary['total_parameters']:,}** | 100% |")
    order = " -> ".join(step["label"] for step in summary["block"])
    final = "; then a final norm after the last block" if summary.get("norm_position") == "pre" else ""
    lines += ["", f"One block ({summary.get('norm_position') or '?'}-norm): x -> {order}{final}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Model summary: the picture
# ---------------------------------------------------------------------------------------------------------------------


_BOX_COLORS = {"attention": "#fcd9b6", "ffn": "#c9e4f6", "norm": "#fff3b0", "add": "#ffffff",
               "embed": "#e4f1dc", "head": "#eadcf2"}


def _draw_block(ax, summary: dict):
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

    steps = summary["block"]
    pre = summary.get("norm_position") == "pre"
    family = summary["family"]
    config_row = {row["switch"]: row["value"] for row in summary["architecture"]}
    position = config_row.get("position_embedding_type", "")
    embed_detail = "token embedding" + (" × √d" if config_row.get("scale_embeddings") else "")
    embed_detail += {"sinusoidal": " + sinusoidal PE", "learned": " + learned PE"}.get(position, "")
    head = {"decoder": "Linear + softmax over the vocabulary"}.get(family, "Task head (MLM / classifier)")
    if summary["model"].endswith("SequenceClassification"):
        head = f"Pool ({config_row.get('classifier_pooling', '?')}) + classifier"
    elif summary["model"].endswith("TokenClassification"):
        head = "Classifier on every position"
    elif summary["model"].endswith("MaskedLM"):
        head = "Transform + linear + softmax (MLM)"
    elif summary["model"].endswith("Model"):
        head = "Hidden states (no head)"

    nodes = [{"kind": "embed", "label": "Embeddings", "detail": embed_detail}]
    nodes += steps
    if pre:
        nodes.append({"kind": "norm", "label": f"Final {steps[0]['label']}", "detail": "after the last block"})
    nodes.append({"kind": "head", "label": "Head", "detail": head})
    x, width, gap = 4.0, 5.6, 1.0
    ys = [i * gap for i in range(len(nodes))]
    first, last = 1, len(steps)  # node indices of the block

    for i, (node, y) in enumerate(zip(nodes, ys)):
        if node["kind"] == "add":
            ax.add_patch(Circle((x, y), 0.2, facecolor="white", edgecolor="black", linewidth=1.0, zorder=3))
            ax.text(x, y, "+", ha="center", va="center", fontsize=11, zorder=4)
            ax.text(x - 0.35, y, _escape(node["detail"]), ha="right", va="center", fontsize=6.3, color="#444")
        else:
            ax.add_patch(FancyBboxPatch((x - width / 2, y - 0.32), width, 0.64, boxstyle="round,pad=0.02",
                                        facecolor=_BOX_COLORS[node["kind"]], edgecolor="black", linewidth=0.8,
                                        zorder=2))
            ax.text(x, y + 0.1, _escape(node["label"]), ha="center", va="center", fontsize=8, weight="bold", zorder=3)
            detail = _escape(node["detail"])
            ax.text(x, y - 0.15, detail, ha="center", va="center", fontsize=6.3 * min(1.0, 46 / max(len(detail), 1)),
                    zorder=3)
        if i:
            bottom = ys[i - 1] + (0.2 if nodes[i - 1]["kind"] == "add" else 0.32)
            top = y - (0.2 if node["kind"] == "add" else 0.32)
            ax.add_patch(FancyArrowPatch((x, bottom), (x, top), arrowstyle="-|>", mutation_scale=8, linewidth=0.9,
                                         zorder=1))

    # Residual connections: from the branch point (just above the step that produced the residual) around the
    # right of the sub-layer into the add.
    for offset, step in enumerate(steps):
        if step["kind"] != "add":
            continue
        source_index = step["residual_from"] + first  # -1 -> the embeddings / previous block
        branch_y = (ys[source_index] + ys[source_index + 1]) / 2
        add_y = ys[offset + first]
        right = x + width / 2 + 0.45 + 0.25 * (offset % 2)
        ax.plot([x, right, right], [branch_y, branch_y, add_y], color="#555", linewidth=0.9, zorder=1)
        ax.add_patch(FancyArrowPatch((right, add_y), (x + 0.2, add_y), arrowstyle="-|>", mutation_scale=8,
                                     linewidth=0.9, color="#555", zorder=1))
        ax.plot([x], [branch_y], marker="o", markersize=2.5, color="#555")

    # The block's frame, with its repeat count.
    top_y, bottom_y = ys[last] + 0.48, ys[first] - 0.58
    ax.add_patch(FancyBboxPatch((x - width / 2 - 0.35, bottom_y), width + 1.5, top_y - bottom_y,
                                boxstyle="round,pad=0.05", facecolor="none", edgecolor="#777", linestyle="--",
                                linewidth=0.9))
    layers = config_row.get("num_hidden_layers", "N")
    ax.text(x - width / 2 - 0.55, (top_y + bottom_y) / 2, f"× {layers}", ha="right", va="center", fontsize=11)
    ax.set_xlim(-0.5, 9.5)
    ax.set_ylim(-0.6, ys[-1] + 0.6)
    ax.set_aspect("auto")
    ax.axis("off")
    ax.set_title(f"One block: {'Pre-LN (norm before each sub-layer)' if pre else 'Post-LN (norm after each add)'}",
                 fontsize=9)


def plot_model_summary(source, output: str | Path | None = None, *, title: str | None = None,
                       formats: Sequence[str] | None = None, dpi: int | None = None, trust_remote_code: bool = False):
    """Draws the model summary in three panels: a diagram of one block as configured (the order of norm,
    sub-layer and residual add shows Post-LN vs Pre-LN; attention and feed-forward variants are labelled), the
    architecture table (each config switch and its value), and the parameter count per component. `source`: a
    model, a config, a folder or a `model_summary` dict. Returns the Figure; `output` also saves it."""
    summary = source if isinstance(source, dict) else model_summary(source, trust_remote_code=trust_remote_code)
    rows = summary["architecture"]
    height = max(7.0, 0.2 * len(rows) + 1.4)
    figure = _new_figure(16.0, height, dpi)
    grid = figure.add_gridspec(1, 3, width_ratios=[1.05, 1.35, 1.0])

    _draw_block(figure.add_subplot(grid[0, 0]), summary)

    table_ax = figure.add_subplot(grid[0, 1])
    table_ax.axis("off")
    cells = [[row["group"].split()[0], row["switch"], _escape(_short(repr(row["value"]), 16)),
              _escape(_meaning(row["description"], row["value"], 52))]
             for row in rows if row["switch"] != "model_type"]
    table = table_ax.table(cellText=cells, colLabels=["group", "switch", "value", "meaning"], loc="upper center",
                           cellLoc="left", colLoc="left", colWidths=[0.15, 0.29, 0.12, 0.50])
    table.auto_set_font_size(False)
    table.set_fontsize(6.5)
    table.scale(1.0, 1.02)
    for (r, _), cell in table.get_celld().items():
        cell.set_linewidth(0.3)
        if r == 0:
            cell.set_facecolor("#dddddd")
        elif r % 2 == 0:
            cell.set_facecolor("#f5f5f5")
    table_ax.set_title("Architecture: every config switch", fontsize=9)

    bars_ax = figure.add_subplot(grid[0, 2])
    params = summary["parameters"]
    labels = [row["component"] for row in params][::-1]
    values = [row["parameters"] for row in params][::-1]
    positions = range(len(values))
    bars_ax.barh(list(positions), values, color="#4c72b0")
    bars_ax.set_yticks(list(positions), [_escape(label) for label in labels], fontsize=7.5)
    peak = max(values) if values else 1
    for y, (value, row) in enumerate(zip(values, params[::-1])):
        bars_ax.text(value + 0.01 * peak, y, f"{value:,} ({100 * row['share']:.1f}%)", va="center", fontsize=7)
    bars_ax.set_xlim(0, peak * 1.55 if peak else 1)
    bars_ax.tick_params(axis="x", labelsize=7)
    bars_ax.spines[["top", "right"]].set_visible(False)
    bars_ax.set_title(f"Parameters: {summary['total_parameters']:,} in all", fontsize=9)

    if title is None:
        title = f"{summary['model']} ({summary['model_type']})"
    figure.suptitle(_escape(title), fontsize=11)
    return _finish(figure, output, formats, dpi)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _default_output(source: str, filename: str) -> Path:
    folder = Path(source)
    if folder.is_file():
        folder = folder.parent
    return (folder if folder.is_dir() else Path(".")) / filename


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_blueprint.visualize",
        description="Pictures of a Blueprint model (needs matplotlib: " + INSTALL_HINT + "). Each command writes "
                    "PNG by default; --format png svg writes both. Headless: no display needed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python -m hf_blueprint.visualize attention out/quickstart --text 'ROMEO: But soft'\n"
            "  python -m hf_blueprint.visualize attention out/model --text 'the cat sat' --views heads "
            "--layers 0 -1 --heads 0 1 -o att.svg\n"
            "  python -m hf_blueprint.visualize curves out/quickstart            # -> out/quickstart/training_curves.png\n"
            "  python -m hf_blueprint.visualize summary out/quickstart --markdown\n"
            "  python -m hf_blueprint.visualize summary --preset llama-135m -o llama.png"
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{attention,curves,summary}")

    def common(sub, default_name):
        sub.add_argument("-o", "--output", help=f"Output file (default: {default_name} in the input folder).")
        sub.add_argument("--format", nargs="+", choices=IMAGE_FORMATS, dest="formats",
                         help="Image format(s) to write (default: the output's extension, else png).")
        sub.add_argument("--dpi", type=int, default=None, help=f"Resolution (default {DEFAULT_DPI}).")

    attention = commands.add_parser(
        "attention", help="attention heatmaps per layer and head, averaged over heads, and rollout",
        description="Attention maps of a saved model for a text: per layer and head, averaged over heads, and "
                    "attention rollout across layers. Masked cells (causal future) are grey.")
    attention.add_argument("model", help="Model folder or Hub id (with its tokenizer).")
    attention.add_argument("--text", required=True, help="The text to look at.")
    attention.add_argument("--views", nargs="+", choices=ATTENTION_VIEWS, default=list(ATTENTION_VIEWS),
                           help="Which pictures (default: all three; several add _heads/_mean/_rollout to the name).")
    attention.add_argument("--layers", nargs="+", type=int, help="Layer indices (default all; -1 is the last).")
    attention.add_argument("--heads", nargs="+", type=int, help="Head indices for --views heads (default all).")
    attention.add_argument("--max_length", type=int, help="Truncate the text to this many tokens.")
    attention.add_argument("--trust_remote_code", action="store_true")
    common(attention, "attention_map.png")

    curves = commands.add_parser(
        "curves", help="training curves from a Trainer output folder (trainer_state.json)",
        description="Loss (train/eval), perplexity for language models, accuracy for classifiers and learning "
                    "rate against steps, from a Trainer output folder or trainer_state.json.")
    curves.add_argument("source", help="Trainer output folder (or checkpoint folder, or trainer_state.json).")
    curves.add_argument("--task", choices=("auto", "lm", "classification"), default="auto")
    curves.add_argument("--panels", nargs="+", choices=CURVE_PANELS, help="Panels to draw, in order.")
    common(curves, TRAINING_CURVES_FILENAME)

    summary = commands.add_parser(
        "summary", help="architecture table, parameters per component and a diagram of one block",
        description="The architecture table (each config switch), parameter counts per component and a diagram of "
                    "one block as configured. Reads only config.json: no weights are loaded.")
    summary.add_argument("model", nargs="?", help="Model folder or Hub id (or use --preset).")
    summary.add_argument("--preset", help="A named preset instead of a folder (see hf_blueprint.presets).")
    summary.add_argument("--family", choices=("encoder", "decoder"), help="Family of --preset (default: its own).")
    summary.add_argument("--markdown", action="store_true", help="Also print the tables as Markdown.")
    summary.add_argument("--json", action="store_true", help="Print the summary as JSON instead of drawing.")
    summary.add_argument("--trust_remote_code", action="store_true")
    common(summary, "model_summary.png")
    return parser


def _preset_config(name: str, family: str | None):
    _import_blueprint()
    import hf_blueprint

    classes = {"decoder": hf_blueprint.BlueprintDecoderConfig, "encoder": hf_blueprint.BlueprintEncoderConfig}
    error = None
    for fam in [family] if family else ["decoder", "encoder"]:
        try:
            return classes[fam].from_preset(name)
        except ValueError as caught:
            error = caught
    raise ValueError(str(error))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """The command line; returns the paths written."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "attention":
            model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
            _require_matplotlib()
            output = Path(args.output) if args.output else _default_output(args.model, "attention_map.png")
            paths = attention_maps(model, tokenizer, args.text, output, views=args.views, layers=args.layers,
                                   heads=args.heads, formats=args.formats, dpi=args.dpi, max_length=args.max_length)
        elif args.command == "curves":
            output = Path(args.output) if args.output else _default_output(args.source, TRAINING_CURVES_FILENAME)
            figure = plot_training_curves(args.source, task=args.task, panels=args.panels, dpi=args.dpi)
            paths = save_figure(figure, output, formats=args.formats, dpi=args.dpi)
        else:
            if (args.model is None) == (args.preset is None):
                raise SystemExit("summary: give a model folder or --preset NAME (one of them).")
            source = args.model if args.model else _preset_config(args.preset, args.family)
            result = model_summary(source, trust_remote_code=args.trust_remote_code)
            if args.json:
                print(json.dumps(result, indent=2, default=str))
                return []
            if args.markdown:
                print(format_model_summary(result))
            default = _default_output(args.model, "model_summary.png") if args.model else \
                Path(f"model_summary_{args.preset}.png")
            output = Path(args.output) if args.output else default
            paths = save_figure(plot_model_summary(result, dpi=args.dpi), output, formats=args.formats, dpi=args.dpi)
    except ImportError as error:
        raise SystemExit(f"error: {error}") from None
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
