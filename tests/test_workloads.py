"""The reference workloads against independent oracles, on every backend."""

from __future__ import annotations

import inspect
import string
from array import array

import pytest
from _backend_helpers import workers_up_to
from hypothesis import given, settings
from hypothesis import strategies as st

from procession.serialization.recipes import Recipe, build_count
from procession.workloads import palindromes, sieve
from procession.workloads.palindromes import (
    BLOCK,
    WordSource,
    find_palindromes,
    generate_words,
    is_palindrome,
    search_palindromes,
)
from procession.workloads.sieve import (
    SieveKernel,
    count_primes,
    prime_sieve,
    primes_up_to,
    segmented_count,
    segmented_sieve,
)


def trial_division(n: int) -> list[int]:
    """The primes <= n by trial division: shares no code with any sieve."""
    return [k for k in range(2, n + 1) if all(k % d for d in range(2, int(k**0.5) + 1))]


# -- the article's sieve ------------------------------------------------------------


@given(st.integers(min_value=-10, max_value=3000))
def test_prime_sieve_matches_trial_division(n: int) -> None:
    assert prime_sieve(n) == trial_division(n)


@pytest.mark.parametrize(("n", "expected"), [(-1, []), (0, []), (1, []), (2, [2]), (3, [2, 3])])
def test_prime_sieve_small_n(n: int, expected: list[int]) -> None:
    # The article answered [2] for n < 2.
    assert prime_sieve(n) == expected


@pytest.mark.parametrize("bad", [2.5, "10", True, None])
def test_sieves_reject_non_int(bad: object) -> None:
    with pytest.raises(TypeError, match="n must be an int"):
        prime_sieve(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="n must be an int"):
        count_primes(bad, backend="serial")  # type: ignore[arg-type]


# -- the segmented sieve, in process ------------------------------------------------


@settings(max_examples=60)
@given(st.integers(min_value=-5, max_value=40_000), st.integers(min_value=2, max_value=5000))
def test_segmented_sieve_matches_oracle(n: int, segment_size: int) -> None:
    expected = prime_sieve(n)
    assert list(segmented_sieve(n, segment_size=segment_size)) == expected
    assert segmented_count(n, segment_size=segment_size) == len(expected)


@given(st.integers(min_value=0, max_value=3000), st.integers(min_value=0, max_value=3000))
def test_kernel_segment_at_any_even_offset(lo: int, width: int) -> None:
    """Segments that start anywhere (inside the pre-sieved primes too) are right."""
    lo -= lo % 2
    hi = lo + width
    expected = [p for p in prime_sieve(hi) if lo <= p < hi]
    kernel = SieveKernel(64)
    assert list(kernel.primes(lo, hi)) == expected
    assert kernel.count(lo, hi) == len(expected)


def test_kernel_refuses_odd_start_and_too_few_base_primes() -> None:
    kernel = SieveKernel(10)
    with pytest.raises(ValueError, match="even"):
        kernel.segment(3, 10)
    with pytest.raises(ValueError, match="base primes reach 10"):
        kernel.segment(0, 200)


@pytest.mark.parametrize("bad", [0, 1, -4])
def test_segment_size_must_be_at_least_two(bad: int) -> None:
    with pytest.raises(ValueError, match="segment_size"):
        segmented_sieve(100, segment_size=bad)


def test_known_prime_counts_sequential() -> None:
    assert segmented_count(10**6) == 78498
    primes = segmented_sieve(10**6)
    assert len(primes) == 78498
    assert primes[-1] == 999983


# -- the parallel sieve, on every backend -------------------------------------------


@settings(max_examples=6)
@given(n=st.integers(min_value=-3, max_value=20_000), segment_size=st.integers(2, 3000))
def test_primes_up_to_matches_trial_division(backend_name: str, n: int, segment_size: int) -> None:
    expected = trial_division(n)
    found = primes_up_to(
        n, backend=backend_name, workers=workers_up_to(backend_name, 2), segment_size=segment_size
    )
    assert isinstance(found, array)
    assert list(found) == expected
    assert count_primes(
        n, backend=backend_name, workers=workers_up_to(backend_name, 2), segment_size=segment_size
    ) == len(expected)


def test_pi_of_a_million_on_every_backend(backend_name: str) -> None:
    assert (
        count_primes(10**6, backend=backend_name, workers=workers_up_to(backend_name, 2)) == 78498
    )
    primes = primes_up_to(
        10**6, backend=backend_name, workers=workers_up_to(backend_name, 2), segment_size=1 << 16
    )
    assert len(primes) == 78498
    assert primes.typecode == "I"  # 4 bytes a prime, not a list of Python ints
    assert primes[-1] == 999983


def test_pi_of_ten_million() -> None:
    assert count_primes(10**7, backend="threads", workers=2) == 664579


