"""The bottom layer: small facts and tools every other package may import, importing none of them.

Redaction (a token or a password never printed), bounded lookups, the lease (the term's deadline
on the monotonic clock), the database URL's parts, private paths, exit codes and stop signals, the
failure episode (warn once), the environment reader, a fixed-bucket histogram, and work an
event interrupts ("run until stopped", :mod:`utils.base.interrupt`). The import contract
(pyproject.toml, ``lint-imports``) keeps this layer at the bottom.
"""
