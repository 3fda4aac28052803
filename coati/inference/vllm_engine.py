"""vLLM's continuous batching behind the server's engine interface (``inference/server.py --engine vllm``).

One background thread owns an in-process ``vllm.LLM`` engine and steps it: requests join the running batch at
the next step and leave it when they finish, so a long answer never holds back a short one (the HF engine runs
each batch to its end). vLLM's ``AsyncLLM`` would always start its engine core in a second process; the
thread keeps the engine in this one (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps even vLLM's core in-process, as
the tests run it on CPU).

vLLM only samples tokens here. EOS, length, stop strings, streamed text pieces and cancellation go through the
same per-row tracker as the HF engine (``coati.inference.generation.RowTracker``), so both engines return the
same text for the same tokens; vLLM's own defaults from the checkpoint's ``generation_config.json`` never
apply (``generation_config="vllm"``).
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from transformers import GenerationConfig, PreTrainedTokenizerBase

from coati.errors import UsageError
from coati.inference.engine import EngineBase, _Request
from coati.inference.generation import Row, RowTracker, SamplingParams, decode, eos_ids


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise UsageError("--engine vllm needs vLLM: pip install 'coati[vllm]'") from None
    return vllm


def vllm_sampling(p: SamplingParams, eos: Sequence[int]) -> Any:
    """vLLM's SamplingParams for one request, field for field what the HF engine's GenerationConfig sets.
    EOS is a stop token of ours (vLLM's own EOS from the checkpoint is ignored), dropped for ``ignore_eos``."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VSamplingParams(n=1, temperature=0.0 if p.greedy else p.temperature,
                           top_p=1.0 if p.greedy else p.top_p, top_k=0 if p.greedy else p.top_k,
                           repetition_penalty=p.repetition_penalty, max_tokens=p.max_new_tokens,
                           ignore_eos=True, stop_token_ids=[] if p.ignore_eos else list(eos), seed=p.seed,
                           detokenize=False, output_kind=RequestOutputKind.DELTA)


class VLLMServingEngine(EngineBase):
    """The server's engine on ``vllm.LLM(model_path)``, built and stepped by its own thread, which starts with it;
    `stop()` ends the thread.

    ``max_num_seqs`` caps the requests stepped together; ``llm_kwargs`` go to ``vllm.LLM`` (``max_model_len``,
    ``gpu_memory_utilization``, ``enforce_eager`` ...). `stats.batches` counts engine steps and
    `stats.max_batch` the most requests one step ran."""

    _thread_name = "coati-vllm-engine"

    def __init__(self, model_path: str | Path, tokenizer: PreTrainedTokenizerBase, *, dtype: str = "auto",
                 max_num_seqs: int = 8, seed: int = 0, **llm_kwargs: Any) -> None:
        super().__init__()
        vllm = import_vllm()
        self._tokenizer = tokenizer
        try:
            generation_config = GenerationConfig.from_pretrained(str(model_path))
        except OSError:  # no generation_config.json: the model config's EOS, as transformers derives it
            from transformers import AutoConfig

            generation_config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(
                str(model_path), trust_remote_code=llm_kwargs.get("trust_remote_code", False)))
        self.eos_ids = eos_ids(generation_config, tokenizer)
        # the HF engine's per-row rules, fed one request's tokens at a time (rows live on the requests)
        self.tracker = RowTracker([], self.eos_ids, lambda ids: decode(tokenizer, ids))
        self._ids = itertools.count()
        self._live: dict[str, _Request] = {}
        # the worker thread builds vLLM's engine and steps it: on CPU vLLM sets up OpenMP for the thread that builds
        # it, and its attention kernels refuse to run on a thread with another OpenMP thread count
        self._build = lambda: vllm.LLM(model=str(model_path), skip_tokenizer_init=True, generation_config="vllm",
                                       dtype=dtype, seed=seed, max_num_seqs=max_num_seqs, **llm_kwargs)
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_config.max_model_len)

    def _loop(self) -> None:
        try:
            self.llm = self._build()
            self.engine = self.llm.llm_engine
        except BaseException as err:  # noqa: BLE001 - raised again by __init__, in the caller's thread
            self._build_error = err
            return
        finally:
            self._ready.set()
        super()._loop()

    def _step(self) -> bool:
        """Admits new requests, drops those whose caller left, runs one engine step; False once stopped."""
        with self._cond:
            if not self._await_work(holding=bool(self._live)):
                return False
            new, self._pending = list(self._pending), deque()
            self.stats.queued = 0
        for req in new:
            self._admit(req)
        for rid, req in list(self._live.items()):
            if req.cancel.is_set():
                self._finish(rid, abort=True)
        if not self._live:
            return True
        self.stats.batches += 1
        self.stats.max_batch = max(self.stats.max_batch, len(self._live))
        outputs = self.engine.step()  # an error here reaches every caller (EngineBase._loop)
        for out in outputs:
            req = self._live.get(out.request_id)
            if req is None:
                continue
            try:
                for tok in out.outputs[0].token_ids:
                    self.tracker.add(req.row, tok)
            except Exception as err:  # noqa: BLE001 - this request's error: the others run on
                self._fail(out.request_id, err)
                continue
            if req.row.done or out.finished:
                self._finish(out.request_id, abort=not out.finished)
        return True

    def _admit(self, req: _Request) -> None:
        if req.cancel.is_set():  # the caller left while its request waited
            self._done(0, cancelled=True)
            return
        try:
            req.row = Row(req.params, len(req.prompt), req.reply if req.stream else None, req.cancel)
            rid = str(next(self._ids))
            self.engine.add_request(rid, {"prompt_token_ids": list(req.prompt)},
                                    vllm_sampling(req.params, self.eos_ids))
        except Exception as err:  # noqa: BLE001 - handed to the caller
            self._done(0)
            req.reply(err)
            return
        self.stats.requests += 1
        self._live[rid] = req

    def _finish(self, rid: str, abort: bool) -> None:
        """Ends a live request with its completion (or with the error that ending it raised)."""
        req = self._live[rid]
        try:
            if abort:
                self.engine.abort_request([rid])
            out = self.tracker.completion(req.row)
        except Exception as err:  # noqa: BLE001 - handed to the caller
            self._fail(rid, err)
            return
        del self._live[rid]
        self._done(out.completion_tokens, cancelled=out.finish_reason == "cancelled")
        req.reply(out)

    def _fail(self, rid: str, err: BaseException) -> None:
        """Ends a live request with ``err``, vLLM dropping it too."""
        req = self._live.pop(rid)
        try:
            self.engine.abort_request([rid])
        except Exception:  # noqa: BLE001 - the engine that failed may refuse this too; the caller gets `err`
            pass
        self._done(0)
        req.reply(err)

    def _fail_all(self, err: BaseException) -> None:
        for rid in list(self._live):
            self._fail(rid, err)
        super()._fail_all(err)

    def _done(self, tokens: int, cancelled: bool = False) -> None:
        self._finished(1, int(cancelled), tokens)
