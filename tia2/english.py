"""Just enough English for prompts about counted objects: number words, plurals and articles.

Shared by the synthetic TIA2 prompts ("a realistic photo of three deer") and the rule-based
contrast prompts ("... of two airplanes and an apple"), which must agree word for word.
"""

from __future__ import annotations

import re

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
NUMBER_OF_WORD = {word: n for n, word in enumerate(NUMBER_WORDS)}

# Nouns whose plural is not made by the spelling rules below.
IRREGULAR_PLURALS = {
    "deer": "deer", "sheep": "sheep", "fish": "fish", "moose": "moose", "bison": "bison",
    "mouse": "mice", "goose": "geese", "person": "people", "man": "men", "woman": "women",
    "child": "children", "tooth": "teeth", "foot": "feet", "ox": "oxen", "cactus": "cacti",
    "wolf": "wolves", "knife": "knives", "leaf": "leaves", "loaf": "loaves", "shelf": "shelves",
    "tomato": "tomatoes", "potato": "potatoes", "hero": "heroes",
}
# Plurals in "-ses" of nouns that end in "-s" (most "-ses" plurals are of "-se" nouns: horses).
S_NOUN_PLURALS = frozenset({"buses", "gases", "lenses", "irises", "viruses", "bonuses", "campuses"})
SINGULAR_OF_PLURAL = {plural: singular for singular, plural in IRREGULAR_PLURALS.items() if plural != singular}
# Words spelled with a vowel but spoken with a consonant sound, and the reverse.
A_BEFORE = ("uni", "use", "usu", "uti", "eu", "one", "once", "ufo")
AN_BEFORE = ("hour", "honest", "honour", "honor", "heir")


def _head_word(noun: str) -> tuple[str, str, str]:
    """('teddy ', 'Bear', 'bear'): what precedes the last word, the word, the word in lower case."""
    head, _, last = noun.rpartition(" ")
    return (f"{head} " if head else ""), last, last.lower()


def plural(noun: str) -> str:
    """'teddy bear' -> 'teddy bears', 'deer' -> 'deer', 'cherry' -> 'cherries'."""
    prefix, last, lower = _head_word(noun)
    if lower in IRREGULAR_PLURALS:
        return prefix + IRREGULAR_PLURALS[lower]
    if re.search(r"[^aeiou]y$", lower):
        return prefix + last[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh)$", lower):
        return prefix + last + "es"
    return prefix + last + "s"


def singular(noun: str) -> str:
    """The inverse of `plural` for the nouns it makes (best effort for others)."""
    prefix, last, lower = _head_word(noun)
    if lower in SINGULAR_OF_PLURAL:
        return prefix + SINGULAR_OF_PLURAL[lower]
    if lower in IRREGULAR_PLURALS:  # same in both numbers: deer, sheep
        return noun
    if lower.endswith("ies") and len(lower) > 4:
        return prefix + last[:-3] + "y"
    if lower in S_NOUN_PLURALS or re.search(r"(sses|xes|zzes|ches|shes)$", lower):
        return prefix + last[:-2]
    if lower.endswith("s") and not lower.endswith("ss"):
        return prefix + last[:-1]
    return noun


def article(word: str) -> str:
    """'a' or 'an' for the sound `word` starts with."""
    lower = word.lower()
    if lower.startswith(AN_BEFORE):
        return "an"
    if lower.startswith(A_BEFORE):
        return "a"
    return "an" if lower[:1] in "aeiou" else "a"


def counted(n: int, noun: str) -> str:
    """'an apple', 'two apples', 'three deer'; one is spelled with the article, as TIA2 does."""
    if n < 1 or n >= len(NUMBER_WORDS):
        raise ValueError(f"counts from 1 to {len(NUMBER_WORDS) - 1} are spelled, got {n}")
    if n == 1:
        return f"{article(noun)} {noun}"
    return f"{NUMBER_WORDS[n]} {plural(noun)}"
