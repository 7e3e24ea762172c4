"""Topology-aware expert placement: the topology, the plan, the cost model, the planner, baselines."""

from lightning_moe.planning.cost_model import LayerCost, PlanEstimate, estimate_plan
from lightning_moe.planning.plan import PlacementPlan
from lightning_moe.planning.planner import PlacementPlanner
from lightning_moe.planning.topology import Topology

__all__ = ["LayerCost", "PlacementPlan", "PlacementPlanner", "PlanEstimate", "Topology", "estimate_plan"]
