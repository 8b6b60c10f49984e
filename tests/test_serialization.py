"""Serializers (round trips), diagnostics that name the culprit, check_report."""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from _serialization_helpers import LOCAL_BACKENDS
from hypothesis import given
from hypothesis import strategies as st

import procession
from procession.serialization import (
    Serializer,
    diagnose,
    get_serializer,
    register_serializer,
    serializer_names,
)
from procession.serialization.diagnostics import check_report

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=LOCAL_BACKENDS)
def local_backend(request: pytest.FixtureRequest) -> str:
    """Every usable local backend (see _serialization_helpers for why not remote ones)."""
    return str(request.param)


SERIALIZERS = ["pickle", "cloudpickle", "dill"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.complex_numbers(allow_nan=False)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=5)
        | st.frozensets(st.integers() | st.text(max_size=5), max_size=5)
    ),
    max_leaves=25,
)


@pytest.mark.parametrize("name", SERIALIZERS)
@given(value=values)
def test_round_trip(name: str, value: Any) -> None:
    serializer = get_serializer(name)
    assert serializer.loads(serializer.dumps(value)) == value


def identity(x: Any) -> Any:
    return x


@pytest.mark.parametrize("name", SERIALIZERS)
@given(batch=st.lists(values, min_size=1, max_size=8))
def test_round_trip_through_a_worker(name: str, batch: list[Any], local_backend: str) -> None:
    out = list(procession.map(identity, batch, backend=local_backend, serializer=name))
    assert out == batch


def test_serializer_registry() -> None:
    assert serializer_names()[:3] == ("pickle", "cloudpickle", "dill")
    assert set(SERIALIZERS) <= set(procession.serializers)
    assert get_serializer(None, default="pickle").name == "pickle"
    with pytest.raises(ValueError, match="unknown serializer 'nope'"):
        get_serializer("nope")
    with pytest.raises(TypeError):
        get_serializer(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"built-in|already registered"):
        register_serializer(_named("pickle"))


class _Repr(Serializer):
    """A third-party serializer: repr/eval of literals."""

    name = "test-repr"

    def dumps(self, obj: Any) -> bytes:
        return repr(obj).encode()

    def loads(self, data: bytes) -> Any:
        import ast

        return ast.literal_eval(data.decode())


def _named(name: str) -> Serializer:
    serializer = _Repr()
    serializer.name = name
    return serializer


def test_third_party_serializer_end_to_end() -> None:
    serializer = _Repr()
    register_serializer(serializer)
    register_serializer(serializer)  # the same object twice is harmless
    assert "test-repr" in serializer_names()
    assert get_serializer("test-repr") is serializer
    with pytest.raises(ValueError, match="already registered"):
        register_serializer(_named("test-repr"))
    # Functions are not literals: a serializer that cannot send code says so.
    with pytest.raises(procession.SerializationError, match="test-repr"):
        list(procession.map(identity, [1], backend="serial", serializer="test-repr"))


def test_pickle_uses_protocol_5() -> None:
    data = get_serializer("pickle").dumps([1])
    assert data[:2] == b"\x80\x05"


# -- diagnostics ------------------------------------------------------------


class Inner:
    def __init__(self) -> None:
        self.lock = threading.Lock()


class Outer:
    def __init__(self) -> None:
        self.name = "outer"
        self.inner = Inner()


def explain(obj: Any, serializer: str, root: str = "obj") -> procession.SerializationError:
    chosen = get_serializer(serializer)
    try:
        chosen.dumps(obj)
    except Exception as exc:
        return diagnose(obj, chosen, root=root, exc=exc)
    raise AssertionError(f"{obj!r} serialized with {serializer}")


@pytest.mark.parametrize("name", SERIALIZERS)
def test_path_through_attributes_and_call_arguments(name: str) -> None:
    error = explain(((Outer(),), {}), name, root="args")
    assert error.path == "args[0].inner.lock"
    assert error.type_name == "_thread.lock"
    assert error.serializer == name
    message = str(error)
    assert "args[0].inner.lock (_thread.lock)" in message
    assert f"serializer {name!r}" in message
    assert "Recipe" in message
    assert "Manager" in message


@pytest.mark.parametrize("name", SERIALIZERS)
def test_path_through_dict_values_lists_and_keys(name: str) -> None:
    assert explain({"key": [1, 2, threading.RLock()]}, name, "item").path == "item['key'][2]"
    assert explain({threading.Lock(): 1}, name, "item").path == "item.keys()[0]"
    assert explain({"a": ({1, 2}, [Outer()])}, name, "item").path == "item['a'][1][0].inner.lock"


def test_path_through_partial_and_methods() -> None:
    bound = Outer().inner.__init__
    assert explain(bound, "pickle").path == "obj.__self__.lock"
    part = functools.partial(identity, Outer())
    assert explain(part, "cloudpickle").path == "obj.args[0].inner.lock"


def make_closure(lock: Any) -> Any:
    def task(x: int) -> Any:
        return lock, x

    return task


@pytest.mark.parametrize("name", ["cloudpickle", "dill"])
def test_path_into_closures_with_code_by_value(name: str) -> None:
    error = explain(make_closure(threading.Lock()), name, root="fn")
    assert error.path == "fn.<closure>.lock"


def test_lambda_with_pickle_suggests_cloudpickle() -> None:
    error = explain(lambda x: x, "pickle", root="fn")
    assert error.path == "fn"
    assert 'serializer="cloudpickle"' in str(error)
    assert "lambda" in str(error)
    with pytest.raises(procession.SerializationError, match='serializer="cloudpickle"'):
        list(procession.map(lambda x: x, [1], backend="serial", serializer="pickle"))
    closure = make_closure(None)
    assert "inside another function" in str(explain(closure, "pickle", root="fn"))


