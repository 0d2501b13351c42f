"""Telegram and Bale bots: a webhook Update (JSON as the Bot API sends it) opens a ticket or is
added to the chat's open one, once per message; agent replies reach the chat through a local
Bot API stub (tests/support/bot_api_stub.py), also after the API fails for a while; the secret
token is checked over gRPC and over HTTP through the gateway (no bearer token)."""

from __future__ import annotations

import itertools
import json
import os
import time

import grpc
import pytest
import sqlalchemy as sa

from crm.support.v1 import channels_pb2 as pb
from crm.support.v1 import channels_pb2_grpc
from crm_chassis import timers
from crm_chassis.bots import BotApiError, TelegramBot, split_text
from support_svc.__main__ import SPEC
from support_svc.messengers import messenger_chats
from support_svc.tables import ticket_messages, tickets
from support_svc.ticketing import DELIVER, number_text
from tests.support.bot_api_stub import BotApiStub
from tests.support.customers import customer_message
from tests.support.harness import assert_problem, md, start_service, token

from .conftest import add_message, manager_md, rt, ticket

TG_SECRET = "tg-webhook-secret-0123456789"
BALE_SECRET = "bale-webhook-secret-abcdef"
PUBLIC = md("public_channel", "gateway:public")
_ids = itertools.count(1000)


@pytest.fixture(scope="module")
def stubs():
    with BotApiStub(token="111:TG-token") as tg, BotApiStub(token="222:BALE-token") as bale:
        yield {"telegram": tg, "bale": bale}


