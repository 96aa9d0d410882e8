"""What the tasks ask of a tokenizer: the ids prompts start with and are padded with, and the
words of an IOI dataset config, the vocabulary of the tiny test model's tokenizer
(`mlpim.engine.tiny.word_tokenizer`)."""

import re

_WORD = re.compile(r"\w+|[^\w\s]")
_PLACEHOLDER = re.compile(r"\{[A-Z]+\}")


def ioi_vocabulary(cfg) -> list[str]:
    """Every word of an IOI dataset config: template and prefix words, names, objects, places."""
    texts = [_PLACEHOLDER.sub(" ", t) for t in cfg.templates] + list(cfg.prefixes)
    words = [w for text in texts for w in _WORD.findall(text)]
    words += [*cfg.names, *cfg.objects, *cfg.places]
    return list(dict.fromkeys(str(w) for w in words))


def bos_id(tokenizer) -> int:
    """The id every prompt starts with (the tokenizer's BOS, else EOS)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    """Padding is masked out; the tokenizer's own pad id when it has one."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else bos_id(tokenizer)