def test_generic_culprit_names_a_working_serializer() -> None:
    error = explain({"f": lambda: 1}, "pickle", root="item")
    assert error.path == "item['f']"
    assert 'serializer="cloudpickle"' in str(error)


class Opaque:
    """Refuses every serializer, with no adapter."""

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle 'Opaque' object")


def test_unknown_unpicklable_type_suggests_recipe_and_adapter() -> None:
    error = explain([1, {"x": Opaque()}], "cloudpickle", root="item")
    assert error.path == "item[1]['x']"
    assert error.type_name.endswith("Opaque")
    message = str(error)
    assert "TypeError: cannot pickle 'Opaque' object" in message
    assert "procession.Recipe" in message
    assert "register_adapter" in message


def test_check_picklable() -> None:
    procession.check_picklable({"a": [1, 2]})
    procession.check_picklable(lambda x: x)  # cloudpickle by default
    with pytest.raises(procession.SerializationError) as info:
        procession.check_picklable({"outer": Outer()}, "pickle")
    assert info.value.path == "obj['outer'].inner.lock"
    # A SerializationError is also a pickle.PicklingError.
    import pickle

    assert isinstance(info.value, pickle.PicklingError)


class BadInit(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)


class BadReduce:
    """Pickles, but its __reduce__ gives the constructor too few arguments."""

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b

    def __reduce__(self) -> Any:
        return (BadReduce, (self.a,))


def test_check_picklable_catches_objects_that_do_not_load_back() -> None:
    with pytest.raises(procession.SerializationError, match="cannot be loaded back"):
        procession.check_picklable(BadReduce(1, 2), "pickle")
    # BadInit(1, 2) fails the same way, unless something made exceptions pickle
    # by value: importing dask.distributed installs tblib's pickling support for
    # every exception class in the process, and then it loads back fine.
    if "distributed" not in sys.modules:
        with pytest.raises(procession.SerializationError, match="cannot be loaded back"):
            procession.check_picklable(BadInit(1, 2), "pickle")


def test_submit_error_names_the_argument_path() -> None:
    # submit() does not raise: its future fails with the error (as on main since
    # the protocol module: "submit's serialization errors fail the future").
    with procession.Executor(backend="serial") as executor:
        error = executor.submit(identity, Outer()).exception(timeout=30)
    assert isinstance(error, procession.SerializationError)
    assert error.path == "args[0].inner.lock"


def test_unsendable_item_names_its_index_and_path(local_backend: str) -> None:
    items: list[Any] = [1, 2, 3, {"key": [0, 0, threading.Lock()]}, 5]
    with pytest.raises(procession.SerializationError) as info:
        list(procession.map(identity, items, backend=local_backend, chunksize=2))
    assert info.value.index == 3
    assert info.value.path == "item['key'][2]"
    assert "input item 3" in str(info.value)
    out = list(
        procession.map(identity, items, backend=local_backend, chunksize=2, on_error="return")
    )
    assert out[:3] == [1, 2, 3]
    assert out[4] == 5
    assert isinstance(out[3], procession.SerializationError)


def lock_at_three(x: int) -> Any:
    return {"value": threading.Lock()} if x == 3 else x


def test_unsendable_result_comes_back_as_error_with_index(local_backend: str) -> None:
    with pytest.raises(procession.SerializationError) as info:
        list(procession.map(lock_at_three, range(6), backend=local_backend, chunksize=3))
    error = info.value
    assert error.index == 3
    assert error.path == "result['value']"
    assert error.type_name == "_thread.lock"
    out = list(
        procession.map(
            lock_at_three, range(6), backend=local_backend, chunksize=3, on_error="return"
        )
    )
    assert [x for i, x in enumerate(out) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(out[3], procession.SerializationError)
    assert out[3].index == 3


# -- procession check MODULE:ATTR --------------------------------------------

PROBE = """
import threading

class Holder:
    def __init__(self):
        self.lock = threading.Lock()

holder = Holder()
square = lambda x: x * x
numbers = [1, 2, 3]

def count(n):
    yield from range(n)

def total(gen, x):
    return sum(gen)

import functools
counting = functools.partial(total, count(3))
"""


@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"procession_probe_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_check_report(probe_module: str) -> None:
    ok, text = check_report(f"{probe_module}:numbers")
    assert ok
    assert "FAILS" not in text
    assert "  pickle       ok" in text

    ok, text = check_report(f"{probe_module}:holder")
    assert not ok
    assert "obj.lock (_thread.lock)" in text
    assert "FAILS" in text

    ok, text = check_report(f"{probe_module}:square")
    assert ok  # cloudpickle, procession's default, sends lambdas
    pickle_line = next(line for line in text.splitlines() if line.strip().startswith("pickle"))
    assert "FAILS" in pickle_line
    assert 'serializer="cloudpickle"' in pickle_line
    assert "value(s) with state" not in text


def test_check_report_names_values_with_state(probe_module: str) -> None:
    ok, text = check_report(f"{probe_module}:counting")
    assert ok
    assert "holds 1 value(s) with state" in text


def test_check_report_bad_targets() -> None:
    ok, text = check_report("no_such_module_here:thing")
    assert not ok
    assert "cannot import" in text
    ok, text = check_report("missing-colon")
    assert not ok
    assert "MODULE:ATTR" in text
    ok, text = check_report("threading:NoSuchThing")
    assert not ok
