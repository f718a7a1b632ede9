"""Bot API parameters as Telegram reads them, and its error answers.

Clients send parameters as a query string, a urlencoded or multipart form (aiogram's way:
every value a string, complex ones JSON-encoded, files as multipart parts named by
`attach://<name>`), or a JSON body. Errors carry Telegram's exact envelope and status, which
is what clients branch on (aiogram maps 400/401/403/404/429 to its typed exceptions).
Text with parse_mode HTML is checked as Telegram checks it, so markup that Telegram would
reject (an unescaped `<name>` in a product title, say) fails here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit


class BotApiError(Exception):
    """An error answer in the Bot API's envelope."""

    def __init__(self, status: int, description: str, *, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.status,
            "description": self.description,
        }
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


def bad_request(detail: str) -> BotApiError:
    return BotApiError(400, f"Bad Request: {detail}")


def too_many_requests(retry_after: int) -> BotApiError:
    return BotApiError(
        429, f"Too Many Requests: retry after {retry_after}", retry_after=retry_after
    )


@dataclass
class Upload:
    filename: str
    content: bytes
    content_type: str | None = None


@dataclass
class Params:
    values: dict[str, Any]
    files: dict[str, Upload] = field(default_factory=dict)

    def _raw(self, name: str) -> Any:
        value = self.values.get(name)
        return None if value == "" else value

    def text(self, name: str, *, required: bool = False) -> str | None:
        value = self._raw(name)
        if value is None:
            if required:
                raise bad_request(f"{name} is empty")
            return None
        return value if isinstance(value, str) else json.dumps(value)

    def integer(self, name: str, *, required: bool = False) -> int | None:
        value = self._raw(name)
        if value is None:
            if required:
                raise bad_request(f"{name} is empty")
            return None
        if isinstance(value, bool):
            raise bad_request(f"invalid {name} specified")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad_request(f"invalid {name} specified") from None

    def flag(self, name: str, default: bool = False) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        return str(value).lower() in {"true", "1"}

    def parsed(self, name: str) -> Any:
        """A complex parameter: JSON-encoded in forms, native in a JSON body."""
        value = self._raw(name)
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            raise bad_request(f"can't parse {name} JSON object") from None

    def chat_id(self) -> int:
        value = self._raw("chat_id")
        if value is None:
            raise bad_request("chat_id is empty")
        try:
            return int(value)
        except (TypeError, ValueError):
            # "@channelusername": the sandbox has private chats only
            raise bad_request("chat not found") from None

    def input_file(self, name: str) -> Upload | str | None:
        """An uploaded file, or the file_id or URL string that names one."""
        if name in self.files:
            return self.files[name]
        value = self._raw(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise bad_request(f"wrong type of the {name} field")
        if value.startswith("attach://"):
            upload = self.files.get(value.removeprefix("attach://"))
            if upload is None:
                raise bad_request(f"wrong HTTP URL or file_id specified: {value}")
            return upload
        return value


# -- Formatted text ----------------------------------------------------------------------------

ENTITY_TAGS = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic",
    "u": "underline", "ins": "underline", "s": "strikethrough", "strike": "strikethrough",
    "del": "strikethrough", "tg-spoiler": "spoiler", "span": "spoiler", "a": "text_link",
    "code": "code", "pre": "pre", "blockquote": "blockquote", "tg-emoji": "custom_emoji",
}  # fmt: skip


def utf16_len(text: str) -> int:
    """Entity offsets and lengths count UTF-16 code units, as Telegram's do."""
    return len(text.encode("utf-16-le")) // 2


