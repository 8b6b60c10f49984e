"""Explain serialization failures: which part of an object failed, and the fix.

When a function, an argument or a result does not serialize, :func:`diagnose`
walks the object the way a pickler would (containers, attributes, the state
``__reduce_ex__`` returns, closures and globals of functions sent by value,
the arguments of Recipes that adapters make) and descends into the first part
that fails on its own, until it reaches a part that fails while all of its
own parts succeed: the culprit.  The error names the path to it
(``args[0].inner.lock``, ``item['key'][2]``, ``fn.<closure>.conn``), its type,
the serializer in use, and the fix: the adapter's advice when an adapter
refused it, another serializer that can send it, a Recipe, or an adapter.

This runs only after a failure, so it may serialize parts of the object many
times; it stops after a bounded number of attempts.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from procession.errors import SerializationError
from procession.serialization import adapters
from procession.serialization.recipes import Recipe
from procession.serialization.serializers import Serializer, get_serializer, serializer_names

__all__ = [
    "OutOfBand",
    "check_picklable",
    "check_report",
    "describe_out_of_band",
    "diagnose",
    "locate",
    "out_of_band_report",
]

# Bounds on the search, so a diagnosis of a huge object stays quick.
MAX_ATTEMPTS = 2000
MAX_DEPTH = 60
MAX_CHILDREN = 10_000
_CODE_BY_VALUE_HINT = 'serializer="cloudpickle"'
# Adapter plug-ins procession knows of, by the top-level module of the types
# they cover: suggested when such an object fails and no adapter is installed.
KNOWN_ADAPTER_PLUGINS = {
    "h5py": "procession-h5py",
    "duckdb": "procession-duckdb",
}


@dataclass
class Culprit:
    """The innermost part of an object that fails to serialize."""

    path: str
    obj: Any
    exc: BaseException
    #: The SerializationError an adapter raised to refuse ``obj``, if any.
    refusal: SerializationError | None = None


def type_name(obj: Any) -> str:
    """``sqlite3.Connection``, ``_thread.lock``, ``int`` (builtins unqualified)."""
    cls = type(obj)
    module = getattr(cls, "__module__", None)
    if module in (None, "builtins"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _failure(obj: Any, serializer: Serializer) -> BaseException | None:
    try:
        serializer.dumps(obj)
    except Exception as exc:
        return exc
    return None


def _short_repr(value: Any, limit: int = 40) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type_name(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _function_children(fn: types.FunctionType, path: str) -> Iterator[tuple[str, Any]]:
    if fn.__closure__:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=False):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            yield f"{path}.<closure>.{name}", value
    fn_globals = fn.__globals__
    for name in sorted(_code_names(fn.__code__)):
        if name in fn_globals:
            yield f"{path}.<globals>.{name}", fn_globals[name]
    for position, default in enumerate(fn.__defaults__ or ()):
        yield f"{path}.__defaults__[{position}]", default
    for name, default in (fn.__kwdefaults__ or {}).items():
        yield f"{path}.__kwdefaults__[{name!r}]", default
    for name, value in vars(fn).items():
        yield f"{path}.{name}", value


def _recipe_children(recipe: Recipe[Any], path: str) -> Iterator[tuple[str, Any]]:
    yield f"{path}.factory", recipe.factory
    for position, arg in enumerate(recipe.args):
        yield f"{path}.args[{position}]", arg
    for name, value in recipe.kwargs.items():
        yield f"{path}.kwargs[{name!r}]", value


def _state_children(state: Any, path: str) -> Iterator[tuple[str, Any]]:
    if (
        isinstance(state, tuple)
        and len(state) == 2
        and all(part is None or isinstance(part, dict) for part in state)
    ):
        # (__dict__, __slots__ values), as object.__reduce_ex__ makes them.
        for part in state:
            yield from _state_children(part, path)
        return
    if isinstance(state, dict):
        for name, value in state.items():
            if isinstance(name, str) and name.isidentifier():
                yield f"{path}.{name}", value
            else:
                yield f"{path}.<state>[{_short_repr(name)}]", value
        return
    if state is not None:
        yield f"{path}.<state>", state


def _children(obj: Any, path: str, serializer: Serializer) -> Iterator[tuple[str, Any]]:
    """The parts a pickler would save for ``obj``, each with its path."""
    reduce = adapters.find_reducer(type(obj))
    if reduce is not None:
        recipe = reduce(obj)  # a refusal was handled by the caller
        if isinstance(recipe, Recipe):
            yield from _recipe_children(recipe, f"{path}.<adapter>")
        return
    if isinstance(obj, Recipe):
        yield from _recipe_children(obj, path)
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{path}[{_short_repr(key)}]", value
        for position, key in enumerate(obj):
            yield f"{path}.keys()[{position}]", key
        return
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for name, value in zip(obj._fields, obj, strict=False):
            yield f"{path}.{name}", value
        return
    if isinstance(obj, list | tuple):
        for position, value in enumerate(obj):
            yield f"{path}[{position}]", value
        return
    if isinstance(obj, set | frozenset):
        for position, value in enumerate(obj):
            yield f"{path}.<element {position}>", value
        return
    if isinstance(obj, functools.partial):
        yield f"{path}.func", obj.func
        for position, arg in enumerate(obj.args):
            yield f"{path}.args[{position}]", arg
        for name, value in obj.keywords.items():
            yield f"{path}.keywords[{name!r}]", value
        yield from _state_children(getattr(obj, "__dict__", None) or None, path)
        return
    if isinstance(obj, types.MethodType):
        yield f"{path}.__self__", obj.__self__
        yield f"{path}.__func__", obj.__func__
        return
    if isinstance(obj, types.FunctionType):
        # pickle sends a function by reference (module + name): its insides do
        # not travel, so the function itself is the culprit.
        if serializer.sends_code_by_value:
            yield from _function_children(obj, path)
        return
    if isinstance(obj, type | types.ModuleType | types.BuiltinFunctionType):
        return
    try:
        reduced = obj.__reduce_ex__(pickle.DEFAULT_PROTOCOL)
    except Exception:
        return  # the object itself refuses
    if not isinstance(reduced, tuple):
        return  # saved as a global name
    args = reduced[1] if len(reduced) > 1 else ()
    for position, arg in enumerate(args or ()):
        if arg is type(obj):
            yield f"{path}.__class__", arg
        else:
            yield f"{path}.<reduce args>[{position}]", arg
    if len(reduced) > 2:
        yield from _state_children(reduced[2], path)
    if len(reduced) > 3 and reduced[3] is not None:
        for position, value in enumerate(reduced[3]):
            yield f"{path}[{position}]", value
    if len(reduced) > 4 and reduced[4] is not None:
        for key, value in reduced[4]:
            yield f"{path}[{_short_repr(key)}]", value


def _call_args_children(obj: Any, root: str) -> Iterator[tuple[str, Any]] | None:
    """``(args, kwargs)`` as ``args[0]``, ``kwargs['name']`` rather than ``root[0][0]``."""
    if not (
        root in ("args", "(args, kwargs)")
        and isinstance(obj, tuple)
        and len(obj) == 2
        and isinstance(obj[0], tuple)
        and isinstance(obj[1], dict)
    ):
        return None
    args, kwargs = obj

    def parts() -> Iterator[tuple[str, Any]]:
        for position, arg in enumerate(args):
            yield f"args[{position}]", arg
        for name, value in kwargs.items():
            yield f"kwargs[{name!r}]", value

    return parts()


def _refusal(obj: Any) -> SerializationError | None:
    """The SerializationError an adapter raises for ``obj``, if it refuses it."""
    reduce = adapters.find_reducer(type(obj))
    if reduce is None:
        return None
    try:
        reduce(obj)
    except SerializationError as refusal:
        return refusal
    except Exception:
        return None
    return None


def locate(obj: Any, serializer: Serializer, *, root: str, exc: BaseException) -> Culprit:
    """Find the innermost part of ``obj`` that fails to serialize with ``serializer``."""
    attempts = 0
    seen: set[int] = {id(obj)}
    path, current, error = root, obj, exc
    children = _call_args_children(obj, root)
    for _ in range(MAX_DEPTH):
        refusal = _refusal(current)
        if refusal is not None:
            return Culprit(path, current, refusal, refusal)
        if children is None:
            children = _children(current, path, serializer)
        descended = False
        try:
            for count, (child_path, child) in enumerate(children):
                if count >= MAX_CHILDREN or attempts >= MAX_ATTEMPTS:
                    break
                if id(child) in seen:
                    continue
                seen.add(id(child))
                attempts += 1
                child_error = _failure(child, serializer)
                if child_error is not None:
                    path, current, error = child_path, child, child_error
                    descended = True
                    break
        except Exception:
            pass  # an object whose parts cannot be listed is the culprit itself
        children = None
        if not descended:
            break
    return Culprit(path, current, error)


def _is_by_reference_failure(obj: Any, serializer: Serializer) -> bool:
    """A function or class that ``serializer`` can only send by (missing) name."""
    if serializer.sends_code_by_value:
        return False
    return isinstance(obj, types.FunctionType | type | types.MethodType | functools.partial)


def _function_kind(obj: Any) -> str:
    qualname = getattr(obj, "__qualname__", "")
    if "<lambda>" in qualname:
        return "a lambda"
    if "<locals>" in qualname:
        return "defined inside another function"
    return "not importable by its module and name in the worker"


def _other_serializers(obj: Any, serializer: Serializer) -> list[str]:
    """The other registered serializers that can send ``obj``."""
    working = []
    for name in serializer_names():
        if name == serializer.name:
            continue
        try:
            get_serializer(name).dumps(obj)
        except Exception:
            continue
        working.append(name)
    return working


def _advice(culprit: Culprit, root_obj: Any, serializer: Serializer) -> str:
    if culprit.refusal is not None:
        return str(culprit.refusal)
    error = f"{type(culprit.exc).__name__}: {culprit.exc}"
    if _is_by_reference_failure(culprit.obj, serializer):
        return (
            f"{error}. Serializer {serializer.name!r} sends functions and classes by reference "
            f"(module and name), and this one is {_function_kind(culprit.obj)}; use "
            f'{_CODE_BY_VALUE_HINT} (or "dill"), which send code by value, or define it at '
            f"module level"
        )
    culprit_type = type(culprit.obj)
    reduce = adapters.find_reducer(culprit_type)
    if reduce is not None:
        return (
            f"{error}. The adapter registered for {type_name(culprit.obj)} "
            f"({getattr(reduce, '__module__', '?')}.{getattr(reduce, '__qualname__', reduce)}) "
            f"failed: fix it, or wrap the object in a procession.Recipe yourself"
        )
    fixes = []
    plugin = KNOWN_ADAPTER_PLUGINS.get(culprit_type.__module__.partition(".")[0])
    if plugin is not None:
        fixes.append(f"pip install {plugin} (procession's adapters for it)")
    others = _other_serializers(root_obj, serializer)
    if others:
        fixes.append(" or ".join(f'serializer="{name}"' for name in others) + " can send it")
    name = type_name(culprit.obj)
    fixes.append(
        f"wrap it in procession.Recipe(factory, *args) so each worker builds its own {name}"
    )
    fixes.append(
        f"or register an adapter: procession.register_adapter({name}, "
        f"lambda obj: procession.Recipe(factory, ...))"
    )
    return f"{error}. Fixes: " + "; ".join(fixes)


def diagnose(
    obj: Any,
    serializer: Serializer,
    *,
    root: str,
    exc: BaseException,
    index: int | None = None,
) -> SerializationError:
    """Build the SerializationError for ``obj`` failing under ``serializer``.

    ``root`` names ``obj`` in the message (``"fn"``, ``"item"``, ``"args"``,
    ``"result"``); ``exc`` is the error serializing it raised; ``index`` the
    input position, when known.

    Example::

        try:
            serializer.dumps(item)
        except Exception as exc:
            raise diagnose(item, serializer, root="item", exc=exc, index=3) from exc
    """
    try:
        culprit = locate(obj, serializer, root=root, exc=exc)
    except Exception:  # never let the diagnosis hide the original failure
        culprit = Culprit(root, obj, exc)
    where = f" (input item {index})" if index is not None else ""
    name = type_name(culprit.obj)
    if isinstance(culprit.obj, types.FunctionType | type):
        name = f"{name} {getattr(culprit.obj, '__qualname__', '')}".rstrip()
    try:
        advice = _advice(culprit, obj, serializer)
    except Exception:
        advice = f"{type(culprit.exc).__name__}: {culprit.exc}"
    return SerializationError(
        f"cannot send {culprit.path} ({name}){where} with serializer {serializer.name!r}: {advice}",
        path=culprit.path,
        type_name=type_name(culprit.obj),
        serializer=serializer.name,
        index=index,
    )


class _TrialUnpickler(pickle.Unpickler):
    """Loads bytes without building Recipes: their factories may be expensive."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "procession.serialization._rebuild":
            return _not_built
        return super().find_class(module, name)


