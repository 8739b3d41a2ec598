"""Exports that other engines load: HF directories (transformers, vLLM) and GGUF (transformers, llama.cpp, Ollama).

A tiny Llama is trained and registered; each export is loaded back by a real loader and its logits compared
with the float32 source on the same token ids. The error is the largest |logit difference| over every
position and vocabulary entry of the prompts, divided by the source's largest |logit|:

    export                     loaded by      tolerance   measured (tiny model; SmolLM2-135M)
    hf bfloat16                transformers   1e-2        4.3e-3
    hf float16                 transformers   2e-3        6.0e-4
    gguf f32                   transformers   1e-5        0 (bit-exact)
    gguf f16                   transformers   2e-3        1.2e-4; SmolLM2 1.1e-3 (tolerance 5e-3)
    gguf q8_0                  transformers   2e-2        2.8e-3
    gguf f16                   llama.cpp      2e-3        1.5e-4, and the same greedy tokens
    gguf q8_0                  llama.cpp      2e-2        3.7e-3, and the same greedy tokens

Token ids must be identical everywhere, and our Q8_0 bytes identical to llama.cpp's own quantizer's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from serving.registry import Registry
from tests.helpers import pretrain_tiny_base
from training.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"
TINY = dict(seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=5, eval_batches=2, checkpoint_every=10)
PROMPTS = ["How do I reset my password?", "Billing: 42 invoices, 3.5% off!\n\n  spaced   out",
           "<|user|>\nhello there<|eos|>\n<|assistant|>\n"]  # plain text, digits and spaces, special tokens


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> Registry:
    """A registry holding one tiny trained Llama as bot@v1 (production)."""
    ws = tmp_path_factory.mktemp("export-ws")
    reg = Registry(ws)
    reg.register("bot", pretrain_tiny_base(ws, "tiny", steps=10, seed=3, **TINY))
    reg.promote("bot", "v1", force=True)
    return reg


@pytest.fixture(scope="module")
def source(reg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = reg.resolve("bot@v1")[2]
    return AutoModelForCausalLM.from_pretrained(path, dtype="float32"), AutoTokenizer.from_pretrained(path)


def logits(model, ids: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([x])).logits[0].float() for x in ids]


def rel_error(got: list, ref: list) -> float:
    return max((torch.as_tensor(g).float() - r).abs().max().item() for g, r in zip(got, ref)) / max(r.abs().max().item() for r in ref)


# ---- hf ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 1e-2), ("float16", 2e-3)])
def test_hf_export_loads_with_from_pretrained_in_its_dtype(reg, source, tmp_path, dtype, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = reg.export("bot", tmp_path / "hf", format="hf", dtype=dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype  # what vLLM's --dtype auto reads
    assert {"README.md", "lineage.json", "registry.json", "chat_template.jinja", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.dtype == getattr(torch, dtype)
    src_model, src_tok = source
    ids = [src_tok(p).input_ids for p in PROMPTS]
    assert [tok(p).input_ids for p in PROMPTS] == ids and tok.chat_template == src_tok.chat_template
    assert rel_error(logits(model, ids), logits(src_model, ids)) < tolerance


# ---- gguf ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant,tolerance", [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_gguf_loads_back_in_transformers(reg, source, tmp_path, quant, tolerance):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = reg.export("bot@production", tmp_path / "gguf", format="gguf", quant=quant)
    name = f"bot-v1-{quant}.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", name, "lineage.json", "registry.json"]
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(out, gguf_file=name)
    src_model, src_tok = source
    ids = [src_tok(p).input_ids for p in PROMPTS]
    assert [tok(p).input_ids for p in PROMPTS] == ids  # same ids, special tokens kept whole
    assert tok.decode(ids[1]) == PROMPTS[1]
    assert rel_error(logits(model, ids), logits(src_model, ids)) < tolerance

    reader = gguf.GGUFReader(out / name)
    meta = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == src_tok.chat_template
    assert meta["llama.context_length"] == src_model.config.max_position_embeddings
    assert meta["tokenizer.ggml.eos_token_id"] == src_tok.eos_token_id and meta["tokenizer.ggml.add_bos_token"] is False
    types = meta["tokenizer.ggml.token_type"]
    assert [types[i] for i in src_tok.all_special_ids] == [gguf.TokenType.CONTROL] * len(src_tok.all_special_ids)
    tensors = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings, as llama.cpp writes them
    assert tensors["blk.0.attn_norm.weight"] == "F32" and tensors["blk.0.attn_q.weight"] == quant.upper()


def test_gguf_pads_a_vocabulary_smaller_than_the_embedding(source, tmp_path):
    """Embedding rows past the tokenizer (rounded up to 64) become unused [PADn] tokens, as llama.cpp writes them."""
    import copy

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.gguf_export import write_gguf

    src_model, src_tok = source
    model = copy.deepcopy(src_model)
    model.resize_token_embeddings(len(src_tok) + 64, mean_resizing=False)
    write_gguf(model, src_tok, tmp_path / "padded.gguf", "f32", "padded")
    fields = gguf.GGUFReader(tmp_path / "padded.gguf").fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(src_tok) + 64 and tokens[-1] == f"[PAD{len(src_tok) + 63}]"
    assert set(types[len(src_tok):]) == {gguf.TokenType.UNUSED}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="padded.gguf", dtype="float32")
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="padded.gguf")
    ids = [src_tok(p).input_ids for p in PROMPTS]
    assert [tok(p).input_ids for p in PROMPTS] == ids
    assert rel_error(logits(loaded, ids), logits(model, ids)) < 1e-5


def test_modelfile_translates_the_chat_template(reg, tmp_path):
    out = reg.export("bot", tmp_path / "gguf", format="gguf", quant="q8_0")
    assert (out / "Modelfile").read_text() == (
        "# bot v1 (q8_0), exported by modelcrew. Run: ollama create <name> -f Modelfile\n"
        "FROM ./bot-v1-q8_0.gguf\n"
        'TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|eos|>\n{{ end }}<|assistant|>\n"""\n'
        'PARAMETER stop "<|eos|>"\n'
        'PARAMETER stop "<|user|>"\n'
        "PARAMETER num_ctx 128\n"
        "PARAMETER temperature 1\n"
        "PARAMETER top_p 1\n")


