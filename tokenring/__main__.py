"""``python -m tokenring``: the same command as ``tokenring``."""

from tokenring.tools.cli import main

# Spawned worker processes import this module as ``__mp_main__``; only the
# process started from the command line may run the command.
if __name__ == "__main__":
    raise SystemExit(main())
