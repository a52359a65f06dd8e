"""tiecli.arch.declared.module_ties: the one answer to a live module's declared ties."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from tiecli.arch.declared import module_ties, ties_by_identity


class _Plain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


class _Transformers4(_Plain):
    """A transformers-4 style model: aliases named in ``_tied_weights_keys``."""

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.config = SimpleNamespace(tie_word_embeddings=tie)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed


def test_a_plain_module_declares_what_it_shares() -> None:
    m = _Plain()
    assert ties_by_identity(m) == {"lm_head.weight": "embed.weight"}
    assert module_ties(m) == {"lm_head.weight": "embed.weight"}
    assert module_ties(torch.nn.Linear(2, 2)) == {}


def test_transformers_4_keys_count_even_when_the_tie_is_broken() -> None:
    m = _Transformers4()
    assert module_ties(m) == {"lm_head.weight": "embed.weight"}
    m.lm_head.weight = torch.nn.Parameter(m.embed.weight.detach().clone())
    assert ties_by_identity(m) == {}
    assert module_ties(m) == {"lm_head.weight": "embed.weight"}


def test_transformers_4_keys_follow_the_flag_the_table_names() -> None:
    m = _Transformers4(tie=False)
    m.lm_head.weight = torch.nn.Parameter(m.embed.weight.detach().clone())
    assert module_ties(m) == {}  # the head's flag is off
    m.encoder = torch.nn.Embedding(10, 4)
    m._tied_weights_keys = ["lm_head.weight", "encoder.weight", "encoder.embed_tokens.weight"]
    m.encoder.embed_tokens = torch.nn.Embedding(10, 4)
    # a key the table ties always stays declared; one it does not know is always declared too
    assert module_ties(m) == {
        "encoder.weight": "embed.weight",
        "encoder.embed_tokens.weight": "embed.weight",
    }


def test_transformers_5_answers_for_itself() -> None:
    m = _Plain()
    m.get_expanded_tied_weights_keys = lambda all_submodels: {  # type: ignore[attr-defined]
        "x.weight": "y.weight",
        "same.weight": "same.weight",
    }
    assert module_ties(m) == {"x.weight": "y.weight"}


def test_the_transformers_version_is_the_installed_distributions(monkeypatch: Any) -> None:
    """Read from the distribution record beside the package (no importlib.metadata on
    every run), the same answer importlib.metadata gives; None once the import is blocked."""
    import importlib.metadata
    import sys

    from tiecli.arch.build import transformers_version

    assert transformers_version() == importlib.metadata.version("transformers")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert transformers_version() is None
