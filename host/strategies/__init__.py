"""Federated strategies, one per module (Flower-style); `STRATEGIES` maps config names to classes."""

from __future__ import annotations

from fedblocks.host.strategies.base import Strategy
from fedblocks.host.strategies.exclusivefl import ExclusiveFL
from fedblocks.host.strategies.fedavg import FedAvg
from fedblocks.host.strategies.neulite import NeuLite
from fedblocks.host.strategies.profl import ProFL
from fedblocks.host.strategies.smartsplit import SmartSplit

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, ExclusiveFL, ProFL, NeuLite, SmartSplit)}

__all__ = ["STRATEGIES", "ExclusiveFL", "FedAvg", "NeuLite", "ProFL", "SmartSplit", "Strategy"]
