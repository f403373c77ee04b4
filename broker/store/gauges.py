"""What ``/metrics`` reads from the store: counts over indexed state columns, in one read transaction."""

from __future__ import annotations

from sqlalchemy import func, select

from broker.metrics import StoreSnapshot
from broker.states import ApprovalState, LeaseState, TaskState, TokenState
from broker.store._base import StoreBase
from broker.store.schema import approvals, audit_checkpoints, audit_head, leases, tasks

# Each reads an index (ix_tasks_state, ix_leases_state_expires, ix_approvals_state) or a one-row table.
_LIVE_TASKS = select(func.count()).select_from(tasks).where(tasks.c.state == TaskState.ACTIVE.value)
_LIVE_LEASES = select(func.count()).select_from(leases).where(leases.c.state == LeaseState.ACTIVE.value)
_PENDING_LEASES = select(func.count()).select_from(leases).where(leases.c.state == LeaseState.REVOKE_PENDING.value)
# A task is fenced (ended_at) when its revocation starts; the oldest one Vault has not confirmed yet. Tasks that
# left active are few next to the ended ones only while they are pending, so the state index narrows first.
_OLDEST_PENDING = (select(func.min(tasks.c.ended_at))
                   .where(tasks.c.state != TaskState.ACTIVE.value,
                          tasks.c.token_state == TokenState.REVOKE_PENDING.value))
_PENDING_APPROVALS = (select(func.count()).select_from(approvals)
                      .where(approvals.c.state == ApprovalState.PENDING.value))
_HEAD_SEQ = select(audit_head.c.seq).where(audit_head.c.id == 1)
_LAST_CHECKPOINT = select(audit_checkpoints.c.seq, audit_checkpoints.c.time).order_by(
    audit_checkpoints.c.seq.desc()).limit(1)


class GaugeStore(StoreBase):
    async def metrics_snapshot(self, *, now: float) -> StoreSnapshot:
        """The gauges of ``broker.metrics`` as of now.

        Raises: StoreUnavailable.
        """
        def run() -> StoreSnapshot:
            with self._read() as conn:
                head = conn.execute(_HEAD_SEQ).scalar()
                checkpoint = conn.execute(_LAST_CHECKPOINT).first()
                pending_approvals = conn.execute(
                    _PENDING_APPROVALS.where(approvals.c.expires_at > now)).scalar_one()
                return StoreSnapshot(
                    live_tasks=conn.execute(_LIVE_TASKS).scalar_one(),
                    live_leases=conn.execute(_LIVE_LEASES).scalar_one(),
                    revoke_pending_leases=conn.execute(_PENDING_LEASES).scalar_one(),
                    oldest_revoke_pending_at=conn.execute(_OLDEST_PENDING).scalar(),
                    pending_approvals=pending_approvals,
                    chain_head_seq=int(head or 0),
                    last_checkpoint_at=float(checkpoint.time) if checkpoint else None,
                    last_checkpoint_seq=int(checkpoint.seq) if checkpoint else None,
                )
        return await self._run(run)
