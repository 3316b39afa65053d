"""Invented entity names: pronounceable, capitalised single words, unique and mutually distinct.

A name is two or three syllables (onset, vowel, coda) such as "Zarnoth" or "Velira". Besides
being unique (case-insensitively), two names never lie within one edit of each other, so that
neither a model nor a fuzzy match confuses them; and no name is an English word that could
appear in the world's own sentences or in a small stoplist.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from tools.errors import WorldError

ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
CLUSTERS = ("br", "dr", "gr", "kr", "tr", "th", "sh", "st", "vr", "zh")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "ei", "ou")
MID_CODAS = ("", "", "", "n", "r", "l", "s", "m")
END_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "nd", "m", "sh", "k", "rn", "sk")
MIN_LENGTH, MAX_LENGTH = 4, 9
MAX_TRIES = 10_000

# English words the syllable patterns can produce; the world's own vocabulary is added to these.
_STOPLIST_LINES = (
    "banana tomato potato bikini casino domino lemon melon salad robot radio piano solo motor",
    "sofa tuna data pizza metal panel label level lever tiger timber silver butter mirror",
    "camel cobra koala lama llama mango papaya sherpa saga soda vodka zebra hero halo lotus",
    "bonus virus genus focus sinus venus minus basin raven haven seven eleven oven dozen",
    "human woman demon lemur tumor humor rumor honor valor vapor manor major minor donor",
    "tenor senor rotor gala lava magma koran sonar lunar solar polar molar radar nadir",
    "baker maker taker lover mover rover diver giver liver river fever never sever",
    "sister mister master faster poster toaster monster lobster roster border order",
    "garden golden sudden hidden bidden laden maiden person reason season lesson",
    "talon salon melon baron heron apron iron lion union onion opinion venom",
    "token broken spoken woken taken shaken open often soften listen fasten",
    "bandit credit rabbit habit limit vomit summit submit permit hermit profit",
    "denim medal pedal modal nodal total vital fatal natal metal petal portal mortal",
    "bishop ketchup sunset bonnet sonnet magnet planet helmet pellet mallet ballet",
)
STOPLIST = frozenset(word for line in _STOPLIST_LINES for word in line.split())


class NameGenerator:
    """Draws distinct names from a seeded random source; `reserved` words are never produced."""

    def __init__(self, rng: random.Random, *, reserved: Iterable[str] = ()) -> None:
        self._rng = rng
        self._reserved = STOPLIST | {w.lower() for w in reserved}
        self._keys: set[str] = set()
        self.names: list[str] = []

    def draw(self) -> str:
        """A new name, at least two edits away from every name drawn before."""
        for _ in range(MAX_TRIES):
            candidate = self._candidate()
            keys = _deletion_keys(candidate)
            if candidate in self._reserved or keys & self._keys:
                continue
            self._keys |= keys
            name = candidate.capitalize()
            self.names.append(name)
            return name
        raise WorldError("the name space is exhausted; add syllables or draw fewer names")

    def _candidate(self) -> str:
        rng = self._rng
        while True:
            syllables = 2 if rng.random() < 0.55 else 3
            word = "" if rng.random() < 0.15 else self._onset(previous_coda="")
            coda = ""
            for i in range(syllables):
                if i:
                    word += self._onset(previous_coda=coda)
                coda = rng.choice(END_CODAS if i == syllables - 1 else MID_CODAS)
                word += rng.choice(VOWELS) + coda
            if MIN_LENGTH <= len(word) <= MAX_LENGTH:
                return word

    def _onset(self, *, previous_coda: str) -> str:
        # After a closing consonant only a single consonant keeps the word pronounceable.
        if previous_coda or self._rng.random() < 0.75:
            return self._rng.choice(ONSETS)
        return self._rng.choice(CLUSTERS)


def _deletion_keys(word: str) -> set[str]:
    # Two words share a key exactly when they are at most one edit apart (substitution,
    # insertion or deletion), or differ by a transposition: the symmetric-delete trick.
    return {word} | {word[:i] + word[i + 1 :] for i in range(len(word))}
