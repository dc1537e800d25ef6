"""The container test (issue 12): run.sh and checks.py, run by .ci/run after pytest.

Only test_healthcheck.py here is collected by pytest (in-process, milliseconds).
"""
