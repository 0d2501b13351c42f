"""A client of the Telegram Bot API and of Bale's (which speaks the same API), shared by the
services that send bot messages: support-svc's messenger channels (replies to a ticket's chat)
and campaign-svc's campaigns (messages to a customer's chat).

    bot = TelegramBot("https://api.telegram.org", token, timeout=10)
    message_id = bot.send_text(chat_id, text)       # long texts go as several messages
    bots = clients()                                # {"telegram": ..., "bale": ...} with a token

Every failure is a `BotApiError` with the API's error code (0: the API could not be reached),
its description and, for 429, `retry_after` seconds; after a 429 the client makes no call
until that time has passed. The token is part of each URL and never of an error's text.

Settings (environment): TELEGRAM_BOT_TOKEN, TELEGRAM_API_BASE (https://api.telegram.org),
BALE_BOT_TOKEN, BALE_API_BASE (https://tapi.bale.ai), BOT_API_TIMEOUT_SECONDS (10).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

PROVIDERS = ("telegram", "bale")
TEXT_LIMIT = 4096  # characters of one Bot API text message
DEFAULT_BASES = {"telegram": "https://api.telegram.org", "bale": "https://tapi.bale.ai"}
ENV_PREFIX = {"telegram": "TELEGRAM", "bale": "BALE"}


class BotApiError(Exception):
    """A Bot API call that did not answer ok: its error code, description and (for 429) how
    many seconds to wait before the next call."""

    def __init__(self, code: int, description: str, retry_after: int = 0):
        self.code, self.description, self.retry_after = code, description, retry_after
        more = f" (retry after {retry_after} s)" if retry_after else ""
        super().__init__(f"Bot API error {code}: {description}{more}")

    @property
    def retryable(self) -> bool:
        """Worth another try later: unreachable, flood limit, a server error. A 400 (a bad chat
        id, an empty text), 401 (a wrong token), 403 (blocked by the user) or 404 is not."""
        return self.code == 0 or self.code == 429 or self.code >= 500


class BotApi:
    """A client of the Telegram Bot API shape: JSON POSTs to {base}/bot{token}/{method}."""

    provider = ""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0):
        if not token:
            raise ValueError("a bot token is required")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # After a 429 no call is made until then (monotonic clock): hammering a bot that is
        # told to wait only lengthens the wait.
        self._not_before = 0.0
        self._lock = threading.Lock()

    def call(self, method: str, params: dict):
        """The `result` of a Bot API method; BotApiError when it does not answer ok (or cannot
        be reached)."""
        with self._lock:
            wait = self._not_before - time.monotonic()
        if wait > 0:
            raise BotApiError(429, "waiting for the Bot API's flood limit", int(wait) + 1)
        req = urllib.request.Request(
            f"{self.base_url}/bot{self.token}/{method}",
            data=json.dumps(params, ensure_ascii=False).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - the configured base URL
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        except (urllib.error.URLError, OSError) as err:  # refused, timed out, DNS
            reason = getattr(err, "reason", err)
            raise BotApiError(0, f"{self.provider or 'bot'} API unreachable: {reason}") from None
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if status == 200 and answer.get("ok"):
            return answer.get("result")
        retry_after = 0
        params_ = answer.get("parameters")
        if isinstance(params_, dict) and isinstance(params_.get("retry_after"), int):
            retry_after = params_["retry_after"]
        code = answer.get("error_code") if isinstance(answer.get("error_code"), int) else status
        if retry_after:
            with self._lock:
                self._not_before = max(self._not_before, time.monotonic() + retry_after)
        raise BotApiError(code, str(answer.get("description") or f"HTTP {status}")[:300], retry_after)

    def send_message(self, chat_id: str | int, text: str, reply_to: int | None = None) -> int:
        """Send a plain-text message (no parse mode: the text is never read as markup); the id
        of the message sent."""
        params: dict = {"chat_id": chat_id, "text": text}
        if reply_to:
            params["reply_to_message_id"] = reply_to  # Telegram and Bale both read this form
        result = self.call("sendMessage", params)
        if not isinstance(result, dict) or "message_id" not in result:
            raise BotApiError(0, "sendMessage answered no message")
        return int(result["message_id"])

    def send_text(self, chat_id: str | int, text: str) -> int:
        """Send a text of any length as messages of at most 4096 characters; the first one's id."""
        first = 0
        for chunk in split_text(text):
            mid = self.send_message(chat_id, chunk)
            first = first or mid
        return first


class TelegramBot(BotApi):
    provider = "telegram"
    DEFAULT_BASE = DEFAULT_BASES["telegram"]


class BaleBot(BotApi):
    provider = "bale"
    DEFAULT_BASE = DEFAULT_BASES["bale"]


BOT_CLASSES = {"telegram": TelegramBot, "bale": BaleBot}


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Chunks of at most `limit` characters, cut at a line break or a space where there is one."""
    text = text.strip()
    out = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit)
        if cut < limit // 2:
            cut = text.rfind(" ", 0, limit)
        if cut < limit // 2:
            cut = limit
        out.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        out.append(text)
    return out


# --- settings ----------------------------------------------------------------------------------
def api_base(provider: str, env: Mapping[str, str] | None = None) -> str:
    """The provider's API base URL: TELEGRAM_API_BASE / BALE_API_BASE, else the public one."""
    env = os.environ if env is None else env
    return (env.get(f"{ENV_PREFIX[provider]}_API_BASE") or DEFAULT_BASES[provider]).rstrip("/")


def bot_token(provider: str, env: Mapping[str, str] | None = None) -> str:
    """TELEGRAM_BOT_TOKEN / BALE_BOT_TOKEN ("" when unset: the provider sends nothing)."""
    env = os.environ if env is None else env
    return env.get(f"{ENV_PREFIX[provider]}_BOT_TOKEN", "").strip()


def api_timeout(env: Mapping[str, str] | None = None) -> float:
    """BOT_API_TIMEOUT_SECONDS (10; a value that is not a positive number is 10)."""
    env = os.environ if env is None else env
    try:
        timeout = float(env.get("BOT_API_TIMEOUT_SECONDS") or 10)
    except ValueError:
        return 10.0
    return timeout if timeout > 0 else 10.0


def clients(env: Mapping[str, str] | None = None) -> dict[str, BotApi]:
    """A client per provider that has a bot token."""
    env = os.environ if env is None else env
    timeout = api_timeout(env)
    return {p: BOT_CLASSES[p](api_base(p, env), bot_token(p, env), timeout) for p in PROVIDERS if bot_token(p, env)}
