#!/usr/bin/env python
"""Pretrain a Blueprint decoder by next-token prediction (causal language modeling), in the manner of run_clm.py.

Texts are tokenized, concatenated and cut into blocks of --block_size tokens. The run reports the validation loss
and perplexity (per token: per character with a character tokenizer), generates a sample from the trained model,
and saves model + tokenizer + generation settings in --output_dir, ready for `AutoModelForCausalLM.from_pretrained`
and `push_to_hub`.

nanoGPT's CPU configuration on tinyshakespeare (character level), from scratch:

    python recipes/pretrain_causal_lm.py recipes/configs/shakespeare_char.yaml

or spelled out:

    python recipes/pretrain_causal_lm.py --train_file recipes/data/tinyshakespeare/input.txt \\
        --tokenizer_type char --block_size 64 \\
        --config_overrides "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512" \\
        --max_steps 2000 --per_device_train_batch_size 12 --learning_rate 1e-3 --output_dir out/shakespeare-char

Any Trainer flag works (`--push_to_hub`, `--resume_from_checkpoint true`, ...); so does `torchrun` and
`accelerate launch`.
"""

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, Trainer, default_data_collator

import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes)
from hf_blueprint.chat import install_chat_template, read_chat_template
from hf_blueprint.data import (
    causal_training_blocks,
    load_raw_datasets,
    pack_into_blocks,
    pick_text_column,
    require_columns,
    require_text,
    tokenize_texts,
    truncate_splits,
)
from hf_blueprint.metrics import language_model_metrics
from hf_blueprint.recipe_run import end_run, evaluate_validation, load_model, record_metrics, start_run
from hf_blueprint.recipe_args import (
    DataArguments,
    ModelArguments,
    RecipeTrainingArguments,
    build_config,
    format_summary,
    load_or_train_tokenizer,
    parse_args,
    require_positive_length,
    sequence_length,
    training_callbacks,
)


logger = logging.getLogger(__name__)

DEFAULTS = {
    "model_type": "blueprint_decoder",
    "output_dir": "out/pretrain_causal_lm",
    "do_train": True,
    "do_eval": True,
}


@dataclass
class CausalLMArguments:
    """Block size and the sample generated at the end."""

    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training block. Default: the model's max_position_embeddings, at most 1024."},
    )
    sample_prompt: str | None = field(
        default=None,
        metadata={"help": "Text to continue for the sample. Default: the first 16 tokens of the validation text."},
    )
    sample_max_new_tokens: int = field(default=200, metadata={"help": "Length of the sample, in tokens (0: none)."})
    sample_do_sample: bool = field(
        default=True, metadata={"help": "Sample (true) or decode greedily (false); saved as the generation default."}
    )
    sample_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (above 0)."})
    sample_top_k: int = field(default=50, metadata={"help": "Sample from the k most likely tokens (0: all)."})
    sample_top_p: float = field(
        default=1.0,
        metadata={"help": "Sample from the smallest set of likeliest tokens whose probabilities add up to p (1: all)."},
    )
    eval_block_sizes: str | None = field(
        default=None,
        metadata={"help": "Comma-separated lengths (e.g. '128,256,512') at which the validation text is also scored "
                          "after training, as eval_len<N>_loss / eval_len<N>_perplexity: how the model does on longer "
                          "contexts than it was trained on (length extrapolation)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template saved with the tokenizer (a Jinja file, or the template itself), for "
                          "/v1/chat/completions and `transformers chat`. Default: hf_blueprint.chat's "
                          "DEFAULT_CHAT_TEMPLATE ('User: ...' / 'Assistant: ...' turns), unless the checkpoint's "
                          "tokenizer has one."},
    )

    def __post_init__(self):
        # Checked here, not when the sample is drawn after hours of training.
        require_positive_length(self.block_size, "--block_size", minimum=2,
                                why=" (a block of one token has no next token to predict)")
        if self.sample_max_new_tokens < 0:
            raise ValueError(f"--sample_max_new_tokens must be 0 (no sample) or more, got {self.sample_max_new_tokens}.")
        if self.sample_do_sample and not (math.isfinite(self.sample_temperature) and self.sample_temperature > 0):
            raise ValueError(f"--sample_temperature must be a number above 0, got {self.sample_temperature} (for "
                             f"greedy decoding give --sample_do_sample false).")
        if self.sample_top_k < 0:
            raise ValueError(f"--sample_top_k must be 0 (all tokens) or more, got {self.sample_top_k}.")
        if not (0 < self.sample_top_p <= 1):
            raise ValueError(f"--sample_top_p must be in (0, 1], got {self.sample_top_p}.")
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a missing file fails now, not after training
        self.extra_eval_lengths = parse_lengths(self.eval_block_sizes, "--eval_block_sizes")