@pytest.fixture(scope="module")
def svc(request, databases, broker, stubs):
    """support-svc with both bots configured (the settings are read from the environment when
    the service starts, so they are set only around the start)."""
    env = {
        "TELEGRAM_API_BASE": stubs["telegram"].url,
        "TELEGRAM_BOT_TOKEN": stubs["telegram"].token,
        "TELEGRAM_WEBHOOK_SECRET": TG_SECRET,
        "BALE_API_BASE": stubs["bale"].url,
        "BALE_BOT_TOKEN": stubs["bale"].token,
        "BALE_WEBHOOK_SECRET": BALE_SECRET,
        "BOT_API_TIMEOUT_SECONDS": "3",
        "PUBLIC_BASE_URL": "https://crm.example.com/",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        service = start_service(SPEC, databases.fresh("messengers"), broker.url, relay=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def stub(ch):
    return channels_pb2_grpc.ChannelServiceStub(ch)


@pytest.fixture
def http(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    clients = Clients(
        {
            "customer": "127.0.0.1:9",
            "sales": "127.0.0.1:9",
            "support": f"127.0.0.1:{svc.port}",
            "reporting": "127.0.0.1:9",
        }
    )
    yield create_app(clients).test_client()
    clients.close()


def user(uid: int, first="سارا", last="احمدی", username="sara_a") -> dict:
    return {
        "id": uid,
        "is_bot": False,
        "first_name": first,
        "last_name": last,
        "username": username,
        "language_code": "fa",
    }


def update(chat_id: int, text: str | None = "سلام، سفارش ۱۲۳ من هنوز نرسیده است.", *, message_id=None, **more) -> dict:
    """A Bot API Update with a private-chat message, as Telegram (and Bale) send it."""
    u = user(chat_id)
    msg = {
        "message_id": message_id or next(_ids),
        "from": u,
        "chat": {
            "id": chat_id,
            "first_name": u["first_name"],
            "last_name": u["last_name"],
            "username": u["username"],
            "type": "private",
        },
        "date": int(time.time()),
    }
    if text is not None:
        msg["text"] = text
    msg.update(more)
    return {"update_id": next(_ids) * 10, "message": msg}


def post(stub, upd: dict, provider="telegram", secret=TG_SECRET):
    body = json.dumps(upd, ensure_ascii=False).encode()
    return stub.PostBotUpdate(
        pb.PostBotUpdateRequest(provider=provider, body=body, secret_token=secret), metadata=PUBLIC
    )


def chat_row(svc, provider, chat_id):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(messenger_chats).where(
                messenger_chats.c.provider == provider, messenger_chats.c.chat_id == str(chat_id)
            )
        ).one()


def messages(svc, ticket_id):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(ticket_messages)
            .where(ticket_messages.c.ticket_id == ticket_id)
            .order_by(ticket_messages.c.create_time, ticket_messages.c.id)
        ).all()


def deliver_until(svc, message_id, state="sent", timeout=10.0):
    """Fire due timers until the message's delivery is `state` (the background worker may fire
    them too)."""
    deadline = time.monotonic() + timeout
    while True:
        rt(svc).timers.run_once()
        with svc.ctx.engine.connect() as conn:
            row = conn.execute(sa.select(ticket_messages).where(ticket_messages.c.id == message_id)).one()
        if row.delivery == state or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def sent_to(bot: BotApiStub, chat_id, text_part: str, timeout=5.0) -> list[dict]:
    return [
        c
        for c in bot.wait_for(
            lambda calls: any(str(c["chat_id"]) == str(chat_id) and text_part in c["text"] for c in calls), timeout
        )
        if str(c["chat_id"]) == str(chat_id) and text_part in c["text"]
    ]


# --- the whole path ----------------------------------------------------------------------------
def test_a_telegram_message_opens_a_ticket_and_the_agent_reply_reaches_the_chat(svc, stub, stubs):
    text = "سلام، سفارش شماره ۴۵۶۷ من بعد از دو هفته هنوز نرسیده است. لطفاً پیگیری کنید که کجاست و کی می‌رسد؟"
    got = post(stub, update(5551001, text))
    assert got.outcome == pb.PostBotUpdateResponse.OUTCOME_OPENED
    chat = chat_row(svc, "telegram", 5551001)
    assert chat.username == "sara_a" and chat.display_name == "سارا احمدی" and chat.last_ticket_id
    t = ticket(svc, chat.last_ticket_id)
    assert t.channel == "telegram" and t.contact_address == "5551001" and t.contact_name == "سارا احمدی"
    assert t.subject == text[:80] and t.state == "new" and t.message_count == 1
    first = messages(svc, t.id)[0]
    assert first.kind == "customer" and first.body == text and first.external_id.startswith("5551001:")
    # the customer is told the ticket's number in the chat
    rt(svc).timers.run_once()
    assert sent_to(stubs["telegram"], 5551001, number_text(t.number))

    reply, _ = add_message(svc, t.id, "agent", "سلام سارا خانم، سفارش شما فردا تحویل می‌شود.", author="agent-7")
    assert reply.delivery == "pending"
    row = deliver_until(svc, reply.id)
    assert row.delivery == "sent"
    calls = sent_to(stubs["telegram"], 5551001, "فردا تحویل")
    assert len(calls) == 1 and calls[0]["text"] == "سلام سارا خانم، سفارش شما فردا تحویل می‌شود."
    assert "parse_mode" not in calls[0]  # an agent's text is never read as markup
    assert row.external_id.startswith("5551001:") and row.external_id != first.external_id
    assert all(str(c["chat_id"]) != "5551001" for c in stubs["bale"].calls())  # not the other bot


def test_the_same_update_twice_is_one_message_and_the_next_message_appends(svc, stub):
    upd = update(5551002, "کالای من خراب رسید")
    assert post(stub, upd).outcome == pb.PostBotUpdateResponse.OUTCOME_OPENED
    assert post(stub, upd).outcome == pb.PostBotUpdateResponse.OUTCOME_DUPLICATE
    tid = chat_row(svc, "telegram", 5551002).last_ticket_id
    assert ticket(svc, tid).message_count == 1

    assert post(stub, update(5551002, "عکسش را هم می‌فرستم")).outcome == pb.PostBotUpdateResponse.OUTCOME_APPENDED
    edited = update(5551002, "کالای من شکسته رسید", message_id=upd["message"]["message_id"])
    edited["edited_message"] = {**edited.pop("message"), "edit_date": int(time.time()) + 5}
    assert post(stub, edited).outcome == pb.PostBotUpdateResponse.OUTCOME_APPENDED
    assert post(stub, edited).outcome == pb.PostBotUpdateResponse.OUTCOME_DUPLICATE
    bodies = [m.body for m in messages(svc, tid)]
    assert bodies == ["کالای من خراب رسید", "عکسش را هم می‌فرستم", "(ویرایش شده) کالای من شکسته رسید"]
    assert ticket(svc, tid).message_count == 3
    with svc.ctx.engine.connect() as conn:  # one ticket for the chat, whatever was redelivered
        n = conn.execute(
            sa.select(sa.func.count()).where(tickets.c.channel == "telegram", tickets.c.contact_address == "5551002")
        ).scalar()
    assert n == 1


def test_a_resolved_ticket_is_reopened_and_a_closed_one_makes_a_new_ticket(svc, stub):
    post(stub, update(5551003, "مشکل اول"))
    first = chat_row(svc, "telegram", 5551003).last_ticket_id
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, first, "resolved", "agent-1")
    assert post(stub, update(5551003, "هنوز درست نشده")).outcome == pb.PostBotUpdateResponse.OUTCOME_APPENDED
    assert ticket(svc, first).state == "reopened"
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, first, "closed", "agent-1")
    assert post(stub, update(5551003, "یک مشکل تازه")).outcome == pb.PostBotUpdateResponse.OUTCOME_OPENED
    second = chat_row(svc, "telegram", 5551003).last_ticket_id
    assert second != first and ticket(svc, second).subject == "یک مشکل تازه"


