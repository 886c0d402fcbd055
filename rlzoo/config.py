"""Gin bindings from the command line: ``--config FILE.gin`` and ``--set key=value``, shared by every command."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Sequence

from rlzoo.errors import UserError

# Modules that declare @gin.configurable: imported before parsing so that gin knows every name.
# Registered tasks, estimators and engines are imported through their registries.
CONFIGURABLE_MODULES: tuple[str, ...] = ("rlzoo.policy", "rlzoo.ppo", "rlzoo.train")


def _import_configurables() -> None:
    from rlzoo.algorithms import ESTIMATORS
    from rlzoo.engine import ENGINES
    from rlzoo.tasks import TASKS

    for module in CONFIGURABLE_MODULES:
        if importlib.util.find_spec(module) is not None:  # an optional module that is absent has no bindings
            importlib.import_module(module)
    for registry in (TASKS, ENGINES, ESTIMATORS):
        registry.names()


def apply_gin(config_files: Sequence[str | Path] = (), bindings: Sequence[str] = ()) -> None:
    """Replace the process's gin bindings with ``config_files`` then ``bindings`` (later ones win).

    ``bindings`` are gin lines such as ``pretrain.steps = 300`` (spaces optional). Gin's errors
    (unknown name, bad syntax, missing file) become a one-line UserError.
    """
    import gin

    for path in config_files:
        if not Path(path).is_file():
            raise UserError(f"gin config file {str(path)!r} not found")
    for binding in bindings:
        if "=" not in binding:
            raise UserError(f"--set {binding!r}: expected configurable.parameter=value, e.g. pretrain.steps=300")
    _import_configurables()
    gin.clear_config()
    for path in config_files:  # so that `include 'other.gin'` finds files beside the including one
        gin.add_config_file_search_path(str(Path(path).resolve().parent))
    try:
        gin.parse_config_files_and_bindings([str(p) for p in config_files], list(bindings), finalize_config=False)
    except Exception as e:  # gin raises ValueError, SyntaxError, KeyError ... with multi-line messages
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"bad gin binding: {first_line}") from None
