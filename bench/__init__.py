"""Asman's benchmarks (issue 7): each measures Asman next to its baseline in the same run.

Run them all with ``make bench`` or ``python -m bench``; see ``bench/__main__.py`` and
docs/performance.md.
"""
