"""lm-evaluation-harness adapter: the registered model `ess` (optional extra `lm_eval`).

    python -m ess.lm_eval_adapter --model ess --model_args pretrained=RUN --tasks mmlu ...

runs the harness's own command line with `ess` registered (the harness does not discover models
of other packages); from Python, `import ess.lm_eval_adapter` and pass `model="ess"` to
`lm_eval.simple_evaluate`. `pretrained` is anything `--model` of the other commands takes: an ESS
checkpoint or run folder, a baseline run folder, or a base LM, the last two run plain. The other
model arguments are the policy's (`ess.generation.policy.POLICY_FLAGS`: `schedule`, `reliance`,
`tau`, `min_window`, `threshold`, `response_threshold`, `hold_back`, `defer_below`) and `batch_size`.

A harness context is the query exactly as the model reads it (with `--apply_chat_template` the
harness renders it with the model's template first). Log-likelihoods are those of the model as it
generates: [CLS] first judges the context, the continuation is fed as response text that reads
[CLS], and [CLS] is re-evaluated over the continuation on the policy's schedule and spans, so that
later tokens read the newer verdicts, as in guarded generation. Where guarded generation would
intervene, scoring goes on over the given continuation (nothing is inserted) and [CLS] keeps its
last verdict. `generate_until` runs the guarded loop itself, interventions included, and cuts the
answer at the first stop string.
"""

from __future__ import annotations

import typing

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .data.encoding import ChatEncoder
from .generation import Policy, Request, Sampling, generate, load_model
from .generation.engines import CachedEngine
from .generation.policy import POLICY_FLAGS, RowPolicy, validate
from .model import find_checkpoint
from .options import strip_none


@register_model("ess")
class ESSLM(TemplateLM):
    """An ESS model (or a plain one) behind the harness's `loglikelihood`, `loglikelihood_rolling`
    and `generate_until`."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        **policy_fields,
    ):
        super().__init__()
        hints = typing.get_type_hints(Policy)
        kinds = {name: strip_none(hints[name]) for name in POLICY_FLAGS}
        unknown = sorted(set(policy_fields) - set(kinds))
        if unknown:
            raise ValueError(f"ess: unknown model_args {unknown}; expected pretrained, batch_size or {sorted(kinds)}")
        self.model = load_model(str(pretrained))
        if device:
            self.model.to(device)
        self.plain = find_checkpoint(str(pretrained)) is None
        policy = Policy(**{name: kinds[name](value) for name, value in policy_fields.items()})
        self.policy = validate(Policy(schedule="none") if self.plain else policy)
        self.encoder = ChatEncoder.for_model(self.model)
        self.tokenizer = self.model.tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.pretrained = str(pretrained)

    # ---- what the harness asks of a TemplateLM ------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return getattr(self.model.base_lm.config, "max_position_embeddings", None) or 2048

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of text; a literal "[CLS]" in it never becomes the [CLS] token."""
        return self.encoder.tokenize(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ---- scoring -------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p of the continuation, whether greedy decoding picks every token) per request."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="ess loglikelihood"):
            chunk = order[start : start + self.batch_size]
            scores = self._score([requests[i][1] for i in chunk], [requests[i][2] for i in chunk])
            for index, score in zip(chunk, scores):
                results[index] = score
                if requests[index][0][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
        return results

    @torch.no_grad()
    def _score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """One batch, fed as the generator feeds it: the context as the query, then the
        continuation token by token, [CLS] re-evaluated where the policy says so."""
        room = self.max_length - 1  # [CLS] takes one position
        queries = [ctx[-max(1, room - len(cont)) :] for ctx, cont in zip(contexts, continuations)]
        config = self.model.config
        policies = [RowPolicy(self.policy, config.threshold, config.response_threshold) for _ in queries]
        longest = max(len(cont) for cont in continuations)
        engine = CachedEngine(self.model, queries, [p.plain for p in policies], longest)
        logits, first = engine.start()
        for policy, p in zip(policies, first.tolist()):
            if not policy.plain:
                policy.first_verdict(p)
        totals = [0.0] * len(queries)
        greedy = [True] * len(queries)
        for j in range(longest):
            logprobs = logits.float().log_softmax(-1)
            tokens: list[int | None] = []
            for row, cont in enumerate(continuations):
                if j < len(cont):
                    totals[row] += float(logprobs[row, cont[j]])
                    greedy[row] &= int(logprobs[row].argmax()) == cont[j]
                tokens.append(cont[j] if j < len(cont) - 1 else None)
            if all(t is None for t in tokens):
                break
            n = j + 1
            spans = [
                p.span(n) if t is not None and not p.plain and p.wants_reevaluation(n) else None
                for p, t in zip(policies, tokens)
            ]
            logits, ps = engine.step(tokens, spans)
            for policy, p in zip(policies, ps):
                if p is not None:
                    policy.observe(p, n)
        return list(zip(totals, greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of the model's context (the first window's
        query is the end-of-text token, the later ones' the tokens before them)."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            pieces = get_rolling_token_windows(
                self.tok_encode(request.args[0]), self.prefix_token_id, self.max_length - 1, context_len=1
            )
            for context, continuation in map(make_disjoint_window, pieces):
                windows.append(((None, None), context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # ---- generation ----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Guarded generation of each context, cut at the first of its stop strings."""
        eot = self.tok_decode([self.eot_token_id])
        batch, stops = [], []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or [eot]
            stops.append([until] if isinstance(until, str) else list(until))
            sample = kwargs.get("do_sample", False) and kwargs.get("temperature", 1.0) > 0
            sampling = Sampling(
                max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                top_k=int(kwargs.get("top_k", 0) or 0),
            )
            batch.append(Request(messages=[], query=context, sampling=sampling, policy=self.policy))
        generations = generate(self.model, batch, batch_size=self.batch_size, progress=not disable_tqdm)
        answers = []
        for request, generation, until in zip(requests, generations, stops):
            text = generation.text
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            answers.append(text)
        return answers


def main() -> None:
    """The harness's command line with the `ess` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
