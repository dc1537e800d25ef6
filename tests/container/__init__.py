"""The container test (issue 12): run.sh, checks.py. Not collected by pytest (no test_ files)."""
