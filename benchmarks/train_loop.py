"""The causal-LM recipe's Trainer against a plain PyTorch loop over the identical model and batches.

nanoGPT trains with a plain loop (set the learning rate, sample a batch, forward, backward, clip, AdamW step); the
recipe (`recipes/pretrain_causal_lm.py`) trains the same model through transformers' Trainer. Both run here at
`recipes/configs/shakespeare_char.yaml`'s settings (4 layers, 128 wide, block 64, batch 12) in one process,
interleaved step by step: each recipe step is followed by one step of each plain loop, so that all of them run under
the same load, second by second, and the ratio recipe / plain is robust to what other processes do. A recipe step is
timed from the moment the Trainer's loop resumes after the step before to the end of this one: data loading,
collation, forward, backward, clipping, the optimizer, the schedule, callbacks and logging all count. The first
steps of each run are a warm-up and left out.

    python benchmarks/train_loop.py --threads 1                      # 300 steps a run, 2 runs
    python benchmarks/train_loop.py --threads 1 --profile            # also where a step's time goes
    python benchmarks/train_loop.py --steps 6 --warmup 2 --repeats 1 --recipe-flags --max_train_samples 400

Two plain loops run: nanoGPT's own choice on a CPU (torch's default AdamW, a loop over the parameters there) and the
same loop with the fused AdamW kernel the Trainer uses by default (`adamw_torch_fused`); the second isolates what the
Trainer adds around the same computation.

The recipe runs as a user runs it (`pretrain_causal_lm.main` on the YAML file), with only what this measurement needs
changed: `--max_steps`, a temporary `--output_dir`, no evaluation and no sample after training (both would come after
the timed loop). A callback appended to the recipe's own (`training_callbacks`) takes the timestamps, runs the plain
loops, and builds them from the Trainer's model config, training blocks and arguments: a fresh model of that config
from the recipe's seed, batches drawn from the same blocks, the same learning-rate schedule.
"""

import argparse
import cProfile
import datetime
import importlib.util
import math
import os
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes)


REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "pretrain_causal_lm.py"
CONFIG = REPO / "recipes" / "configs" / "shakespeare_char.yaml"


def machine_load() -> str:
    return " / ".join(f"{load:.2f}" for load in os.getloadavg())


def load_recipe():
    spec = importlib.util.spec_from_file_location("pretrain_causal_lm", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PlainLoop:
    """nanoGPT's training loop, one step per call, over a fresh model of the recipe's config (initialized from the
    recipe's seed) on batches drawn at random from the recipe's training blocks: set the learning rate, sample a
    batch, forward, backward, clip, AdamW step, zero the gradients. `fused` picks the AdamW implementation: None is
    torch's default and nanoGPT's choice on a CPU (a loop over the parameters there; nanoGPT fuses on CUDA only), True
    the fused kernel of the Trainer's default `adamw_torch_fused`."""

    def __init__(self, config, blocks: torch.Tensor, args, fused: bool | None = None):
        with torch.random.fork_rng():  # the recipe's own random stream stays as it would be without this loop
            torch.manual_seed(args.seed)
            self.model = AutoModelForCausalLM.from_config(config)
        self.model.train()
        self.optimizer = plain_optimizer(self.model, args, fused)
        self.blocks, self.args = blocks, args
        self.generator = torch.Generator().manual_seed(args.seed)
        self.step_index = 0
        self.loss = None
        self.parts: dict[str, float] | None = None  # a dict: each part's seconds are added up in it

    def step(self):
        args, mark = self.args, self._clock()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step_index, args)
        mark("learning rate")
        batch = self.blocks[torch.randint(len(self.blocks), (args.per_device_train_batch_size,),
                                          generator=self.generator)]
        mark("batch")
        loss = self.model(input_ids=batch, labels=batch).loss
        mark("forward + loss")
        loss.backward()
        mark("backward")
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        mark("gradient clipping")
        self.optimizer.step()
        mark("optimizer step")
        self.optimizer.zero_grad(set_to_none=True)
        mark("zero_grad")
        self.step_index += 1
        self.loss = loss.detach()

    def _clock(self):
        """A function that, called with a part's name, adds the time since its previous call to that part."""
        if self.parts is None:
            return lambda label: None
        last = [time.perf_counter()]

        def mark(label):
            now = time.perf_counter()
            self.parts[label] = self.parts.get(label, 0.0) + now - last[0]
            last[0] = now

        return mark


