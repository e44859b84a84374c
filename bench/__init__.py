"""Benchmarks of the whole dispatch path against a real broker, side by side with Celery and Dramatiq.

    python -m bench [--quick] [--tasks N] [--workers N] [--record] [--profile DIR]

Run from the repository root (`make bench`); it is not part of the installed package. See
BENCHMARKS.md for what is measured and how.
"""
