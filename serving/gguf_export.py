"""GGUF export for llama.cpp and Ollama: one `.gguf` file (weights, tokenizer, chat template) and a Modelfile.

Written with the `gguf` package's own writer, tensor name map and quantizers, following what llama.cpp's
`convert_hf_to_gguf.py` does for `LlamaForCausalLM` (its `LlamaModel` and `_set_vocab_gpt2`), so llama.cpp,
Ollama and transformers' `gguf_file=` read it as they read any converted Llama:

- metadata `llama.*` (context, embedding, block count, feed-forward, heads, KV heads, RoPE base and dims,
  RMS epsilon, vocab size) and `tokenizer.ggml.*` for a byte-level BPE vocabulary (model "gpt2", tokens,
  token types with special tokens as CONTROL, merges, BOS/EOS/PAD ids) plus `tokenizer.chat_template`;
- Q and K projections permuted into llama.cpp's rotary layout (it rotates interleaved pairs, transformers
  rotates halves); transformers undoes the same permutation on load;
- norms and other 1-D tensors stay float32 (llama.cpp's kernels expect it); 2-D weights are f32, f16 or
  Q8_0; with tied embeddings there is no `output.weight` (llama.cpp then reuses `token_embd.weight`).

Only Llama-architecture models with a byte-level BPE tokenizer are exported (every model this project
trains: tiny/small/124m from scratch and SmolLM2). Anything else is refused in one line rather than
written in a layout an engine would misread.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import InputError

QUANTS = ("f16", "q8_0", "f32")


def check_architecture(config: dict, where: str) -> None:
    """Refuse, before any weights load, a model the Llama GGUF layout cannot describe exactly."""
    arch = (config.get("architectures") or ["?"])[0]
    if config.get("model_type") != "llama" or arch != "LlamaForCausalLM":
        raise InputError(f"{where}: GGUF export supports Llama-architecture models (LlamaForCausalLM) only; "
                         f"this one is {config.get('model_type')} ({arch}); export it with --format hf")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise InputError(f"{where}: GGUF export does not carry RoPE scaling {rope.get('rope_type')!r}; "
                         "export it with --format hf")


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's text splitting; only plain GPT-2 byte-level splitting is known here."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        raise InputError(f"tokenizer: GGUF export supports byte-level BPE tokenizers only (this one is "
                         f"{model.get('type')} with normalizer {(spec.get('normalizer') or {}).get('type')})")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # the GPT-2 split regex, llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2
    raise InputError(f"tokenizer: pre-tokenizer {json.dumps(pre)[:120]} has no known llama.cpp equivalent; "
                     "export with --format hf")


def _vocab(tokenizer, vocab_size: int):
    """Tokens and types as convert_hf_to_gguf's get_vocab_base: ids past the tokenizer (the embedding is
    padded to a multiple of 64) become unused `[PADn]` entries, added special tokens CONTROL."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: halves-rotation rows -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: Path, quant: str, name: str) -> None:
    """Write `model` (a LlamaForCausalLM, float32) and `tokenizer` to one GGUF file at `path`."""
    import gguf

    qtype, ftype = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
                    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
                    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}[quant]
    c = model.config
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    rope = getattr(c, "rope_parameters", None) or {}
    vocab_size = model.get_input_embeddings().num_embeddings

    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // n_head:  # llama.cpp assumes hidden/heads unless told
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)

    tokens, types = _vocab(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # SpecialVocab reads merges, special ids and template from files
        tokenizer.save_pretrained(tmp)
        c.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    # Say explicitly whether BOS/EOS are added, as the HF tokenizer does: llama.cpp's default for a "gpt2"
    # vocabulary is not stated anywhere a reader of the file could see.
    probe = tokenizer("a")["input_ids"]
    w.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and c.tie_word_embeddings):
            continue  # recomputed by every engine / the same tensor as token_embd
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise InputError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        kind = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or new_name.endswith("_norm.weight") else qtype
        try:
            packed = gguf.quants.quantize(data, kind)
        except gguf.QuantError:  # rows not a multiple of Q8_0's 32-value block: f16, as llama.cpp falls back
            kind = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, kind)
        w.add_tensor(new_name, packed, raw_dtype=kind)

    w.write_header_to_file(path=Path(path))
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- Ollama --------------------------------------------------------------------------------------------


