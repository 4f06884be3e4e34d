"""reloop: streaming continual learning for CTR models.

This package holds what ties the stages together: the event contract
(:mod:`reloop.events`), the dataset readers (:mod:`reloop.datasets`), the typed
config (:mod:`reloop.config`), the local service manager (:mod:`reloop.services`),
the replay tool (:mod:`reloop.replay`) and the CLI (:mod:`reloop.cli`).
"""

__version__ = "0.1.0"
