"""Prompt building at the edge: the bundle's tokenizer (``tokenizers``) and chat template (``template``: sandboxed
and bounded jinja2).

What the user types is text. The image placeholder is the one control token a user may write (it says where the
image goes); any other special token spelled in the prompt (``</s>``, ``<s>``, ``<pad>``, ...) is encoded as the
characters it is made of, never as the control token. Prompts without such strings are tokenized exactly as the
model's processor does (one pass over the rendered template).
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from vlmprune.errors import VlmpruneError

from .template import ChatTemplate

# Strings spelled like an image placeholder (<image>, <|image_pad|>, <|image|>, <img>, ...), whichever model uses them
_PLACEHOLDER_LIKE = re.compile(r"<\|?(?:image|img)[a-z_]*\|?>", re.IGNORECASE)
_SENTINEL = "\ue000vlmprune-user-text\ue001"  # private-use characters: never in a real template


def load_tokenizer(path: Path, what: str = "tokenizer") -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for unreadable JSON
        first = (str(exc).splitlines() or [""])[0][:160]
        raise VlmpruneError(f"cannot read the bundle's {what} {Path(path).name}: {first}", "re-export the bundle") from None


class Conversation(str):
    """A whole chat (``messages`` in the chat template's form: roles, and content as text or a list of ``text`` and
    ``image`` parts) passed where a prompt goes. As a string it is the last user message's text: what a text-guided
    pruning method reads. ``PromptBuilder`` renders every message through the bundle's chat template."""

    messages: list[dict]

    def __new__(cls, messages: list[dict]):
        users = [m for m in messages if m.get("role") == "user"]
        last = users[-1]["content"] if users else ""
        if not isinstance(last, str):
            last = " ".join(p.get("text", "") for p in last if p.get("type") == "text")
        self = super().__new__(cls, last)
        self.messages = messages
        return self

    def texts(self) -> list[str]:
        out = []
        for m in self.messages:
            c = m.get("content")
            out += [c] if isinstance(c, str) else [p.get("text", "") for p in c if p.get("type") == "text"]
        return out


