"""Quality of a model on what a device really sees: its answers compared with another
model's, request by request (:class:`Comparer`, :class:`Comparison`,
:class:`CompareConfig`)."""

from ._compare import CompareConfig, Comparer, Comparison

__all__ = ["CompareConfig", "Comparer", "Comparison"]
