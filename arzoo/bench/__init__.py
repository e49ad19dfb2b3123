"""The benchmark harness behind `arzoo bench`: suites, training runs, evaluation, leaderboard."""

from arzoo.bench.suite import Budget, Run, Suite, load_suite, resolve_suite_path

__all__ = ["Budget", "Run", "Suite", "load_suite", "resolve_suite_path"]