def _not_built(*args: Any) -> None:
    return None


def _trial_load(serializer: Serializer, data: bytes) -> None:
    if serializer.name in ("pickle", "cloudpickle"):
        _TrialUnpickler(io.BytesIO(data)).load()
    elif serializer.name == "dill":
        import dill

        class _TrialDillUnpickler(dill.Unpickler):  # type: ignore[misc]
            def find_class(self, module: str, name: str) -> Any:
                if module == "procession.serialization._rebuild":
                    return _not_built
                return super().find_class(module, name)

        _TrialDillUnpickler(io.BytesIO(data)).load()
    # A third-party serializer's format is its own: sending is what we can check.


def check_picklable(obj: Any, serializer: str | Serializer | None = None) -> None:
    """Raise SerializationError naming the offending part if ``obj`` does not serialize.

    It also loads the bytes back (without building Recipes), which catches
    objects that pickle but cannot be rebuilt, such as an exception whose
    ``__init__`` takes other arguments than it passes to ``super().__init__``.

    Example::

        >>> import threading, procession
        >>> procession.check_picklable({"lock": threading.Lock()}, "pickle")
        Traceback (most recent call last):
        ...
        procession.errors.SerializationError: cannot send obj['lock'] (_thread.lock) ...
    """
    chosen = get_serializer(serializer, default="cloudpickle")
    try:
        data = chosen.dumps(obj)
    except Exception as exc:
        raise diagnose(obj, chosen, root="obj", exc=exc) from exc
    try:
        _trial_load(chosen, data)
    except Exception as exc:
        raise SerializationError(
            f"obj ({type_name(obj)}) serializes with {chosen.name!r} but cannot be loaded "
            f"back: {type(exc).__name__}: {exc}. Give its class a __reduce__ that returns "
            f"arguments its constructor accepts",
            path="obj",
            type_name=type_name(obj),
            serializer=chosen.name,
        ) from exc


