"""Modules built from :mod:`groupmoe.ops`: router, stacked experts, MoE block."""

from .block import MoEBlock, SharedExpert
from .experts import IMPLS, GroupedExperts
from .router import TopKRouter

__all__ = ["IMPLS", "GroupedExperts", "MoEBlock", "SharedExpert", "TopKRouter"]
