"""A gptlab run as an lm-evaluation-harness model (optional extra: `pip install gptlab[eval]`).

    import lm_eval
    import gptlab.evaluate.lm_eval_adapter  # registers the model name "gptlab"
    lm_eval.simple_evaluate(model="gptlab", model_args="run_dir=runs/shk,device=cpu", tasks=["lambada_openai"])

or `gptlab evaluate RUN_DIR --lm-eval TASK[,TASK] [--include-path DIR]`. Requests are encoded with lm-eval's
own pair encoding (TemplateLM) and scored by gptlab.evaluate.scoring — the same function gptlab's evaluator
uses — so both harnesses score the same tokens. loglikelihood_rolling uses lm-eval's disjoint windows by
default (`rolling_stride` = the context window); generate_until decodes with gptlab.generate (greedy unless
do_sample is set), stops at the `until` strings and the end-of-text token, and left-truncates a prompt to
leave room for `max_gen_toks` new tokens, as lm-eval's HF model does.
"""

from __future__ import annotations

from gptlab.errors import GptlabError


class MissingExtraError(GptlabError, ImportError):
    pass


try:
    import lm_eval  # noqa: F401
    import lm_eval.models  # noqa: F401  registers lm-eval's own model names first (its registry is lazy)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError(f"the lm-eval adapter needs lm-evaluation-harness ({e}): pip install gptlab[eval]") from None

import torch

from gptlab.evaluate.scoring import loglikelihood_rolling, score_pairs
from gptlab.runtime import INFER_DTYPES, canonical_dtype



class GptlabLM(TemplateLM):
    """model_args: run_dir (required unless model/tokenizer objects are passed), device (cpu), dtype
    (auto|float32|bfloat16|float16; unset: the weights'), batch_size (16), max_gen_toks (256), rolling_stride (context window), share_prefix."""

    def __init__(self, run_dir: str | None = None, device: str = "cpu", dtype: str | None = None,
                 batch_size: int | str = 16, max_batch_size: int | None = None, max_gen_toks: int = 256,
                 rolling_stride: int | None = None, share_prefix: bool = True, model=None, tokenizer=None, **kwargs):
        super().__init__()
        if dtype is not None:
            dtype = canonical_dtype(dtype, INFER_DTYPES)
        if model is None:
            if run_dir is None:
                raise GptlabError("the gptlab lm-eval model needs model_args=run_dir=PATH")
            from gptlab.run import load_run

            run = load_run(run_dir, device=device, dtype=dtype, rows=2048)
            model, tokenizer = run.model, run.tokenizer
        elif tokenizer is None:
            raise GptlabError("pass a tokenizer with the model")
        self.model, self.tok = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        try:
            self.batch_size = max(1, int(batch_size))
        except (TypeError, ValueError):  # "auto": a fixed default (gptlab batches are small on purpose)
            self.batch_size = 16
        self.max_gen_toks, self.rolling_stride, self.share_prefix = int(max_gen_toks), rolling_stride, share_prefix
        self._generator = None

    # --- the tokenizer side (TemplateLM) -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.block_size

    @property
    def tokenizer_name(self) -> str:
        return f"gptlab-{self.tok.kind}-{self.tok.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    # --- requests ----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None, **kwargs):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        scores = score_pairs(self.model, pairs, override_bs or self.batch_size, self.tok.vocab_size, self.share_prefix)
        out = []
        for (key, _, _), s in zip(requests, scores):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            s = loglikelihood_rolling(self.model, self.tok_encode(text), self.eot_token_id, self.rolling_stride,
                                      self.batch_size, self.tok.vocab_size)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), s.logprob)
            out.append(s.logprob)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from gptlab.generate import Generator, SamplingParams

        if self._generator is None:
            self._generator = Generator(self.model, self.tok)
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        args = [r.args for r in requests]
        for i, (_, kw) in enumerate(args):
            groups.setdefault(repr(sorted((kw or {}).items())), []).append(i)
        for idx in groups.values():
            kw = dict(args[idx[0]][1] or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0))
            p = SamplingParams(max_new_tokens=max_new, temperature=temperature if do_sample else 0.0,
                               top_k=int(kw.pop("top_k", 0) or 0), top_p=float(kw.pop("top_p", 1.0) or 1.0),
                               stop=tuple(until), seed=kw.pop("seed", None))
            keep = max(1, self.max_length - max_new)
            prompts = [self.tok_encode(args[i][0])[-keep:] or [self.eot_token_id] for i in idx]
            for b in range(0, len(idx), self.batch_size):
                comps = self._generator.generate(prompts[b:b + self.batch_size], p)
                for i, c in zip(idx[b:b + self.batch_size], comps):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", args[i], c.text)
        return out  # type: ignore[return-value]


if "gptlab" not in model_registry:  # a re-import keeps the first registration (the registry refuses a second)
    model_registry.register("gptlab")(GptlabLM)
