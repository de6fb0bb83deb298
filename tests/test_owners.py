"""One owner per piece of state (STYLE.md): no runtime module reaches into another object's private state.

A name with one leading underscore belongs to its object or module. Code may use `self._x` and `cls._x`, and its own
module's `_names`; never `other._x`, `getattr(other, "_x")`, or `from .module import _name`. Dunders are protocol,
not private state.
"""
import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
OWN = {"self", "cls"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def reaches(source: str) -> list[str]:
    """`line: what` for every reach into another object's or module's private names in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in OWN):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            target, name = node.args[0], node.args[1]
            if (isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value)
                    and not (isinstance(target, ast.Name) and target.id in OWN)):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"from {'.' * node.level}{node.module or ''} import {a.name}") for a in node.names
                      if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if any(_private(part) for part in a.name.split("."))]
    return [f"{line}: {what}" for line, what in sorted(found)]


def test_the_check_finds_each_kind_of_reach():
    bad = ("from .chat import _common\nimport a._b\n"
           "def f(chat):\n    chat._fed.append(1)\n    return getattr(chat, '_load')\n"
           "class C:\n    def g(self):\n        return self.model._lock\n")
    assert [r.split(":")[0] for r in reaches(bad)] == ["1", "2", "4", "5", "8"]
    good = ("from __future__ import annotations\nclass C:\n    def g(self):\n        self._x = type(self).__name__\n"
            "        return getattr(self, '_x'), self.__class__, cls_free()\n"
            "def cls_free():\n    return _helper()\n")
    assert reaches(good) == []


def test_no_runtime_module_reaches_into_another_objects_private_state():
    found = {p.name: reaches(p.read_text()) for p in sorted(RUNTIME.glob("*.py"))}
    assert len(found) > 10  # the check read the runtime package, not an empty directory
    assert {name: r for name, r in found.items() if r} == {}
