"""Which node a cluster client tries next (broker.vault.nodes): only a request that certainly did not run moves."""

from __future__ import annotations

import pytest

from broker.vault.nodes import Next, NodeOrder, after_status, after_transport

NO_LEADER = "local node not active but active cluster node not found"
NO_AUDIT = "no audit backend succeeded in logging the request"


class TestAfterStatus:
    @pytest.mark.parametrize("status", [429, 472, 473, 501, 503, 307, 301])
    @pytest.mark.parametrize("idempotent", [True, False])
    def test_a_node_that_does_not_serve_moves_on(self, status: int, idempotent: bool) -> None:
        """Standby, sealed, not initialised, redirect: nothing ran there, even a credential read moves on."""
        assert after_status(status, "", idempotent=idempotent) is Next.ELSEWHERE

    @pytest.mark.parametrize("idempotent", [True, False])
    def test_a_standby_without_a_leader_moves_on(self, idempotent: bool) -> None:
        assert after_status(500, NO_LEADER, idempotent=idempotent) is Next.ELSEWHERE

    @pytest.mark.parametrize("status, errors", [(500, ""), (500, NO_AUDIT), (502, ""), (504, "")])
    def test_a_create_that_may_have_run_is_the_callers(self, status: int, errors: str) -> None:
        """A 500 may mean the credential was created: sending it again could make a second one."""
        assert after_status(status, errors, idempotent=False) is Next.ANSWER

    @pytest.mark.parametrize("status, errors", [(500, NO_AUDIT), (502, ""), (504, "")])
    def test_a_lookup_may_run_twice(self, status: int, errors: str) -> None:
        assert after_status(status, errors, idempotent=True) is Next.ELSEWHERE

    @pytest.mark.parametrize("status", [200, 204, 400, 403, 404])
    def test_answers_are_answers(self, status: int) -> None:
        assert after_status(status, "permission denied", idempotent=True) is Next.ANSWER


class TestAfterTransport:
    def test_refused_connection_moves_on_even_for_a_create(self) -> None:
        assert after_transport(connected=False, idempotent=False, config_error=False) is Next.ELSEWHERE

    def test_a_reset_after_sending_a_create_is_the_callers(self) -> None:
        assert after_transport(connected=True, idempotent=False, config_error=False) is Next.ANSWER

    def test_a_reset_lookup_moves_on(self) -> None:
        assert after_transport(connected=True, idempotent=True, config_error=False) is Next.ELSEWHERE

    def test_tls_or_url_errors_are_never_hidden(self) -> None:
        assert after_transport(connected=False, idempotent=True, config_error=True) is Next.ANSWER


class TestNodeOrder:
    def test_starts_at_the_last_active_and_goes_round(self) -> None:
        order = NodeOrder(3)
        assert order.active == 0 and order.after(0) == 1 and order.after(2) == 0
        order.answered(2)
        assert order.active == 2

    def test_needs_a_node(self) -> None:
        with pytest.raises(ValueError, match="at least one"):
            NodeOrder(0)