def test_photos_and_documents_are_noted_with_their_file_ids(svc, stub):
    photo = [
        {"file_id": "AgAD-small", "file_unique_id": "s1", "width": 90, "height": 90, "file_size": 1200},
        {"file_id": "AgAD-large", "file_unique_id": "l1", "width": 1280, "height": 960, "file_size": 98000},
    ]
    got = post(stub, update(5551004, None, photo=photo, caption="این عکس کالای خراب است"))
    assert got.outcome == pb.PostBotUpdateResponse.OUTCOME_OPENED
    tid = chat_row(svc, "telegram", 5551004).last_ticket_id
    assert ticket(svc, tid).subject == "این عکس کالای خراب است"
    doc = {
        "file_id": "BQAD-doc",
        "file_unique_id": "d1",
        "file_name": "factor.pdf",
        "mime_type": "application/pdf",
        "file_size": 5000,
    }
    post(stub, update(5551004, None, document=doc))
    first, second = messages(svc, tid)
    assert first.body == "این عکس کالای خراب است\n[عکس: l1]"
    assert first.headers["bot"]["files"][0]["file_id"] == "AgAD-large"  # the largest size
    assert second.body == "[فایل: factor.pdf]"
    assert second.headers["bot"]["files"][0]["file_size"] == 5000
    assert second.headers["bot"]["files"][0]["mime_type"] == "application/pdf"
    # a sticker has no text: it is noted by its emoji
    assert post(stub, update(5551004, None, sticker={"file_id": "CAAD", "emoji": "👍"})).outcome == (
        pb.PostBotUpdateResponse.OUTCOME_APPENDED
    )
    # a NUL in a text (PostgreSQL stores none) is dropped, not an error the platform retries forever
    assert post(stub, update(5551004, "a\x00b")).outcome == pb.PostBotUpdateResponse.OUTCOME_APPENDED
    assert messages(svc, tid)[-1].body == "ab"
    # kinds that are no message an agent answers are accepted and ignored
    ignored = {"update_id": 99, "callback_query": {"id": "1", "from": user(5551004), "data": "x"}}
    assert post(stub, ignored).outcome == pb.PostBotUpdateResponse.OUTCOME_IGNORED
    assert post(stub, update(5551004, None, dice={"emoji": "🎲", "value": 3})).outcome == (
        pb.PostBotUpdateResponse.OUTCOME_IGNORED
    )


def test_start_is_greeted_once_and_opens_no_ticket(svc, stub, stubs):
    upd = update(5551005, "/start")
    assert post(stub, upd).outcome == pb.PostBotUpdateResponse.OUTCOME_IGNORED
    assert post(stub, upd).outcome == pb.PostBotUpdateResponse.OUTCOME_IGNORED  # redelivered
    rt(svc).timers.run_once()
    greetings = sent_to(stubs["telegram"], 5551005, "خوش آمدید")
    time.sleep(0.3)
    assert len(sent_to(stubs["telegram"], 5551005, "خوش آمدید")) == len(greetings) == 1
    assert chat_row(svc, "telegram", 5551005).last_ticket_id is None


def test_a_shared_contact_stores_the_phone_and_links_the_customer(svc, stub):
    from support_svc import customer_projection

    handlers = customer_projection.subscriptions(rt(svc))[0].handlers
    e = customer_message("customer.created.v1", email="reza@example.ir", mobile="+989121110000")
    with svc.ctx.engine.begin() as conn:
        handlers[e.routing_key](conn, e)
    cid = e.subject.removeprefix("customers/")

    post(stub, update(5551006, "سلام، فاکتور من اشتباه است"))
    tid = chat_row(svc, "telegram", 5551006).last_ticket_id
    assert ticket(svc, tid).customer_id == ""
    # someone else's contact card forwarded is a message, not the user's phone
    other = update(5551006, None, contact={"phone_number": "+989350000000", "first_name": "Ali", "user_id": 777})
    assert post(stub, other).outcome == pb.PostBotUpdateResponse.OUTCOME_APPENDED
    assert chat_row(svc, "telegram", 5551006).phone == ""
    # the user's own contact (a request_contact button): Telegram sends it without the plus
    own = update(5551006, None, contact={"phone_number": "989121110000", "first_name": "سارا", "user_id": 5551006})
    assert post(stub, own).outcome == pb.PostBotUpdateResponse.OUTCOME_IGNORED
    chat = chat_row(svc, "telegram", 5551006)
    assert chat.phone == "+989121110000" and chat.customer_id == cid
    assert ticket(svc, tid).customer_id == cid
    # the chat's next ticket starts linked
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, tid, "closed", "agent-1")
    post(stub, update(5551006, "سؤال دیگری دارم"))
    assert ticket(svc, chat_row(svc, "telegram", 5551006).last_ticket_id).customer_id == cid


