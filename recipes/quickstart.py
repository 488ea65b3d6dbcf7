#!/usr/bin/env python
"""Quickstart: from raw text to a trained, evaluated, shareable Blueprint language model in a few minutes on a CPU.

    python recipes/quickstart.py

On the shipped tinyshakespeare (first 90% of the characters for training, last 10% for validation, as nanoGPT):

1. trains a character-level tokenizer (`recipes/train_tokenizer.py`);
2. pretrains a small Blueprint decoder (nanoGPT's CPU model: 4 layers, 4 heads, 128 wide, 64-token context) by
   next-token prediction (`recipes/pretrain_causal_lm.py`);
3. reports the validation loss and perplexity per character;
4. prints a generated sample;
5. saves a Hub-ready folder (weights, config, tokenizer, generation settings, model card), reloads it through
   `AutoModelForCausalLM` / `AutoTokenizer` and checks that the reloaded model generates the same text.

The defaults are nanoGPT's CPU configuration (2,000 steps of 12 x 64 characters). Every Trainer flag works
(`--max_steps 500` for a quicker, rougher model, `--push_to_hub`, ...); see below.
"""

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes)
from hf_blueprint.recipe_args import (
    DataArguments,
    ModelArguments,
    RecipeTrainingArguments,
    format_summary,
    parse_args,
    prepare_run,
)
from hf_blueprint.visualize import write_attention_map


# The sibling recipes are the steps of the quickstart.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_causal_lm  # noqa: E402
import train_tokenizer  # noqa: E402


logger = logging.getLogger(__name__)

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(RECIPES_DIR, "data", "tinyshakespeare", "input.txt")

# nanoGPT's CPU settings, as in recipes/configs/shakespeare_char.yaml: 2,000 steps take about two minutes on two cores
# (docs/RESULTS.md); `--max_steps 500` gives a rougher model in a quarter of the time.
TRAINING_DEFAULTS = {
    "output_dir": "out/quickstart",
    "max_steps": 2000,
    "per_device_train_batch_size": 12,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr": 1e-4},
    "warmup_steps": 100,
    "adam_beta2": 0.99,
    "weight_decay": 0.1,
    "logging_steps": 50,
    "save_steps": 1000,
    "seed": 1337,
    "dataloader_pin_memory": False,
    "log_level": "warning",  # the progress bar, the loss logs and the steps below; not every library detail
    "do_train": True,
    "do_eval": True,
}


