# Every test of TokenRing's shared conformance suite, run against this backend.
from tokenring.testing.suite import *  # noqa: F401,F403
