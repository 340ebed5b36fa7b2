"""Statistics collectors, registered by name in ``llmprune.registry.COLLECTORS``.

``layer_input`` collectors (norms, hessian, moments) accumulate over each prunable layer's input
through forward hooks (:class:`StatsCollector`); ``block`` collectors (regional_grad) run their
own pass over the block, a backward pass allowed, and return one value per layer. A method names
what it needs in its spec's ``needs``; the engine runs each collector once per block. Every module of
this package is imported (and so registers its collectors) with it.
"""

from __future__ import annotations

import importlib
import pkgutil

from llmprune.stats.gradient import regional_gradients
from llmprune.stats.inputs import Accumulator, ChannelMoments, StatsCollector, input_moments
from llmprune.stats.layer import LayerStats

__all__ = ["Accumulator", "ChannelMoments", "LayerStats", "StatsCollector", "input_moments",
           "regional_gradients"]

# every module here registers its collectors when imported: a new statistic is a new file
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