class InterleavedTimer(TrainerCallback):
    """Times the recipe's optimizer steps and, between them, one step of each plain loop: recipe step, plain step(s),
    recipe step, ... so that every figure is measured under the same load, second by second.

    A recipe step's time runs from the moment the Trainer's loop resumes after the previous step (or from the start of
    training) to the end of this one (`on_step_end`, called last among the callbacks): data loading and collation,
    forward, backward, clipping, the optimizer, the schedule and the callbacks count, and so does the logging and
    saving check `_maybe_log_save_evaluate` of the step before, which runs right after `on_step_end`. The plain
    loops (see PlainLoop) are built at `on_train_begin` from the Trainer's model config, training dataset and
    arguments. With `plain_variants` empty only the recipe is timed; `profile_steps` (first, last) wraps those recipe
    steps in cProfile."""

    def __init__(self, plain_variants: dict[str, bool | None], profile_steps: tuple[int, int] | None = None):
        self.plain_variants = plain_variants
        self.plain: dict[str, PlainLoop] = {}
        self.seconds: dict[str, list[float]] = {"recipe": [], **{name: [] for name in plain_variants}}
        self.config = self.dataset = self.training_arguments = None
        self.profile_steps = profile_steps
        self.profiler = cProfile.Profile() if profile_steps else None
        self._resumed = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.config, self.dataset, self.training_arguments = model.config, train_dataloader.dataset, args
        blocks = training_blocks(self.dataset) if self.plain_variants else None
        self.plain = {name: PlainLoop(model.config, blocks, args, fused) for name, fused in self.plain_variants.items()}
        if self.profiler is not None and self.profile_steps[0] == 1:
            self.profiler.enable()
        self._resumed = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds["recipe"].append(time.perf_counter() - self._resumed)
        if self.profiler is not None:
            if state.global_step == self.profile_steps[1]:
                self.profiler.disable()
        for name, loop in self.plain.items():
            start = time.perf_counter()
            loop.step()
            self.seconds[name].append(time.perf_counter() - start)
        if self.profiler is not None and state.global_step == self.profile_steps[0] - 1:
            self.profiler.enable()
        self._resumed = time.perf_counter()


def recipe_argv(steps: int, output_dir: str, extra: list[str]) -> list[str]:
    return [str(CONFIG), "--max_steps", str(steps), "--output_dir", output_dir, "--overwrite_output_dir", "true",
            "--do_eval", "false", "--eval_strategy", "no", "--sample_max_new_tokens", "0", *extra]


def run_recipe(steps: int, extra: list[str], timer: InterleavedTimer) -> InterleavedTimer:
    """One run of the recipe for `steps` steps, with `timer` given to its Trainer after the recipe's own callbacks."""
    recipe = load_recipe()
    recipe_callbacks = recipe.training_callbacks
    recipe.training_callbacks = lambda model_args: [*recipe_callbacks(model_args), timer]
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as output_dir:
        os.chdir(REPO)  # the recipe's YAML names its data relative to the repository root
        try:
            recipe.main(recipe_argv(steps, output_dir, extra))
        finally:
            os.chdir(previous)
    if len(timer.seconds["recipe"]) != steps:
        raise RuntimeError(f"the recipe ran {len(timer.seconds['recipe'])} steps, {steps} were asked for")
    for name, loop in timer.plain.items():
        if not math.isfinite(loop.loss.item()):
            raise RuntimeError(f"the plain loop {name!r} ended with loss {loop.loss.item()}")
    return timer