def test_sieve_base_primes_built_once_per_worker() -> None:
    """In-process workers (threads) share the recipe cache: one build for many calls."""
    n = 123_457
    recipe = Recipe(SieveKernel, sieve._kernel_limit(n))
    before = build_count(recipe)
    for _ in range(3):
        assert count_primes(n, backend="threads", workers=2, segment_size=2048) == len(
            prime_sieve(n)
        )
    assert build_count(recipe) == max(before, 1)


# -- palindromes ----------------------------------------------------------------------


def test_generate_words_is_a_generator_of_lowercase_words() -> None:
    words = generate_words(10, 6, seed=3)
    assert inspect.isgenerator(words)
    listed = list(words)
    assert len(listed) == 10
    assert all(len(w) == 6 and set(w) <= set(string.ascii_lowercase) for w in listed)


@settings(max_examples=25)
@given(
    count=st.integers(0, 3 * BLOCK),
    length=st.integers(0, 6),
    seed=st.integers(-(2**70), 2**70),
    data=st.data(),
)
def test_word_i_depends_only_on_seed_and_i(
    count: int, length: int, seed: int, data: st.DataObject
) -> None:
    words = list(generate_words(count, length, seed=seed))
    assert words == list(generate_words(count, length, seed=seed))
    assert len(words) == count
    start = data.draw(st.integers(0, count))
    stop = data.draw(st.integers(start, count))
    assert WordSource(length, seed).words(start, stop) == words[start:stop]
    # a longer run starts with the same words
    assert list(generate_words(count + 7, length, seed=seed))[:count] == words


def test_generate_words_checks_its_arguments_at_the_call() -> None:
    with pytest.raises(ValueError, match="count"):
        generate_words(-1, 3, seed=1)
    with pytest.raises(TypeError, match="seed"):
        generate_words(3, 3, seed="x")  # type: ignore[arg-type]


def test_different_seeds_give_different_words() -> None:
    assert list(generate_words(50, 8, seed=1)) != list(generate_words(50, 8, seed=2))


@given(st.lists(st.text(alphabet="abc", max_size=7), max_size=40))
def test_find_palindromes_matches_reversal_oracle(words: list[str]) -> None:
    assert find_palindromes(words) == [w for w in words if w == w[::-1]]


@pytest.mark.parametrize(
    ("word", "expected"),
    [("", True), ("a", True), ("ab", False), ("aa", True), ("aba", True), ("abca", False)],
)
def test_is_palindrome_handles_half_zero(word: str, expected: bool) -> None:
    # The article's word[-half:] is the whole word when half == 0, so "a" failed.
    assert is_palindrome(word) is expected


@given(count=st.integers(0, 2 * BLOCK + 3), length=st.integers(0, 4), seed=st.integers(0, 10**6))
def test_word_source_palindromes_equal_find_palindromes(count: int, length: int, seed: int) -> None:
    source = WordSource(length, seed)
    assert source.palindromes(0, count) == find_palindromes(source.words(0, count))


@pytest.mark.parametrize("workers", [1, 2, 3])
@settings(max_examples=4)
@given(count=st.integers(0, 4 * BLOCK + 17), length=st.integers(0, 4), seed=st.integers(0, 2**32))
def test_search_palindromes_equals_sequential(
    backend_name: str, workers: int, count: int, length: int, seed: int
) -> None:
    expected = find_palindromes(list(generate_words(count, length, seed=seed)))
    found = search_palindromes(
        count, length, seed=seed, backend=backend_name, workers=workers_up_to(backend_name, workers)
    )
    assert found == expected


def test_search_palindromes_finds_some_at_a_realistic_size() -> None:
    found = search_palindromes(50_000, 3, seed=11, backend="threads", workers=2)
    assert found == find_palindromes(generate_words(50_000, 3, seed=11))
    assert len(found) > 1000  # about 1 in 26 three-letter words


def test_search_palindromes_builds_the_word_source_once() -> None:
    recipe = Recipe(WordSource, 5, 77)
    before = build_count(recipe)
    for _ in range(2):
        search_palindromes(3 * BLOCK, 5, seed=77, backend="threads", workers=2)
    assert build_count(recipe) == max(before, 1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"count": -1, "length": 3, "seed": 1}, ValueError),
        ({"count": 10, "length": -1, "seed": 1}, ValueError),
        ({"count": 10, "length": 3, "seed": 1.5}, TypeError),
        ({"count": "10", "length": 3, "seed": 1}, TypeError),
    ],
)
def test_search_palindromes_rejects_bad_arguments(kwargs: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        search_palindromes(backend="serial", **kwargs)  # type: ignore[arg-type]


def test_collect_primes_is_reexported() -> None:
    ranges = [(0, 100), (100, 250), (250, 251), (251, 400)]
    assert sieve.collect_primes(ranges, backend="threads", workers=2) == prime_sieve(400)
    assert palindromes.search_palindromes is search_palindromes
