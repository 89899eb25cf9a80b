"""Policies (velocity predictors) behind one interface; see `qirl.models.policy`."""

from qirl.models.policy import Condition, FlowPolicy

__all__ = ["Condition", "FlowPolicy"]
