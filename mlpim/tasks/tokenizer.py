"""A tiny word-level tokenizer (GPT-2 style leading-space tokens) for test models."""

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"
PUNCTUATION = tuple(".,!?;:'\"()-")
_WORD = re.compile(r"\w+|[^\w\s]")
_PLACEHOLDER = re.compile(r"\{[A-Z]+\}")


def word_tokenizer(words: Iterable[str], cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over `words` (each with and without a leading space) and punctuation.

    "<|endoftext|>" is id 0 and serves as bos/eos/pad/unk. Built in memory (no temporary files)
    with `add_bos_token=True`, the form TransformerLens's bridge would otherwise reload it in from
    `name_or_path`, so the bridge takes it as it is; saved to `cache_dir` when one is given.
    """
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab = {EOT: 0}
    for word in [*words, *PUNCTUATION]:
        if not word.strip():
            continue
        for text in (word, " " + word):
            for piece, _ in pre.pre_tokenize_str(text):
                vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOT])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        add_bos_token=True,
        name_or_path=str(cache_dir) if cache_dir else "mlpim-word-level",
    )
    if cache_dir is not None:
        tok.save_pretrained(str(Path(cache_dir)))
    return tok


def ioi_vocabulary(cfg) -> list[str]:
    """Every word of an IOI dataset config: template and prefix words, names, objects, places."""
    texts = [_PLACEHOLDER.sub(" ", t) for t in cfg.templates] + list(cfg.prefixes)
    words = [w for text in texts for w in _WORD.findall(text)]
    words += [*cfg.names, *cfg.objects, *cfg.places]
    return list(dict.fromkeys(str(w) for w in words))