# --- authentication and bad input ---------------------------------------------------------------
def test_a_bad_or_missing_secret_is_unauthenticated(svc, stub):
    upd = update(5551007, "hello")
    for secret in ("wrong", "", TG_SECRET[:-1], BALE_SECRET):
        with pytest.raises(grpc.RpcError) as err:
            post(stub, upd, secret=secret)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        post(stub, upd, provider="whatsapp")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.PostBotUpdate(
            pb.PostBotUpdateRequest(provider="telegram", body=b"not json", secret_token=TG_SECRET), metadata=PUBLIC
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # an agent's token does not grant the public RPC
        stub.PostBotUpdate(
            pb.PostBotUpdateRequest(provider="telegram", body=b"{}", secret_token=TG_SECRET),
            metadata=md("support_agent", "omid"),
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(messenger_chats.c.chat_id == "5551007")).scalar() == 0


def test_the_webhook_over_http_needs_no_bearer_token_but_the_secret(svc, http):
    body = json.dumps(update(5551008, "از طریق درگاه"), ensure_ascii=False).encode()
    path = "/v1/channels/telegram:webhook"
    headers = {"Content-Type": "application/json"}
    assert_problem(http.post(path, data=body, headers=headers), 401)
    assert_problem(http.post(path, data=body, headers={**headers, "X-Telegram-Bot-Api-Secret-Token": "nope"}), 401)
    # a secret put in the body instead of the header does not count
    assert_problem(http.post(path, json={"secretToken": TG_SECRET, "update_id": 1}), 401)
    ok = http.post(path, data=body, headers={**headers, "X-Telegram-Bot-Api-Secret-Token": TG_SECRET})
    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert ok.get_json() == {"outcome": "OUTCOME_OPENED"}
    again = http.post(path, data=body, headers={**headers, "X-Telegram-Bot-Api-Secret-Token": TG_SECRET})
    assert again.get_json() == {"outcome": "OUTCOME_DUPLICATE"}
    bad = http.post(path, data=b"[1, 2]", headers={**headers, "X-Telegram-Bot-Api-Secret-Token": TG_SECRET})
    assert_problem(bad, 400, "body")
    assert_problem(
        http.post("/v1/channels/whatsapp:webhook", data=body, headers={"X-Telegram-Bot-Api-Secret-Token": "x"}), 404
    )
    big = b'{"update_id": 1, "pad": "' + b"x" * (1024 * 1024) + b'"}'
    assert_problem(http.post(path, data=big, headers={**headers, "X-Telegram-Bot-Api-Secret-Token": TG_SECRET}), 413)
    assert ticket(svc, chat_row(svc, "telegram", 5551008).last_ticket_id).channel == "telegram"


def test_bale_goes_through_the_same_code_with_its_own_secret_and_bot(svc, stub, stubs, http):
    upd = update(7770001, "سلام از بله")
    with pytest.raises(grpc.RpcError) as err:
        post(stub, upd, provider="bale", secret=TG_SECRET)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = http.post(
        "/v1/channels/bale:webhook",
        data=json.dumps(upd, ensure_ascii=False).encode(),
        headers={"X-Telegram-Bot-Api-Secret-Token": BALE_SECRET},
    )
    assert resp.status_code == 200 and resp.get_json()["outcome"] == "OUTCOME_OPENED"
    chat = chat_row(svc, "bale", 7770001)
    t = ticket(svc, chat.last_ticket_id)
    assert t.channel == "bale" and t.contact_address == "7770001"
    # the same chat id on Telegram is another chat
    assert post(stub, update(7770001, "سلام از تلگرام")).outcome == pb.PostBotUpdateResponse.OUTCOME_OPENED
    assert chat_row(svc, "telegram", 7770001).last_ticket_id != chat.last_ticket_id

    reply, _ = add_message(svc, t.id, "agent", "پاسخ در بله", author="agent-2")
    assert deliver_until(svc, reply.id).delivery == "sent"
    assert len(sent_to(stubs["bale"], 7770001, "پاسخ در بله")) == 1
    assert not [c for c in stubs["telegram"].calls() if "پاسخ در بله" in c["text"]]


# --- delivery failures ----------------------------------------------------------------------------
def test_a_failing_bot_api_leaves_the_reply_pending_until_it_recovers(svc, stub, stubs):
    tg = stubs["telegram"]
    post(stub, update(5551009, "کی جواب می‌دهید؟"))
    tid = chat_row(svc, "telegram", 5551009).last_ticket_id
    rt(svc).timers.run_once()  # the ticket-number notice goes out while the API is up
    sent_to(tg, 5551009, number_text(ticket(svc, tid).number))
    tg.fail(500, times=10_000)
    try:
        reply, _ = add_message(svc, tid, "agent", "همین حالا بررسی می‌کنیم", author="agent-3")
        row = deliver_until(svc, reply.id, state="never", timeout=0.5)
        assert row.delivery == "pending"
        with svc.ctx.engine.connect() as conn:
            timer = timers.get(conn, DELIVER, str(reply.id))
        assert timer.attempts >= 1 and "500" in timer.last_error
        assert not [c for c in tg.calls() if "همین حالا" in c["text"]]
    finally:
        tg.recover()
    with svc.ctx.engine.begin() as conn:  # its back-off ends now instead of in a second or more
        timers.reschedule(conn, DELIVER, str(reply.id), conn.execute(sa.select(sa.func.now())).scalar())
    row = deliver_until(svc, reply.id)
    assert row.delivery == "sent" and row.external_id.startswith("5551009:")
    assert len(sent_to(tg, 5551009, "همین حالا بررسی")) == 1


def test_a_429_raises_with_its_retry_after_and_the_client_waits_it_out():
    with BotApiStub(token="333:T") as api:
        bot = TelegramBot(api.url, api.token, timeout=3)
        api.fail(429, times=1, retry_after=30)
        with pytest.raises(BotApiError) as err:
            bot.send_message(42, "hi")
        assert err.value.code == 429 and err.value.retry_after == 30
        assert api.token not in str(err.value)
        calls = len(api.received)
        with pytest.raises(BotApiError) as err:  # no call while the API said to wait
            bot.send_message(42, "hi again")
        assert err.value.code == 429 and len(api.received) == calls
        other = TelegramBot(api.url, "999:wrong", timeout=3)
        with pytest.raises(BotApiError) as err:
            other.send_message(42, "hi")
        assert err.value.code == 401
    with pytest.raises(BotApiError) as err:  # the API cannot be reached
        TelegramBot(api.url, api.token, timeout=1).send_message(42, "hi")
    assert err.value.code == 0


def test_a_long_reply_goes_as_several_messages(svc, stub, stubs):
    assert split_text("a" * 5000) == ["a" * 4096, "a" * 904]
    assert [len(c) for c in split_text(("word " * 1000).strip())] == [4094, 904]
    post(stub, update(5551010, "سؤال طولانی"))
    tid = chat_row(svc, "telegram", 5551010).last_ticket_id
    text = "\n".join(f"بند {i}: " + ("توضیح " * 30).strip() for i in range(60))
    reply, _ = add_message(svc, tid, "agent", text, author="agent-4")
    assert deliver_until(svc, reply.id).delivery == "sent"
    parts = [c["text"] for c in stubs["telegram"].calls() if str(c["chat_id"]) == "5551010" and "بند" in c["text"]]
    assert len(parts) == 3 and all(len(p) <= 4096 for p in parts)  # 11,220 characters
    assert "\n".join(parts) == text.strip()


# --- status -------------------------------------------------------------------------------------
def test_the_channel_status_shows_configuration_and_counts(svc, stub, http):
    status = stub.GetChannelStatus(pb.GetChannelStatusRequest(), metadata=manager_md("mina"))
    by = {p.provider: p for p in status.providers}
    assert set(by) == {"telegram", "bale"}
    tg = by["telegram"]
    assert tg.webhook_configured and tg.sending_configured
    assert tg.webhook_url == "https://crm.example.com/v1/channels/telegram:webhook"
    assert tg.chat_count >= 9 and by["bale"].chat_count >= 1
    assert status.web_form_site_keys == 1  # the default dev-site-key
    with pytest.raises(grpc.RpcError) as err:
        stub.GetChannelStatus(pb.GetChannelStatusRequest(), metadata=md("support_agent", "omid"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    resp = http.get("/v1/channelStatus", headers={"Authorization": f"Bearer {token('support_manager', 'mina')}"})
    assert resp.status_code == 200 and resp.get_json()["name"] == "channelStatus"
    assert http.get("/v1/channelStatus").status_code == 401
