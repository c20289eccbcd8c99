"""CLI sub-command groups; each module exposes ``register(subparsers)`` and sets ``handler`` defaults."""
