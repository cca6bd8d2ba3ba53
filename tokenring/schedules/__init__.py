"""The first-party schedules, one builder module each.

Every module here that implements ``tokenring_register_schedules`` is found
by scanning this package (`tokenring.registry`) and registers through the
same pluggy hook a third-party plugin uses. Adding a schedule is adding one
such module and its tests. Beside the builders: `build` (every schedule's plans,
built, proven and cached), `masked` (any plan cut down to a token mask) and
`replicated` (decode's replicated-query plans).
This package imports nothing itself, so the registry can scan it without a
cycle.
"""
