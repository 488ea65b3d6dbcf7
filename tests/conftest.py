"""Shared fixtures of the core-model test suite.

Everything here is tiny on purpose (hidden 32, 2 layers, vocab 100) so that the whole suite runs on two CPU
cores in a few minutes. Nothing is downloaded: the tokenizer is built locally with the `tokenizers` library.
"""

import os
import warnings

import pytest
import torch

# Keep the suite quiet and deterministic on a shared 2-core machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import hf_blueprint  # noqa: E402  (registers the Auto classes)


# --------------------------------------------------------------------------------------------------------------
# Vocabulary: 7 special tokens + 93 words = 100 ids, the `vocab_size` of every tiny config.
# --------------------------------------------------------------------------------------------------------------

PAD, UNK, CLS, SEP, MASK, BOS, EOS = range(7)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
WORDS = (
    "the a an and or but if then so of to in on at by for with from up down over under "
    "cat dog bird fish cow horse mouse fox bear wolf lion tiger frog duck goat sheep "
    "sat ran ate saw hid jumped slept sang flew swam walked looked ",
    "red blue green black white big small old young happy sad fast slow quiet loud "
    "good bad hot cold new "
    "one two three four five six seven eight nine ten "
    "is was are were has had do did can will "
    "mat hat tree",
)
WORDS = " ".join(WORDS).split()
VOCAB = SPECIAL_TOKENS + WORDS
VOCAB_SIZE = len(VOCAB)
assert VOCAB_SIZE == 100, VOCAB_SIZE
assert len(set(VOCAB)) == VOCAB_SIZE

POSITION_TYPES = ["sinusoidal", "learned", "rope", "alibi", "none"]
ABSOLUTE_POSITION_TYPES = ["sinusoidal", "learned"]
FAMILIES = ["encoder", "decoder"]

# The tiny shape shared by every test model. initializer_range is larger than the default 0.02 so that attention
# is far from uniform and position/content changes move the outputs well above float noise: a test that checks a
# counterfactual DOES change the output needs an effect much bigger than its tolerance.
TINY = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    initializer_range=0.1,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)


def tiny_config(family: str, **overrides):
    """A tiny `BlueprintEncoderConfig` / `BlueprintDecoderConfig` with `overrides` applied."""
    kwargs = {**TINY, **overrides}
    cls = {"encoder": hf_blueprint.BlueprintEncoderConfig, "decoder": hf_blueprint.BlueprintDecoderConfig}[family]
    return cls(**kwargs)


def tiny_model(cls_name: str, seed: int = 0, attn_implementation: str | None = None, **overrides):
    """Builds `hf_blueprint.<cls_name>` from a tiny config (family read from the class name), in eval mode."""
    family = "encoder" if cls_name.startswith("BlueprintEncoder") else "decoder"
    config = tiny_config(family, **overrides)
    cls = getattr(hf_blueprint, cls_name)
    torch.manual_seed(seed)
    if attn_implementation is None:
        model = cls(config)
    else:
        model = cls._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def lm_class(family: str) -> str:
    return {"encoder": "BlueprintEncoderForMaskedLM", "decoder": "BlueprintDecoderForCausalLM"}[family]


def random_ids(batch: int, length: int, seed: int = 0, low: int = 7, high: int = VOCAB_SIZE) -> torch.Tensor:
    """Random non-special token ids (no pad/bos/eos inside, so that nothing stops or masks by accident)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, length), generator=g)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The paper's table, computed independently in float64: PE(pos, 2i) = sin(pos / 10000^(2i/d)),
    PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    div = 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos / div)
    table[:, 1::2] = torch.cos(pos / div)
    return table.float()


@pytest.fixture
def config_factory():
    return tiny_config


@pytest.fixture
def model_factory():
    return tiny_model


# --------------------------------------------------------------------------------------------------------------
# Tokenizer: WordLevel over VOCAB, whitespace pre-tokenizer, wrapped in PreTrainedTokenizerFast.
# --------------------------------------------------------------------------------------------------------------


def build_tokenizer(add_cls_sep: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordLevel has no decoder of its own; WordPiece's joins tokens with spaces (no "##" pieces in this vocab).
    backend.decoder = decoders.WordPiece(prefix="##")
    if add_cls_sep:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            bos_token="<s>",
            eos_token="</s>",
            model_max_length=TINY["max_position_embeddings"],
        )
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    """Plain tokenizer (no template): the decoder-side tokenizer, and the one for fill-mask."""
    tok = build_tokenizer(add_cls_sep=False)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def encoder_tokenizer():
    """Tokenizer that wraps every text in [CLS] ... [SEP] (BERT style), right padding."""
    tok = build_tokenizer(add_cls_sep=True)
    tok.padding_side = "right"
    return tok
