"""A tiny BERT text encoder written to disk, so tests can build a ``TextEncoder`` offline in well under 1 s.

Usage (``tests/`` is on ``sys.path`` when pytest runs)::

    from helpers_tiny_text import make_tiny_text_encoder_dir

    encoder = TextEncoder(make_tiny_text_encoder_dir(tmp_path / "tiny_text"))

Tokenizer pitfall: in transformers 5, ``BertTokenizer(vocab_file=...)`` silently ignores the file and
keeps a 5-token vocabulary (every word becomes ``[UNK]``). The tokenizer is therefore built with the
``tokenizers`` library (WordPiece over an explicit vocabulary, BERT normaliser/pre-tokeniser,
``[CLS] ... [SEP]`` template) and wrapped in ``PreTrainedTokenizerFast``, which works the same in
transformers 4 and 5.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["TINY_TEXT_HIDDEN_SIZE", "TINY_VOCABULARY", "make_tiny_text_encoder_dir"]

TINY_TEXT_HIDDEN_SIZE = 32

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Words of the GuideGen prompt template (custom_components.data.prompts) and common record values; the
# BERT normaliser lower-cases, so lower case is enough.
_WORDS = (
    "the patient is a an year old male female person white black asian hispanic other unknown "
    "in this imaging patient's condition described as with no tumor tumors measuring largest mm stage "
    "one two three four five six seven eight nine ten i ii iii iv not and of or "
    "liver spleen kidney left right pancreas lung lungs colon stomach bladder heart aorta bone "
    "hepatocellular carcinoma cancer adenocarcinoma metastasis metastases cyst lesion mass abnormality "
    "healthy normal small large"
).split()
_PUNCTUATION = tuple(".,;:-'()/%")
_DIGITS = tuple("0123456789")
TINY_VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(_SPECIAL_TOKENS + tuple(_WORDS) + _PUNCTUATION + _DIGITS + tuple(f"##{d}" for d in _DIGITS))
)


def _tiny_tokenizer(model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(TINY_VOCABULARY)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def make_tiny_text_encoder_dir(
    path: str | os.PathLike, max_position_embeddings: int = 128, seed: int = 0
) -> Path:
    """Write a randomly initialised tiny BERT (hidden 32, 2 layers, 2 heads) and its tokenizer to ``path``.

    Args:
        path: folder to write (created if missing); holds ``config.json``, ``model.safetensors`` and the
            tokenizer files afterwards, i.e. what ``TextEncoder(model_path=path)`` loads.
        max_position_embeddings: the model's position limit (the tokenizer's model_max_length too).
        seed: seed of the weight initialisation; the caller's global RNG state is left untouched.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from transformers import BertConfig, BertModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=len(TINY_VOCABULARY),
        hidden_size=TINY_TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(path)
    _tiny_tokenizer(max_position_embeddings).save_pretrained(path)
    return path
