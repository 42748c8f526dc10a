"""The fault suite: the real processes (Core, two Bitrix service processes, the emulator) on the
suite's own PostgreSQL, Redis and RabbitMQ, a stream of user changes, one fault after another,
then a check of every user against its lead.

    .venv/bin/python -m tests.chaos --profile full|short --report PATH [--run-dir DIR]

`make chaos` runs the full profile; `make test` runs the short one (tests/chaos/test_chaos.py).
"""