def test_modelfile_leaves_out_a_template_it_cannot_translate(source):
    import copy

    from serving.gguf_export import modelfile

    tok = copy.deepcopy(source[1])
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                         "{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}")  # no role names in the text
    text = modelfile(tok, "x.gguf", 128, "x")
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "FROM ./x.gguf" in text
    assert 'PARAMETER stop "<|eos|>"' in text


@pytest.fixture
def llama_cpp(monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    # Where the CPU advertises AMX (as here), llama.cpp's AMX matmul segfaulted on every quantized file we
    # tried, its own Q8_0 and Q4_1 files included; without extra buffer types it runs its generic CPU kernels.
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)
    return llama_cpp


@pytest.mark.parametrize("quant,tolerance", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_llama_cpp_loads_the_gguf(llama_cpp, reg, source, tmp_path, quant, tolerance):
    out = reg.export("bot", tmp_path / "gguf", format="gguf", quant=quant)
    llm = llama_cpp.Llama(model_path=str(out / f"bot-v1-{quant}.gguf"), n_ctx=128, logits_all=True, verbose=False)
    src_model, src_tok = source
    ids = [src_tok(p).input_ids for p in PROMPTS]
    assert [llm.tokenize(p.encode(), add_bos=False, special=True) for p in PROMPTS] == ids
    got = []
    for x in ids:
        llm.reset()
        llm.eval(x)
        got.append(llm.scores[: len(x)].copy())
    assert rel_error(got, logits(src_model, ids)) < tolerance
    # greedy decoding by llama.cpp's own sampler picks the source's argmax tokens, compared up to the first
    # near-tie (a barely trained model may have some, and rounding may break them either way)
    prompt, expected = list(ids[0]), []
    while len(expected) < 8:
        top2 = logits(src_model, [prompt + expected])[0][-1].topk(2)
        if top2.values[0] - top2.values[1] < 2e-2:
            break
        expected.append(int(top2.indices[0]))
    assert expected, "the source's first greedy token is a near-tie; nothing to compare"
    llm.reset()
    ours = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        ours.append(token)
        if len(ours) == len(expected):
            break
    assert ours == expected
    llm.close()


def test_q8_0_is_what_llama_cpp_quantizes(llama_cpp, reg, tmp_path):
    """Our Q8_0 file holds the very bytes llama.cpp's own quantizer writes from our f32 file."""
    import ctypes

    import gguf

    f32 = reg.export("bot", tmp_path / "f32", format="gguf", quant="f32") / "bot-v1-f32.gguf"
    ours = reg.export("bot", tmp_path / "q8", format="gguf", quant="q8_0") / "bot-v1-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp_path / "theirs.gguf").encode(), ctypes.byref(params)) == 0

    def tensors(path):
        return {t.name: (t.tensor_type.name, bytes(t.data.view("uint8"))) for t in gguf.GGUFReader(path).tensors}

    assert tensors(ours) == tensors(tmp_path / "theirs.gguf")


# ---- refusals and the CLI --------------------------------------------------------------------------------


def test_export_refuses_bad_input_and_writes_nothing(reg, tmp_path):
    with pytest.raises(InputError, match="--format: choose hf or gguf, not 'onnx'"):
        reg.export("bot", tmp_path / "a", format="onnx")
    with pytest.raises(InputError, match="--quant: choose f16, q8_0, f32, not 'q4_0'"):
        reg.export("bot", tmp_path / "a", format="gguf", quant="q4_0")
    with pytest.raises(InputError, match="--dtype: choose bfloat16, float16 or float32"):
        reg.export("bot", tmp_path / "a", dtype="int8")
    assert not (tmp_path / "a").exists()


def _register_gemma(reg: Registry, tmp_path: Path) -> None:
    fake = tmp_path / "gemma"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}))
    (fake / "lineage.json").write_text(json.dumps({"run_id": "g1", "dataset": "d", "base_model": "gemma3-270m"}))
    reg.register("gem", fake)


