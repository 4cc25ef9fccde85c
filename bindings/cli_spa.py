"""`divgen spa ...` subcommands (being written)."""


def register(subparsers) -> None:
    """Add this module's subcommands to the `divgen` parser."""
