"""A password reset tells no one whether an address has an account, by its answer or by its time: the request only hands
the address to a worker (``dashboard.send_password_reset_email`` on the ``default`` queue), the same message whether
or not an account has it, and the worker looks the address up and sends the link. The tests here call the task
function as the worker would (tests/conftest.py ``sent_tasks`` keeps the messages)."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import current_app
from django.core import mail
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files")]

RESET_TASK = "dashboard.send_password_reset_email"


def deliver_reset_emails(sent_tasks: list[tuple[str, list[Any]]]) -> None:
    """Runs the password reset messages handed to the broker, as the housekeeping worker does, and forgets them."""
    from dashboard import tasks

    for _, args in [sent for sent in sent_tasks if sent[0] == RESET_TASK]:
        tasks.send_password_reset_email(*args)
    sent_tasks[:] = [sent for sent in sent_tasks if sent[0] != RESET_TASK]


def email(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}@example.com"


def browser() -> Client:
    """A client from an address of its own, so the per-address form counters of one test never meet another's."""
    number = uuid.uuid4().int
    return Client(REMOTE_ADDR=f"198.51.{number % 256}.{(number >> 8) % 254 + 1}")


def test_the_request_does_the_same_whether_or_not_the_address_has_an_account(
    make_user: Callable[..., User], sent_tasks: list[tuple[str, list[Any]]]
) -> None:
    known, unknown = make_user(email("forgetful")).email, email("stranger")
    answers = {}
    for address in (known, unknown):
        with CaptureQueriesContext(connection) as queries:
            response = browser().post("/auth/password-reset", {"email": address})
        statements = [query["sql"] for query in queries.captured_queries]
        answers[address] = (response.status_code, response["Location"], response.content, statements)
    # No lookup, no token, no email in the request: its answer and its database work are the same for both.
    assert answers[known] == answers[unknown]
    assert answers[known][:2] == (302, "/auth/password-reset/sent")
    assert mail.outbox == []
    # One message each, alike but for the address.
    assert [name for name, _ in sent_tasks] == [RESET_TASK, RESET_TASK]
    [(_, for_known), (_, for_unknown)] = sent_tasks
    assert (for_known[0], for_unknown[0]) == (known, unknown)
    assert for_known[1:] == for_unknown[1:]

    # The worker sends the link to the account, and nothing for the address that has none.
    deliver_reset_emails(sent_tasks)
    [message] = mail.outbox
    assert message.to == [known]
    link = re.search(r"http://testserver(/auth/password-reset/\S+)", message.body)
    assert link is not None
    client = Client()
    form = client.get(link.group(1), follow=True)
    assert "Choose a password" in form.content.decode()
    chosen = "a brand new long secret"
    saved = client.post(form.redirect_chain[-1][0], {"new_password1": chosen, "new_password2": chosen})
    assert saved.status_code == 302
    assert User.objects.get(email=known).check_password(chosen)


def test_a_reset_link_follows_the_address_and_scheme_asked_on(
    make_user: Callable[..., User], sent_tasks: list[tuple[str, list[Any]]]
) -> None:
    user = make_user(email("secure"))
    browser().post("/auth/password-reset", {"email": user.email}, HTTP_HOST="localhost", secure=True)
    deliver_reset_emails(sent_tasks)
    [message] = mail.outbox
    assert re.search(r"https://localhost/auth/password-reset/\S+", message.body), message.body
    assert "localhost" in message.subject


@pytest.mark.django_db(transaction=True)  # the thread that sends reads the account on a connection of its own
def test_a_broker_that_is_down_changes_nothing_the_visitor_sees_and_the_link_is_still_sent(
    make_user: Callable[..., User], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(current_app, "send_task", refused)
    known, unknown = make_user(email("unlucky")).email, email("stranger")
    answers = {}
    for address in (known, unknown):
        response = browser().post("/auth/password-reset", {"email": address})
        answers[address] = (response.status_code, response["Location"], response.content)
    assert answers[known] == answers[unknown]
    assert answers[known][:2] == (302, "/auth/password-reset/sent")
    # Sent from the web process instead: the account's link, nothing for the address with none.
    wait_until(
        lambda: not any(thread.name == "password-reset" for thread in threading.enumerate()),
        timeout=30,
        message="the password reset thread to end",
    )
    [message] = mail.outbox
    assert message.to == [known]
    assert re.search(r"http://testserver/auth/password-reset/\S+", message.body), message.body


def test_the_task_goes_to_a_queue_that_every_deployment_consumes(tmp_path: Path) -> None:
    """What tests/test_beat_schedule.py checks for the tasks of billing and inference: the housekeeping worker
    (production) and the embedded run's take the message; a GPU worker's queue never does."""
    from config.celery import app
    from inference.models import GpuClass
    from tests.test_beat_schedule import embedded_queues, production_queues

    app.loader.import_default_modules()  # what a worker does at start: the task modules, autodiscovery included
    assert RESET_TASK in app.tasks
    task = app.tasks[RESET_TASK]
    assert task.soft_time_limit < task.time_limit
    queue = app.amqp.router.route({}, RESET_TASK)["queue"].name
    assert queue == "default"
    assert queue not in GpuClass.values
    assert queue in production_queues(tmp_path)["housekeeping"]
    assert queue in embedded_queues()["housekeeping worker"]