class _HtmlText(HTMLParser):
    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self._source = source
        self.parts: list[str] = []
        self.entities: list[dict[str, Any]] = []
        self._length = 0
        self._open: list[tuple[str, str, int, dict[str, Any]]] = []

    def _error(self, detail: str) -> BotApiError:
        return bad_request(f"can't parse entities: {detail}")

    def _byte_offset(self) -> int:
        line, column = self.getpos()
        lines = self._source.split("\n")
        index = sum(len(text) + 1 for text in lines[: line - 1]) + column
        return len(self._source[:index].encode())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        kind = ENTITY_TAGS.get(tag)
        if kind is None or (tag == "span" and attributes.get("class") != "tg-spoiler"):
            raise self._error(f'Unsupported start tag "{tag}" at byte offset {self._byte_offset()}')
        extra: dict[str, Any] = {}
        if tag == "a":
            extra["url"] = attributes.get("href") or ""
        elif tag == "tg-emoji":
            if not attributes.get("emoji-id"):
                raise self._error(f"Custom emoji at byte offset {self._byte_offset()} has no id")
            extra["custom_emoji_id"] = attributes["emoji-id"]
        elif tag == "blockquote" and "expandable" in attributes:
            kind = "expandable_blockquote"
        self._open.append((tag, kind, self._length, extra))

    def handle_endtag(self, tag: str) -> None:
        if not self._open or self._open[-1][0] != tag:
            expected = f'expected "</{self._open[-1][0]}>", ' if self._open else ""
            offset = self._byte_offset()
            found = f'found "</{tag}>"'
            raise self._error(f"Unmatched end tag at byte offset {offset}, {expected}{found}")
        _, kind, start, extra = self._open.pop()
        if self._length > start and not (kind == "text_link" and not extra["url"]):
            self.entities.append(
                {"type": kind, "offset": start, "length": self._length - start, **extra}
            )

    def handle_data(self, data: str) -> None:
        self.parts.append(data)
        self._length += utf16_len(data)

    def finish(self) -> None:
        self.close()
        if self._open:
            tag = self._open[-1][0]
            raise self._error(f'Can\'t find end tag corresponding to start tag "{tag}"')


def formatted(text: str, parse_mode: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The text a user sees and its entities. HTML is parsed; Markdown is kept as sent."""
    if parse_mode is None or parse_mode.lower() != "html":
        if parse_mode is not None and parse_mode.lower() not in {"markdown", "markdownv2"}:
            raise bad_request(f"unsupported parse_mode {parse_mode}")
        return text, []
    parser = _HtmlText(text)
    parser.feed(text)
    parser.finish()
    entities = sorted(parser.entities, key=lambda e: (e["offset"], -e["length"]))
    return "".join(parser.parts), entities


# -- Keyboards ---------------------------------------------------------------------------------

BUTTON_KINDS = (
    "url", "callback_data", "web_app", "login_url", "switch_inline_query",
    "switch_inline_query_current_chat", "switch_inline_query_chosen_chat", "copy_text",
    "callback_game", "pay",
)  # fmt: skip
MAX_CALLBACK_DATA_BYTES = 64


def _check_url(url: Any, what: str) -> None:
    parts = urlsplit(url) if isinstance(url, str) else None
    # Telegram wants https (and no local hosts) for web apps; the local stack serves plain
    # http on 127.0.0.1, so the sandbox accepts that.
    if parts is None or not (
        (parts.scheme in {"http", "https"} and parts.netloc) or parts.scheme == "tg"
    ):
        raise bad_request(f"{what} '{url}' is invalid: Wrong HTTP URL")


def reply_markup(value: Any) -> dict[str, Any] | None:
    """A reply_markup checked the way Telegram rejects bad inline keyboards."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("can't parse reply keyboard markup JSON object")
    if "inline_keyboard" not in value:
        return value  # reply keyboards, remove_keyboard, force_reply: kept as sent
    rows = value["inline_keyboard"]
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise bad_request(
            'field "inline_keyboard" of the InlineKeyboardMarkup must be an Array of Arrays'
        )
    for button in (button for row in rows for button in row):
        if not isinstance(button, dict) or not isinstance(button.get("text"), str):
            raise bad_request(
                'can\'t parse inline keyboard button: Field "text" must be of type String'
            )
        if not any(kind in button for kind in BUTTON_KINDS):
            raise bad_request(
                "can't parse inline keyboard button: "
                "Text buttons are unallowed in the inline keyboard"
            )
        if "url" in button:
            _check_url(button["url"], "inline keyboard button URL")
        if "web_app" in button:
            web_app = button["web_app"]
            _check_url(web_app.get("url") if isinstance(web_app, dict) else None, "Web App URL")
        if "callback_data" in button:
            data = button["callback_data"]
            if not isinstance(data, str) or not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA_BYTES:
                raise bad_request("BUTTON_DATA_INVALID")
    return value
