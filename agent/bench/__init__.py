"""Benchmarks, run as `voice-agent bench NAME [flags]` (or `python -m agent.bench.NAME`): each prints its figures
and the command that made them. They are measurements, not tests: tests assert behaviour, benchmarks print
numbers (timed assertions are flaky on a shared machine)."""
