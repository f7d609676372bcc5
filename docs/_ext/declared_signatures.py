"""Griffe extension for the API pages: show a loop's shared options in its signature.

The public loops take the options they share as ``**options`` and declare them at import
(``ddim_jax._loop.takes_options`` sets ``__signature__``), so ``inspect.signature`` and
``help`` list each one. Griffe reads the source, where only ``**options`` stands: for each
function with a ``**options`` parameter and such a signature this extension imports it and puts the declared
keyword-only parameters (name, type, default) in its place.
"""

import importlib
import inspect
import sys
from pathlib import Path

import griffe

_REPOSITORY = str(Path(__file__).resolve().parents[2])  # where ddim_jax is, installed or not


class DeclaredSignatures(griffe.Extension):
    """Replace ``**options`` by the parameters the imported function's signature declares."""

    def on_function_instance(self, *, func: griffe.Function, **kwargs) -> None:
        if "options" not in func.parameters or func.parameters["options"].kind.name != "var_keyword":
            return
        if _REPOSITORY not in sys.path:
            sys.path.append(_REPOSITORY)
        runtime = importlib.import_module(func.module.path)
        for name in func.path[len(func.module.path) + 1 :].split("."):  # a method: through its class
            runtime = getattr(runtime, name)
        if "__signature__" not in vars(runtime):  # not a declared signature: the source says it all
            return
        declared = inspect.signature(runtime).parameters
        kept = [p for p in func.parameters if p.name != "options"]
        names = {p.name for p in kept}
        added = [
            griffe.Parameter(
                name,
                annotation=parameter.annotation,
                kind=griffe.ParameterKind.keyword_only,
                default=repr(parameter.default),
            )
            for name, parameter in declared.items()
            if name not in names and parameter.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        func.parameters = griffe.Parameters(*kept, *added)
