"""Log-likelihood classification, scored server-side by vLLM.

For each image the prompt is the question plus a prefilled answer prefix ("The photo features a")
and each class name is teacher-forced after it: the score of a class is built from the log-probs of
its tokens, the tokens that follow the prefix's tokens in prefix + " " + class (the reference's rule,
without a second tokenisation). Two server-side methods, both exact:

- `trie` (default): the class names' tokens form a trie; one request per trie node (the prefix, then
  the prefix followed by each shared token prefix of the names) asks for one generated token with
  `logprob_token_ids` = the node's children, so every class token's log-prob comes from a node
  request. The requests carry no `prompt_logprobs`, so vLLM's prefix cache serves the image and the
  prefix: each node request prefills only its few new tokens. The trie is planned once per run from
  the server's /tokenize and /detokenize (text only, no forward); each node's prompt tokens are checked
  against the plan (prefix ids + node ids) on every image.
- `prompt-logprobs`: one request per class with `prompt_logprobs` on prefix + class. Simple and
  portable, but vLLM skips *reading* the prefix cache for any request that asks for prompt log-probs
  (SamplingParams.skip_reading_prefix_cache), so every class request prefills the whole prompt (the
  image encoder output is still reused from the multimodal cache).

Classes whose tokens do not start with the prefix's tokens (a merge across the boundary) are
`misaligned`: the trie method scores them with prompt log-probs, the tokens after the longest common
prefix. Scores (`score_run`): sum and mean of the class tokens' log-probs, top-1 / top-5; the
reference's transductive calibration (a S + (1-a) mean over the run's images of S, a = 0..8; a = 1 is
the plain score) and the paper's image-free prior (a S + (1-a) S(no image)), for sum and mean.
Requests are chat requests with `continue_final_message` (the model's chat template), or with the
reference's raw prompt as the request's `chat_template` (`raw`; the image-free prior then uses the raw
prompt with the image placeholder removed).

Result lines follow the shared schema (DESIGN.md section 4): qid, item, level (null), truth (the label),
choices (null: every class is scored), letter (null), prediction (the class with the highest mean
log-prob), raw (null), error; plus line, label, lp (per class, its tokens' log-probs), prefix_tokens,
requests, and misaligned / tokens_differ when any. The image-free prior is the line with qid "prior".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.backends.http import FatalError, RetryableError, RetryPolicy
from harness.classification.prompts import ASSISTANT_SLOT, RawTemplate, raw_chat_template, strip_image
from harness.classification.requests import user_message
from harness.engine.core import Group, GroupError, Unit
from harness.engine.fanout import with_retries

PRIOR_QID = "prior"
Method = Literal["trie", "prompt-logprobs"]


@dataclass(frozen=True)
class LoglikStyle:
    model: str
    question: str
    prefix: str
    request: str = "chat"  # chat | raw
    template: RawTemplate | None = None
    text_first: bool = False

    def messages(self, image, answer: str) -> list[dict]:
        return [user_message(self.question, image, self.text_first), {"role": "assistant", "content": answer}]

    def chat_fields(self, image_present: bool) -> dict:
        d: dict = {"continue_final_message": True, "add_generation_prompt": False}
        if self.request == "raw" and self.template is not None:
            t = self.template.loglik_prompt(self.question, ASSISTANT_SLOT)
            d["chat_template"] = raw_chat_template(t if image_present else strip_image(t))
        return d


@dataclass(frozen=True)
class Answer:
    ids: tuple[int, ...]  # the class's token ids
    lp: tuple[float, ...]  # their log-probs
    aligned: bool


def _prompt_fields(resp: dict) -> tuple[list[int] | None, list | None]:
    """(prompt_token_ids, prompt_logprobs) of a chat reply (top level) or a completions reply (choice)."""
    ids, plp = resp.get("prompt_token_ids"), resp.get("prompt_logprobs")
    ch = (resp.get("choices") or [{}])[0] if isinstance(resp.get("choices"), list) else {}
    if ids is None and isinstance(ch, dict):
        ids = ch.get("prompt_token_ids")
    if plp is None and isinstance(ch, dict):
        plp = ch.get("prompt_logprobs")
    return ids, plp


def class_logprobs(prefix_ids: Sequence[int], ids: Sequence[int], plp: Sequence) -> Answer:
    """The class tokens (prompt tokens after the prefix) and their log-probs."""
    p = len(prefix_ids)
    aligned = list(ids[:p]) == list(prefix_ids)
    if not aligned:
        p = 0
        while p < min(len(ids), len(prefix_ids)) and ids[p] == prefix_ids[p]:
            p += 1
    if p >= len(ids):
        raise RetryableError("malformed response: no tokens after the prefix")
    out = []
    for j in range(p, len(ids)):
        entry = plp[j]
        if not isinstance(entry, dict):
            raise RetryableError(f"malformed prompt_logprobs at position {j}")
        v = entry.get(str(ids[j]))
        if v is None:
            raise RetryableError(f"prompt_logprobs at position {j} lacks the prompt token {ids[j]}")
        out.append(float(v["logprob"] if isinstance(v, dict) else v))
    return Answer(tuple(ids[p:]), tuple(out), aligned)


def token_logprobs(resp: dict) -> dict[int, float]:
    """{token id: log-prob} of the one generated position (top_logprobs with return_tokens_as_token_ids)."""
    try:
        content = resp["choices"][0]["logprobs"]["content"]
        first = content[0]
    except (KeyError, IndexError, TypeError):
        raise FatalError("the endpoint returned no logprobs for the generated token: the trie method needs "
                         "vLLM's `logprob_token_ids`; use --method prompt-logprobs") from None
    out: dict[int, float] = {}
    for t in [first, *(first.get("top_logprobs") or [])]:
        tok = str(t.get("token", ""))
        if tok.startswith("token_id:"):
            out[int(tok[len("token_id:"):])] = float(t["logprob"])
    return out


@dataclass
class TriePlan:
    """The class names' token trie, planned once per run (text-only tokenisation)."""

    prefix_ids: list[int]
    class_ids: list[tuple[int, ...]]
    nodes: list[tuple[int, ...]]  # root () first, then every proper prefix of a class's tokens
    children: dict[tuple[int, ...], list[int]]
    suffix: dict[tuple[int, ...], str]  # text after the answer prefix that tokenises to the node
    fallback: list[int] = field(default_factory=list)  # classes scored with prompt log-probs

    @classmethod
    def build(cls, prefix_ids: list[int], full_ids: Sequence[Sequence[int]]) -> TriePlan:
        p = len(prefix_ids)
        class_ids: list[tuple[int, ...]] = []
        fallback = []
        for c, ids in enumerate(full_ids):
            if list(ids[:p]) != prefix_ids or len(ids) <= p:
                fallback.append(c)
                class_ids.append(())
            else:
                class_ids.append(tuple(ids[p:]))
        children: dict[tuple[int, ...], set[int]] = {}
        for c, ids in enumerate(class_ids):
            if c in fallback:
                continue
            for d in range(len(ids)):
                children.setdefault(ids[:d], set()).add(ids[d])
        nodes = [()] + sorted((n for n in children if n), key=lambda n: (len(n), n))
        return cls(prefix_ids, class_ids, nodes, {n: sorted(v) for n, v in children.items()}, {}, fallback)


