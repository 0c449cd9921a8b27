"""The embedded default model: a tiny, seeded Llama built locally, no downloads.

It exists so that the whole stack (prefill server, NIXL transfer, decode server,
router) runs on any machine in seconds. Its greedy output is gibberish but
deterministic, and it depends on the whole prompt, so "the disaggregated answer
equals the decode server's own local answer" is a strong check that the KV that
crossed the wire was the right KV.

Shape: vocab 512 (byte-level BPE trained on the text below), hidden 128, 2
attention heads of dim 64 (vLLM's CPU attention rejects head_dim 16), 1 KV head,
2 layers. Weights are drawn from a fixed seed with a wide init so that logits
are far from uniform and the next token really depends on context.

The model is built once into ``<WATCHDOG_KV_CACHE_DIR>/models/<name>`` and
reused; concurrent builders serialise on a lock file and the directory appears
atomically (built beside it, then renamed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MODEL_SPEC", "build", "default_model_path", "validate_model_dir"]

MODEL_SPEC: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 1024,
    "initializer_range": 0.25,
    "seed": 1234,
}

_CORPUS = """\
The watchdog watches the prefill and the decode servers.
A decode worker waits for KV blocks from a prefill worker on another node.
The lease expires, the blocks are released, and the request must not hang.
Every request gets an answer or a clear error within its deadline.
Hello, world! The quick brown fox jumps over the lazy dog.
Once upon a time there was a tiny model that could not speak but never lied.
0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " @ # $ % & _
"""

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _spec_digest() -> str:
    blob = json.dumps([MODEL_SPEC, _CORPUS, _CHAT_TEMPLATE], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def model_name() -> str:
    return f"tiny-llama-{_spec_digest()}"


def default_model_path(cache_dir: Path) -> Path:
    return cache_dir / "models" / model_name()


class InvalidModelError(ValueError):
    """A ``--model`` path that vLLM could not load."""


def validate_model_dir(path: Path) -> Path:
    """Check that ``path`` looks like a local Hugging Face model directory."""
    path = path.expanduser()
    if not path.exists():
        raise InvalidModelError(f"model path {path} does not exist")
    if not path.is_dir():
        raise InvalidModelError(f"model path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise InvalidModelError(f"model path {path} has no config.json (not a model directory)")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{path / 'config.json'} is not readable JSON: {exc}") from None
    return path.resolve()


def _build_into(target: Path) -> None:
    # Heavy imports only when building.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SPEC["vocab_size"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call,unused-ignore]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(target)

    torch.manual_seed(int(MODEL_SPEC["seed"]))
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=MODEL_SPEC["hidden_size"],
        intermediate_size=MODEL_SPEC["intermediate_size"],
        num_hidden_layers=MODEL_SPEC["num_hidden_layers"],
        num_attention_heads=MODEL_SPEC["num_attention_heads"],
        num_key_value_heads=MODEL_SPEC["num_key_value_heads"],
        max_position_embeddings=MODEL_SPEC["max_position_embeddings"],
        initializer_range=MODEL_SPEC["initializer_range"],
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call,unused-ignore]
    model.save_pretrained(target, safe_serialization=True)
    (target / "WATCHDOG_KV_MODEL.json").write_text(
        json.dumps({"name": model_name(), "spec": MODEL_SPEC}, indent=2) + "\n"
    )


def build(cache_dir: Path, *, force: bool = False) -> Path:
    """Build the embedded model under ``cache_dir`` unless it is there; return its path."""
    target = default_model_path(cache_dir)
    marker = target / "WATCHDOG_KV_MODEL.json"
    if marker.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and not force:
            return target  # another builder finished while we waited
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _build_into(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