def training_blocks(dataset) -> torch.Tensor:
    """The recipe's training blocks as one (blocks, block size) tensor of token ids: the plain loop's data. The
    recipe trains from an Arrow dataset or from the blocks in memory (any map-style dataset of equal-length rows)."""
    if hasattr(dataset, "with_format"):  # Arrow: equal-length rows come back as one tensor
        rows = dataset.with_format("torch", columns=["input_ids", "labels"])[:]
        blocks, labels = rows["input_ids"], rows["labels"]
    else:
        items = [dataset[index] for index in range(len(dataset))]
        blocks = torch.stack([torch.as_tensor(item["input_ids"]) for item in items])
        labels = torch.stack([torch.as_tensor(item["labels"]) for item in items])
    if not torch.equal(blocks, labels):
        raise ValueError("the plain loop expects the recipe's blocks to be their own labels (causal LM)")
    return blocks.long()


def learning_rate(step: int, args) -> float:
    """The recipe's schedule (transformers' cosine_with_min_lr: linear warm-up from 0, then cosine decay to min_lr at
    max_steps) at optimizer step `step` (from 0), computed as nanoGPT's get_lr computes its own, from the step alone."""
    base, warmup, total = args.learning_rate, args.warmup_steps, args.max_steps
    min_lr = (args.lr_scheduler_kwargs or {}).get("min_lr", 0.0)
    if step < warmup:
        return base * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base - min_lr)


def plain_optimizer(model, args, fused: bool | None) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers: weight decay on matrices, none on biases and norm weights."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, fused=fused)


PLAIN_VARIANTS = {"plain": None, "plain, fused AdamW": True}


def measure(steps: int, warmup: int, repeats: int, recipe_flags: list[str]) -> dict:
    """`repeats` recipe runs of `steps` steps, each step followed by one step of each plain loop; per run and loop,
    the mean and median ms/step of the steps after the warm-up."""
    runs = []
    for _ in range(repeats):
        timer = run_recipe(steps, recipe_flags, InterleavedTimer(PLAIN_VARIANTS))
        runs.append({name: summarize(seconds, warmup) for name, seconds in timer.seconds.items()})
    return {"runs": runs, "config": timer.config, "arguments": timer.training_arguments, "blocks": len(timer.dataset)}


def summarize(seconds: list[float], warmup: int) -> dict:
    steady = seconds[warmup:]
    return {"mean_ms": 1000 * statistics.fmean(steady), "median_ms": 1000 * statistics.median(steady),
            "steps": len(steady)}


# ---------------------------------------------------------------------------------------------------------------------
# Where a recipe step's time goes
# ---------------------------------------------------------------------------------------------------------------------

# (label, class, method): the parts of the Trainer's step, in the order it runs them; "  " marks a part inside the one
# above it. Callbacks are timed one by one (CallbackHandler.call_event), the InterleavedTimer itself left out.
def _trainer_parts():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler
    from transformers import Trainer

    return [
        ("batch: dataloader, collation, counting the labels", Trainer, "get_batch_samples"),
        ("training_step", Trainer, "training_step"),
        ("  forward + loss (compute_loss)", Trainer, "compute_loss"),
        ("  backward", Accelerator, "backward"),
        ("FLOP count for the logs (floating_point_ops)", Trainer, "floating_point_ops"),
        ("input-token count (_track_num_input_tokens)", Trainer, "_track_num_input_tokens"),
        ("gradient clipping (_clip_grad_norm)", Trainer, "_clip_grad_norm"),
        ("gradient norm to a number (_get_grad_norm)", Trainer, "_get_grad_norm"),
        ("optimizer step", AcceleratedOptimizer, "step"),
        ("learning-rate schedule", AcceleratedScheduler, "step"),
        ("zero_grad (model.zero_grad)", torch.nn.Module, "zero_grad"),
        ("logging / saving / evaluation check (_maybe_log_save_evaluate)", Trainer, "_maybe_log_save_evaluate"),
    ]