def _import_target(target: str) -> Any:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected MODULE:ATTR (e.g. mypackage.tasks:work), got {target!r}")
    # Like `python -m`, let a module in the current directory be found.
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    finally:
        if added:
            sys.path.remove(os.getcwd())
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def check_report(target: str, *, threshold: int | str | None = None) -> tuple[bool, str]:
    """Import ``MODULE:ATTR`` and say whether it serializes with each serializer.

    Returns ``(ok, report)``: ``ok`` is True when the object can be sent with
    procession's default serializer (cloudpickle); the report has one line per
    serializer and, for each failure, the path to the offending part and the fix.

    Example::

        ok, text = check_report("myapp.tasks:process_row")
        print(text)
    """
    try:
        obj = _import_target(target)
    except Exception as exc:
        return False, f"cannot import {target}: {type(exc).__name__}: {exc}"
    lines = [f"{target}: {type_name(obj)}"]
    ok = False
    width = max(len(name) for name in serializer_names())
    for name in serializer_names():
        try:
            chosen = get_serializer(name)
            check_picklable(obj, chosen)
        except SerializationError as error:
            lines.append(f"  {name:<{width}}  FAILS  {error}")
        except Exception as exc:  # the serializer itself is unusable (dill missing)
            lines.append(f"  {name:<{width}}  n/a    {type(exc).__name__}: {exc}")
        else:
            lines.append(f"  {name:<{width}}  ok")
            if name == "cloudpickle":
                ok = True
    adapter = adapters.find_adapter(type(obj))
    if adapter is not None:
        name = getattr(adapter.reduce, "__qualname__", None) or repr(adapter.reduce)
        lines.append(f"  an adapter handles {type_name(obj)}: {name} (kind={adapter.kind!r})")
    lines.extend(_stateful_note(obj))
    if ok:
        lines.append(describe_out_of_band(obj, threshold=threshold))
    return ok, "\n".join(lines)