# The recipe's flags: one dataclass per group, in the order main() unpacks them.
ARGUMENTS = (ModelArguments, DataArguments, CausalLMArguments, RecipeTrainingArguments)


def main(argv=None):
    model_args, data_args, lm_args, training_args = parse_args(ARGUMENTS, argv, DEFAULTS, description=__doc__)
    return run(model_args, data_args, lm_args, training_args)


def run(model_args: ModelArguments, data_args: DataArguments, lm_args: CausalLMArguments,
        training_args: RecipeTrainingArguments, report: bool = True, output_dir_checked: bool = False) -> dict:
    """Trains, saves, evaluates and samples; returns the metrics, the sample and the sizes. `report` prints the
    summary table (the quickstart prints its own); `output_dir_checked`: the caller ran `prepare_run` already (the
    quickstart, which writes its tokenizer into the folder first)."""
    run = start_run(training_args, output_dir_checked)

    raw, sources = load_raw_datasets(
        data_args, contiguous_validation=True, seed=training_args.seed, cache_dir=model_args.cache_dir,
        token=model_args.token, trust_remote_code=model_args.trust_remote_code,
    )
    text_column = data_args.text_column_name or pick_text_column(raw["train"].column_names)
    require_columns(raw, sources, {text_column: "--text_column_name"})
    require_text(raw, sources, {text_column: "--text_column_name"})
    raw = truncate_splits(raw, data_args.max_train_samples, data_args.max_eval_samples)

    tokenizer = load_or_train_tokenizer(model_args, raw["train"], [text_column], family="decoder")
    config = build_config(model_args, tokenizer)
    model = load_model(AutoModelForCausalLM, model_args, config, tokenizer, run)
    block_size = sequence_length(lm_args.block_size, config, default=1024, flag="--block_size")
    configure_generation(model, tokenizer, lm_args)  # before training: the final save writes it
    if lm_args.chat_template is not None or tokenizer.chat_template is None:
        install_chat_template(tokenizer, lm_args.chat_template)  # saved with the tokenizer

    with training_args.main_process_first(desc="tokenizing and packing"):
        # Each line is tokenized on its own, then the token streams are concatenated: with a character tokenizer
        # that is exactly the character stream of the file (newlines included).
        tokenized = tokenize_texts(raw, tokenizer, text_column, data_args.preprocessing_num_workers)
        blocks = pack_into_blocks(tokenized, block_size, sources, data_args.preprocessing_num_workers, labels=True)

    # Set after tokenizing: long lines are packed, not truncated, so the length warning would be noise.
    tokenizer.model_max_length = block_size
    preprocess_logits, compute_metrics = language_model_metrics(causal=True)
    has_eval = training_args.do_eval and "validation" in blocks
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=causal_training_blocks(blocks["train"]) if training_args.do_train else None,
        eval_dataset=blocks["validation"] if has_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if has_eval else None,
        preprocess_logits_for_metrics=preprocess_logits if has_eval else None,
        callbacks=training_callbacks(model_args),
    )

    def evaluate_and_sample(trainer, results):
        evaluate_validation(trainer, results)
        if has_eval:
            validation = DatasetDict(validation=tokenized["validation"])
            for length in lm_args.extra_eval_lengths:
                longer = pack_into_blocks(validation, length, sources, data_args.preprocessing_num_workers,
                                          labels=True)["validation"]
                metrics = trainer.evaluate(longer, metric_key_prefix=f"eval_len{length}")
                record_metrics(trainer, f"eval_len{length}", metrics, results)
        prompt = lm_args.sample_prompt if lm_args.sample_prompt is not None else _default_prompt(blocks, tokenizer)
        # Sharded parameters (FSDP, DeepSpeed ZeRO-3) are gathered layer by layer during each forward, so every rank
        # must generate in step with the others (same seed, same tokens); otherwise rank 0 alone samples.
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or (trainer.model.tp_size or 1) > 1
        if lm_args.sample_max_new_tokens > 0 and (sharded or trainer.is_world_process_zero()):
            started = time.perf_counter()
            sample = generate_sample(trainer.model, tokenizer, prompt, seed=training_args.seed)
            seconds = time.perf_counter() - started
            if trainer.is_world_process_zero():
                results.update(prompt=prompt, sample=sample)
                tokens = len(tokenizer(sample, add_special_tokens=False)["input_ids"])
                record_metrics(trainer, "sample", {"sample_tokens": tokens, "sample_seconds": seconds,
                                                   "sample_tokens_per_second": tokens / seconds}, results)
                logger.info(f"Sample:\n{prompt}{sample}")

    results = {"num_parameters": model.num_parameters(), "train_blocks": len(blocks["train"]),
               "block_size": block_size, "output_dir": training_args.output_dir}
    end_run(trainer, run, results, task="text-generation", model_args=model_args,
            data_source=data_args.dataset_name or sources.get("train"), evaluate=evaluate_and_sample)
    if report and trainer.is_world_process_zero():
        print(format_summary("pretrain_causal_lm", _summary_rows(results, sources)))
    return results


