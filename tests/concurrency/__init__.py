"""Races of the job lifecycle and the credit ledger on real PostgreSQL: actors in separate processes, released together.

``harness`` runs the actors, ``actors`` is what each one does, ``races`` sets a round up and checks the contract
(docs/lifecycle.md and docs/money.md) after it, ``test_races`` runs each race ``RACE_REPETITIONS`` times, and
``run`` is the command that runs them 100 times and prints a table (``make race``).
"""
