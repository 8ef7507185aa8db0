"""The word-level tokenizer of the shipped base model: one token per task word, per digit and
per punctuation mark, plus <pad> <bos> <eos> <unk>. Saved in the transformers format so
``AutoTokenizer.from_pretrained(folder)`` loads it offline."""
from __future__ import annotations

from pathlib import Path

from dms.tasks.vocab import all_words

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def build_tokenizer():
    """A ``tokenizers.Tokenizer`` over the task vocabulary; encoding prepends <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(all_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    # Decoding joins tokens with spaces (no vocabulary entry starts with the "##" prefix and
    # cleanup is off); dms.tasks.normalize joins digits back into numbers.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tok


def save_tokenizer(folder: str | Path):
    """Writes the tokenizer to ``folder`` in the transformers format and returns it as a
    ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, model_max_length=4096)
    fast.save_pretrained(str(folder))
    return fast