class PromptBuilder:
    def __init__(self, tokenizer_path: Path, prompt_spec: dict):
        self.spec = prompt_spec
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.image_token = prompt_spec["image_token"]
        self.image_token_id = int(prompt_spec["image_token_id"])
        self.template = ChatTemplate(prompt_spec["chat_template"]) if prompt_spec.get("chat_template") else None
        added = self.tokenizer.get_added_tokens_decoder().values()
        self.control = sorted({t.content for t in added if t.special and t.content} - {self.image_token}, key=len)

    def _messages(self, text: str, count: int) -> str:
        content = [{"type": "text", "text": text}] if count else [{"type": "image"}, {"type": "text", "text": text}]
        return self.template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)

    def render(self, prompt: str) -> str:
        """The full prompt text with exactly one image placeholder.

        A prompt that already holds the placeholder keeps it where the user put it; otherwise the chat template
        puts the image where the model expects it."""
        if isinstance(prompt, Conversation):
            return self._conversation(prompt)
        _check_text(prompt)
        self._check_foreign_placeholder(prompt)
        count = prompt.count(self.image_token)
        if count > 1:
            raise VlmpruneError(f"the prompt holds {count} image placeholders {self.image_token!r}",
                                "vlmprune takes one image per prompt; keep at most one placeholder")
        if self.template is None:  # no template to say where the image goes, and none is invented
            if not count:
                raise VlmpruneError(f"the bundle has no chat template, so the prompt must hold the image placeholder "
                                    f"{self.image_token!r} where the image goes",
                                    f"write e.g. \"{self.image_token}\\n{prompt[:40]}\"")
            return prompt
        return self._messages(prompt, count)

    def _conversation(self, chat: Conversation) -> str:
        for text in chat.texts():
            _check_text(text)
            spelled = [c for c in self.control + [self.image_token] if c in text]
            if spelled:  # in a rendered chat the text cannot be told from the template: refused, never obeyed
                raise VlmpruneError(f"a message spells the control token {spelled[0]!r}",
                                    "remove it from the message text (images go in image parts)")
        if self.template is None:
            raise VlmpruneError("the bundle has no chat template, so a conversation cannot be rendered",
                                "send one user message holding the image placeholder")
        return self.template.render(messages=chat.messages, add_generation_prompt=True)

    def _check_foreign_placeholder(self, prompt: str) -> None:
        """Another model's image placeholder (``<image>`` in a bundle whose placeholder is ``<|image_pad|>``, or the
        reverse) would be read as plain text and the image put elsewhere, silently: say which one this bundle reads."""
        for found in dict.fromkeys(_PLACEHOLDER_LIKE.findall(prompt)):
            if found != self.image_token:
                raise VlmpruneError(
                    f"the prompt holds {found!r}, which this bundle reads as plain text: its image placeholder is "
                    f"{self.image_token!r}",
                    f"write {self.image_token!r} where the image goes, or leave the placeholder out (the chat "
                    "template then places the image)")

    def encode(self, prompt: str) -> list[int]:
        rendered = self.render(prompt)
        if not isinstance(prompt, Conversation) and any(c in prompt for c in self.control):
            ids = self._encode_with_literal_user_text(prompt, rendered)
        else:
            ids = self.tokenizer.encode(rendered, add_special_tokens=True).ids
        found = ids.count(self.image_token_id)
        if found != 1:
            raise VlmpruneError(f"the tokenized prompt holds {found} image tokens, expected 1",
                                "check the bundle's chat template and image token")
        return ids

    def _user_span(self, prompt: str, rendered: str) -> tuple[str, str]:
        """The rendered text before and after the user's text."""
        if self.template is not None:
            marked = self._messages(_SENTINEL, prompt.count(self.image_token))
            if marked.count(_SENTINEL) == 1:
                before, after = marked.split(_SENTINEL)
                if before + prompt + after == rendered:
                    return before, after
        if rendered.count(prompt) == 1:
            before, _, after = rendered.partition(prompt)
            return before, after
        raise VlmpruneError("the prompt spells a control token (e.g. </s>) and the chat template changes the "
                            "prompt's text, so it cannot be kept as plain text",
                            "remove the control token from the prompt")

    def _encode_with_literal_user_text(self, prompt: str, rendered: str) -> list[int]:
        before, after = self._user_span(prompt, rendered)
        parts = [self.tokenizer.encode(before, add_special_tokens=False)] if before else []
        pieces = prompt.split(self.image_token)
        if not hasattr(self.tokenizer, "encode_special_tokens"):  # tokenizers < 0.19
            raise VlmpruneError("the prompt spells a control token (e.g. </s>), which this tokenizers version "
                                "cannot keep as text", "remove it from the prompt, or pip install 'tokenizers>=0.19'")
        self.tokenizer.encode_special_tokens = True  # special tokens spelled in the text are split as text
        try:
            texts = [self.tokenizer.encode(p, add_special_tokens=False) if p else None for p in pieces]
        finally:
            self.tokenizer.encode_special_tokens = False
        image = self.tokenizer.encode(self.image_token, add_special_tokens=False)
        for i, enc in enumerate(texts):
            if i:
                parts.append(image)
            if enc is not None:
                parts.append(enc)
        if after:
            parts.append(self.tokenizer.encode(after, add_special_tokens=False))
        merged = Encoding.merge(parts or [self.tokenizer.encode("", add_special_tokens=False)], growing_offsets=True)
        return self.tokenizer.post_process(merged, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _check_text(prompt: str) -> None:
    if not isinstance(prompt, str):
        raise VlmpruneError("the prompt is not text", "pass a string")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: bytes that were not UTF-8 on the command line
        raise VlmpruneError(f"the prompt is not valid UTF-8 (at character {exc.start})",
                            "pass the prompt as UTF-8 text") from None