class LoglikTask:
    """Engine task: per image (or the image-free prior) a head request on the prefix, then the trie nodes
    (method `trie`) or one request per class (`prompt-logprobs`)."""

    def __init__(self, style: LoglikStyle, classes: Sequence[str], method: Method = "trie"):
        self.style = style
        self.classes = list(classes)
        self.method = method
        self.plan: TriePlan | None = None
        self.class_ids: list[tuple[int, ...] | None] = [None] * len(self.classes)

    # ------------------------------------------------------------------ planning (trie)
    async def prepare(self, backend, retry: RetryPolicy | None = None) -> None:
        """Tokenise prefix and prefix + class (text only) and find each trie node's text, via the server
        (`backend.post_root`: vLLM's /tokenize and /detokenize, retried like every engine request)."""
        if self.method != "trie":
            return
        import asyncio

        s = self.style

        async def post_root(path: str, body: dict) -> dict:
            try:
                return await with_retries(lambda: backend.post_root(path, body), retry or RetryPolicy())
            except RetryableError as e:
                raise FatalError(f"{path}: gave up after retries: {e.reason}") from None

        async def tok(answer: str) -> list[int]:
            body = {"model": s.model, "messages": s.messages(None, answer)} | s.chat_fields(False)
            return list((await post_root("/tokenize", body))["tokens"])

        async def detok(ids: Sequence[int]) -> str:
            return str((await post_root("/detokenize", {"model": s.model, "tokens": list(ids)}))["prompt"])

        sem = asyncio.Semaphore(32)

        async def bounded(coro):
            async with sem:
                return await coro

        try:
            prefix_ids = await tok(s.prefix)
        except FatalError as e:
            if "HTTP 404" in str(e):
                raise FatalError("the endpoint has no /tokenize: the trie method needs vLLM's /tokenize and "
                                 "/detokenize (or use --method prompt-logprobs, which needs vLLM too)") from None
            raise
        full = await asyncio.gather(*(bounded(tok(f"{s.prefix} {c}")) for c in self.classes))
        plan = TriePlan.build(prefix_ids, full)
        base = await detok(prefix_ids)
        texts = await asyncio.gather(*(bounded(detok(prefix_ids + list(n))) for n in plan.nodes[1:]))
        plan.suffix[()] = ""
        bad: set[tuple[int, ...]] = set()
        for n, t in zip(plan.nodes[1:], texts):
            if t.startswith(base):
                plan.suffix[n] = t[len(base):]
            else:
                bad.add(n)
        if bad:  # a node whose text cannot be recovered: its classes fall back to prompt log-probs
            for c, ids in enumerate(plan.class_ids):
                if c not in plan.fallback and any(ids[:d] in bad for d in range(1, len(ids))):
                    plan.fallback.append(c)
        self.plan = plan

    # ------------------------------------------------------------------ groups and requests
    def _n(self) -> int:
        if self.method == "trie":
            if self.plan is None:
                raise RuntimeError("LoglikTask.prepare() must run before the trie method's groups are made")
            return len(self.plan.nodes) + len(self.plan.fallback)
        return 1 + len(self.classes)

    def unit(self, qid: str, image: str | None, data: dict) -> Unit:
        """One image (None: the image-free prior) and its group: the head request, then the rest."""
        return Unit(image, [Group(qid, self._n(), data, head=True)], key=data.get("item"))

    def _kind(self, i: int) -> tuple[str, Any]:
        """("head", None) | ("node", node ids) | ("class", class index) of request i."""
        if i == 0:
            return "head", None
        if self.method == "trie":
            assert self.plan is not None
            nn = len(self.plan.nodes)
            if i < nn:
                return "node", self.plan.nodes[i]
            return "class", self.plan.fallback[i - nn]
        return "class", i - 1

    def request(self, group: Group, i: int, image) -> tuple[str, dict]:
        s = self.style
        kind, what = self._kind(i)
        body: dict = {"model": s.model, "max_tokens": 1, "temperature": 0.0, "return_token_ids": True}
        if kind == "class":
            answer = f"{s.prefix} {self.classes[what]}"
            body["prompt_logprobs"] = 0
        else:
            answer = s.prefix
            if self.method == "trie":
                assert self.plan is not None
                node = () if kind == "head" else what
                answer = s.prefix + self.plan.suffix[node]
                if self.plan.children.get(node):
                    body.update(logprobs=True, logprob_token_ids=self.plan.children[node],
                                return_tokens_as_token_ids=True)
        body["messages"] = s.messages(image, answer)
        body.update(s.chat_fields(image is not None))
        return "/chat/completions", body

    def interpret(self, group: Group, i: int, resp: dict, head: Any) -> Any:
        ids, plp = _prompt_fields(resp)
        if ids is None:
            raise FatalError("log-likelihood scoring needs vLLM: the endpoint returned no prompt_token_ids "
                             "(`return_token_ids`, `prompt_logprobs` / `logprob_token_ids`)")
        kind, what = self._kind(i)
        if self.method == "trie" and head is not None:
            head = head[0]  # the head's answer is (prompt ids, root log-probs)
        if kind == "class":
            if plp is None:
                raise FatalError("log-likelihood scoring needs vLLM: the endpoint returned no prompt_logprobs")
            return class_logprobs(head, ids, plp)
        if self.method != "trie":
            return list(ids)
        assert self.plan is not None
        node = () if kind == "head" else what
        if kind == "node" and list(ids) != list(head) + list(node):
            raise GroupError(f"token alignment: the prompt of trie node {list(node)} tokenised as "
                             f"{list(ids[len(head):])} after the prefix (use --method prompt-logprobs)")
        lps = token_logprobs(resp) if self.plan.children.get(node) else {}
        missing = [t for t in self.plan.children.get(node, ()) if t not in lps]
        if missing:
            raise FatalError(f"the endpoint did not return log-probs for requested tokens {missing[:5]}: "
                             "`logprob_token_ids` unsupported? use --method prompt-logprobs")
        return (list(ids), lps) if kind == "head" else lps

    # ------------------------------------------------------------------ result lines
    def _answers(self, answers: list) -> list[Answer]:
        if self.method != "trie":
            return answers[1:]
        assert self.plan is not None
        _, root_lps = answers[0]
        node_lps = {(): root_lps}
        for i in range(1, len(self.plan.nodes)):
            node_lps[self.plan.nodes[i]] = answers[i]
        by_fallback = {c: answers[len(self.plan.nodes) + j] for j, c in enumerate(self.plan.fallback)}
        out = []
        for c, ids in enumerate(self.plan.class_ids):
            if c in by_fallback:
                out.append(by_fallback[c])
            else:
                out.append(Answer(ids, tuple(node_lps[ids[:d]][ids[d]] for d in range(len(ids))), True))
        return out

    def record(self, group: Group, answers: list) -> dict:
        head = answers[0][0] if self.method == "trie" else answers[0]
        lp, misaligned, changed = [], [], []
        for c, a in enumerate(self._answers(answers)):
            lp.append(list(a.lp))
            if not a.aligned:
                misaligned.append(c)
            if self.class_ids[c] is None:
                self.class_ids[c] = a.ids
            elif self.class_ids[c] != a.ids:
                changed.append(c)
        pred = None
        if group.qid != PRIOR_QID and lp:
            means = [sum(t) / len(t) if t else float("-inf") for t in lp]
            pred = self.classes[max(range(len(means)), key=lambda c: (means[c], -c))]  # ties: the lower index
        rec = self._base(group) | {"prediction": pred, "prefix_tokens": len(head), "requests": group.n, "lp": lp,
                                   "error": None}
        if misaligned:
            rec["misaligned"] = misaligned
        if changed:
            rec["tokens_differ"] = changed  # class tokens differ from the first image's: context-dependent
        return rec

    def _base(self, group: Group) -> dict:
        d = group.data
        return {"qid": group.qid, "item": d.get("item"), "level": None, "truth": d.get("label"), "choices": None,
                "letter": None, "raw": None} | dict(d)

    def error_record(self, group: Group, error: str) -> dict:
        return self._base(group) | {"prediction": None, "lp": None, "error": error}


