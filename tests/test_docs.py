"""Every ```python block in the docs runs, or says why it does not.

Each page's blocks run in order in one fresh interpreter (a block may use what
the blocks before it on that page defined), in a scratch directory, as
``__main__``, with a timeout.  A block that must not run is marked on purpose
by the line ``<!-- not-run: reason -->`` directly before its opening fence.  A
block marked ``<!-- test-file: NAME -->`` is written to NAME in the scratch
directory (a module is then imported into the page's namespace; a ``test_*.py``
file is only written: tests/test_conformance.py runs those with pytest).

Tracebacks point at the Markdown file and line of the failing code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [
    *sorted(DOCS.glob("*.md")),
    *sorted((DOCS / "reference").glob("*.md")),
    ROOT / "README.md",
]
PAGE_TIMEOUT = 60  # seconds for all the blocks of one page

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")
_TEST_FILE = re.compile(r"^\s*<!--\s*test-file:\s*(?P<name>\S+)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    lang: str
    code: str
    not_run: str | None  # the reason, when marked
    test_file: str | None


def parse_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the marker before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"].lower()
        before = lines[i - 1] if i > 0 else ""
        not_run = _NOT_RUN.match(before)
        test_file = _TEST_FILE.match(before)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page}:{i + 1}: code fence {fence} is never closed")
        blocks.append(
            Block(
                page=page,
                line=i + 2,
                lang=lang,
                code="\n".join(body) + "\n",
                not_run=not_run["reason"].strip() if not_run else None,
                test_file=test_file["name"] if test_file else None,
            )
        )
        i = j + 1
    return blocks


def _relative(page: Path) -> str:
    return str(page.relative_to(ROOT))


# Runs in the child: exec each block in __main__'s namespace, so functions the
# docs define pickle by reference as __main__.NAME, as in a user's script.
_RUNNER = """
import json, sys, traceback

def main():
    blocks = json.load(open(sys.argv[1], encoding="utf-8"))
    sys.path.insert(0, ".")
    namespace = sys.modules["__main__"].__dict__
    for block in blocks:
        where = f"{block['page']}:{block['line']}"
        if block["test_file"]:
            with open(block["test_file"], "w", encoding="utf-8") as fh:
                fh.write(block["code"])
            name = block["test_file"].removesuffix(".py")
            if name.startswith("test_"):
                continue
            source = f"from {name} import *\\n"
        else:
            # Blank lines first, so tracebacks give the Markdown file's line numbers.
            source = "\\n" * (block["line"] - 1) + block["code"]
        print(f"--- running {where}", flush=True)
        try:
            exec(compile(source, block["page"], "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: the block at {where}", flush=True)
            sys.exit(1)
    print("ALL BLOCKS RAN", flush=True)

if __name__ == "__main__":
    main()
"""


def _runnable(page: Path) -> list[Block]:
    return [b for b in parse_blocks(page) if b.lang in ("python", "py") and b.not_run is None]


RUN_PAGES = [page for page in PAGES if _runnable(page)]


@pytest.mark.timeout(PAGE_TIMEOUT + 30)
@pytest.mark.parametrize("page", RUN_PAGES, ids=_relative)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    blocks = _runnable(page)
    spec = [
        {
            "page": str(b.page),
            "line": b.line,
            "code": b.code,
            "test_file": b.test_file,
        }
        for b in blocks
    ]
    (tmp_path / "blocks.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "run_blocks.py").write_text(_RUNNER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PROCESSION_"))}
    try:
        run = subprocess.run(
            [sys.executable, "run_blocks.py", "blocks.json"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=PAGE_TIMEOUT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"{_relative(page)}: blocks took over {PAGE_TIMEOUT}s; output:\n{out[-3000:]}")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "ALL BLOCKS RAN" in run.stdout, output[-3000:]
    # Every block announced itself: none was skipped by an early exit.
    assert run.stdout.count("--- running ") == sum(
        1 for b in blocks if not (b.test_file or "").startswith("test_")
    )


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_every_python_block_runs_or_says_why_not(page: Path) -> None:
    text = page.read_text(encoding="utf-8").splitlines()
    blocks = parse_blocks(page)
    for block in blocks:
        where = f"{_relative(page)}:{block.line - 1}"
        if block.not_run is not None:
            assert block.lang in ("python", "py"), f"{where}: not-run on a {block.lang!r} block"
            assert len(block.not_run) >= 10, f"{where}: say why the block does not run"
    # A marker must sit directly on a python fence, or it marks nothing.
    fences = {b.line - 2 for b in blocks}
    for number, line in enumerate(text):
        if _NOT_RUN.match(line) or _TEST_FILE.match(line):
            where = f"{_relative(page)}:{number + 1}"
            assert number + 1 in fences, f"{where}: the marker is not directly before a fence"


def test_the_docs_have_code_that_runs() -> None:
    """The pages exist and most of their examples run (the check above is not vacuous)."""
    runnable = sum(len(_runnable(page)) for page in PAGES)
    marked = sum(1 for page in PAGES for b in parse_blocks(page) if b.not_run is not None)
    assert runnable >= 60, runnable
    assert runnable > 2 * marked, (runnable, marked)


def test_parse_blocks_reads_markers_and_indented_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "<!-- not-run: needs a cluster -->\n"
        "```python\n"
        "connect()\n"
        "```\n"
        "- item\n\n"
        "  ```python\n"
        "  x = 1\n"
        "  ```\n"
        "```bash\nls\n```\n",
        encoding="utf-8",
    )
    first, second, third = parse_blocks(page)
    assert (first.not_run, first.code, first.line) == ("needs a cluster", "connect()\n", 4)
    assert (second.not_run, second.code, second.lang) == (None, "x = 1\n", "python")
    assert third.lang == "bash"


def test_the_api_reference_covers_every_public_name() -> None:
    """Each public name has its `::: procession.NAME` line (a new name fails here first)."""
    import procession
    import procession.testing

    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: (procession[\w.]*)\s*$", text, re.M))
    # Not objects with a docstring of their own: described in prose on the pages.
    prose = {
        "procession.__version__": "`procession.__version__`",
        "procession.serializers": "`procession.serializers`",
    }
    expected = {f"procession.{n}" for n in procession.__all__} | {
        f"procession.testing.{n}" for n in procession.testing.__all__
    }
    missing = sorted(n for n in expected - documented if prose.get(n, "\0") not in text)
    assert not missing, f"add a `::: NAME` line to a page of docs/reference/ for: {missing}"
    unknown = sorted(name for name in documented - expected if not _public_in_module(name))
    assert not unknown, f"docs/reference/ documents names that are not public: {unknown}"


def _public_in_module(dotted: str) -> bool:
    """``procession.x.y.NAME`` names something its module lists in ``__all__``."""
    import importlib

    module_name, _, name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    return name in getattr(module, "__all__", ())


def test_docstring_literal_blocks_become_fenced_python() -> None:
    """docs/_griffe_examples.py, which mkdocstrings loads for the API reference."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_griffe_examples", DOCS / "_griffe_examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (
        "Run ``fn`` on :func:`procession.map`.\n\nExample::\n\n"
        "    with x:\n        y = 1\n\n    z = 2\n\nAfter the block."
    )
    assert module.rest_to_markdown(text).splitlines() == [
        "Run `fn` on `procession.map`.",
        "",
        "Example:",
        "",
        "```python",
        "with x:",
        "    y = 1",
        "",
        "z = 2",
        "```",
        "",
        "After the block.",
    ]
