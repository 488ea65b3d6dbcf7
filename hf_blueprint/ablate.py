"""Ablations: train one recipe with its switches varied, over several seeds, and tabulate and plot what changes.

    python -m hf_blueprint.ablate recipes/configs/ablations/example_tiny.yaml
    python -m hf_blueprint.ablate SPEC.yaml --jobs 2 --output_dir out/try    # two runs at a time, elsewhere
    python -m hf_blueprint.ablate SPEC.yaml --dry_run                        # the plan and the commands, nothing run

A spec (YAML; the format is documented in recipes/configs/ablations/README.md) names a recipe, its config file, the
settings every run shares (`base`), the switches to vary (a `grid`, or `one_at_a_time` from the base) and the seeds.
Each (cell, seed) is one run of the recipe in a subprocess: the recipes do all the training, this module only plans,
launches, records and summarizes. The output folder holds:

    ablation.json          the spec the folder was made with (it marks the folder as an ablation's)
    ablate.log             a line per run started and finished
    runs/<cell>__seed<s>/  recipe.log, output/ (the recipe's --output_dir), result.json (written last)
    runs.csv               one row per (cell, seed): switch values, seed, status, seconds, metrics
    results.csv, .md       one row per cell: mean and sd over the seeds that finished, computed from runs.csv
    figures/*.png          learning curves per cell, each metric against each switch, per-layer gradient norms

A run is finished when its `result.json` exists; it is written (atomically) only after the recipe exited and its
metrics were read, so a later invocation skips it. A run folder without one (the runner was killed, or stopped by
Ctrl-C) belongs to the runner and is deleted and run again from scratch. A recipe that exits with an error is recorded
as `failed`, with the end of its log; one stopped by a NaN/inf loss (the recipes' NonFiniteLossCallback) or reporting
one is recorded as `diverged`, a result like any other.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import difflib
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml


RECIPES = ("pretrain_causal_lm", "pretrain_masked_lm", "finetune_classification", "train_translation")
SPEC_KEYS = ("description", "recipe", "config", "output_dir", "base", "grid", "one_at_a_time", "seeds", "metrics")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Flags the runner sets for every run: a spec that set them would break resuming or the run folders.
RUNNER_FLAGS = {
    "output_dir": "each run gets its own folder under the ablation's output_dir",
    "seed": "the runner passes each of `seeds`",
    "overwrite_output_dir": "the runner clears an unfinished run's folder itself",
    "resume_from_checkpoint": "an unfinished run is redone from scratch",
}
# Metrics taken by default: the final evaluation and test numbers, not their timings.
DEFAULT_METRIC_PREFIXES = ("eval_", "test_", "predict_")
TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")
STATUSES = ("ok", "diverged", "failed")
RESULT_FILE = "result.json"
MARKER_FILE = "ablation.json"
LOCK_FILE = ".ablate.lock"
LOG_TAIL_LINES = 30
POLL_SECONDS = 0.2
NONFINITE_STOP = re.compile(r"NonFiniteLossError: Non-finite training step (\d+)")
REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class SpecError(ValueError):
    """The spec (or the command line) asks for something that cannot run; raised before any run starts."""


class AblationError(RuntimeError):
    """The ablation cannot go on: its output folder is not its own, or the spec changed under finished runs."""


# ---------------------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Switch:
    name: str  # the recipe flag or model config field, without a `model.`/`recipe.` prefix
    kind: str  # "model" (goes into --config_overrides) or "recipe" (a flag of the recipe)
    values: list


@dataclass
class Spec:
    path: Path
    text: str
    description: str
    recipe: str
    recipe_path: Path
    config: Path | None
    output_dir: Path
    base_flags: dict
    base_model: dict
    mode: str  # "grid" or "one_at_a_time"
    switches: list[Switch]
    seeds: list[int]
    metrics: list[str] | None


@dataclass
class Cell:
    index: int  # 1-based, in plan order
    values: dict  # switch name -> value, for the switches this cell sets
    shown: dict  # switch name -> text for the tables, for every switch (the base value where the cell keeps it)
    slug: str  # folder-name form of the values

    @property
    def label(self) -> str:
        return ", ".join(f"{name}={format_value(value)}" for name, value in self.values.items()) or "base"


@dataclass
class Run:
    number: int  # 1-based, in plan order
    cell: Cell
    seed: int
    folder: Path
    command: list[str]
    arguments: list[str]  # the recipe's arguments, with the run folder written as <run>: what identifies the run
    config_sha256: str | None

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def output(self) -> Path:
        return self.folder / "output"

    @property
    def result_path(self) -> Path:
        return self.folder / RESULT_FILE


def format_value(value) -> str:
    """A switch value as the tables and --config_overrides write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def load_spec(path: str | os.PathLike, output_dir: str | None = None) -> Spec:
    """Reads and checks a spec file's structure. Switch names and values are checked against the recipe by `plan`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"Spec file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path} must hold a mapping with the keys {list(SPEC_KEYS)}, got {type(raw).__name__}.")
    where = str(path)
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; a spec has the keys {list(SPEC_KEYS)}.")

    recipe = raw.get("recipe")
    if recipe not in RECIPES:
        raise SpecError(f"{where}: recipe: {recipe!r} is not a recipe the runner knows; choose one of {list(RECIPES)}.")
    recipe_path = REPO_RECIPES / f"{recipe}.py"
    if not recipe_path.is_file():
        raise SpecError(f"{where}: recipe: {recipe_path} does not exist (the runner needs the repository's recipes/ "
                        f"folder next to the hf_blueprint package: an editable install of the repository).")

    config = raw.get("config")
    if config is not None:
        if not isinstance(config, str) or not config.endswith(CONFIG_SUFFIXES):
            raise SpecError(f"{where}: config: expected the path of a recipe config file ({'/'.join(CONFIG_SUFFIXES)}),"
                            f" got {config!r}.")
        config = Path(config)
        if not config.is_file():
            raise SpecError(f"{where}: config: {config} does not exist (paths are relative to the folder you run "
                            f"from, {Path.cwd()}, as for the recipes).")
        read_config_file(config)  # a mapping, or an error naming the file

    if output_dir is None:
        output_dir = raw.get("output_dir", f"out/ablations/{path.stem}")
        if not isinstance(output_dir, str) or not output_dir.strip():
            raise SpecError(f"{where}: output_dir: expected a folder path, got {output_dir!r}.")

    base = raw.get("base") or {}
    if not isinstance(base, dict) or not all(isinstance(k, str) for k in base):
        raise SpecError(f"{where}: base: expected a mapping of recipe flags and model config fields to values, got "
                        f"{base!r}.")

    modes = [mode for mode in ("grid", "one_at_a_time") if mode in raw]
    if len(modes) != 1:
        raise SpecError(f"{where}: give exactly one of `grid` (every combination of the values) or `one_at_a_time` "
                        f"(each switch varied alone from the base), got {modes or 'neither'}.")
    mode = modes[0]
    varied = raw[mode]
    if not isinstance(varied, dict) or not varied:
        raise SpecError(f"{where}: {mode}: expected a non-empty mapping of switch names to lists of values, got "
                        f"{varied!r}.")
    for name, values in varied.items():
        if not isinstance(name, str):
            raise SpecError(f"{where}: {mode}: switch names are text, got {name!r}.")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: {mode}.{name}: expected a non-empty list of values, got {values!r}.")
        seen = {}
        for value in values:
            key = json.dumps(value, sort_keys=True, default=str)
            if key in seen:
                raise SpecError(f"{where}: {mode}.{name}: the value {value!r} is listed twice.")
            seen[key] = value

    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise SpecError(f"{where}: seeds: expected a non-empty list of integers, e.g. [0, 1, 2], got {seeds!r}.")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise SpecError(f"{where}: seeds: {seed!r} is not a seed; seeds are integers in [0, 2**32).")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{where}: seeds: {seeds} repeats a seed (the same seed twice is the same run).")

    metrics = raw.get("metrics")
    if metrics is not None:
        if (not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) and m for m in metrics)
                or len(set(metrics)) != len(metrics)):
            raise SpecError(f"{where}: metrics: expected a non-empty list of distinct metric names, e.g. [eval_loss], "
                            f"got {metrics!r}.")

    description = raw.get("description") or path.stem
    spec = Spec(path=path, text=text, description=str(description).strip(), recipe=recipe, recipe_path=recipe_path,
                config=config, output_dir=Path(output_dir), base_flags={}, base_model={}, mode=mode, switches=[],
                seeds=list(seeds), metrics=metrics)
    _resolve_switches(spec, base, varied)
    return spec


def read_config_file(path: Path) -> dict:
    """A recipe config file's mapping (the recipes read it the same way)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
    except (ValueError, yaml.YAMLError) as error:
        raise SpecError(f"config: {path} cannot be read: {error}") from None
    if not isinstance(values, dict):
        raise SpecError(f"config: {path} must hold a mapping of recipe flags to values, got {type(values).__name__}.")
    return values


