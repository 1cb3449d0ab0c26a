"""An open status stream stops answering once whatever let it in would no longer: its API key revoked, or its maker
demoted to a role that does not grant the key's ``inference`` scope, or the dashboard's session logged out or
invalidated by a new password. Checked at its start only, it went on answering for as long as its request waited (a
queued job with no start deadline can wait for ever)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import AsyncClient, Client

from accounts.models import Membership, Role, Scope
from accounts.services import add_member, change_member_role, create_api_key, revoke_api_key
from billing.ledger import grant_credits
from inference import api
from inference.models import Endpoint
from tests.lifecycle import submit, submit_as

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("priced_without_broker")]

KEEP_ALIVE_SECONDS = 0.05


def _closing(action: Any) -> Any:
    def run(*args: Any) -> Any:
        try:
            return action(*args)
        finally:
            connection.close()

    return run


async def _chunks_after(response: Any, then: Any, *, most: int = 200) -> tuple[list[bytes], bool]:
    """The first chunk, then ``then()``, then the chunks that follow: all of them, and whether the stream ended
    (before ``most`` more)."""
    chunks = [await asyncio.wait_for(response.streaming_content.__anext__(), 10)]
    await then()
    ended = False
    for _ in range(most):
        try:
            chunks.append(await asyncio.wait_for(response.streaming_content.__anext__(), 10))
        except StopAsyncIteration:
            ended = True
            break
    return chunks, ended


def test_a_status_stream_ends_once_its_key_is_revoked(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "STREAM_KEEP_ALIVE_SECONDS", KEEP_ALIVE_SECONDS)
    grant_credits(organization=tenant["organization"], amount_micros=10_000_000, reason="test")
    job = submit_as(tenant, builtin_endpoint)  # no broker: it waits in its queue for ever
    path = f"/queue/platform/tiny-sd/requests/{job.pk}/status/stream"
    headers = {"Authorization": f"Key {tenant['token']}"}

    async def scenario() -> tuple[list[bytes], bool, int]:
        response = await AsyncClient().get(path, headers=headers)
        assert response.status_code == 200

        async def revoke() -> None:
            await sync_to_async(_closing(lambda: revoke_api_key(api_key=tenant["api_key"])), thread_sensitive=False)()

        chunks, ended = await _chunks_after(response, revoke)
        again = await AsyncClient().get(path, headers=headers)
        return chunks, ended, again.status_code

    chunks, ended, refused = asyncio.run(scenario())
    assert chunks[0].startswith(b"data: ")
    assert ended, f"the stream went on after its key was revoked: {len(chunks)} chunks"
    assert refused == 401


def test_a_dashboard_status_stream_ends_once_its_session_is_logged_out(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "STREAM_KEEP_ALIVE_SECONDS", KEEP_ALIVE_SECONDS)
    job = submit_as(tenant, builtin_endpoint)
    browser = Client()
    browser.force_login(tenant["user"])
    session_key = browser.session.session_key

    async def scenario() -> tuple[list[bytes], bool]:
        client = AsyncClient()
        client.cookies = browser.cookies
        response = await client.get(f"/dashboard/requests/{job.pk}/events")
        assert response.status_code == 200, response.content

        async def log_out() -> None:
            from django.contrib.sessions.backends.db import SessionStore

            await sync_to_async(_closing(lambda: SessionStore(session_key=session_key).delete()),
                                thread_sensitive=False)()  # fmt: skip

        return await _chunks_after(response, log_out)

    chunks, ended = asyncio.run(scenario())
    assert ended, f"the stream went on after its session was logged out: {len(chunks)} chunks"


def test_a_run_stream_ends_once_its_key_is_revoked(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference import streaming

    monkeypatch.setattr(streaming, "KEEP_ALIVE_SECONDS", KEEP_ALIVE_SECONDS)
    grant_credits(organization=tenant["organization"], amount_micros=10_000_000, reason="test")
    headers = {"Authorization": f"Key {tenant['token']}"}
    body = {"prompt": "a lighthouse", "num_inference_steps": 2}

    async def scenario() -> tuple[list[bytes], bool]:
        response = await AsyncClient().post("/run/platform/tiny-sd/stream", body, content_type="application/json",
                                            headers=headers)  # fmt: skip
        assert response.status_code == 200, response.content

        async def revoke() -> None:
            await sync_to_async(_closing(lambda: revoke_api_key(api_key=tenant["api_key"])), thread_sensitive=False)()

        return await _chunks_after(response, revoke)

    chunks, ended = asyncio.run(scenario())
    assert ended, f"the stream went on after its key was revoked: {len(chunks)} chunks"


@pytest.mark.parametrize("stream", ["status", "run"])
def test_an_api_stream_ends_once_its_key_loses_the_inference_scope(
    stream: str, tenant: dict[str, Any], builtin_endpoint: Endpoint, make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A developer's key, its maker made a billing member (who may not run models): new requests with it are refused
    403 ``insufficient_scope``, and so is the stream opened with it before."""
    from inference import streaming

    monkeypatch.setattr(api, "STREAM_KEEP_ALIVE_SECONDS", KEEP_ALIVE_SECONDS)
    monkeypatch.setattr(streaming, "KEEP_ALIVE_SECONDS", KEEP_ALIVE_SECONDS)
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=10_000_000, reason="test")
    developer = make_user()
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)
    api_key, token = create_api_key(
        organization=organization, name="dev", scopes=[Scope.INFERENCE], created_by=developer
    )
    headers = {"Authorization": f"Key {token}"}
    job = submit(organization, builtin_endpoint, api_key=api_key)  # no broker: it waits in its queue for ever
    status_path = f"/queue/platform/tiny-sd/requests/{job.pk}/status/stream"
    body = {"prompt": "a lighthouse", "num_inference_steps": 2}

    async def scenario() -> tuple[list[bytes], bool, int]:
        if stream == "status":
            response = await AsyncClient().get(status_path, headers=headers)
        else:
            response = await AsyncClient().post("/run/platform/tiny-sd/stream", body, content_type="application/json",
                                                headers=headers)  # fmt: skip
        assert response.status_code == 200, response.content

        async def demote() -> None:
            def make_billing() -> None:
                membership = Membership.objects.get(organization=organization, user=developer)
                change_member_role(membership=membership, role=Role.BILLING)

            await sync_to_async(_closing(make_billing), thread_sensitive=False)()

        chunks, ended = await _chunks_after(response, demote)
        again = await AsyncClient().get(status_path, headers=headers)
        return chunks, ended, again.status_code

    chunks, ended, refused = asyncio.run(scenario())
    assert refused == 403  # what the stream is held to: a new request with the key
    assert ended, f"the stream went on after its key lost the inference scope: {len(chunks)} chunks"