@dataclass
class QuickstartArguments:
    """The data, tokenizer, model size and sample of the quickstart."""

    train_file: str = field(default=SHAKESPEARE, metadata={"help": "Text to train on (a .txt file)."})
    tokenizer_type: str = field(
        default="char", metadata={"help": "Character level, or byte-level BPE.", "choices": ("char", "bpe")}
    )
    tokenizer_vocab_size: int = field(default=2000, metadata={"help": "Vocabulary size for --tokenizer_type bpe."})
    hidden_size: int = field(default=128, metadata={"help": "Model width (d_model)."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of Transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads per block."})
    block_size: int = field(default=64, metadata={"help": "Context length in tokens (training blocks)."})
    prompt: str = field(default="ROMEO:", metadata={"help": "Text the sample continues."})
    sample_max_new_tokens: int = field(default=300, metadata={"help": "Length of the sample, in tokens."})
    torch_threads: int = field(
        default=1,
        metadata={"help": "CPU threads for torch (0: torch's default, one per core). One is the default because a "
                          "model this small gains little from a second thread, and when another process keeps the "
                          "other core busy two threads were measured 40x slower per step (2.2 s against 0.05 s)."},
    )
    attention_text: str = field(
        default="ROMEO: But soft, what light",
        metadata={"help": "Text whose attention maps (every layer and head) go to attention_map.png."},
    )


def main(argv=None):
    quick_args, training_args = parse_args((QuickstartArguments, RecipeTrainingArguments), argv, TRAINING_DEFAULTS,
                                           description=__doc__)
    return run(quick_args, training_args)


def run(args: QuickstartArguments, training_args: RecipeTrainingArguments) -> dict:
    started = time.perf_counter()
    # Before the tokenizer is written into it: --output_dir holds no other run (or replacing or resuming it was asked),
    # as every rank of a multi-process launch must have seen before the main one writes.
    prepare_run(training_args)
    training_args.distributed_state.wait_for_everyone()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    is_main = training_args.process_index == 0
    say = print if is_main else (lambda *a, **k: None)
    tokenizer_dir = os.path.join(training_args.output_dir, "tokenizer")
    data_args = DataArguments(train_file=args.train_file, validation_split_percentage=10)

    say(f"[1/5] Training a {args.tokenizer_type}-level tokenizer on the first 90% of {args.train_file}")
    with training_args.main_process_first(desc="training the tokenizer"):
        if is_main:
            tokenizer_args = train_tokenizer.TokenizerTrainingArguments(
                output_dir=tokenizer_dir, tokenizer_type=args.tokenizer_type, vocab_size=args.tokenizer_vocab_size,
                family="decoder", model_max_length=args.block_size,
                overwrite_output_dir=True,  # inside --output_dir, checked above
            )
            train_tokenizer.run(data_args, tokenizer_args, report=False)

    say(f"[2/5] Pretraining a {args.num_hidden_layers}-layer, {args.hidden_size}-wide Blueprint decoder for "
        f"{training_args.max_steps} steps (batch {training_args.per_device_train_batch_size} x "
        f"{args.block_size} tokens)")
    model_args = ModelArguments(
        model_type="blueprint_decoder",
        tokenizer_name=tokenizer_dir,
        # nanoGPT's GPT: learned positions, Pre-LN, GELU, no biases, unscaled tied embeddings, no dropout.
        config_overrides=(
            f"hidden_size={args.hidden_size},num_hidden_layers={args.num_hidden_layers},"
            f"num_attention_heads={args.num_attention_heads},intermediate_size={4 * args.hidden_size},"
            f"max_position_embeddings={args.block_size},position_embedding_type=learned,norm_position=pre,"
            "hidden_act=gelu,attention_bias=false,mlp_bias=false,scale_embeddings=false,hidden_dropout_prob=0.0"
        ),
    )
    lm_args = pretrain_causal_lm.CausalLMArguments(
        block_size=args.block_size, sample_prompt=args.prompt, sample_max_new_tokens=args.sample_max_new_tokens,
    )
    results = pretrain_causal_lm.run(model_args, data_args, lm_args, training_args, report=False,
                                     output_dir_checked=True)
    if not is_main:
        return results

    unit = "character" if args.tokenizer_type == "char" else "token"
    say(f"[3/5] Validation loss {results['eval_loss']:.4f} nats/{unit}, perplexity "
        f"{results['eval_perplexity']:.2f} per {unit}")
    say(f"[4/5] Sample:\n{'-' * 80}\n{args.prompt}{results['sample']}\n{'-' * 80}")

    say(f"[5/5] Reloading {training_args.output_dir} with AutoModelForCausalLM and AutoTokenizer")
    model = AutoModelForCausalLM.from_pretrained(training_args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(training_args.output_dir)
    reloaded_sample = pretrain_causal_lm.generate_sample(model, tokenizer, args.prompt, seed=training_args.seed)
    results["reloaded_sample"] = reloaded_sample
    results["reload_matches"] = reloaded_sample == results["sample"]
    # Pictures need matplotlib (the [viz] extra); without it they are skipped with a warning.
    write_attention_map(model, tokenizer, args.attention_text,
                        os.path.join(training_args.output_dir, "attention_map.png"), view="heads", dpi=80)
    results["wall_seconds"] = time.perf_counter() - started

    print(format_summary("quickstart", [
        ("data", f"{args.train_file} (90% train / 10% validation)"),
        ("tokenizer", f"{args.tokenizer_type}, {len(tokenizer)} tokens"),
        ("model", f"Blueprint decoder, {results['num_parameters']:,} parameters"),
        ("training", f"{results['global_step']} steps in {results['train_runtime']:.0f} s"),
        (f"validation loss (nats/{unit})", results["eval_loss"]),
        (f"validation perplexity (per {unit})", results["eval_perplexity"]),
        ("saved to", training_args.output_dir),
        ("reloaded model, same sample", "yes" if results["reload_matches"] else "NO"),
        ("wall time", f"{results['wall_seconds']:.0f} s"),
    ]))
    if not results["reload_matches"]:
        raise RuntimeError(
            "The reloaded model generated different text than the trained one:\n"
            f"trained:  {results['sample']!r}\nreloaded: {reloaded_sample!r}"
        )
    return results


if __name__ == "__main__":
    main()
