"""The engine: ``plan(model, config)`` is the one preflight, ``run(plan, ...)`` the one block loop
with two strategies, mask (``engine.mask``) and shrink (``engine.shrink``); ``prune`` is both."""

from __future__ import annotations

from llmprune.engine.plan import BlockPlan, Plan, plan
from llmprune.engine.report import LayerReport, PruneReport
from llmprune.engine.run import prune, run

__all__ = ["BlockPlan", "LayerReport", "Plan", "PruneReport", "plan", "prune", "run"]