def parse_lengths(text: str | None, flag: str) -> list[int]:
    """'128,256' -> [128, 256], each a length of at least 2 tokens (a next token to predict)."""
    if not text:
        return []
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated whole numbers, e.g. '128,256', got {text!r}.") from None
    for length in lengths:
        require_positive_length(length, flag, minimum=2, why=" (a block of one token has no next token to predict)")
    return lengths


def _default_prompt(blocks, tokenizer) -> str:
    split = "validation" if "validation" in blocks else "train"
    return tokenizer.decode(blocks[split][0]["input_ids"][:16])


def configure_generation(model, tokenizer, lm_args: CausalLMArguments) -> None:
    """Stores the sampling settings in the model's generation config, so that they are saved with it and a reloaded
    model generates the same way without being told."""
    generation_config = model.generation_config
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.max_new_tokens = lm_args.sample_max_new_tokens or None
    generation_config.do_sample = lm_args.sample_do_sample
    if lm_args.sample_do_sample:
        generation_config.temperature = lm_args.sample_temperature
        generation_config.top_k = lm_args.sample_top_k or None
        generation_config.top_p = lm_args.sample_top_p


@torch.no_grad()
def generate_sample(model, tokenizer, prompt: str, seed: int) -> str:
    """Continues `prompt` with the model's saved generation settings; seeded, so the same model gives the same text.

    A model with a position table (learned or sinusoidal) cannot see past max_position_embeddings tokens. Longer
    samples slide a window, as nanoGPT's sampler crops its context: each `generate` call continues the last half
    window of tokens until the window is full again.
    """
    model.eval()
    config = model.config
    limit = config.max_position_embeddings if config.position_embedding_type in ("learned", "sinusoidal") else None
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    if ids.shape[1] == 0:  # an empty prompt: start from the beginning-of-text token
        ids = torch.tensor([[tokenizer.bos_token_id]], device=model.device)
    prompt_length, remaining = ids.shape[1], model.generation_config.max_new_tokens or 0
    torch.manual_seed(seed)
    while remaining > 0:
        context = ids
        if limit is not None and ids.shape[1] + remaining > limit:
            context = ids[:, -max(1, min(ids.shape[1], limit // 2)):]
        steps = remaining if limit is None else min(remaining, limit - context.shape[1])
        output = model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=steps)
        new_tokens = output[:, context.shape[1]:]
        ids = torch.cat([ids, new_tokens], dim=1)
        remaining -= new_tokens.shape[1]
        if new_tokens.shape[1] < steps:  # stopped at the end-of-text token
            break
    return tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)


def _summary_rows(results: dict, sources: dict) -> list:
    rows = [
        ("training data", sources.get("train")),
        ("parameters", f"{results['num_parameters']:,}"),
        ("blocks x block size", f"{results['train_blocks']:,} x {results['block_size']}"),
    ]
    if "train_runtime" in results:
        rows += [("train steps / runtime", f"{results.get('global_step', '?')} / {results['train_runtime']:.1f} s"),
                 ("train loss", results["train_loss"])]
    if "eval_loss" in results:
        rows += [("validation loss (nats/token)", results["eval_loss"]),
                 ("validation perplexity", results["eval_perplexity"]),
                 ("validation token accuracy", results["eval_accuracy"])]
    if "sample" in results:
        rows.append(("sample", repr((results["prompt"] + results["sample"])[:80]) + " ..."))
    rows += [("saved to", results["output_dir"]), ("wall time", f"{results['wall_seconds']:.1f} s")]
    return rows


if __name__ == "__main__":
    main()