def test_cli_export(reg, tmp_path, cli):
    ws = str(reg.workspace)
    ok = cli("models", "export", "bot", tmp_path / "q8", "--format", "gguf", "--quant", "q8_0", "--workspace", ws, "--json")
    assert ok.exit_code == 0, ok.stderr
    assert "bot-v1-q8_0.gguf" in ok.json()["files"] and (tmp_path / "q8" / "Modelfile").is_file()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _register_gemma(reg, tmp_path)
    for args, message in [
        (("bot", tmp_path / "o1", "--format", "onnx"), "error: --format: choose hf or gguf, not 'onnx'"),
        (("bot", tmp_path / "full", "--format", "gguf"), f"error: {tmp_path / 'full'}: exists and is not an empty directory"),
        (("gem@v1", tmp_path / "o2", "--format", "gguf"),
         "error: gem@v1: GGUF export supports Llama-architecture models (LlamaForCausalLM) only; "
         "this one is gemma3_text (Gemma3ForCausalLM); export it with --format hf"),
    ]:
        bad = cli("models", "export", *args, "--workspace", ws)
        assert bad.exit_code == 2 and bad.stderr.strip() == message, bad.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---- the embedded SmolLM2 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 (GQA: 9 heads, 3 KV heads; ChatML with a default system prompt) registered and exported as f16."""
    from training.models import base_dir

    tmp = tmp_path_factory.mktemp("smol")
    base = base_dir("smollm2-135m-instruct", tmp / "ws")
    model_dir = tmp / "smol"
    shutil.copytree(base, model_dir)
    (model_dir / "lineage.json").write_text(json.dumps({"run_id": "base", "dataset": "", "base_model": "smollm2-135m-instruct"}))
    reg = Registry(tmp / "ws")
    reg.register("smol", model_dir)
    return base, reg.export("smol@v1", tmp / "gguf", format="gguf", quant="f16")


def test_smollm2_gguf_loads_back_in_transformers(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, out = smol
    modelfile = (out / "Modelfile").read_text()
    assert ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
            '<|im_start|>assistant\n"""\n') in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 8192" in modelfile
    src_model, src_tok = AutoModelForCausalLM.from_pretrained(base, dtype="float32"), AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="smol-v1-f16.gguf", dtype="float32")
    tok = AutoTokenizer.from_pretrained(out, gguf_file="smol-v1-f16.gguf")
    messages = [{"role": "user", "content": "What is 12+30?"}]
    chat = src_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat
    ids = [src_tok(p).input_ids for p in (PROMPTS[1], chat)]
    assert [tok(p).input_ids for p in (PROMPTS[1], chat)] == ids
    assert rel_error(logits(model, ids), logits(src_model, ids)) < 5e-3


