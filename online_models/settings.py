"""The serving defaults that every path shares, torch-free so that config loading stays light.

:data:`SERVING_MEMORY` is the error-compensation memory the serving path uses unless the config's
``memory`` section says otherwise (``jobs.config.MemorySection``). It was chosen on the
evaluation's validation slot (``reloop evaluate``); ``key`` is what keys the memory
(:func:`online_models.models.memory_key`), the rest are :class:`online_models.memory.MemoryConfig`
fields.

>>> SERVING_MEMORY["key"], SERVING_MEMORY["num_tables"]
('hidden+user', 32)

:data:`MODEL_ARCH` is the architecture every model is built with unless the config's ``model`` section says
otherwise (``jobs.config.ModelSection``): the incremental trainer, the retrain, ``reloop evaluate``. It is the
evaluation's choice on its validation slot; :func:`online_models.models.model_config_for` applies it.

>>> MODEL_ARCH["embedding_dim"], MODEL_ARCH["hidden_sizes"]
(8, (64, 32))
"""

from __future__ import annotations

from typing import Any

#: the model kinds (:func:`online_models.models.build_model`)
KINDS = ("lr", "deepfm", "dcnv2", "din")

#: the memory keys a model can give (:func:`online_models.models.memory_key`)
MEMORY_KEYS = ("hidden", "hidden+ids", "hidden+user")

MODEL_ARCH: dict[str, Any] = {
    "hash_buckets": 20_011,  # rows per categorical field (a prime, so hashed ids spread evenly)
    "embedding_dim": 8,
    "hidden_sizes": (64, 32),
    "cross_layers": 2,  # DCNv2 only
    "dropout": 0.1,
    "embedding_l2": 1e-4,  # L2 on the embedding rows a batch looks up
}

SERVING_MEMORY: dict[str, Any] = {
    "key": "hidden+user",
    "num_tables": 32,
    "bits": 10,
    "tau": 0.2,
    "gamma": 0.0,
    "lam": 0.6,
    "shrinkage": 10.0,
    "eps": 0.02,
    "decay": 0.999,
}
