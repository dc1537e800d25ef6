"""The bottom layer: small facts and tools every other package may import, importing none of them.

Redaction (a token or a password never printed), bounded lookups, the lease (the term's deadline
on the monotonic clock), the database URL's parts, private paths, exit codes. The import contract
(pyproject.toml, ``lint-imports``) keeps this layer at the bottom.
"""