def test_smollm2_gguf_chats_in_llama_cpp(llama_cpp, smol):
    """llama.cpp renders the GGUF's chat template, answers, and stops at <|im_end|>."""
    llm = llama_cpp.Llama(model_path=str(smol[1] / "smol-v1-f16.gguf"), n_ctx=512, verbose=False)
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=24, temperature=0)["choices"][0]
    assert "Paris" in answer["message"]["content"] and answer["finish_reason"] == "stop"
    llm.close()


# ---- an adapter version: merged on export ------------------------------------------------------------------------


def test_cli_hf_export_of_an_adapter_version_is_the_merged_model(reg, tmp_path, cli):
    """A LoRA version (its directory an adapter over the registered base) exported with `--format hf` through the
    CLI: one full model whose logits are the adapter-applied model's. In float32 they differ only by rounding (the
    merge adds scale * B @ A into W once instead of per forward): measured 5e-7 of the largest logit; tolerance 1e-5.
    The adapter itself moves the logits far more than that (checked), so an export that dropped it would fail."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.contracts import Budget, LoraSettings, TrainPlan
    from training.data import curate_to_workspace
    from training.loop import train

    ws = reg.workspace
    base_dir = reg.resolve("bot@v1")[2]
    fp = curate_to_workspace(str(FAQ), ws).summary.fingerprint
    plan = TrainPlan(task="finetune", dataset=fp, base_model=str(base_dir), method="lora", budget=Budget(steps=6),
                     lora=LoraSettings(merge=False), **{**TINY, "seq_len": 128, "lr": 1e-2})
    adapter_run = Path(train(plan, ws, "lora-export", show_progress=False).final_dir)
    version = reg.register("lora-bot", adapter_run)
    assert version.weights == "adapter"
    adapter_dir = reg.resolve("lora-bot@v1")[2]
    assert (Path(adapter_dir) / "adapter_config.json").is_file()

    ok = cli("models", "export", "lora-bot@v1", tmp_path / "merged", "--format", "hf", "--dtype", "float32",
             "--workspace", ws, "--json")
    assert ok.exit_code == 0, ok.stderr
    out = Path(ok.json()["path"])
    assert not (out / "adapter_config.json").exists() and any(out.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32

    tok = AutoTokenizer.from_pretrained(out)
    ids = [tok(p).input_ids for p in PROMPTS]
    base = AutoModelForCausalLM.from_pretrained(version.base_dir, dtype="float32")
    base_logits = logits(base, ids)
    applied = PeftModel.from_pretrained(base, str(adapter_dir)).eval()  # the adapter as a separate branch, unmerged
    applied_logits = logits(applied, ids)
    error, moved = rel_error(logits(merged, ids), applied_logits), rel_error(applied_logits, base_logits)
    print(f"\nmerged vs adapter-applied: {error:.1e}; adapter-applied vs base: {moved:.1e}")
    assert error < 1e-5
    assert moved > 100 * 1e-5  # the adapter is really in there
