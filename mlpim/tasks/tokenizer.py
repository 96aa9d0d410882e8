"""The words of an IOI dataset config, the vocabulary of the tiny test model's tokenizer
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
