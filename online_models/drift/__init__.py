"""Drift detection as pure logic: monitors only detect, the policy only decides.

:mod:`~online_models.drift.monitors` (River detectors, PSI/KS), :mod:`~online_models.drift.policy`
(cooldown, minimum evidence, rollback watch) and :mod:`~online_models.drift.records` (what they
say to each other). Delivery to on-call is :mod:`jobs.alerts`; the loop that runs them is
:mod:`jobs.monitor`.
"""
