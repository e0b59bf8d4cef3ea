"""CPython's own dbm and shelve test suites, run against partydbm (see test_cpython_dbm.py).

A package so that `python -m unittest conformance.test_cpython_dbm` works and the runner
can import its role machinery. Never name this folder `test`: that would shadow the
standard library's `test` package, whose suites we run.
"""