# ---------------------------------------------------------------- scoring

def _topk_hits(scores, labels, k: int):
    import numpy as np

    # stable: ties go to the lower class index (the reference's argsort order was unspecified)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top1 = order[:, 0] == labels
    topk = (order == labels[:, None]).any(axis=1)
    return float(top1.mean() * 100), float(topk.mean() * 100)


def score_run(records: Iterable[dict], classes: Sequence[str], alphas: Sequence[float] = tuple(range(9)),
              *, reference_classes: Sequence[str] | None = None) -> dict:
    """Top-1 / top-5 of sum and mean scores, the transductive calibration sweep and the image-free prior
    sweep. Streams the records: only two floats per image and class are kept.

    `classes` are the unique class names the run scored. Duplicate names (ImageNet lists `missile` and
    `sunglasses` twice) are one candidate, so an image of either class is right when that name wins
    (robust). `reference_classes` (the full class list, duplicates included) reproduces the reference
    instead: every list entry is a candidate (a duplicate gets its name's score twice), an image's label
    maps to the *last* index of its name (`{c: i for i, c in enumerate(classes)}`) while equal scores
    rank the lower index first, so images of a duplicated class are never top-1 correct."""
    import numpy as np

    pos = {c: i for i, c in enumerate(classes)}
    prior = None
    S_rows, M_rows, labels = [], [], []
    n_err = misaligned = differ = 0
    n_tok: list[int] | None = None
    n_req: list[int] = []
    for r in records:
        lp = r.get("lp")
        if lp is None:
            n_err += 1
            continue
        if len(lp) != len(classes):
            raise ValueError(f"result {r.get('qid')!r} holds {len(lp)} class scores, the class list has {len(classes)}")
        if r.get("qid") == PRIOR_QID:
            prior = lp
            continue
        if r["label"] not in pos:
            raise ValueError(f"result {r.get('qid')!r}: label {r['label']!r} is not in the class list")
        S_rows.append(np.fromiter((sum(t) for t in lp), float, len(lp)))
        M_rows.append(np.fromiter((sum(t) / len(t) for t in lp), float, len(lp)))
        labels.append(pos[r["label"]])
        if "requests" in r:
            n_req.append(r["requests"])
        misaligned += len(r.get("misaligned", ()))
        differ += len(r.get("tokens_differ", ()))
        if n_tok is None:
            n_tok = [len(t) for t in lp]
    out: dict = {"n": len(labels), "n_errors": n_err, "n_classes": len(classes), "prior": prior is not None}
    if not labels:
        return out
    y = np.array(labels)
    cols = None
    if reference_classes is not None:  # the reference's candidate list, duplicates and all
        missing = sorted(set(reference_classes) - set(pos))
        if missing:
            raise ValueError(f"reference class list has names the run did not score: {missing[:5]}")
        cols = np.array([pos[c] for c in reference_classes])
        last = {c: i for i, c in enumerate(reference_classes)}
        y = np.array([last[classes[k]] for k in labels])
        out["n_candidates"] = len(reference_classes)
    for name, X in (("sum", np.vstack(S_rows)), ("mean", np.vstack(M_rows))):
        if cols is not None:
            X = X[:, cols]
        t1, t5 = _topk_hits(X, y, 5)
        out[name] = {"top1": t1, "top5": t5}
        cal = X.mean(axis=0)  # per class, mean over the run's images (the reference's transductive prior)
        out[f"{name}_calibrated"] = {_a(a): dict(zip(("top1", "top5"), _topk_hits(a * X + (1 - a) * cal, y, 5)))
                                     for a in alphas}
        if prior is not None:
            P = np.array([sum(t) if name == "sum" else sum(t) / len(t) for t in prior])
            if cols is not None:
                P = P[cols]
            out[f"{name}_prior"] = {_a(a): dict(zip(("top1", "top5"), _topk_hits(a * X + (1 - a) * P, y, 5)))
                                    for a in alphas}
    assert n_tok is not None
    out["class_tokens"] = {"total": int(sum(n_tok)), "mean": float(np.mean(n_tok)), "max": int(max(n_tok))}
    out["misaligned"] = misaligned
    out["tokens_differ"] = differ
    # per image: the reference ran one batch-1 forward per class token plus one for the prefix; here
    # one request per class (prefill of its few tokens; the prefix comes from vLLM's prefix cache)
    out["cost_per_image"] = {"reference_forwards": 1 + int(sum(n_tok)),
                             "requests": float(np.mean(n_req)) if n_req else 1 + len(classes)}
    return out


def per_class_top1(records: Iterable[dict], classes: Sequence[str]) -> dict[str, float]:
    """Per-class top-1 accuracy of the mean score (the reference's main log-likelihood score)."""
    import numpy as np

    from harness.classification.metrics import per_class_accuracy

    labels, hits = [], []
    for r in records:
        if r.get("qid") == PRIOR_QID or r.get("lp") is None:
            continue
        means = np.array([sum(t) / len(t) for t in r["lp"]])
        labels.append(r["label"])
        hits.append(classes[int(np.argmax(means))] == r["label"])
    return per_class_accuracy(labels, hits)


def _a(a: float) -> str:
    return str(int(a)) if float(a).is_integer() else str(a)
