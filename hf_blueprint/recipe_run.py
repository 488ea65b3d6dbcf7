"""The start and the end every recipe shares, so that a recipe file shows only what is specific to its task.

    run = start_run(training_args)                    # logging, seed, output folder and resume checks
    model = load_model(AutoModelForCausalLM, model_args, config, tokenizer, run)
    ...                                               # the task: data, collator, metrics, Trainer
    results = end_run(trainer, run, results, task="text-generation", model_args=model_args,
                      data_source=..., evaluate=...)  # train, save, evaluate, curves, card or push
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from transformers import set_seed

from .model_card import use_blueprint_model_card
from .recipe_args import check_resume_config, perplexity_of, prepare_run, resume_checkpoint, setup_logging
from .training_guards import check_tokenizer_fits_model
from .visualize import add_training_curves


logger = logging.getLogger(__name__)


@dataclass
class Run:
    """What the start of a run hands to the rest of it."""

    training_args: object
    checkpoint: str | None  # the checkpoint to resume from, or None
    started: float  # time.perf_counter() at the start


def start_run(training_args, output_dir_checked: bool = False) -> Run:
    """Logging, the seed, and the checks made before any data is read (`prepare_run`: the schedule trains something;
    --output_dir holds no other run unless replacing or resuming it). `output_dir_checked`: the caller ran them."""
    setup_logging(training_args)
    set_seed(training_args.seed)
    started = time.perf_counter()
    checkpoint = resume_checkpoint(training_args) if output_dir_checked else prepare_run(training_args)
    return Run(training_args, checkpoint, started)


def load_model(auto_class, model_args, config, tokenizer, run: Run):
    """The model: loaded from --model_name_or_path (its body; a new head starts fresh) or built from `config`, with
    --attn_implementation and, for tensor parallelism, --tp_size. Refuses a tokenizer larger than its vocabulary and
    a resume from a checkpoint of another model config."""
    options = {}
    if model_args.attn_implementation is not None:
        options["attn_implementation"] = model_args.attn_implementation
    if model_args.tp_size > 1:
        if not model_args.model_name_or_path:
            raise ValueError("--tp_size shards a model as transformers loads it: give --model_name_or_path (save the "
                             "freshly initialized model first, e.g. with --max_steps 0 on one process).")
        options["tp_plan"], options["tp_size"] = "auto", model_args.tp_size
    if model_args.model_name_or_path:
        model = auto_class.from_pretrained(model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
                                           token=model_args.token, **options)
    else:
        model = auto_class.from_config(config, **options)
    check_tokenizer_fits_model(tokenizer, model)  # a --tokenizer_name larger than the checkpoint's vocab
    check_resume_config(run.training_args, run.checkpoint, model.config)
    return model


def end_run(trainer, run: Run, results: dict, *, task: str, model_args, data_source: str | None,
            evaluate: Callable | None = None) -> dict:
    """Trains (resuming the run's checkpoint) and saves at once, so that nothing after training (evaluation,
    samples, pictures, the card) can lose the weights; evaluates (`evaluate(trainer, results)`, the task's own, by
    default the validation split); then writes the training curves and the model card, or pushes to the Hub.
    Returns `results` with every metric and the wall time."""
    use_blueprint_model_card(trainer, task=task)  # the card create_model_card and push_to_hub write
    training_args = run.training_args
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=run.checkpoint)
        trainer.save_model()  # model, tokenizer and generation config, on the main process only
        trainer.save_state()
        record_metrics(trainer, "train", train_result.metrics, results)
        results["global_step"] = train_result.global_step
    (evaluate or evaluate_validation)(trainer, results)
    if training_args.do_train:
        trainer.save_state()  # again, with the evaluations in its log history
        add_training_curves(trainer)  # training_curves.png, linked from the card (needs the [viz] extra)
        card = {"finetuned_from": model_args.model_name_or_path, "tasks": task, "dataset": data_source}
        if training_args.push_to_hub:
            trainer.push_to_hub(**card)
        else:
            trainer.create_model_card(**card)
    results["wall_seconds"] = time.perf_counter() - run.started
    return results


def evaluate_validation(trainer, results: dict) -> None:
    """The validation split, when the run has one; a language model's also as the perplexity of its mean loss."""
    if trainer.eval_dataset is None:
        return
    metrics = trainer.evaluate()
    if "eval_perplexity" in metrics:
        # eval_loss averages per-batch means; eval_perplexity is per token over every scored token. With full blocks
        # they agree, which the tests check.
        metrics["eval_loss_perplexity"] = perplexity_of(metrics["eval_loss"])
    record_metrics(trainer, "eval", metrics, results)


def record_metrics(trainer, split: str, metrics: dict, results: dict) -> None:
    """Logged, saved as <split>_results.json (and all_results.json), and added to `results`."""
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)
    results.update(metrics)
