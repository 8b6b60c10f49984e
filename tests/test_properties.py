"""Properties: a parallel map equals the sequential one, whatever the backend,
serializer, chunking, ordering and error policy."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import procession

SERIALIZERS = ["pickle", "cloudpickle", "dill"]

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


def describe(value: Any) -> str:
    """Deterministic, picklable by reference: works with every serializer."""
    return f"{type(value).__name__}:{value!r}"


def checked_inverse(x: int) -> float:
    if x % 7 == 0:
        raise ZeroDivisionError(f"item {x}")
    return 1 / x


@pytest.mark.parametrize("serializer", SERIALIZERS)
@given(
    items=st.lists(values, max_size=40),
    chunksize=st.one_of(st.just("auto"), st.integers(min_value=1, max_value=9)),
)
def test_parallel_equals_sequential(
    backend_name: str, serializer: str, items: list[Any], chunksize: int | str
) -> None:
    got = procession.map(
        describe, items, backend=backend_name, serializer=serializer, chunksize=chunksize
    )
    assert list(got) == [describe(x) for x in items]


@given(
    items=st.lists(st.integers(min_value=-50, max_value=50), max_size=40),
    chunksize=st.integers(min_value=1, max_value=9),
)
def test_unordered_is_a_permutation_of_sequential(
    backend_name: str, items: list[int], chunksize: int
) -> None:
    got = procession.map(describe, items, backend=backend_name, chunksize=chunksize, ordered=False)
    assert sorted(got) == sorted(describe(x) for x in items)


@given(
    items=st.lists(st.integers(min_value=1, max_value=60), max_size=30),
    chunksize=st.one_of(st.just("auto"), st.integers(min_value=1, max_value=6)),
)
def test_on_error_return_matches_sequential_outcomes(
    backend_name: str, items: list[int], chunksize: int | str
) -> None:
    got = list(
        procession.map(
            checked_inverse, items, backend=backend_name, chunksize=chunksize, on_error="return"
        )
    )
    expected: list[Any] = []
    for x in items:
        try:
            expected.append(checked_inverse(x))
        except ZeroDivisionError as exc:
            expected.append(exc)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        if isinstance(theirs, BaseException):
            assert type(mine) is type(theirs) and str(mine) == str(theirs)
        else:
            assert mine == theirs


@given(
    items=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=30),
    chunksize=st.integers(min_value=1, max_value=6),
)
def test_raise_stops_at_the_first_failure_in_input_order(
    backend_name: str, items: list[int], chunksize: int
) -> None:
    seen: list[float] = []
    first_bad = next((i for i, x in enumerate(items) if x % 7 == 0), None)
    results = procession.map(checked_inverse, items, backend=backend_name, chunksize=chunksize)
    if first_bad is None:
        seen.extend(results)
        assert seen == [1 / x for x in items]
        return
    with pytest.raises(ZeroDivisionError, match=f"^item {items[first_bad]}$"):
        for value in results:
            seen.append(value)
    assert seen == [1 / x for x in items[:first_bad]]
