"""smallbn: batch normalization that works when the batch is small.

Layers (:mod:`smallbn.layers`) are built on one statistics core (:mod:`smallbn.stats`);
:func:`build_norm` makes one by name and :func:`convert` swaps every norm layer of a model.
The top level holds the public names of the layers and the tools; the released-checkpoint
loaders (:mod:`smallbn.checkpoints`), the framework integrations (:mod:`smallbn.integrations`)
and the jobs (:mod:`smallbn.experiments`, :mod:`smallbn.bench`) stay submodules.
"""

import importlib as _importlib

from smallbn.convert import *  # noqa: F403
from smallbn.fold import *  # noqa: F403
from smallbn.layers import *  # noqa: F403
from smallbn.population import *  # noqa: F403
from smallbn.recorder import *  # noqa: F403
from smallbn.registry import *  # noqa: F403

__version__ = "0.1.0"

#: The submodules whose ``__all__`` make up smallbn's: one list per name, kept where it is
#: defined.
_PUBLIC_MODULES = ("convert", "fold", "layers", "population", "recorder", "registry")

__all__ = sorted(
    {
        name
        for module in _PUBLIC_MODULES
        for name in _importlib.import_module(f"smallbn.{module}").__all__
    }
)