@dataclass
class ChatFormat:
    """A ChatML-style template: every turn is `start + role + sep + content + end`."""
    start: str
    sep: str
    end: str
    default_system: str | None  # what the template inserts when the conversation has no system message


def chat_format(tokenizer) -> ChatFormat | None:
    """Read the turn layout off the model's own Jinja template by rendering marker messages.

    Returns None when the template does not follow one uniform turn layout (then no Ollama TEMPLATE is
    written rather than a wrong one).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages, gen=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def need(ok: bool) -> None:  # not `assert`: the checks must hold under python -O too
        if not ok:
            raise ValueError("not one uniform turn layout")

    role, c0, c1 = "ROLEx7q", "CONTENTa9z", "CONTENTb4k"
    try:
        system = render([{"role": "system", "content": c0}])
        turn = render([{"role": "system", "content": c0}, {"role": role, "content": c1}])
        need(turn.startswith(system))
        start, rest = turn[len(system):].split(role)
        sep, end = rest.split(c1)
        fmt = ChatFormat(start, sep, end, None)

        def shape(r, c):
            return f"{start}{r}{sep}{c}{end}"

        convo = [{"role": "system", "content": c0}, {"role": "user", "content": c1}, {"role": "assistant", "content": c0}]
        need(render(convo) == "".join(shape(m["role"], m["content"]) for m in convo))
        need(render(convo[:2], gen=True) == render(convo[:2]) + f"{start}assistant{sep}")
        alone = render([{"role": "user", "content": c1}])
        need(alone.endswith(shape("user", c1)))
        head = alone[: len(alone) - len(shape("user", c1))]
        if head:  # what the template adds to a conversation without a system message
            prefix = f"{start}system{sep}"
            need(head.startswith(prefix) and head.endswith(end))
            fmt.default_system = head[len(prefix): len(head) - len(end)]
    except Exception:  # a template with another shape, or one that raises on these messages
        return None
    literal = start + sep + end + (fmt.default_system or "")
    return None if "{{" in literal or '"""' in literal or not start.strip() else fmt


def modelfile(tokenizer, gguf_name: str, context_length: int, title: str) -> str:
    """An Ollama Modelfile for the GGUF: FROM, TEMPLATE (the chat template in Go template syntax), the
    template's default SYSTEM prompt, stop strings and the sampling defaults `modelcrew serve` uses."""
    fmt = chat_format(tokenizer)
    lines = [f"# {title}, exported by modelcrew. Run: ollama create <name> -f Modelfile", f"FROM ./{gguf_name}"]
    stops: list[str] = []
    if fmt is None:
        lines.append("# no TEMPLATE: the chat template is not one uniform turn layout; Ollama picks one from "
                     "the GGUF's tokenizer.chat_template")
    else:
        # Ollama puts SYSTEM first in .Messages when the conversation has no system message: the same rule
        # as the Jinja template's default system prompt.
        lines.append('TEMPLATE """{{- range .Messages }}' + fmt.start + "{{ .Role }}" + fmt.sep + "{{ .Content }}"
                     + fmt.end + "{{ end }}" + fmt.start + "assistant" + fmt.sep + '"""')
        if fmt.default_system:
            lines.append(f'SYSTEM """{fmt.default_system}"""')
        stops += [fmt.end.strip(), (fmt.start + "user" + fmt.sep).strip()]  # end of turn; the model starting the user's
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    for stop in dict.fromkeys(s for s in stops if s and '"' not in s):
        lines.append(f'PARAMETER stop "{stop}"')
    lines += [f"PARAMETER num_ctx {context_length}",  # the positions it was trained on, not Ollama's default
              "PARAMETER temperature 1", "PARAMETER top_p 1"]
    return "\n".join(lines) + "\n"
