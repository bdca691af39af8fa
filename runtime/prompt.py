"""Prompt building at the edge: the bundle's tokenizer (``tokenizers``) and chat template (jinja2, sandboxed)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from vlmprune.errors import VlmpruneError


def _template(source: str):
    # The same environment settings transformers uses for chat templates.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise VlmpruneError(f"chat template: {message}", "check the prompt")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class PromptBuilder:
    def __init__(self, folder: Path, prompt_spec: dict):
        self.spec = prompt_spec
        self.tokenizer = Tokenizer.from_file(str(folder / prompt_spec["tokenizer"]))
        self.image_token = prompt_spec["image_token"]
        self.image_token_id = int(prompt_spec["image_token_id"])
        self.template = _template(prompt_spec["chat_template"]) if prompt_spec.get("chat_template") else None

    def render(self, prompt: str) -> str:
        """The full prompt text with exactly one image placeholder.

        A prompt that already holds the placeholder keeps it where the user put it; otherwise the chat template
        puts the image where the model expects it."""
        count = prompt.count(self.image_token)
        if count > 1:
            raise VlmpruneError(f"the prompt holds {count} image placeholders {self.image_token!r}",
                                "vlmprune takes one image per prompt; keep at most one placeholder")
        if self.template is None:
            return prompt if count else f"{self.image_token}\n{prompt}"
        if count:
            content = [{"type": "text", "text": prompt}]
        else:
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
        return self.template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(self.render(prompt), add_special_tokens=True).ids
        found = ids.count(self.image_token_id)
        if found != 1:
            raise VlmpruneError(f"the tokenized prompt holds {found} image tokens, expected 1",
                                "check the bundle's chat template and image token")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
