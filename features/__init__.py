"""Declarations: the feature windows (declared once, in :mod:`features.windows`) and the Feast repo as code.

``feast -c features apply`` reads :mod:`features.feature_repo`; the Beam feature job computes
the same windows from :mod:`features.windows`, so the two cannot disagree.
"""