def test_a_dashboard_status_stream_ends_once_a_new_password_signs_its_session_out(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password reset signs out every session of the person (Django checks each session's password hash at its
    next request): a stream opened by one of them ends too, though its session row is still there."""
    monkeypatch.setattr(api, "STREAM_KEEP_ALIVE_SECONDS", KEEP_ALIVE_SECONDS)
    job = submit_as(tenant, builtin_endpoint)
    browser = Client()
    browser.force_login(tenant["user"])

    async def scenario() -> tuple[list[bytes], bool]:
        client = AsyncClient()
        client.cookies = browser.cookies
        response = await client.get(f"/dashboard/requests/{job.pk}/events")
        assert response.status_code == 200, response.content

        async def new_password() -> None:
            def reset() -> None:
                user = type(tenant["user"]).objects.get(pk=tenant["user"].pk)
                user.set_password("another long enough passphrase 43")
                user.save()

            await sync_to_async(_closing(reset), thread_sensitive=False)()

        return await _chunks_after(response, new_password)

    chunks, ended = asyncio.run(scenario())
    # What the stream is held to: the same session's next request.
    assert browser.get(f"/dashboard/requests/{job.pk}/events").status_code == 401
    assert ended, f"the stream went on after a new password signed its session out: {len(chunks)} chunks"
