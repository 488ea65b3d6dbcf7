"""Training tokenizers for Blueprint models with the `tokenizers` library.

Three kinds:
    `"bpe"`   byte-level BPE (GPT-2 style): every byte is in the base alphabet, so no text is ever unknown.
    `"char"`  one token per character (char-rnn / nanoGPT style), for small corpora; characters never seen in
              training become `[UNK]`.
    `"word"`  one token per word or run of punctuation (the vocabulary of word-embedding classifiers such as Kim's
              2014 CNN), for small labelled sets: a word seen fewer than `min_frequency` times becomes `[UNK]`, so
              the model learns what to do with words it has not seen, which test sets are full of.

Every tokenizer carries the special tokens of both families, so one vocabulary serves an encoder and a decoder:
`[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]` (BERT's) and `<|endoftext|>` (GPT-2's bos/eos). What differs by family
is the post-processor: the encoder family wraps every text in `[CLS] ... [SEP]` (the first-token pooling and the
sentence-pair format of BERT rely on it); the decoder family adds nothing, so that packed causal-LM blocks are the
plain token stream; the seq2seq family ends every text with `<|endoftext|>`: the encoder-decoder reads the source up
to it, and learns to stop by predicting it at the end of each target. One tokenizer trained on source and target text
together is the paper's shared vocabulary (`train_tokenizer(chain(sources, targets), family="seq2seq")`).

The result is a `PreTrainedTokenizerFast`: `save_pretrained` writes a folder that `AutoTokenizer.from_pretrained`
loads, with no Python code of this package needed at load time.
"""

from collections import Counter
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


TOKENIZER_TYPES = ("bpe", "char", "word")
FAMILIES = ("encoder", "decoder", "seq2seq")

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    # GPT-2's convention: one end-of-text token serves as bos and eos.
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
}
# In id order: the special tokens get the first ids, the same in every tokenizer this module trains.
SPECIAL_TOKEN_LIST = list(dict.fromkeys(SPECIAL_TOKENS.values()))


# Special tokens each family's post-processor adds to one text and to a pair of texts (see `set_family`).
SPECIAL_TOKENS_ADDED = {"encoder": (2, 3), "decoder": (0, 0), "seq2seq": (1, 2)}


def special_tokens_per_text(family: str, pair: bool = False) -> int:
    """How many special tokens a tokenizer of `family` trained here adds to every text (or pair of texts): what
    `tokenizer.num_special_tokens_to_add(pair)` will say, known before the tokenizer is trained."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; choose one of {list(FAMILIES)}.")
    return SPECIAL_TOKENS_ADDED[family][int(pair)]


def train_tokenizer(
    texts: Iterable[str],
    tokenizer_type: str = "bpe",
    vocab_size: int = 8000,
    min_frequency: int | None = None,
    family: str = "decoder",
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Trains a tokenizer on `texts` and wraps it for transformers.

    Args:
        texts: the training texts (any iterable of strings; read once).
        tokenizer_type: `"bpe"` (byte-level BPE), `"char"` (character level) or `"word"` (word level).
        vocab_size: the largest vocabulary to build, special tokens included. For `"char"` and `"word"` it caps the
            number of distinct characters or words kept (the most frequent win).
        min_frequency: a merge (BPE), character or word seen fewer times than this is not added. Default: 2 for
            BPE (merges seen once are noise) and words (so that `[UNK]` is trained), 1 for characters (nanoGPT keeps
            every character of the text).
        family: `"encoder"` adds `[CLS] ... [SEP]` around every text, `"decoder"` adds nothing, `"seq2seq"` appends
            `<|endoftext|>` (the end of a source or target sentence).
        model_max_length: recorded in the saved tokenizer config (the model's longest input), if known.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"tokenizer_type={tokenizer_type!r} is not supported; choose one of {list(TOKENIZER_TYPES)}.")
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; choose one of {list(FAMILIES)}.")
    if vocab_size <= len(SPECIAL_TOKEN_LIST):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKEN_LIST)} special tokens, got {vocab_size}.")

    if min_frequency is None:
        min_frequency = 1 if tokenizer_type == "char" else 2
    if tokenizer_type == "bpe":
        backend = _train_byte_level_bpe(texts, vocab_size, min_frequency)
    elif tokenizer_type == "word":
        backend = _train_word_level(texts, vocab_size, min_frequency)
    else:
        backend = _train_char_level(texts, vocab_size, min_frequency)
    set_family(backend, family)

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        # The models take no token_type_ids unless configured with type_vocab_size > 0; leave them out by default.
        model_input_names=["input_ids", "attention_mask"],
        **SPECIAL_TOKENS,
        **kwargs,
    )


def set_family(backend: Tokenizer, family: str) -> None:
    """Sets the post-processor of the `tokenizers` backend for an encoder ([CLS] ... [SEP]), a decoder (none) or an
    encoder-decoder (... <|endoftext|>)."""
    if family == "seq2seq":
        eos = SPECIAL_TOKENS["eos_token"]
        template = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, backend.token_to_id(eos))]
        )
        # Byte-level BPE keeps its own post-processor too, so that offsets are those of the decoder family.
        byte_level = isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
        backend.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
                                  if byte_level else template)
    elif family == "encoder":
        cls_id, sep_id = backend.token_to_id(SPECIAL_TOKENS["cls_token"]), backend.token_to_id(SPECIAL_TOKENS["sep_token"])
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    elif isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        # Byte-level's own post-processor only fixes offsets; it adds no tokens.
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        backend.post_processor = None


def _train_byte_level_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKEN_LIST,
        # All 256 bytes up front, whatever the corpus: unseen characters still encode (as bytes), never as [UNK].
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_strings(texts), trainer=trainer)
    return backend


def _train_char_level(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    counts = Counter()
    for text in _strings(texts):
        counts.update(text)
    kept = [char for char, count in counts.most_common() if count >= min_frequency]
    kept = sorted(kept[: vocab_size - len(SPECIAL_TOKEN_LIST)])  # sorted, as nanoGPT numbers its characters
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKEN_LIST + kept)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Every character, newlines and spaces included, is its own pre-token ("." would skip newlines).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # WordLevel's default decoding joins tokens with spaces; characters must be concatenated back as they were.
    backend.decoder = decoders.Fuse()
    return backend


def _train_word_level(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    backend = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Words (\w+) and punctuation runs are tokens; whitespace only separates them, and decoding joins with spaces.
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKEN_LIST, show_progress=False
    )
    backend.train_from_iterator(_strings(texts), trainer=trainer)
    return backend


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer training expects strings, got {type(text).__name__}: {text!r:.80}")
        yield text
