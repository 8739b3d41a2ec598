"""Hub bases: a goal names any causal LM on the hub; it resolves through the Hugging Face cache with
huggingface_hub's own code, its architecture and chat template are checked at planning, and a hub id
that is not cached fails in one line when offline.

The cache is built here the way the hub writes it (models--org--name/blobs, snapshots/<commit>, refs/main)
under a temporary HF_HOME, holding a tiny Llama saved with safetensors and a BPE tokenizer trained on the spot.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = "tiny-org/tiny-chat"


def publish(hf_home: Path, repo_id: str, files: Path) -> Path:
    """Put the files of `files` into the hub cache under `hf_home` as `hf download` leaves them: content
    in blobs/, relative symlinks in snapshots/<commit>/, the commit in refs/main. Returns the snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, 32 wide) and its tokenizer with a chat template, saved as a hub repo holds them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.tokenizer import train_bpe

    texts = [json.loads(line)["question"] + " " + json.loads(line)["answer"] for line in FAQ.read_text().splitlines()]
    tokenizer = train_bpe(texts, 400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny-chat")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def variant(tiny_files: Path, tmp_path: Path, config: dict | None = None, chat_template: bool = True) -> Path:
    """A copy of the tiny repo with `config` merged into config.json, or without its chat template."""
    out = tmp_path / "variant"
    out.mkdir()
    for f in tiny_files.iterdir():
        if chat_template or f.name != "chat_template.jinja":
            (out / f.name).write_bytes(f.read_bytes())
    if config:
        (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), **config}))
    if not chat_template:
        tok = json.loads((out / "tokenizer_config.json").read_text())
        tok.pop("chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(tok))
    return out


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME=<tmp>/hf with HF_HUB_OFFLINE=1 for this process. huggingface_hub reads both when it is
    imported, so its constants are set here as it would have set them (the child-process test below sets
    the real environment variables)."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def test_a_hub_id_resolves_from_the_cache_under_hf_home_offline_and_an_absent_one_says_how_to_fetch_it(tiny_files, tmp_path):
    hf_home = tmp_path / "hf"
    snapshot = publish(hf_home, TINY, tiny_files)
    child = ("import json, sys\nfrom pathlib import Path\nfrom training.errors import InputError\n"
             "from training.models import base_dir\nout = {}\n"
             "for name in sys.argv[1:]:\n"
             "    try:\n        out[name] = str(base_dir(name, Path(sys.argv[0]).parent))\n"
             "    except InputError as err:\n        out[name] = str(err)\n"
             "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", child, TINY, "tiny-org/absent"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert Path(out[TINY]) == snapshot
    assert out["tiny-org/absent"] == (
        f"base_model: cannot fetch 'tiny-org/absent' from the hub: it is not in the Hugging Face cache at {hf_home / 'hub'} "
        "and HF_HUB_OFFLINE is set; fetch it on a machine with a network (`hf download tiny-org/absent`, or "
        "`huggingface-cli download tiny-org/absent`) into that cache, or name a local model directory")


def test_a_lora_step_over_a_cached_hub_base_changes_the_adapters_and_nothing_else(tiny_files, offline_cache):
    from training.contracts import LoraSettings
    from training.models import apply_lora, base_dir, load_base

    snapshot = publish(offline_cache, TINY, tiny_files)
    path = base_dir(TINY, Path("unused-workspace"))
    assert path == snapshot
    model, tokenizer = load_base(path)
    model = apply_lora(model, LoraSettings(rank=8, alpha=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "How do I reset my password?"},
                                          {"role": "assistant", "content": "Use the link on the sign-in page."}], tokenize=False)
    batch = tokenizer([text] * 4, return_tensors="pt")
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: it moved, so the adapter learned something
    assert {n for n, p in model.named_parameters() if "lora_" in n and "q_proj" in n} <= changed


REFUSALS = [
    ("no chat template", dict(chat_template=False),
     "error: base_model: tiny-org/x has no chat template (tokenizer_config.json or chat_template.jinja), so it cannot "
     "learn pairs data; use its -Instruct variant or another instruct model, or curate the data with --format text"),
    ("an encoder", dict(config={"model_type": "bert", "architectures": ["BertForMaskedLM"]}),
     "error: base_model: tiny-org/x (BertForMaskedLM, model_type 'bert') is not a causal language model "
     "(AutoModelForCausalLM); fine-tuning here needs a decoder LM, e.g. Qwen/Qwen2.5-0.5B-Instruct"),
    ("its own modelling code", dict(config={"model_type": "acme_lm", "architectures": ["AcmeForCausalLM"],
                                            "auto_map": {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}}),
     "error: base_model: tiny-org/x (AcmeForCausalLM, model_type 'acme_lm') cannot be loaded: it ships its own "
     "modelling code (auto_map), and trust_remote_code stays off"),
    ("not cached, offline", None, "error: base_model: cannot fetch 'tiny-org/x' from the hub: it is not in the Hugging "
     "Face cache at {cache} and HF_HUB_OFFLINE is set; fetch it"),
]


@pytest.mark.parametrize("case,change,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_plan_refuses_a_hub_base_it_cannot_fine_tune_in_one_line(cli, tiny_files, offline_cache, tmp_path, case, change, message):
    if change is not None:
        publish(offline_cache, "tiny-org/x", variant(tiny_files, tmp_path, **change))
    bad = cli("plan", f"fine-tune tiny-org/x on {FAQ}", "--workspace", tmp_path / "ws", "--json")
    assert bad.exit_code == 2 and bad.stdout == ""
    assert bad.stderr.startswith(message.format(cache=offline_cache / "hub")) and bad.stderr.count("\n") == 1


def test_plan_takes_a_cached_hub_base_named_in_the_goal_and_measures_seq_len_with_its_tokenizer(cli, tiny_files, offline_cache, tmp_path):
    publish(offline_cache, TINY, tiny_files)
    ok = cli("plan", f"fine-tune {TINY} on {FAQ}", "--workspace", tmp_path / "ws", "--json")
    assert ok.exit_code == 0, ok.stderr
    body = ok.json()
    assert body["goal"]["base_model"] == TINY and body["plan"]["base_model"] == TINY and body["plan"]["method"] == "lora"
    assert "training records fit 256 tokens" in body["records_fit"]  # measured with the cached tokenizer (None when the base is not at hand)
    assert not (tmp_path / "ws").exists()  # planning wrote nothing: no weights converted or copied


def test_a_plain_text_fine_tune_needs_no_chat_template(tiny_files, offline_cache, tmp_path):
    from training.errors import InputError
    from training.models import base_dir, check_chat_template, load_base

    publish(offline_cache, "tiny-org/plain", variant(tiny_files, tmp_path, chat_template=False))
    _, tokenizer = load_base(base_dir("tiny-org/plain", tmp_path))
    check_chat_template(tokenizer, "tiny-org/plain", "text")
    with pytest.raises(InputError, match="tiny-org/plain has no chat template"):
        check_chat_template(tokenizer, "tiny-org/plain", "chat")
