"""Planning: which classifiers share which backbone, and where each one is split.

Works on neutral graphs (:mod:`convert.read`) alone; the result is a
:class:`~convert.plan.types.Plan`.
"""
