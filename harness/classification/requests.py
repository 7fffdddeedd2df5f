"""Request bodies shared by the classification tasks: chat-templated, or the reference's raw prompts.

- `chat`: OpenAI chat messages (image part, then the text; `text_first` for the reference API order);
  the server applies the model's own chat template.
- `raw`: the reference's raw prompt string (templates.toml). With an image it goes to
  /chat/completions with that string as the request's `chat_template` (vLLM renders exactly it and
  still receives the image; start vLLM with `--trust-request-chat-template`); without an image it goes
  to /completions as a plain prompt (BOS added by the server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from harness.backends.http import RetryableError
from harness.backends.images import ImagePayload
from harness.classification.prompts import RawTemplate, raw_chat_template, strip_image

RequestKind = Literal["chat", "raw"]


@dataclass(frozen=True)
class Style:
    model: str
    request: RequestKind = "chat"
    template: RawTemplate | None = None
    text_first: bool = False
    max_tokens: int | None = 64  # None: not sent (the provider's default), as the reference's API calls
    temperature: float | None = 0.0  # None: not sent
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.request == "raw" and self.template is None:
            raise ValueError("raw requests need a raw template (--template)")


def image_part(image: ImagePayload) -> dict:
    return {"type": "image_url", "image_url": {"url": image.url}, "uuid": image.uuid}


def user_message(text: str, image: ImagePayload | None, text_first: bool = False) -> dict:
    if image is None:
        return {"role": "user", "content": [{"type": "text", "text": text}]}
    parts = [image_part(image), {"type": "text", "text": text}]
    return {"role": "user", "content": parts[::-1] if text_first else parts}


def _sampling(style: Style, body: dict) -> dict:
    body["model"] = style.model
    if style.max_tokens is not None:
        body["max_tokens"] = style.max_tokens
    if style.temperature is not None:
        body["temperature"] = style.temperature
    if style.seed is not None:
        body["seed"] = style.seed
    return body


def generation_request(style: Style, question: str, image: ImagePayload | None, *, cot: bool,
                       cot_sentence: str) -> tuple[str, dict, str | None]:
    """(path, body, raw prompt or None) of a generation question."""
    if style.request == "chat":
        text = f"{question} {cot_sentence}" if cot else question
        return "/chat/completions", _sampling(style, {"messages": [user_message(text, image, style.text_first)]}), None
    assert style.template is not None
    prompt = style.template.render(question, cot=cot)
    if image is None:
        return "/completions", _sampling(style, {"prompt": strip_image(prompt)}), prompt
    body = {"messages": [user_message(question, image, style.text_first)], "chat_template": raw_chat_template(prompt),
            "add_generation_prompt": False}
    return "/chat/completions", _sampling(style, body), prompt


def completion_text(resp: dict) -> str:
    """The generated text of a chat or completions reply (raises RetryableError when malformed)."""
    try:
        choice = resp["choices"][0]
        if "message" in choice:
            text = choice["message"].get("content")
        else:
            text = choice["text"]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RetryableError("malformed response (no choices[0])") from None
    return text or ""


def usage_tokens(resp: dict) -> list[int]:
    u = resp.get("usage") or {}
    return [u.get("prompt_tokens", 0) or 0, u.get("completion_tokens", 0) or 0]