class PartTimer:
    """Accumulates the wall time of the Trainer's parts (methods patched with a timing wrapper for the duration of a
    run) and of each callback's events; `reset()` at the end of the warm-up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._patched = []

    def reset(self):
        self.seconds = {}

    def add(self, label: str, seconds: float):
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def __enter__(self):
        from transformers.trainer_callback import CallbackHandler

        for label, owner, name in _trainer_parts():
            self._patch(owner, name, self._timed(label, getattr(owner, name)))
        self._patch(CallbackHandler, "call_event", self._timed_callbacks())
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched = []

    def _patch(self, owner, name, replacement):
        self._patched.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, replacement)

    def _timed(self, label, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)
        return timed

    def _timed_callbacks(self):
        parts = self

        def call_event(handler, event, args, state, control, **kwargs):
            for callback in handler.callbacks:
                start = time.perf_counter()
                result = getattr(callback, event)(
                    args, state, control, model=handler.model, processing_class=handler.processing_class,
                    optimizer=handler.optimizer, lr_scheduler=handler.lr_scheduler,
                    train_dataloader=handler.train_dataloader, eval_dataloader=handler.eval_dataloader, **kwargs)
                if not isinstance(callback, InterleavedTimer):
                    parts.add(f"callback {type(callback).__name__}.{event}", time.perf_counter() - start)
                if result is not None:
                    control = result
            return control

        return call_event


class ProfiledTimer(InterleavedTimer):
    """InterleavedTimer that also resets a PartTimer (and the plain loops' part times) at the end of the warm-up."""

    def __init__(self, plain_variants, parts: PartTimer, warmup: int):
        super().__init__(plain_variants)
        self.parts, self.warmup = parts, warmup

    def on_train_begin(self, *args, **kwargs):
        super().on_train_begin(*args, **kwargs)
        for loop in self.plain.values():
            loop.parts = {}

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.global_step == self.warmup:
            self.parts.reset()
            for loop in self.plain.values():
                loop.parts = {}
        if state.global_step == state.max_steps:  # what runs after the last step is outside the timed steps
            self.recipe_parts = dict(self.parts.seconds)


def parts_table(parts: dict[str, float], steps: int, step_ms: float, title: str) -> list[str]:
    lines = [f"| {title} | ms/step | share |", "| --- | ---: | ---: |"]
    accounted = 0.0
    for label, seconds in parts.items():
        ms = 1000 * seconds / steps
        if not label.startswith("  "):
            accounted += ms
        if ms >= 0.005:
            lines.append(f"| {label} | {ms:.3f} | {ms / step_ms:.1%} |")
    lines.append(f"| the rest (the loop's own work between the parts above) | {step_ms - accounted:.3f} | "
                 f"{(step_ms - accounted) / step_ms:.1%} |")
    lines.append(f"| **whole step** (mean) | {step_ms:.3f} | 100% |")
    return lines


def profile(steps: int, warmup: int, recipe_flags: list[str], rows: int) -> str:
    """Where a step's time goes: the Trainer's parts and callbacks timed one by one (wall clock, no profiler) in a
    recipe run interleaved with the plain loop (fused AdamW, the same kernel as the recipe's), whose parts are timed
    too; then a cProfile of a recipe run alone, its top functions by own time."""
    parts = PartTimer()
    variant = "plain, fused AdamW"
    timer = ProfiledTimer({variant: PLAIN_VARIANTS[variant]}, parts, warmup)
    with parts:
        run_recipe(steps, recipe_flags, timer)
    counted = steps - warmup
    recipe_ms = 1000 * statistics.fmean(timer.seconds["recipe"][warmup:])
    plain_ms = 1000 * statistics.fmean(timer.seconds[variant][warmup:])
    # The last step's _maybe_log_save_evaluate runs after its on_step_end, outside the timed steps; the warm-up's last
    # runs inside the first timed step. The parts are those of the timed steps' wall time, up to that shift.
    measured = timer.recipe_parts
    recipe_parts = {label: measured.get(label, 0.0) for label, _, _ in _trainer_parts()}
    recipe_parts.update({label: seconds for label, seconds in measured.items() if label.startswith("callback ")})
    lines = [f"### Where a step goes: parts timed one by one, steps {warmup + 1}-{steps}, recipe interleaved with the "
             f"plain loop (fused AdamW)", "",
             f"Recipe {recipe_ms:.2f} ms/step, plain loop {plain_ms:.2f} ms/step (means of the same steps): recipe / "
             f"plain {recipe_ms / plain_ms:.3f}, a difference of {recipe_ms - plain_ms:.2f} ms/step.", ""]
    lines += parts_table(recipe_parts, counted, recipe_ms, "part of a recipe step")
    lines += [""] + parts_table(timer.plain[variant].parts, counted, plain_ms, "part of a plain-loop step")

    profiled = InterleavedTimer({}, profile_steps=(warmup + 1, steps))
    run_recipe(steps, recipe_flags, profiled)
    lines += ["", f"### cProfile of a recipe run alone, steps {warmup + 1}-{steps}: top functions by own time "
              f"(ms per step; the profiler's own cost inflates Python-heavy functions)", "",
              "| function | own | cumulative |", "| --- | ---: | ---: |"]
    lines += [f"| `{function}` | {own:.3f} | {cumulative:.3f} |"
              for function, own, cumulative in top_functions(profiled.profiler, counted, rows)]
    return "\n".join(lines) + "\n"


def top_functions(profiler: cProfile.Profile, steps: int, rows: int) -> list[tuple[str, float, float]]:
    """The functions with the most own time per step: (name, own ms/step, cumulative ms/step)."""
    stats = pstats.Stats(profiler).stats
    items = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:rows]
    return [(f"{Path(filename).name}:{line} {name}", 1000 * own / steps, 1000 * cumulative / steps)
            for (filename, line, name), (_, _, own, cumulative, _) in items]


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def markdown(result: dict, header: str) -> str:
    runs = result["runs"]
    names = list(runs[0])
    lines = [header, "", "| run | " + " | ".join(f"{name} mean / median ms/step" for name in names) + " |",
             "| --- |" + " ---: |" * len(names)]
    for index, run in enumerate(runs):
        lines.append(f"| {index + 1} | " + " | ".join(f"{run[name]['mean_ms']:.2f} / {run[name]['median_ms']:.2f}"
                                                     for name in names) + " |")
    lines += ["", "Over all runs (the median of the runs' figures):", "",
              "| loop | mean ms/step | median ms/step | recipe / this loop (means) | recipe / this loop (medians) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    overall = {name: {key: statistics.median(run[name][key] for run in runs) for key in ("mean_ms", "median_ms")}
               for name in names}
    for name in names:
        mean, median = overall[name]["mean_ms"], overall[name]["median_ms"]
        lines.append(f"| {name} | {mean:.2f} | {median:.2f} | {overall['recipe']['mean_ms'] / mean:.3f} | "
                     f"{overall['recipe']['median_ms'] / median:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="first steps of each run left out of the figures")
    parser.add_argument("--repeats", type=int, default=2, help="recipe runs (each with its interleaved plain loops)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--profile", action="store_true",
                        help="also time the parts of a step (recipe and plain loop) and cProfile a recipe run")
    parser.add_argument("--profile-rows", type=int, default=15, help="top functions listed from the cProfile")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument("--recipe-flags", nargs=argparse.REMAINDER, default=[],
                        help="further flags for the recipe (last on the command line), e.g. --max_train_samples 200")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = machine_load()
    result = measure(args.steps, args.warmup, args.repeats, args.recipe_flags)
    config, training = result["config"], result["arguments"]
    header = (f"Recipe (Trainer) vs plain loop, `{CONFIG.name}`: {config.num_hidden_layers} layers, "
              f"{config.hidden_size} wide, vocabulary {config.vocab_size}, batch "
              f"{training.per_device_train_batch_size} x {config.max_position_embeddings} tokens, "
              f"{result['blocks']:,} training blocks; recipe optimizer `{training.optim.value}`; {args.steps} steps a "
              f"run, each recipe step followed by one step of each plain loop, the first {args.warmup} left out, "
              f"{args.repeats} run(s); "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, {datetime.date.today().isoformat()}, load average {load_before} before / "
              f"{machine_load()} after")
    text = markdown(result, header)
    if args.profile:
        text += "\n" + profile(args.steps, args.warmup, args.recipe_flags, args.profile_rows)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
