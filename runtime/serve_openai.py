"""The OpenAI chat-completions request, checked: messages with text and ``image_url`` parts, the generation settings,
the image (a ``data:`` URI, or a file under ``--allow-image-dir``; remote URLs are refused) bounded in bytes and
pixels. Every problem is a ``VlmpruneError`` (one line; HTTP 400). Torch-free."""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from vlmprune.errors import VlmpruneError

from .prompt import Conversation

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
ROLES = ("system", "user", "assistant")


@dataclass
class Limits:
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    image_dirs: list[Path] = field(default_factory=list)


@dataclass
class ChatRequest:
    model: str | None
    conversation: Conversation
    image: Image.Image
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    keep: float | None
    ignore_eos: bool


def _bad(problem: str, fix: str) -> VlmpruneError:
    return VlmpruneError(problem, fix)


def _number(body: dict, key: str, default, kind=float, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise _bad(f"{key} {value!r} is not {'an integer' if kind is int else 'a number'}", f"send {key} as a number")
    value = kind(value)
    if kind is float and not math.isfinite(value):
        raise _bad(f"{key} {value!r} is not finite", f"send a finite {key}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _bad(f"{key} {value} is outside [{low}, {high}]", f"send {key} within [{low}, {high}]")
    return value


def parse_chat(body, limits: Limits, default_max_tokens: int = 256) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("the request body is not a JSON object", "send {\"model\": ..., \"messages\": [...]}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages is missing or empty", "send a list of {role, content} messages")
    if len(messages) > 256:
        raise _bad(f"{len(messages)} messages", "send at most 256 messages")
    n = body.get("n", 1)
    if n not in (1, None):
        raise _bad(f"n {n!r}: one choice per request is served", "leave n out or send 1")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model is not a string", "send the model's id from GET /v1/models")
    rendered, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}] has no role among {', '.join(ROLES)}", "give each message a role and content")
        content = m.get("content")
        if isinstance(content, str):
            rendered.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"messages[{i}].content is neither text nor a list of parts", "send text or parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if m["role"] != "user":
                    raise _bad(f"messages[{i}] ({m['role']}) holds an image", "put images in user messages")
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise _bad(f"messages[{i}].content[{j}].image_url has no url", "send {\"url\": \"data:...\"}")
                images.append(url)
                parts.append({"type": "image"})
            else:
                raise _bad(f"messages[{i}].content[{j}] is not a text or image_url part",
                           "send {\"type\": \"text\", \"text\": ...} or {\"type\": \"image_url\", ...}")
        rendered.append({"role": m["role"], "content": parts})
    if rendered[-1]["role"] != "user":
        raise _bad("the last message is not the user's", "end the conversation with a user message")
    if len(images) != 1:
        raise _bad(f"the request holds {len(images)} images; the served families take exactly one per request",
                   "send one image_url part (a data: URI) in the conversation")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
        raise _bad("stop is not a string or a list of at most 4 non-empty strings", "send e.g. \"stop\": [\"\\n\"]")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options is not an object", "send {\"include_usage\": true} or leave it out")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        model=model, conversation=Conversation(rendered), image=load_image_url(images[0], limits),
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int, 1, 1 << 20),
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        seed=_number(body, "seed", None, int, 0, 2**63 - 1),
        stop=stop, stream=bool(body.get("stream", False)), include_usage=bool(stream_options.get("include_usage")),
        keep=_number(body, "keep", None, float, 0.0, 1.0), ignore_eos=bool(body.get("ignore_eos", False)))


def load_image_url(url: str, limits: Limits) -> Image.Image:
    """A ``data:`` URI, or ``file://`` / a path under one of ``--allow-image-dir``; the image is decoded and bounded."""
    match = _DATA_URI.match(url[:512])
    if match:
        if not match.group("b64"):
            raise _bad("the image data URI is not base64", "send data:image/png;base64,...")
        payload = url[match.end():]
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise _bad(f"the image is larger than {limits.max_image_bytes} bytes", "send a smaller image")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("the image data URI is not valid base64", "encode the image bytes with base64") from None
        return _decode(raw, limits)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise _bad("remote image URLs are not fetched by this server", "send the image as a data: URI")
    if scheme not in ("", "file"):
        raise _bad(f"image URL scheme {scheme!r} is not served", "send the image as a data: URI")
    if not limits.image_dirs:
        raise _bad("image files are not served (no --allow-image-dir)", "send the image as a data: URI")
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):
        raise _bad("the image path cannot be resolved", "send a path under --allow-image-dir") from None
    if not any(real.is_relative_to(d) for d in limits.image_dirs):
        raise _bad("the image path is outside every --allow-image-dir", "send a file under an allowed folder")
    try:
        size = real.stat().st_size
        if size > limits.max_image_bytes:
            raise _bad(f"the image file is larger than {limits.max_image_bytes} bytes", "send a smaller image")
        raw = real.read_bytes()
    except OSError as exc:
        raise _bad(f"cannot read the image file: {exc.strerror}", "send a readable file under --allow-image-dir") from None
    return _decode(raw, limits)


def _decode(raw: bytes, limits: Limits) -> Image.Image:
    if len(raw) > limits.max_image_bytes:
        raise _bad(f"the image is larger than {limits.max_image_bytes} bytes", "send a smaller image")
    try:
        image = Image.open(io.BytesIO(raw))
        w, h = image.size  # read from the header, before any pixel is decoded
        if w * h > limits.max_image_pixels:
            raise _bad(f"the image has {w}x{h} pixels, more than {limits.max_image_pixels}", "send a smaller image")
        image.load()
        return image.convert("RGB")
    except VlmpruneError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _bad(f"the image cannot be decoded: {str(exc)[:120]}", "send a PNG, JPEG or WebP image") from None


class StopMatcher:
    """The text released to the client, cut at the first stop string; text that may begin a stop string is held
    back until it cannot."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self.flush()
        safe = len(self.text) - self.hold if self.stops else len(self.text)
        out = self.text[self.sent:max(self.sent, safe)]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
