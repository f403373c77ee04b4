"""Grants beyond PostgreSQL, PKI and tokens, each against the real server on this machine.

MariaDB, Redis and RabbitMQ are the machine's own (tests/support/engines.py creates and removes what the
session uses); SSH certificates and KV live in the session's OpenBao. The oracles are the servers and
Vault (logins, commands, ``ssh-keygen -L``, root lease lookups), never the broker's own word.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pymysql
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.api import STORE
from broker.vault import VaultClient
from tests.api.test_task_flow import Client, end, start_task, vault_lease_id
from tests.conftest import AGENT, BrokerSite, bearer
from tests.support.engines import AMQP, MYSQL, REDIS, ExternalEngines
from tests.support.fixtures import KV_VALUE

ROLE = "engines"


async def issue(client: Client, site: BrokerSite, task_id: str, grant: str, *, status: int = 200,
                **extra: Any) -> dict[str, Any]:
    resp = await client.post(f"/v1/tasks/{task_id}/credentials", json={"grant": grant, **extra},
                             headers=bearer(site.ids.agent(AGENT)))
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def task_leases(client: Client, site: BrokerSite, task_id: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/v1/tasks/{task_id}", headers=bearer(site.ids.agent(AGENT)))
    assert resp.status == 200, await resp.text()
    return (await resp.json())["leases"]  # type: ignore[no-any-return]


async def assert_revoked_in_vault(client: Client, admin: VaultClient, lease_id: str, vault_id: str) -> None:
    assert await admin.lookup_lease(vault_id) is None
    row = await client.app[STORE].get_lease(lease_id)
    assert row is not None and row.state == "revoked"


def openssh_public(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " agent@laptop"


class TestMariaDB:
    async def test_login_reads_and_stops_when_the_task_ends(self, client: Client, site: BrokerSite,
                                                            admin: VaultClient,
                                                            external_engines: ExternalEngines) -> None:
        """A MariaDB login SELECTs, may not write, is revocable, and is dropped (session killed) at task end."""
        db = external_engines.database
        task = await start_task(client, site, role=ROLE)
        cred = await issue(client, site, task["id"], "app-db-ro")
        assert cred["revocation"] == "revocable" and cred["data"]["username"].startswith(external_engines.user_prefix)

        def connect() -> pymysql.connections.Connection[Any]:
            return pymysql.connect(host=MYSQL[0], port=MYSQL[1], user=cred["data"]["username"],
                                   password=cred["data"]["password"], database=db, connect_timeout=5)

        held = await asyncio.to_thread(connect)
        with held.cursor() as cur:
            await asyncio.to_thread(cur.execute, "SELECT x FROM t")
            assert cur.fetchall() == ((42,),)
            with pytest.raises(pymysql.err.OperationalError, match="denied"):
                await asyncio.to_thread(cur.execute, "INSERT INTO t VALUES (1)")
        vault_id = await vault_lease_id(client, cred["lease_id"])
        assert await admin.lookup_lease(vault_id) is not None

        assert (await end(client, site, task["id"]))["revoked"] == 1
        await assert_revoked_in_vault(client, admin, cred["lease_id"], vault_id)
        with pytest.raises(pymysql.err.OperationalError, match="Access denied"):
            await asyncio.to_thread(connect)
        # The session it already held was ended too (KILL USER in the role's revocation statements).
        with pytest.raises(pymysql.err.OperationalError), held.cursor() as cur:
            await asyncio.to_thread(cur.execute, "SELECT x FROM t")
        held.close()


class TestRedis:
    async def test_auth_and_command_until_the_task_ends(self, client: Client, site: BrokerSite, admin: VaultClient,
                                                        external_engines: ExternalEngines) -> None:
        """A Redis ACL user may SET/GET its own keys only, and AUTH fails once the task ended."""
        key = external_engines.key_prefix + "greeting"
        task = await start_task(client, site, role=ROLE)
        cred = await issue(client, site, task["id"], "cache-rw")
        assert cred["revocation"] == "revocable"

        def use() -> bytes | None:
            r = redis.Redis(host=REDIS[0], port=REDIS[1], username=cred["data"]["username"],
                            password=cred["data"]["password"], socket_timeout=5)
            try:
                r.set(key, b"hello")
                with pytest.raises(redis.exceptions.NoPermissionError):
                    r.get("not-" + key)
                return r.get(key)  # type: ignore[no-any-return]
            finally:
                r.close()

        assert await asyncio.to_thread(use) == b"hello"
        vault_id = await vault_lease_id(client, cred["lease_id"])
        assert (await end(client, site, task["id"]))["revoked"] == 1
        await assert_revoked_in_vault(client, admin, cred["lease_id"], vault_id)
        with pytest.raises(redis.exceptions.AuthenticationError):
            await asyncio.to_thread(use)


class TestRabbitMQ:
    async def test_amqp_connection_until_the_task_ends(self, client: Client, site: BrokerSite, admin: VaultClient,
                                                       external_engines: ExternalEngines) -> None:
        """A RabbitMQ user publishes and consumes on its vhost over AMQP; after the task it cannot connect."""
        task = await start_task(client, site, role=ROLE)
        cred = await issue(client, site, task["id"], "queue")
        assert cred["revocation"] == "revocable"
        params = pika.ConnectionParameters(
            host=AMQP[0], port=AMQP[1], virtual_host=external_engines.vhost, connection_attempts=1,
            socket_timeout=5, credentials=pika.PlainCredentials(cred["data"]["username"], cred["data"]["password"]))

        def round_trip() -> bytes | None:
            conn = pika.BlockingConnection(params)
            try:
                ch = conn.channel()
                ch.queue_declare(queue="jobs", auto_delete=True)
                ch.basic_publish(exchange="", routing_key="jobs", body=b"job 1")
                for _ in range(50):  # bounded: the message is routed within milliseconds
                    _method, _props, body = ch.basic_get(queue="jobs", auto_ack=True)
                    if body is not None:
                        return body  # type: ignore[no-any-return]
                    conn.sleep(0.05)
                return None
            finally:
                conn.close()

        assert await asyncio.to_thread(round_trip) == b"job 1"
        vault_id = await vault_lease_id(client, cred["lease_id"])
        lease = (await task_leases(client, site, task["id"]))[0]
        # The engine's 32-day default lease is capped to the grant's max TTL by the broker.
        assert lease["expires_at"] - lease["issued_at"] <= 300 + 1
        assert (await end(client, site, task["id"]))["revoked"] == 1
        await assert_revoked_in_vault(client, admin, cred["lease_id"], vault_id)
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            await asyncio.to_thread(round_trip)


def ssh_keygen_list(tmp_path: Path, signed_key: str) -> str:
    cert = tmp_path / "id-cert.pub"
    cert.write_text(signed_key)
    return subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True, text=True, check=True,
                          timeout=10).stdout


def ssh_keygen_fingerprint(tmp_path: Path, public: str) -> str:
    pub = tmp_path / "id.pub"
    pub.write_text(public + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return out.split()[1]


class TestSshCertificates:
    async def test_signed_certificate_names_the_task_and_is_expiry_only(
            self, client: Client, site: BrokerSite, admin: VaultClient, tmp_path: Path) -> None:
        """ssh-keygen -L shows the grant's principal, the task as key id, validity within the task's TTL;
        the agent's key is in the audit record by fingerprint; the end releases it, never 'revoked'."""
        task = await start_task(client, site, role=ROLE, ttl="90s")
        public = openssh_public(ed25519.Ed25519PrivateKey.generate())
        cred = await issue(client, site, task["id"], "ssh-deploy", public_key=public)
        assert cred["revocation"] == "expiry-only" and cred["renewable"] is False
        listing = ssh_keygen_list(tmp_path, cred["data"]["signed_key"])
        assert "Type: ssh-ed25519-cert-v01@openssh.com user certificate" in listing
        assert f'Key ID: "{task["id"]}"' in listing
        principals = listing.split("Principals:")[1].split("Critical Options:")[0].split()
        assert principals == ["deploy"]
        # Signed by the session OpenBao's CA, for the key the agent sent.
        ca = (await admin.read_credential("ssh/config/ca", token=site.engines.bao.root_token)).data or {}
        ca_fp = ssh_keygen_fingerprint(tmp_path, str(ca["public_key"]).strip())
        assert f"Signing CA: ED25519 {ca_fp}" in listing
        fingerprint = ssh_keygen_fingerprint(tmp_path, public)
        assert f"Public key: ED25519-CERT {fingerprint}" in listing
        # The task's 90 s cap holds for a certificate too (Vault backdates valid_after by 30 s).
        assert 0 < cred["expires_at"] - task["created_at"] <= 90 + 1
        assert cred["expires_at"] <= task["expires_at"]

        records = await client.app[STORE].query_audit(task=task["id"])
        issued = next(r.record for r in records if r.record.event == "lease.issued")
        assert (issued.revocation, issued.key_fingerprint) == ("expiry-only", fingerprint)
        assert public.split()[1] not in str(issued)  # the key itself is named only by its fingerprint

        ended = await end(client, site, task["id"])
        assert ended["revoked"] == 0
        [lease] = await task_leases(client, site, task["id"])
        assert (lease["state"], lease["revocation"]) == ("released", "expiry-only")
        records = await client.app[STORE].query_audit(task=task["id"])
        released = [r.record for r in records if r.record.event == "lease.released"]
        assert len(released) == 1 and released[0].reason is not None and "cannot be revoked" in released[0].reason
        assert not [r for r in records if r.record.event == "lease.revoked"]

    @pytest.mark.parametrize(("case", "extra"), [
        ("rsa-2048", {"public_key": "rsa2048"}),
        ("not-a-key", {"public_key": "ssh-ed25519 AAAA not-base64!"}),
        ("wrong-inner-type", {"public_key": "ecdsa-in-ed25519-clothing"}),
        ("missing", {}),
    ])
    async def test_bad_public_keys_are_refused_before_vault(self, client: Client, site: BrokerSite,
                                                            case: str, extra: dict[str, str]) -> None:
        """Short RSA, garbage, a blob of another type and no key at all: 400, recorded as access.denied."""
        if extra.get("public_key") == "rsa2048":
            extra = {"public_key": openssh_public(rsa.generate_private_key(public_exponent=65537, key_size=2048))}
        elif extra.get("public_key") == "ecdsa-in-ed25519-clothing":
            blob = openssh_public(ec.generate_private_key(ec.SECP256R1())).split()[1]
            extra = {"public_key": f"ssh-ed25519 {blob}"}
        task = await start_task(client, site, role=ROLE)
        problem = await issue(client, site, task["id"], "ssh-deploy", status=400, **extra)
        assert problem["code"] == "bad_request" and "public_key" in problem["detail"]
        records = await client.app[STORE].query_audit(task=task["id"])
        events = [r.record.event for r in records]  # the Vault audit tailer may merge vault.request records too
        assert events.count("access.denied") == 1 and "lease.issued" not in events
        denied = next(r.record for r in records if r.record.event == "access.denied")
        assert denied.reason is not None and "public_key" in denied.reason
        assert await task_leases(client, site, task["id"]) == []

    async def test_public_key_is_refused_where_the_agent_chooses_nothing(self, client: Client,
                                                                         site: BrokerSite) -> None:
        """public_key is the one agent-chosen field, and only for a grant that signs one."""
        task = await start_task(client, site, role=ROLE)
        public = openssh_public(ed25519.Ed25519PrivateKey.generate())
        problem = await issue(client, site, task["id"], "app-db-ro", status=400, public_key=public)
        assert "takes no public_key" in problem["detail"]
        # Any other field is refused by the request model itself.
        await issue(client, site, task["id"], "ssh-deploy", status=400, public_key=public, valid_principals="root")


