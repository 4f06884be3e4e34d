"""reloop: streaming continual learning for CTR models.

The top floor of the house: the CLI (:mod:`reloop.cli`), the composed config
(:mod:`reloop.config`), the main job (:mod:`reloop.run`) and its report, the local
service manager (:mod:`reloop.services`), the data sets and the replay tool
(:mod:`reloop.datasets`, :mod:`reloop.replay`) and the evaluations
(:mod:`reloop.evaluate`, :mod:`reloop.anchor`, :mod:`reloop.evaluate_drift`).
The floors below: :mod:`jobs` (Ray jobs and services), :mod:`pipelines` (event
contract, Kafka I/O, Beam jobs), :mod:`features` (declarations),
:mod:`online_models` (pure logic).
"""

__version__ = "0.1.0"
