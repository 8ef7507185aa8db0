"""Word lists of the synthetic tasks. The tokenizer's vocabulary is exactly these words plus
single digits and punctuation, so every prompt tokenizes without unknowns. Token ids follow
the order here: a trained model depends on it, so never reorder or insert (append only).

Needle keys and filler words are disjoint: a needle is never confused with haystack text.
"""
from __future__ import annotations

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
DIGITS = tuple("0123456789")
PUNCT = tuple(".,:;?=+-")

# Needle keys, variable names and the common-word-extraction list all draw from KEYS.
KEYS = tuple("""
apple river mountain castle garden rocket violin candle pencil mirror
dragon falcon tiger rabbit turtle salmon parrot spider wolf zebra
copper silver marble crystal velvet cotton amber ivory coral pearl
anchor bridge tunnel harbor island valley desert forest meadow canyon
helmet saddle basket ladder hammer needle bucket lantern compass kettle
orange lemon cherry mango peach olive walnut ginger pepper onion
planet comet meteor galaxy nebula quasar photon proton neutron quark
""".split())

FILLER_NOUNS = tuple("""
man woman child dog cat bird farmer teacher doctor king queen student
house road car boat tree flower book letter table window door city
""".split())
FILLER_ADJS = tuple("""
old young small big red blue green quiet happy tired busy bright dark warm cold
""".split())
FILLER_VERBS = tuple("""
sees finds likes paints visits follows watches builds sells carries opens closes
""".split())
FILLER_PLACES = tuple("near under behind beside".split())

# Words of the fixed task templates (headers, questions, trace steps).
TEMPLATE_WORDS = tuple("""
the a some special magic number numbers for is are what all hidden in text memorize them
question answer var variables which equal to value values of compute modulo result list words
most common find repeat
""".split())


def all_words() -> list[str]:
    """Every vocabulary entry, specials first, without duplicates, in a fixed order."""
    seen: dict[str, None] = {}
    for group in (SPECIAL, DIGITS, PUNCT, TEMPLATE_WORDS, FILLER_NOUNS, FILLER_ADJS, FILLER_VERBS,
                  FILLER_PLACES, KEYS):
        for w in group:
            seen.setdefault(w, None)
    return list(seen)


def _check_disjoint() -> None:
    filler = set(FILLER_NOUNS + FILLER_ADJS + FILLER_VERBS + FILLER_PLACES + TEMPLATE_WORDS)
    clash = filler & set(KEYS)
    if clash:
        raise AssertionError(f"needle keys also used as filler/template words: {sorted(clash)}")


_check_disjoint()
