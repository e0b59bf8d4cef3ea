"""The test suite, a package so that its process driver (tests.procs) and its workers
(`python -m tests.workers`) have one import path from the tests, conformance/ and bench/."""
