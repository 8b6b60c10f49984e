"""Palindromes among random words: the article's ``Pool.map`` workload.

The article generated a word list in the parent and shipped it to a pool, so
the transfer cost more than the search.  Here the words are never shipped:
word ``i`` depends only on the seed and ``i``, so each worker generates its
own index range from a :class:`procession.Recipe` and sends back only the few
palindromes it found.

    parent: spans [0, 4096·k), [4096·k, ...) ──► worker: WordSource (a Recipe,
                                                  built once per worker)
            palindromes, in input order    ◄──        generates + tests its span

Words come in blocks of :data:`BLOCK` words; each block is drawn from its own
``random.Random`` seeded by ``(seed, block number)``, which is what makes any
span reproducible on its own.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from procession.backends.base import Backend

__all__ = [
    "BLOCK",
    "WordSource",
    "find_palindromes",
    "generate_words",
    "is_palindrome",
    "search_palindromes",
]

#: Words per independently seeded block; spans given to workers are multiples of it.
BLOCK = 4096
# byte -> lowercase letter.  256 is not a multiple of 26, so 'a'..'v' come up
# 10/9 as often as 'w'..'z': irrelevant for a benchmark, and it keeps generation
# one C-level translate() per block.
_LETTERS = bytes.maketrans(bytes(range(256)), bytes(97 + b % 26 for b in range(256)))
# How many spans per worker: enough to even out the load, few enough that the
# per-task cost stays negligible.
_SPANS_PER_WORKER = 4


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return value


def _check_seed(seed: object) -> int:
    if seed is None:
        return random.SystemRandom().getrandbits(64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return seed


class WordSource:
    """Deterministic random words: ``words(start, stop)`` is the same in every process.

    Example::

        >>> src = WordSource(length=5, seed=1)
        >>> src.words(0, 3) == src.words(0, 10)[:3]
        True
    """

    __slots__ = ("length", "seed")

    def __init__(self, length: int, seed: int) -> None:
        self.length = _check_count("length", length)
        self.seed = _check_seed(seed)

    def block_text(self, block: int) -> str:
        """The :data:`BLOCK` words of block ``block``, concatenated."""
        # A str seed is hashed with SHA-512 by random.seed(): stable across
        # processes and Python runs, unlike hash().
        rng = random.Random(f"procession.palindromes/{self.seed}/{block}")
        return rng.randbytes(BLOCK * self.length).translate(_LETTERS).decode("ascii")

    def _spans(self, start: int, stop: int) -> Iterator[tuple[str, int, int]]:
        """(block text, first char, end char) covering words [start, stop)."""
        length = self.length
        block = start // BLOCK
        while start < stop:
            block_end = min((block + 1) * BLOCK, stop)
            first = (start - block * BLOCK) * length
            last = (block_end - block * BLOCK) * length
            yield self.block_text(block), first, last
            start = block_end
            block += 1

    def words(self, start: int, stop: int) -> list[str]:
        """Words ``start`` (inclusive) to ``stop`` (exclusive)."""
        length = self.length
        if length == 0:
            return [""] * max(stop - start, 0)
        out: list[str] = []
        for text, first, last in self._spans(start, stop):
            out.extend([text[i : i + length] for i in range(first, last, length)])
        return out

    def palindromes(self, start: int, stop: int) -> list[str]:
        """The palindromes among words ``start`` to ``stop``, in order."""
        length = self.length
        if length <= 1:
            return self.words(start, stop)  # "", "a": all palindromes
        out: list[str] = []
        for text, first, last in self._spans(start, stop):
            # The per-word test of find_palindromes, inlined: this loop is the
            # workload, and a function call per word would double its cost.
            out.extend(
                [w for i in range(first, last, length) if (w := text[i : i + length]) == w[::-1]]
            )
        return out

    def __repr__(self) -> str:
        return f"WordSource(length={self.length}, seed={self.seed})"


def generate_words(count: int, length: int, seed: int | None = None) -> Iterator[str]:
    """A generator of ``count`` random lowercase words of ``length`` letters.

    The same seed gives the same words, and word ``i`` depends only on the seed
    and ``i`` (so any slice can be regenerated on its own).

    Example::

        >>> list(generate_words(3, 4, seed=7)) == list(generate_words(3, 4, seed=7))
        True
    """
    # Checked here, at the call, not at the first next(): the generator itself
    # is the inner function.
    source = WordSource(length, _check_seed(seed))
    return _words(source, _check_count("count", count))


def _words(source: WordSource, count: int) -> Iterator[str]:
    for start in range(0, count, BLOCK):
        yield from source.words(start, min(start + BLOCK, count))


def is_palindrome(word: str) -> bool:
    """The article's test: the first half equals the reversed second half.

    Example::

        >>> is_palindrome("level"), is_palindrome("a"), is_palindrome("ab")
        (True, True, False)
    """
    half = len(word) // 2
    # The article wrote word[-half:], which is the whole word when half == 0
    # (so "a" was not a palindrome); slicing from len - half is right for all.
    return word[:half] == word[len(word) - half :][::-1]


def find_palindromes(words: Iterable[str]) -> list[str]:
    """The palindromes in ``words``, in order (duplicates kept).

    Example::

        >>> find_palindromes(["abba", "abc", "x", ""])
        ['abba', 'x', '']
    """
    return [word for word in words if is_palindrome(word)]


def _search_span(source: WordSource, span: tuple[int, int]) -> list[str]:
    return source.palindromes(*span)


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous spans of [0, count) on BLOCK boundaries (fewer if small)."""
    blocks = -(-count // BLOCK)
    parts = max(1, min(parts, blocks))
    edges = [min(count, (blocks * k // parts) * BLOCK) for k in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if a < b]


def search_palindromes(
    count: int,
    length: int,
    *,
    seed: int | None,
    backend: str | Backend | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Find the palindromes among ``generate_words(count, length, seed)`` in parallel.

    Each worker generates its own words (a :class:`WordSource` recipe, built
    once per worker); only index ranges go out and palindromes come back.  The
    answer is exactly ``find_palindromes(generate_words(count, length, seed=seed))``
    on every backend and for every worker count.

    Example::

        >>> found = search_palindromes(100_000, 5, seed=1, backend="threads", workers=2)
        >>> found == find_palindromes(generate_words(100_000, 5, seed=1))
        True
    """
    from procession.api import map as parallel_map
    from procession.api import resolve_backend
    from procession.serialization.recipes import Recipe

    _check_count("count", count)
    source_recipe: Any = Recipe(WordSource, _check_count("length", length), _check_seed(seed))
    # The same warm pool procession.map will use: only its worker count is needed.
    pool_size = resolve_backend(backend, workers).workers
    spans = _split(count, pool_size * _SPANS_PER_WORKER)
    found: list[str] = []
    task = functools.partial(_search_span, source_recipe)
    parts = parallel_map(
        task, spans, backend=backend, workers=workers, chunksize=1, progress=progress
    )
    for part in parts:
        found.extend(part)
    return found