def model_config_fields() -> set[str]:
    """The fields a spec may set in --config_overrides: the dataclass fields of the Blueprint configs."""
    import dataclasses

    from .configuration_blueprint import BlueprintDecoderConfig, BlueprintEncoderConfig, BlueprintSeq2SeqConfig

    fields = set()
    for config_class in (BlueprintDecoderConfig, BlueprintEncoderConfig, BlueprintSeq2SeqConfig):
        fields |= {f.name for f in dataclasses.fields(config_class)}
    return fields


_RECIPE_MODULES = {}


def load_recipe(recipe_path: Path):
    """The recipe's module (its ARGUMENTS and DEFAULTS), imported from its file; main() is not run."""
    key = str(recipe_path)
    if key not in _RECIPE_MODULES:
        module_spec = importlib.util.spec_from_file_location(f"_ablate_recipe_{recipe_path.stem}", recipe_path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _RECIPE_MODULES[key] = module
    return _RECIPE_MODULES[key]


def recipe_flags(recipe_path: Path) -> set[str]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(load_recipe(recipe_path).ARGUMENTS)
    return {action.dest for action in parser._actions if action.dest != "help"}


def _resolve_switches(spec: Spec, base: dict, varied: dict) -> None:
    """Sorts each name into a recipe flag or a model config field (a `model.`/`recipe.` prefix decides when a name
    is both) and checks the values each kind can take."""
    from .recipe_args import parse_config_overrides

    flags, fields = recipe_flags(spec.recipe_path), model_config_fields()
    where = str(spec.path)

    def resolve(name: str, place: str) -> tuple[str, str]:
        for prefix, kind, names in (("model.", "model", fields), ("recipe.", "recipe", flags)):
            if name.startswith(prefix):
                bare = name[len(prefix):]
                if bare not in names:
                    raise SpecError(f"{where}: {place}: {bare!r} is not a {kind} "
                                    f"{'config field' if kind == 'model' else 'flag'}{_close(bare, names)}.")
                return bare, kind
        if name in RUNNER_FLAGS:
            raise SpecError(f"{where}: {place}: {name} is set by the runner ({RUNNER_FLAGS[name]}).")
        if name == "config_overrides":
            raise SpecError(f"{where}: {place}: vary the model config fields themselves (e.g. num_hidden_layers: "
                            f"[2, 4]), not config_overrides.")
        if name in flags and name in fields:
            raise SpecError(f"{where}: {place}: {name!r} is both a flag of recipes/{spec.recipe}.py and a model config "
                            f"field; write recipe.{name} or model.{name}.")
        if name in fields:
            return name, "model"
        if name in flags:
            return name, "recipe"
        raise SpecError(f"{where}: {place}: {name!r} is neither a flag of recipes/{spec.recipe}.py nor a field of the "
                        f"Blueprint configs{_close(name, flags | fields)}.")

    def check_value(name: str, kind: str, value, place: str) -> None:
        if kind == "model":
            if isinstance(value, (list, dict)) or (isinstance(value, str) and "," in value):
                raise SpecError(f"{where}: {place}: {value!r} cannot go into --config_overrides (one value per field, "
                                f"no commas).")
        else:
            if value is None:
                raise SpecError(f"{where}: {place}: a recipe flag needs a value; leave the flag out for the recipe's "
                                f"default.")
            if isinstance(value, list) and any(isinstance(v, (list, dict)) or v is None for v in value):
                raise SpecError(f"{where}: {place}: a list flag takes a list of plain values, got {value!r}.")

    for name, value in base.items():
        if name == "config_overrides":
            if not isinstance(value, str):
                raise SpecError(f"{where}: base.config_overrides: expected 'field=value,...' text, got {value!r}.")
            for field_name, field_value in parse_config_overrides(value).items():
                bare, kind = resolve(f"model.{field_name}", "base.config_overrides")
                spec.base_model[bare] = field_value
            continue
        bare, kind = resolve(name, f"base.{name}")
        check_value(bare, kind, value, f"base.{name}")
        (spec.base_model if kind == "model" else spec.base_flags)[bare] = value

    for name, values in varied.items():
        bare, kind = resolve(name, f"{spec.mode}.{name}")
        if any(s.name == bare for s in spec.switches):
            raise SpecError(f"{where}: {spec.mode}: {bare} is listed twice.")
        for value in values:
            check_value(bare, kind, value, f"{spec.mode}.{name}")
        spec.switches.append(Switch(bare, kind, list(values)))


def _close(name: str, names) -> str:
    matches = difflib.get_close_matches(name, sorted(names), n=3)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


# ---------------------------------------------------------------------------------------------------------------------
# The plan: cells, runs, and their commands, checked by the recipe's own argument parser before anything runs
# ---------------------------------------------------------------------------------------------------------------------


def flag_arguments(name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{name}", "true" if value else "false"]
    if isinstance(value, list):
        return [f"--{name}", *(format_value(v) for v in value)]
    return [f"--{name}", format_value(value)]


def recipe_arguments(spec: Spec, values: dict, seed: int, output: str) -> list[str]:
    """The recipe's command-line arguments for one run: config file, then the base, then the cell (later flags win;
    the model fields of all three merged into one --config_overrides, which would otherwise replace the file's)."""
    kinds = {switch.name: switch.kind for switch in spec.switches}
    flags = {**spec.base_flags, **{k: v for k, v in values.items() if kinds[k] == "recipe"}}
    model = {**config_file_overrides(spec), **spec.base_model,
             **{k: v for k, v in values.items() if kinds[k] == "model"}}
    arguments = [str(spec.config)] if spec.config else []
    arguments += ["--disable_tqdm", "true"]  # the log is a file: no progress bars in it (a spec may set it back)
    for name, value in flags.items():
        arguments += flag_arguments(name, value)
    if model:
        arguments += ["--config_overrides", ",".join(f"{k}={format_value(v)}" for k, v in model.items())]
    return arguments + ["--seed", str(seed), "--output_dir", output]


def config_file_overrides(spec: Spec) -> dict:
    from .recipe_args import parse_config_overrides

    if spec.config is None:
        return {}
    overrides = read_config_file(spec.config).get("config_overrides")
    return parse_config_overrides(str(overrides)) if overrides else {}


def check_with_recipe(spec: Spec, arguments: list[str], what: str):
    """Parses `arguments` with the recipe's own parser and builds the model config from them (when training from
    scratch), as the recipe will: a value it refuses is reported now, naming the cell, not after hours of runs.
    Returns the parsed argument groups and the config (None when the model comes from a checkpoint)."""
    from transformers.utils import logging as hf_logging

    from .recipe_args import build_config, parse_args

    module = load_recipe(spec.recipe_path)
    messages = io.StringIO()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(messages):
            parsed = parse_args(module.ARGUMENTS, arguments, module.DEFAULTS)
        model_args = next(group for group in parsed if hasattr(group, "config_overrides"))
        config = None
        if model_args.model_name_or_path is None and model_args.config_name is None:
            config = build_config(model_args)
    except SystemExit:  # argparse's error(): the reason is the last line it printed
        lines = [line for line in messages.getvalue().splitlines() if line.strip()]
        raise SpecError(f"{spec.path}: {what}: recipes/{spec.recipe}.py refuses the arguments: "
                        f"{lines[-1] if lines else 'see its --help'}") from None
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise SpecError(f"{spec.path}: {what}: recipes/{spec.recipe}.py refuses the settings: {error}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return parsed, config


def effective_values(spec: Spec, parsed, config) -> dict:
    """What each switch is in a parsed run: the recipe's parsed flag, or the built config's field (None: unknown,
    the model comes from a checkpoint)."""
    values = {}
    for switch in spec.switches:
        if switch.kind == "recipe":
            values[switch.name] = next(getattr(group, switch.name) for group in parsed if hasattr(group, switch.name))
        else:
            values[switch.name] = getattr(config, switch.name, None) if config is not None else None
    return values


def plan(spec: Spec, notes: list[str] | None = None) -> list[Run]:
    """Every (cell, seed) run of the spec, seeds in the outer loop (one full pass over the cells per seed: the first
    comparison is ready early). Each cell is checked with the recipe's parser and config before anything runs."""
    notes = notes if notes is not None else []
    probe = str(spec.output_dir / "runs" / "check" / "output")
    check_with_recipe(spec, recipe_arguments(spec, {}, spec.seeds[0], probe), "base")

    if spec.mode == "grid":
        names = [switch.name for switch in spec.switches]
        combos = [dict(zip(names, combo)) for combo in itertools.product(*(s.values for s in spec.switches))]
    else:
        combos = [{}]
        for switch in spec.switches:
            combos += [{switch.name: value} for value in switch.values]

    cells, seen = [], {}
    for values in combos:
        what = ", ".join(f"{spec.mode}.{k}={format_value(v)}" for k, v in values.items()) or "base"
        parsed, config = check_with_recipe(spec, recipe_arguments(spec, values, spec.seeds[0], probe), what)
        effective = effective_values(spec, parsed, config)
        key = json.dumps(effective, sort_keys=True, default=str)
        if None not in effective.values() and key in seen:
            if spec.mode == "one_at_a_time" and seen[key] == "base":
                notes.append(f"{what} is the base setting: the base cell covers it.")
                continue
            raise SpecError(f"{spec.path}: {what} and {seen[key]} are the same setting once parsed.")
        seen[key] = what
        # A switch the cell does not set shows the value its run has, which a varied switch can change (8 query
        # heads give 8 key/value heads; 1 query head gives 1), not the base cell's.
        shown = {}
        for switch in spec.switches:
            if switch.name in values:
                shown[switch.name] = format_value(values[switch.name])
            else:
                known = effective[switch.name]
                shown[switch.name] = format_value(known) if known is not None or switch.kind == "recipe" else "default"
        cells.append(Cell(index=len(cells) + 1, values=values, shown=shown, slug=_slug(values)))

    _unique_slugs(cells)
    config_sha = hashlib.sha256(spec.config.read_bytes()).hexdigest() if spec.config else None
    runs = []
    for seed in spec.seeds:
        for cell in cells:
            folder = spec.output_dir / "runs" / f"{cell.slug}__seed{seed}"
            arguments = recipe_arguments(spec, cell.values, seed, "<run>/output")
            command = [sys.executable, str(spec.recipe_path)] + recipe_arguments(
                spec, cell.values, seed, str((folder / "output").absolute()))
            runs.append(Run(number=len(runs) + 1, cell=cell, seed=seed, folder=folder, command=command,
                            arguments=arguments, config_sha256=config_sha))
    return runs


def _slug(values: dict) -> str:
    text = "__".join(f"{name}={format_value(value)}" for name, value in values.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def _unique_slugs(cells: list[Cell]) -> None:
    """Folder names stay short and distinct: a long or clashing name gets a hash of the values."""
    counts = {}
    for cell in cells:
        counts[cell.slug] = counts.get(cell.slug, 0) + 1
    for cell in cells:
        if counts[cell.slug] > 1 or len(cell.slug) > 80:
            digest = hashlib.sha1(json.dumps(cell.values, sort_keys=True, default=str).encode()).hexdigest()[:8]
            cell.slug = f"{cell.slug[:60]}-{digest}"


# ---------------------------------------------------------------------------------------------------------------------
# Running: one subprocess per run, results written atomically
# ---------------------------------------------------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part: a temporary file, flushed, then renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_result(run: Run) -> dict | None:
    """The run's recorded result, or None when it has none (never finished) or an unreadable one (redone)."""
    try:
        result = json.loads(run.result_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("status") in STATUSES else None


def _die_with_parent() -> None:
    """In the child, before the recipe starts: on Linux, be killed when the runner dies, so that a killed runner
    leaves no recipe writing into a folder the next invocation clears."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_run(run: Run, threads_per_job: int) -> subprocess.Popen:
    if run.folder.is_symlink():
        raise AblationError(f"{run.folder} is a symbolic link; the runner only clears folders it made.")
    if run.folder.exists():
        shutil.rmtree(run.folder)  # the runner's own folder of an unfinished run: redone from scratch
    run.folder.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_job), PYTHONUNBUFFERED="1")
    with open(run.folder / "recipe.log", "w", encoding="utf-8") as log:
        log.write(f"# {shlex.join(run.command)}\n# OMP_NUM_THREADS={threads_per_job}\n")
        log.flush()
        return subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def read_metrics(output: Path) -> dict:
    """The final metrics the recipe saved: all_results.json (train, eval and test merged by the Trainer), else the
    per-split files it is merged from. Only numbers are kept (NaN and inf included, as the recipe wrote them)."""
    names = ["all_results.json"] if (output / "all_results.json").is_file() else \
        ["train_results.json", "eval_results.json", "test_results.json", "predict_results.json"]
    metrics = {}
    for name in names:
        try:
            values = json.loads((output / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(values, dict):
            metrics.update({k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return metrics


def read_log_history(output: Path) -> list[dict]:
    try:
        state = json.loads((output / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    history = state.get("log_history") if isinstance(state, dict) else None
    return [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []


def interrupted(run: Run, returncode: int) -> bool:
    """Whether the recipe stopped on Ctrl-C (SIGINT, or Python's KeyboardInterrupt): the user stopping the
    ablation, not an outcome of the run."""
    if returncode == 0:
        return False
    tail = log_tail(run.folder / "recipe.log", lines=3)
    return returncode in (-signal.SIGINT, 128 + signal.SIGINT) or any(line.startswith("KeyboardInterrupt")
                                                                      for line in tail)


def judge(run: Run, returncode: int, seconds: float) -> dict:
    """The run's result: ok, diverged (stopped by the non-finite loss guard, or finished with a NaN loss) or failed."""
    tail = log_tail(run.folder / "recipe.log")
    metrics = read_metrics(run.output)
    result = {"run": run.id, "cell": run.cell.index, "switches": run.cell.values, "seed": run.seed,
              "status": "ok", "returncode": returncode, "wall_seconds": round(seconds, 3), "metrics": metrics,
              "diverged_at_step": None, "note": "", "arguments": run.arguments, "config_sha256": run.config_sha256,
              "finished_at": datetime.datetime.now().isoformat(timespec="seconds")}
    stopped = next((NONFINITE_STOP.search(line) for line in reversed(tail) if NONFINITE_STOP.search(line)), None)
    if returncode != 0 and stopped:
        result.update(status="diverged", diverged_at_step=int(stopped.group(1)),
                      note=f"non-finite loss at step {stopped.group(1)}")
    elif returncode != 0:
        why = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}")
        result.update(status="failed", note=f"{why}: {tail[-1] if tail else 'no output'}")
    elif not metrics:
        result.update(status="failed", note=f"exit code 0 but no metrics in {run.output} (all_results.json)")
    else:
        losses = {k: v for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(v)}
        losses.update({f"step {e.get('step')} loss": e["loss"] for e in read_log_history(run.output)
                       if isinstance(e.get("loss"), (int, float)) and not math.isfinite(e["loss"])})
        if losses or any(isinstance(v, float) and math.isnan(v) for v in metrics.values()):
            shown = ", ".join(f"{k}={v}" for k, v in list(losses.items())[:3]) or "a NaN metric"
            result.update(status="diverged", note=f"non-finite: {shown}")
    if result["status"] != "ok":
        result["log_tail"] = tail
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


def is_default_metric(name: str) -> bool:
    return name.startswith(DEFAULT_METRIC_PREFIXES) and not name.endswith(TIMING_SUFFIXES)


def metric_names(spec: Spec, results: dict) -> list[str]:
    if spec.metrics is not None:
        return list(spec.metrics)
    names = []
    for result in results.values():
        if result and result["status"] == "ok":
            names += [name for name in result["metrics"] if is_default_metric(name) and name not in names]
    return names


def check_metrics_reported(spec: Spec, result: dict) -> None:
    if spec.metrics is None or result["status"] != "ok":
        return
    missing = [name for name in spec.metrics if name not in result["metrics"]]
    if missing:
        raise AblationError(f"{spec.path}: metrics: {missing} are not among the metrics run {result['run']} reported "
                            f"({sorted(result['metrics'])}); fix the names (its result is kept).")


def _number(value) -> str:
    """Full precision (Python's shortest round-trip form): the per-cell statistics are recomputed from this text."""
    return repr(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def write_runs_csv(spec: Spec, runs: list[Run], results: dict, metrics: list[str]) -> Path:
    switch_names = [switch.name for switch in spec.switches]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run", "cell", *switch_names, "seed", "status", "wall_seconds", "diverged_at_step", *metrics,
                     "note"])
    for run in runs:
        result = results.get(run.id) or {}
        values = result.get("metrics", {})
        writer.writerow([run.id, run.cell.index, *(run.cell.shown[name] for name in switch_names), run.seed,
                         result.get("status", "pending"), _number(result.get("wall_seconds")),
                         result.get("diverged_at_step") or "", *(_number(values.get(m)) for m in metrics),
                         result.get("note", "")])
    path = spec.output_dir / "runs.csv"
    write_atomically(path, buffer.getvalue())
    return path


def summarize_cells(spec: Spec, runs_csv: Path, metrics: list[str]) -> list[dict]:
    """Per cell, from runs.csv: counts by status, and mean, sd (n - 1) and n of each metric over its ok runs."""
    with open(runs_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cells = {}
    for row in rows:
        cell = cells.setdefault(row["cell"], {"cell": int(row["cell"]), "rows": []})
        cell["rows"].append(row)
    summaries = []
    for cell in cells.values():
        rows = cell["rows"]
        summary = {"cell": cell["cell"], "switches": {s.name: rows[0][s.name] for s in spec.switches},
                   "seeds": len(rows), **{status: sum(r["status"] == status for r in rows)
                                          for status in (*STATUSES, "pending")},
                   "metrics": {}, "notes": []}
        for metric in metrics:
            values = [float(r[metric]) for r in rows if r["status"] == "ok" and r[metric] != ""]
            summary["metrics"][metric] = {
                "mean": statistics.fmean(values) if values else None,
                "sd": statistics.stdev(values) if len(values) >= 2 else None,
                "n": len(values),
            }
        for row in rows:
            if row["status"] in ("diverged", "failed"):
                summary["notes"].append(f"seed {row['seed']} {row['status']}: {row['note']}")
        summaries.append(summary)
    return summaries


def write_results(spec: Spec, summaries: list[dict], metrics: list[str]) -> tuple[Path, Path]:
    switch_names = [switch.name for switch in spec.switches]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cell", *switch_names, "seeds", *STATUSES, "pending",
                     *(f"{m}_{stat}" for m in metrics for stat in ("mean", "sd", "n"))])
    for s in summaries:
        writer.writerow([s["cell"], *(s["switches"][n] for n in switch_names), s["seeds"],
                         *(s[status] for status in (*STATUSES, "pending")),
                         *(value for m in metrics for value in (_number(s["metrics"][m]["mean"]),
                                                                _number(s["metrics"][m]["sd"]),
                                                                s["metrics"][m]["n"]))])
    csv_path = spec.output_dir / "results.csv"
    write_atomically(csv_path, buffer.getvalue())

    def shown(stats: dict) -> str:
        if stats["mean"] is None:
            return "—"
        if stats["sd"] is None:
            return f"{stats['mean']:.4g} (n=1)"
        return f"{stats['mean']:.4g} ± {stats['sd']:.2g}"

    base = ", ".join(f"{k}={format_value(v)}" for k, v in {**spec.base_flags, **spec.base_model}.items())
    lines = [f"# {spec.description}", "",
             f"Spec `{spec.path}`: recipe `{spec.recipe}`"
             + (f", config `{spec.config}`" if spec.config else "")
             + f", {spec.mode.replace('_', ' ')} over {', '.join(f'`{n}`' for n in switch_names)}"
             + f", seeds {', '.join(map(str, spec.seeds))}.",
             *([f"Base: `{base}`."] if base else []), "",
             "Each metric: mean ± sd (sample standard deviation) over the seeds whose run finished `ok`; runs that "
             "diverged or failed are counted apart and named in the notes.", "",
             "| cell | " + " | ".join(switch_names) + " | ok / seeds | " + " | ".join(metrics) + " | notes |",
             "|---:|" + "---|" * len(switch_names) + "---|" + "---:|" * len(metrics) + "---|"]
    for s in summaries:
        notes = "; ".join(s["notes"] + ([f"{s['pending']} pending"] if s["pending"] else []))
        cells = [str(s["cell"]), *(s["switches"][n] for n in switch_names), f"{s['ok']} / {s['seeds']}",
                 *(shown(s["metrics"][m]) for m in metrics), notes]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    md_path = spec.output_dir / "results.md"
    write_atomically(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def write_tables(spec: Spec, runs: list[Run], results: dict) -> list[dict]:
    metrics = metric_names(spec, results)
    runs_csv = write_runs_csv(spec, runs, results, metrics)
    summaries = summarize_cells(spec, runs_csv, metrics)
    write_results(spec, summaries, metrics)
    return summaries


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)
    return path


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def mean_curve(histories: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """The mean over runs of `key` at each step that every run logged it at."""
    per_run = [{e["step"]: e[key] for e in history if isinstance(e.get(key), (int, float)) and "step" in e}
               for history in histories]
    per_run = [values for values in per_run if values]
    if not per_run:
        return [], []
    steps = sorted(set.intersection(*(set(values) for values in per_run)))
    return steps, [statistics.fmean(values[step] for values in per_run) for step in steps]


def figure_groups(spec: Spec, cells: list[Cell]) -> dict[str, list[Cell]]:
    """Which cells share a picture: all of a grid; for one-at-a-time, the base and the cells of each switch."""
    if spec.mode == "grid":
        return {"": cells}
    base = [cell for cell in cells if not cell.values]
    return {switch.name: base + [cell for cell in cells if switch.name in cell.values] for switch in spec.switches}


def write_figures(spec: Spec, runs: list[Run], results: dict, summaries: list[dict]) -> list[Path]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    folder = spec.output_dir / "figures"
    folder.mkdir(exist_ok=True)
    cells = list({run.cell.index: run.cell for run in runs}.values())
    ok_runs = {cell.index: [run for run in runs if run.cell.index == cell.index
                            and (results.get(run.id) or {}).get("status") == "ok"] for cell in cells}
    histories = {cell.index: [read_log_history(run.output) for run in ok_runs[cell.index]] for cell in cells}
    paths = []

    for group, members in figure_groups(spec, cells).items():
        figure = _figure(11, 4)
        axes = figure.subplots(1, 2)
        drawn = False
        for ax, key, title in ((axes[0], "loss", "training loss"), (axes[1], "eval_loss", "validation loss")):
            for cell in members:
                steps, values = mean_curve(histories[cell.index], key)
                if steps:
                    label = cell.label if cell.values or not group else f"base ({group}={cell.shown[group]})"
                    ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
                    drawn = True
            ax.set_xlabel("step")
            ax.set_title(f"{title} (mean over seeds)")
            if ax.lines:
                ax.legend(fontsize="small")
        if drawn:
            name = f"learning_curves_{_file_name(group)}.png" if group else "learning_curves.png"
            paths.append(_save(figure, folder / name))

    metrics = list(summaries[0]["metrics"]) if summaries else []
    by_cell = {summary["cell"]: summary for summary in summaries}
    for metric in metrics:
        for switch in spec.switches:
            figure = plot_metric_against_switch(spec, switch, metric, cells, by_cell)
            if figure is not None:
                paths.append(_save(figure, folder / f"{_file_name(metric)}_vs_{_file_name(switch.name)}.png"))

    # Per-layer gradient norms (hf_blueprint.callbacks.GradientNormCallback), averaged over logged steps and seeds.
    norms = {}
    for cell in cells:
        per_key = {}
        for history in histories[cell.index]:
            for entry in history:
                for key, value in entry.items():
                    if key.startswith("grad_norm/") and isinstance(value, (int, float)) and math.isfinite(value):
                        per_key.setdefault(key[len("grad_norm/"):], []).append(value)
        if per_key:
            norms[cell.index] = {key: statistics.fmean(values) for key, values in per_key.items()}
    if norms:
        groups = sorted({key for values in norms.values() for key in values}, key=_group_order)
        figure = _figure(max(6.4, 0.5 * len(groups) + 2), 4)
        ax = figure.subplots()
        for cell in cells:
            if cell.index in norms:
                ax.plot(range(len(groups)), [norms[cell.index].get(g, float("nan")) for g in groups], marker="o",
                        label=cell.label)
        ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("gradient L2 norm")
        ax.set_title("gradient norm per layer (mean over logged steps and seeds)")
        ax.legend(fontsize="small")
        paths.append(_save(figure, folder / "grad_norms.png"))
    return paths


def plot_metric_against_switch(spec: Spec, switch: Switch, metric: str, cells: list[Cell], by_cell: dict):
    """The metric's mean (± sd) per value of the switch. In a grid, one line per combination of the other switches;
    one-at-a-time, the base and the cells of this switch. None when no cell has a value."""
    if spec.mode == "grid":
        others = [s.name for s in spec.switches if s.name != switch.name]
        lines = {}
        for cell in cells:
            lines.setdefault(", ".join(f"{o}={cell.shown[o]}" for o in others), []).append(cell)
    else:
        lines = {"": figure_groups(spec, cells)[switch.name]}

    def tick(cell: Cell) -> str:
        return cell.shown[switch.name] + (" (base)" if not cell.values and spec.mode == "one_at_a_time" else "")

    members = [cell for members in lines.values() for cell in members]
    ticks = list(dict.fromkeys(tick(cell) for cell in members))
    # A numeric switch: its values in order, joined by lines. A categorical one: as listed, points apart.
    numeric = all(_is_number(cell.shown[switch.name]) for cell in members)
    if numeric:
        value_of = {tick(cell): float(cell.shown[switch.name]) for cell in members}
        ticks.sort(key=value_of.get)

    figure = _figure()
    ax = figure.subplots()
    for label, members in lines.items():
        points = sorted(((ticks.index(tick(cell)), by_cell[cell.index]["metrics"][metric]) for cell in members
                         if by_cell[cell.index]["metrics"][metric]["mean"] is not None), key=lambda point: point[0])
        if points:
            ax.errorbar([x for x, _ in points], [stats["mean"] for _, stats in points],
                        yerr=[stats["sd"] or 0.0 for _, stats in points], marker="o", capsize=4,
                        label=label or None, linestyle="-" if numeric else "none")
    if not ax.lines:
        return None
    ax.set_xticks(range(len(ticks)), ticks, rotation=20 if len(ticks) > 4 else 0)
    ax.set_xlim(-0.5, len(ticks) - 0.5)
    ax.set_xlabel(switch.name)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {switch.name}\n(mean ± sd over seeds)", fontsize="medium")
    if any(lines):
        ax.legend(fontsize="small")
    return figure


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def _group_order(name: str):
    """embeddings, then the blocks in order (encoder before decoder), then the head."""
    match = re.fullmatch(r"(?:(\w+?)_)?layer_(\d+)", name)
    if name == "embeddings":
        return (0, "", 0)
    if match:
        return (1, match.group(1) or "", int(match.group(2)))
    return (2, name, 0)


# ---------------------------------------------------------------------------------------------------------------------
# The whole ablation
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    output_dir: Path
    executed: list[str] = field(default_factory=list)  # ids of the runs this invocation ran
    skipped: list[str] = field(default_factory=list)  # ids of the runs already finished
    statuses: dict = field(default_factory=dict)  # every finished run's id -> status
    figures: list[Path] = field(default_factory=list)


class Progress:
    """Lines on stdout and in ablate.log: which run, cell and seed, the elapsed time and the ETA."""

    def __init__(self, log_path: Path | None, total: int, cells: int, jobs: int, metrics: list[str] | None = None,
                 stream=None):
        self.log_path, self.total, self.cells, self.jobs, self.metrics = log_path, total, cells, jobs, metrics
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self.durations = []

    def line(self, text: str) -> None:
        stamped = f"[ablate {datetime.datetime.now():%H:%M:%S}] {text}"
        print(stamped, file=self.stream, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(stamped + "\n")

    def what(self, run: Run) -> str:
        return f"run {run.number}/{self.total}, cell {run.cell.index}/{self.cells} ({run.cell.label}), seed {run.seed}"

    def run_started(self, run: Run) -> None:
        self.line(f"start {self.what(run)}")

    def run_finished(self, run: Run, result: dict, remaining: int) -> None:
        self.durations.append(result["wall_seconds"])
        eta = statistics.fmean(self.durations) * remaining / self.jobs
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()
                          if (k in self.metrics if self.metrics else is_default_metric(k)))
        self.line(f"{result['status']:<8} {self.what(run)} in {_clock(result['wall_seconds'])}"
                  f"{': ' + shown if shown and result['status'] == 'ok' else ''}"
                  f"{': ' + result['note'] if result['note'] else ''}"
                  f" | elapsed {_clock(time.monotonic() - self.started)}, ETA {_clock(eta)}")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def claim_output_dir(spec: Spec) -> None:
    """The output folder is new, or an ablation's (it holds ablation.json): never a folder of something else."""
    out = spec.output_dir
    if out.exists() and not out.is_dir():
        raise AblationError(f"output_dir {out} is a file; give a folder.")
    marker = out / MARKER_FILE
    held = [path for path in out.iterdir() if path.name != LOCK_FILE] if out.is_dir() else []
    if held and not marker.is_file():
        raise AblationError(f"output_dir {out} is not empty and is not an ablation's folder (it has no {MARKER_FILE}): "
                            f"give a new output_dir (in the spec or with --output_dir).")
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def locked(out: Path):
    """One runner per output folder: a second one would clear the runs the first is running."""
    import fcntl

    with open(out / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AblationError(f"Another hf_blueprint.ablate is running on {out}; wait for it or stop it.") from None
        yield


def check_finished_runs(spec: Spec, runs: list[Run], results: dict, notes: list[str]) -> None:
    """A finished run made with other arguments (the spec or the config file changed since) is not this spec's
    result: stop, rather than mix them in one table. A failed one holds no result: it is simply run again."""
    for run in runs:
        result = results.get(run.id)
        if result is None:
            continue
        if result.get("arguments") != run.arguments or result.get("config_sha256") != run.config_sha256:
            if result["status"] == "failed":
                notes.append(f"run {run.id} failed with other settings than the spec now gives: it runs again.")
                results[run.id] = None
                continue
            changed = "the config file's content" if result.get("arguments") == run.arguments else \
                f"its arguments (then: {shlex.join(map(str, result.get('arguments') or []))})"
            raise AblationError(
                f"Run {run.id} in {spec.output_dir} finished with other settings than the spec now gives: "
                f"{changed}. Give a new output_dir, or delete {run.folder} to run it again.")
        check_metrics_reported(spec, result)


def run_ablation(spec_path, output_dir: str | None = None, jobs: int = 1, threads_per_job: int = 1,
                 retry_failed: bool = False, dry_run: bool = False, stream=None) -> Summary:
    """Runs every unfinished (cell, seed) of the spec, then writes the tables and figures. Returns what it did."""
    stream = stream or sys.stdout
    if jobs < 1 or threads_per_job < 1:
        raise SpecError(f"--jobs and --threads_per_job must be at least 1, got {jobs} and {threads_per_job}.")
    spec = load_spec(spec_path, output_dir)
    notes = []
    runs = plan(spec, notes)
    cells = len({run.cell.index for run in runs})
    summary = Summary(output_dir=spec.output_dir)

    if dry_run:
        for note in notes:
            print(f"note: {note}", file=stream)
        for run in runs:
            done = read_result(run) if run.folder.is_dir() else None
            state = done["status"] if done else "to run"
            print(f"run {run.number}/{len(runs)} cell {run.cell.index}/{cells} seed {run.seed} [{state}]\n"
                  f"  {shlex.join(run.command)}", file=stream)
        return summary

    claim_output_dir(spec)
    with locked(spec.output_dir):
        write_atomically(spec.output_dir / MARKER_FILE, json.dumps(
            {"written_by": "hf_blueprint.ablate", "spec": str(spec.path), "spec_text": spec.text,
             "recipe": spec.recipe, "config": str(spec.config) if spec.config else None,
             "runs": [run.id for run in runs]}, indent=2) + "\n")
        results = {run.id: read_result(run) for run in runs}
        check_finished_runs(spec, runs, results, notes)
        todo = [run for run in runs if results[run.id] is None
                or (retry_failed and results[run.id]["status"] == "failed")]
        todo_ids = {run.id for run in todo}
        summary.skipped = [run.id for run in runs if run.id not in todo_ids]
        progress = Progress(spec.output_dir / "ablate.log", len(runs), cells, jobs, spec.metrics, stream)
        for note in notes:
            progress.line(f"note: {note}")
        progress.line(f"{spec.path}: {len(runs)} runs ({cells} cells x {len(spec.seeds)} seeds), "
                      f"{len(summary.skipped)} already finished, {len(todo)} to run, {jobs} at a time, "
                      f"OMP_NUM_THREADS={threads_per_job} each.")
        write_tables(spec, runs, results)
        execute(spec, runs, todo, results, jobs, threads_per_job, progress, summary)
        summaries = write_tables(spec, runs, results)
        summary.figures = write_figures(spec, runs, results, summaries)
        summary.statuses = {run_id: result["status"] for run_id, result in results.items() if result}
        counts = {status: sum(s == status for s in summary.statuses.values()) for status in STATUSES}
        progress.line(f"executed {len(summary.executed)} runs, skipped {len(summary.skipped)} finished; all runs: "
                      + ", ".join(f"{n} {status}" for status, n in counts.items())
                      + f". Tables: {spec.output_dir / 'results.md'}, {spec.output_dir / 'results.csv'}, "
                        f"{spec.output_dir / 'runs.csv'}; {len(summary.figures)} figures in "
                        f"{spec.output_dir / 'figures'}.")
    return summary


def execute(spec: Spec, runs: list[Run], todo: list[Run], results: dict, jobs: int, threads_per_job: int,
            progress: Progress, summary: Summary) -> None:
    """Runs `todo`, `jobs` at a time. On any way out other than the end (Ctrl-C, an error) the runs in progress are
    stopped and left without a result: the next invocation redoes them."""
    queue = list(todo)
    running = {}  # run id -> (run, process, start time)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run = queue.pop(0)
                running[run.id] = (run, start_run(run, threads_per_job), time.monotonic())
                progress.run_started(run)
            finished = [key for key, (_, process, _) in running.items() if process.poll() is not None]
            if not finished:
                time.sleep(POLL_SECONDS)
                continue
            for key in finished:
                run, process, started = running.pop(key)
                if interrupted(run, process.returncode):
                    raise KeyboardInterrupt  # Ctrl-C reached the recipe first: not a result, the run will be redone
                result = judge(run, process.returncode, time.monotonic() - started)
                write_atomically(run.result_path, json.dumps(result, indent=2) + "\n")  # the run is finished now
                results[run.id] = result
                summary.executed.append(run.id)
                progress.run_finished(run, result, remaining=len(queue) + len(running))
                write_tables(spec, runs, results)
                check_metrics_reported(spec, result)
    finally:
        for run, process, _ in running.values():
            if process.poll() is None:
                process.terminate()
        for run, process, _ in running.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            progress.line(f"stopped {progress.what(run)}: no result recorded, it will be redone")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_blueprint.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="The ablation spec (YAML); see recipes/configs/ablations/README.md.")
    parser.add_argument("--output_dir", default=None, help="Write here instead of the spec's output_dir.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs at the same time.")
    parser.add_argument("--threads_per_job", type=int, default=1,
                        help="OMP_NUM_THREADS of each run (keep jobs x threads within the cores).")
    parser.add_argument("--retry_failed", action="store_true", help="Run again the runs recorded as failed.")
    parser.add_argument("--dry_run", action="store_true", help="Check the spec and print the commands; run nothing.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        summary = run_ablation(args.spec, args.output_dir, args.jobs, args.threads_per_job, args.retry_failed,
                               args.dry_run)
    except (SpecError, AblationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the runs in progress were stopped and will be redone; run the same command to resume.",
              file=sys.stderr)
        return 130
    failed = [run_id for run_id, status in summary.statuses.items() if status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}; their log tails are in runs/<run>/result.json "
              f"(--retry_failed runs them again).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