def _stateful_note(obj: Any) -> list[str]:
    """A line saying how many values with state ``obj`` holds (none when it holds none)."""
    try:
        with adapters.track_stateful_values() as seen:
            get_serializer("cloudpickle").dumps(obj)
    except Exception:  # reported above, serializer by serializer
        return []
    if not seen.count:
        return []
    return [
        f"  holds {seen.count} value(s) with state (unstarted generators, read-only files, "
        f"fresh Recipes): each task gets its own, as in the caller; as the mapped function "
        f"it is unpickled for every call"
    ]


# -- large buffers: what would travel out of band --------------------------------


@dataclass(frozen=True)
class OutOfBand:
    """One part of an object that would not travel in the byte stream."""

    #: ``"shared memory"`` (written to a segment) or ``"file"`` (a memmap, sent by name).
    kind: str
    nbytes: int
    #: The type of the object that owns the memory (``numpy.ndarray``, ``bytes``, ...).
    owner: str
    #: dtype and shape for numpy arrays, the file name and offset for memmaps.
    detail: str


def out_of_band_report(
    obj: Any, serializer: Serializer | str | None = None, *, threshold: int | str | None = None
) -> list[OutOfBand]:
    """The parts of ``obj`` that a same-machine process backend would send out of band.

    Example::

        for part in out_of_band_report({"x": np.zeros(10**6)}):
            print(part.kind, part.nbytes, part.owner)   # shared memory 8000000 numpy.ndarray
    """
    from procession.serialization import shm

    chosen = get_serializer(serializer)
    limit = shm.current().threshold if threshold is None else shm.parse_size(threshold)
    if not chosen.supports_buffers:
        return []
    buffers, files, _ = shm.arena.out_of_band_parts(chosen, obj, limit)
    parts: list[OutOfBand] = []
    for buffer in buffers:
        raw = buffer.raw()
        owner = raw.obj
        detail = ""
        if hasattr(owner, "dtype") and hasattr(owner, "shape"):
            detail = f"dtype={owner.dtype} shape={tuple(owner.shape)}"
        parts.append(OutOfBand("shared memory", raw.nbytes, type_name(owner), detail))
    for filename, start, nbytes in files:
        parts.append(OutOfBand("file", nbytes, "numpy.memmap", f"{filename} at byte {start}"))
    return parts


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def describe_out_of_band(
    obj: Any, serializer: Serializer | str | None = None, *, threshold: int | str | None = None
) -> str:
    """:func:`out_of_band_report` as text, one line per part (for ``procession check``).

    Example::

        print(describe_out_of_band(np.zeros(10**6)))
    """
    from procession.serialization import shm

    limit = shm.current().threshold if threshold is None else shm.parse_size(threshold)
    try:
        parts = out_of_band_report(obj, serializer, threshold=limit)
    except Exception as exc:  # it does not serialize: the serializer lines say why
        return f"  out-of-band: not computed ({type(exc).__name__})"
    if not parts:
        return f"  out-of-band: nothing (every buffer is under {_size(limit)}: all in-band)"
    total = sum(part.nbytes for part in parts)
    lines = [
        f"  out-of-band on process backends (threshold {_size(limit)}): "
        f"{len(parts)} part(s), {_size(total)}"
    ]
    for part in parts:
        detail = f" {part.detail}" if part.detail else ""
        lines.append(f"    {part.kind:<13} {_size(part.nbytes):>10}  {part.owner}{detail}")
    return "\n".join(lines)
