"""Database layer: SQLAlchemy models (:mod:`db.models`, :mod:`db.fraud_models`), engines and
sessions (:mod:`db.session`) and migrations (:mod:`db.migrate`). Nothing here imports ``worker``.

Importing the package registers every table on ``Base.metadata`` (migrations, tests comparing
models with migrations), whichever module is imported first.
"""

from db import fraud_models, models

__all__ = ["fraud_models", "models"]
