"""A transformers ``TrainerCallback`` that guards ties around every save."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from ..errors import TieError
from ..guard import check_model

PREFIX_CHECKPOINT_DIR = "checkpoint"


class TieGuardCallback(TrainerCallback):  # type: ignore[misc]
    """Checks the model's ties before each save and verifies the checkpoint after it.

    Before a save (the step at which the trainer decided to save) the live
    model goes through :func:`tiecli.check_model`; after it, the written
    checkpoint folder goes through ``tiecli verify``. Either failing raises
    :class:`tiecli.TieError` and stops training, naming the tie.

    ``require_deduped`` makes the post-save check also fail on a tied tensor
    stored twice; ``strict`` fails on warnings too.
    """

    def __init__(
        self,
        require_deduped: bool = False,
        strict: bool = False,
        ties: dict[str, str] | None = None,
    ):
        self.require_deduped = require_deduped
        self.strict = strict
        self.ties = ties
        self.verified: list[str] = []

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> Any:
        if getattr(control, "should_save", False) and model is not None:
            check_model(_unwrap(model), self.ties)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        from ..api import verify

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            return control
        result = verify(folder, require_deduped=self.require_deduped, strict=self.strict)
        if not result.ok:
            details = "; ".join(f"{p.code}: {p.message}" for p in result.failures)
            raise TieError(f"saved checkpoint failed tie verification: {details}", folder)
        self.verified.append(folder)
        return control


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module") and not hasattr(model, "get_input_embeddings"):
        model = model.module
    return model
