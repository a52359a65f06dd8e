"""The package's layout rules (tools/layout.py), each a test on tiecli/ itself, and the
checks themselves proven on a small package built to break each rule."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT

_spec = importlib.util.spec_from_file_location("layout", ROOT / "tools" / "layout.py")
assert _spec is not None and _spec.loader is not None
layout = importlib.util.module_from_spec(_spec)
sys.modules["layout"] = layout  # dataclasses look their module up by name
_spec.loader.exec_module(layout)

PACKAGE = ROOT / "tiecli"


CHECKS = [pytest.param(c) for c in ("long", "format", "private", "storage", "declared")]


@pytest.mark.parametrize("check", CHECKS)
def test_the_package_keeps_the_rule(check: str) -> None:
    found = layout.violations(PACKAGE, check)
    assert found == [], "\n".join(map(str, found))


def test_every_rule_has_a_test() -> None:
    assert sorted(layout.CHECKS) == sorted(p.values[0] for p in CHECKS)


# -- the checks, on a package that breaks each rule once ------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "tiecli"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


CLEAN = {
    "formats/__init__.py": "",
    "formats/pickle.py": """\
        class PickleFile:
            pass


        def is_pickle(ckpt):
            return ckpt.format.startswith("pytorch") or isinstance(ckpt, PickleFile)
        """,
    "arch/__init__.py": "",
    "arch/storage.py": """\
        def where(t):
            return t.untyped_storage().data_ptr()
        """,
    "arch/declared.py": """\
        def declared(model):
            return getattr(model, "get_expanded_tied_weights_keys")()
        """,
    "api.py": """\
        from .formats.pickle import is_pickle
        from . import formats
        import tiecli.arch.storage as storage


        def run(ckpt):
            stem = "pytorch_model.bin"
            return is_pickle(ckpt), stem.startswith("pytorch_model"), storage.where(ckpt)
        """,
}

BROKEN = {
    "long": {"big.py": "x = 1\n" * 451},
    "format": {
        "plan.py": "def f(ckpt):\n    return ckpt.format.startswith('pytorch')\n",
        "render.py": "def f(r):\n    return r.format == 'gguf'\n",
        "detect.py": "def f(fmt):\n    return fmt.startswith('pytorch')\n",
        "rewrite.py": "from .formats.pickle import PickleFile\n\n\n"
        "def f(r):\n    return isinstance(r, PickleFile)\n",
        "values.py": "from .formats.pickle import PickleFile\n\n\n"
        "def f(b):\n    return type(b) is PickleFile\n",
        "serialization.py": "def f(ckpt):\n    return ckpt.format in ('dcp', 'gguf')\n",
    },
    "private": {
        "fixing.py": "from .api import _rewriting\n",
        "other.py": "from tiecli import api\n\n\ndef f():\n    return api._secret()\n",
        "third.py": "import tiecli.api as a\n\n\ndef f():\n    return a._secret\n",
    },
    "storage": {
        "guard.py": "def same(a, b):\n    return a.untyped_storage() is b.untyped_storage()\n",
        "forward.py": "def f(p):\n    return p.data_ptr()\n",
    },
    "declared": {
        "guard.py": "def keys(m):\n    return getattr(m, '_tied_weights_keys', None)\n",
        "serialization.py": "def keys(m):\n    return m.get_expanded_tied_weights_keys()\n",
    },
}


def test_a_package_that_keeps_every_rule_passes(tmp_path: Path) -> None:
    assert layout.violations(_package(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("check", sorted(BROKEN))
def test_each_check_finds_what_breaks_its_rule(tmp_path: Path, check: str) -> None:
    root = _package(tmp_path, {**CLEAN, **BROKEN[check]})
    found = layout.violations(root)
    assert {v.check for v in found} == {check}, found
    assert {v.path for v in found} == {f"tiecli/{rel}" for rel in BROKEN[check]}


def test_the_script_prints_each_violation_and_fails(tmp_path: Path, capsys) -> None:
    root = _package(tmp_path, {**CLEAN, **BROKEN["private"]})
    assert layout.main([str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "PRIVATE tiecli/fixing.py:1 from tiecli.api import _rewriting" in out
    assert "PRIVATE tiecli/other.py:5 api._secret" in out
    assert layout.main([str(_package(tmp_path / "clean", CLEAN))]) == 0
