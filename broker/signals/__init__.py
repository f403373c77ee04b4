"""Signals out: the broker as a Shared Signals Framework (SSF 1.0) transmitter.

When a task leaves ``active`` (ended, revoked by an operator or the broker, expired), every configured
receiver is sent a Security Event Token (RFC 8417) carrying the CAEP 1.0 ``session-revoked`` event about
that task, pushed per RFC 8935. The pieces, pure ones first:

- ``broker.signals.deliveries``: the delivery state table, and how an HTTP answer is read (pure);
- ``broker.signals.events``: the SET's claims for a task, and its signing (pure);
- ``broker.signals.keys``: the transmitter's signing key, its ``kid`` and the published JWKS;
- ``broker.signals.transmitter``: the delivery worker (claims due deliveries from the store, pushes, audits);
- ``broker.signals.web``: ``GET /.well-known/ssf-configuration`` and the JWKS it names.

A delivery row is written by the store in the same transaction that moves the task out of ``active``
(``broker.store.signals``), so a crash never loses a signal and never sends one for a task that did not end.
"""
