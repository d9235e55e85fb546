"""Tools run from the command line that are not part of the daemon (the demo)."""
