"""What solobot runs against when not against Telegram: the fake Bot API (faithful to the real
server: conflicts, webhooks, flood limits), nginx as a webhook balancer, and the waiting helpers.

Shared by the tests, the benchmarks (``bench/``) and the README's try-it path, so none of them
imports the test package. Never imported by ``main.py``, ``bot.py`` or ``utils/`` (the import
contract in pyproject.toml says so).
"""