class TestSshApproval:
    async def test_an_approval_signs_only_the_key_it_was_given_for(self, client: Client, site: BrokerSite) -> None:
        """A high-risk SSH grant's approval binds the agent's key by fingerprint: another key is refused."""
        from tests.api.test_approvals import decide

        task = await start_task(client, site, role=ROLE)
        key_a = openssh_public(ed25519.Ed25519PrivateKey.generate())
        key_b = openssh_public(ed25519.Ed25519PrivateKey.generate())
        pending = await issue(client, site, task["id"], "ssh-root", status=202, public_key=key_a)
        await decide(client, site, pending["approval_id"])
        refused = await issue(client, site, task["id"], "ssh-root", status=403, public_key=key_b,
                              approval_id=pending["approval_id"])
        assert refused["code"] == "approval_mismatch"
        cred = await issue(client, site, task["id"], "ssh-root", public_key=key_a, approval_id=pending["approval_id"])
        assert cred["revocation"] == "expiry-only"
        records = [r.record for r in await client.app[STORE].query_audit(task=task["id"])]
        requested = next(r for r in records if r.event == "approval.requested")
        issued = next(r for r in records if r.event == "lease.issued")
        assert requested.key_fingerprint == issued.key_fingerprint is not None


class TestKvStatic:
    async def test_value_is_handed_out_and_shown_as_static(self, client: Client, site: BrokerSite) -> None:
        """A KV v2 read returns the value, says 'static' everywhere, and is released (not revoked) at the end."""
        task = await start_task(client, site, role=ROLE)
        cred = await issue(client, site, task["id"], "api-key")
        assert cred["data"] == KV_VALUE and cred["revocation"] == "static" and cred["renewable"] is False
        [lease] = await task_leases(client, site, task["id"])
        assert (lease["state"], lease["revocation"]) == ("active", "static")
        assert lease["expires_at"] == pytest.approx(task["expires_at"], abs=1)  # tracked to its task's end
        await end(client, site, task["id"])
        [lease] = await task_leases(client, site, task["id"])
        assert (lease["state"], lease["revocation"]) == ("released", "static")
        records = [r.record for r in await client.app[STORE].query_audit(task=task["id"])]
        assert [(r.event, r.revocation) for r in records if r.event.startswith("lease.")] == [
            ("lease.issued", "static"), ("lease.released", "static")]
        assert KV_VALUE["api_key"] not in repr(records)

    async def test_console_task_page_says_how_each_lease_ends(self, site: BrokerSite,
                                                              aiohttp_client: Callable[..., Any],
                                                              external_engines: ExternalEngines) -> None:
        """The console's task page shows each lease's state and class: revocable, expiry-only, static."""
        from broker.app import make_app
        from tests.api.test_console_escaping import mint, sign_in

        console = await aiohttp_client(make_app(site.settings))
        task = await start_task(console, site, role=ROLE)
        for grant, extra in (("app-db-ro", {}), ("api-key", {}),
                             ("ssh-deploy", {"public_key": openssh_public(ed25519.Ed25519PrivateKey.generate())})):
            await issue(console, site, task["id"], grant, **extra)
        await end(console, site, task["id"])
        await sign_in(console, mint(site, "olga", ("secops",)))
        page = await (await console.get(f"/console/tasks/{task['id']}")).text()
        for shown in ('<span class="revocation revocable">revocable</span>',
                      '<span class="revocation expiry-only">expiry-only</span>',
                      '<span class="revocation static">static</span>',
                      '<span class="state released">released</span>', '<span class="state revoked">revoked</span>'):
            assert shown in page

    async def test_the_chain_with_the_added_fields_verifies(self, client: Client, site: BrokerSite) -> None:
        """Records carrying revocation and key_fingerprint verify with the rest of the chain."""
        task = await start_task(client, site, role=ROLE)
        await issue(client, site, task["id"], "api-key")
        await issue(client, site, task["id"], "ssh-deploy",
                    public_key=openssh_public(ec.generate_private_key(ec.SECP384R1())))
        await end(client, site, task["id"])
        resp = await client.get("/v1/audit/verify", headers=bearer(site.ids.user("audrey@example.com", ("audit",))))
        body = await resp.json()
        assert resp.status == 200 and body["ok"] is True, body
