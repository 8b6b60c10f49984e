"""The article's message-passing sieve, re-expressed on :class:`procession.Pipeline`.

The article chained processes with ``Pipe``s: each process owned a range of
numbers, crossed off multiples of the primes that reached it from upstream,
passed those primes on, then added the primes it found itself.  Every range
waited for all the ranges before it.

Here the primes found upstream still flow downstream to the stages that need
them, but a range needs only the primes up to the square root of its end::

    ranges ─► head (the source thread) ─► map: sieve one range ─► consumer
              finds the small primes,      on the backend, many     concatenates,
              sends each range the ones    ranges at once, in       in order
              it needs: (first, last,      order
              base primes)

so the ranges are sieved concurrently instead of one after another.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from itertools import compress
from math import isqrt

from procession.backends.base import Backend
from procession.pipeline import Pipeline

__all__ = ["check_ranges", "collect_primes", "range_messages", "sieve_range"]

Message = tuple[int, int, "array[int]"]


def check_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validate contiguous half-open ``(first, last)`` pairs; returns them as a list.

    Example::

        >>> check_ranges([(0, 10), (10, 25)])
        [(0, 10), (10, 25)]
    """
    try:
        pairs = list(ranges)
    except TypeError:
        raise TypeError(
            f"ranges must be an iterable of (first, last) pairs, got {type(ranges).__name__}"
        ) from None
    checked: list[tuple[int, int]] = []
    for index, pair in enumerate(pairs):
        try:
            first, last = pair
        except (TypeError, ValueError):
            raise TypeError(f"ranges[{index}] must be a (first, last) pair, got {pair!r}") from None
        for value in (first, last):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ranges[{index}] = {pair!r}: bounds must be ints")
        if first > last:
            raise ValueError(
                f"ranges[{index}] = ({first}, {last}): first must be <= last "
                f"(ranges are half-open [first, last))"
            )
        if checked and checked[-1][1] != first:
            raise ValueError(
                f"ranges[{index}] starts at {first} but ranges[{index - 1}] ends at "
                f"{checked[-1][1]}: ranges must be contiguous"
            )
        checked.append((first, last))
    return checked


def _small_primes(limit: int) -> array[int]:
    """Primes <= ``limit`` (the plain sieve; ``limit`` is a square root, so small)."""
    if limit < 2:
        return array("q")
    flags = bytearray(b"\x01") * (limit + 1)
    flags[0] = flags[1] = 0
    for p in range(2, isqrt(limit) + 1):
        if flags[p]:
            flags[p * p :: p] = bytes(len(range(p * p, limit + 1, p)))
    return array("q", compress(range(limit + 1), flags))


def range_messages(ranges: list[tuple[int, int]]) -> Iterator[Message]:
    """The head of the chain: each range with the primes it needs to be sieved.

    Example::

        >>> [(f, l, list(base)) for f, l, base in range_messages([(0, 10), (10, 30)])]
        [(0, 10, [2, 3]), (10, 30, [2, 3, 5])]
    """
    known = array("q")
    known_limit = 1
    for first, last in ranges:
        need = isqrt(last - 1) if last > 2 else 1
        if need > known_limit:
            # Grow geometrically so many small steps cost one sieve each doubling.
            known_limit = max(need, 2 * known_limit)
            known = _small_primes(known_limit)
        count = _count_up_to(known, need)
        yield first, last, known[:count]


def _count_up_to(primes: array[int], limit: int) -> int:
    lo, hi = 0, len(primes)
    while lo < hi:
        mid = (lo + hi) // 2
        if primes[mid] <= limit:
            lo = mid + 1
        else:
            hi = mid
    return lo


def sieve_range(message: Message) -> list[int]:
    """The primes in ``[first, last)``, given every prime up to ``isqrt(last - 1)``.

    Example::

        >>> sieve_range((10, 30, array("q", [2, 3, 5])))
        [11, 13, 17, 19, 23, 29]
    """
    first, last, base = message
    lo = max(first, 2)
    if last <= lo:
        return []
    flags = bytearray(b"\x01") * (last - lo)
    for p in base:
        if p * p >= last:
            break
        # The first multiple to cross: p*p (smaller ones have a smaller factor), or
        # the first multiple of p in the range.
        start = max(p * p, -(-lo // p) * p)
        if start < last:
            flags[start - lo :: p] = bytes(len(range(start - lo, last - lo, p)))
    return list(compress(range(lo, last), flags))


def collect_primes(
    ranges: Iterable[tuple[int, int]],
    *,
    backend: str | Backend | None = None,
    workers: int | None = None,
) -> list[int]:
    """The primes in the union of contiguous half-open ``(first, last)`` ranges,
    each once, sorted; the ranges are sieved concurrently on ``backend``.

    Example::

        >>> collect_primes([(0, 10), (10, 20)], backend="threads")
        [2, 3, 5, 7, 11, 13, 17, 19]

    Raises ValueError when the ranges are not contiguous or a range has
    ``first > last``.
    """
    checked = check_ranges(ranges)
    if not checked:
        return []
    pipe = Pipeline(range_messages(checked), maxsize=max(4, 2 * (workers or 1))).map(
        sieve_range, backend=backend, workers=workers
    )
    primes: list[int] = []
    with pipe.run() as found:
        for chunk in found:
            primes.extend(chunk)
    return primes
