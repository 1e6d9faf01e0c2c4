"""Every public name is documented, with examples that run."""

from __future__ import annotations

import doctest
import inspect
import pydoc
import subprocess
import sys

import pytest

import flowgate
import flowgate.testing

PUBLIC = [getattr(flowgate, n) for n in flowgate.__all__ if not n.startswith("_")]


@pytest.mark.parametrize(
    "obj",
    [o for o in PUBLIC if isinstance(o, type) or inspect.isroutine(o)],
    ids=lambda o: getattr(o, "__name__", str(o)),
)
def test_every_public_name_has_a_docstring(obj: object) -> None:
    assert inspect.getdoc(obj), f"{obj} has no docstring"
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if not name.startswith("_") and (callable(member) or isinstance(member, property)):
                assert inspect.getdoc(member), f"{obj.__name__}.{name} has no docstring"


def test_help_shows_documented_signatures() -> None:
    out = subprocess.run(
        # -I: the installed package, not the source tree in the working
        # directory (pytest runs from python/, which has no built module).
        [sys.executable, "-I", "-c", "import flowgate; help(flowgate.App)"],
        capture_output=True,
        text=True,
        check=True,
        env={"PAGER": "cat", "TERM": "dumb"},
    ).stdout
    for expected in (
        "class App",
        "publish(self, exchange: 'str', routing_key: 'str', body:",
        "handler(self, name: 'str')",
        "run(self) -> 'None'",
        "Register the decorated function",
        "Raises :class:`flowgate.Backpressure`",
    ):
        assert expected in out, f"{expected!r} not in help(flowgate.App)"
    assert "class Message" in pydoc.render_doc(flowgate.Message)


@pytest.mark.parametrize("obj", [flowgate.Message, flowgate.Output], ids=lambda o: o.__name__)
def test_the_bindings_examples_run(obj: type) -> None:
    finder = doctest.DocTestFinder(recurse=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(obj, obj.__name__, globs={"flowgate": flowgate})
    assert any(t.examples for t in tests)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


@pytest.mark.parametrize(
    "module",
    [
        "flowgate",
        "flowgate.app",
        "flowgate.errors",
        "flowgate.headers",
        "flowgate.reasons",
        "flowgate.logs",
        "flowgate.testing",
    ],
)
def test_the_modules_examples_run(module: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(
        mod, extraglobs={"flowgate": flowgate}, optionflags=doctest.ELLIPSIS, verbose=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
