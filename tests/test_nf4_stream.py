"""NF4 of a model larger than memory: the CPU checkpoint is written while the source is read, one tensor at a
time, and equals transformers' from_pretrained + save_pretrained; the QLoRA check runs only when it fits the
device's free memory and otherwise says why on the card."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import _tiny

ROOT = Path(__file__).resolve().parent.parent


def tensors(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def logits(folder: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("model, variant, options, shard_bytes", [
    (("tiny-llama-bpe", "bpe", "llama"), "NF4",
     {"double_quant": True, "compute_dtype": "bfloat16", "skip_modules": "lm_head"}, None),
    # FP4 without double quantization, fp16, everything quantized, in 200 KB shards with an index
    (("tiny-qwen3", "bpe", "qwen3"), "FP4",
     {"double_quant": False, "compute_dtype": "float16", "skip_modules": ""}, 200_000),
    # the real SmolLM2-135M: tied embeddings, saved once as transformers saves them
    ("smollm2", "NF4", {"double_quant": True, "compute_dtype": "bfloat16", "skip_modules": "lm_head"}, None),
], ids=["llama-nf4", "qwen3-fp4-sharded", "smollm2-nf4"])
def test_streamed_checkpoint_is_transformers_checkpoint(model, variant, options, shard_bytes, tmp_path,
                                                        monkeypatch, request):
    """Same tensor names, dtypes, shapes and bytes, same config.json (quantization_config included), same
    memory footprint; transformers loads it 4-bit with the same logits as its own checkpoint."""
    import torch

    from quantspace import nf4_stream
    from quantspace.formats import nf4

    source = request.getfixturevalue(model) if isinstance(model, str) else _tiny(*model)
    config = nf4.bnb_config(variant, options)
    ref = nf4.load_and_save(str(source), str(tmp_path / "ref"), dict(config), "cpu")
    if shard_bytes:
        monkeypatch.setattr(nf4_stream, "SHARD_BYTES", shard_bytes)
    new = nf4.quantize_folder(str(source), str(tmp_path / "new"), dict(config), "cpu")
    assert new == {**ref, "streamed": True}

    a, b = tensors(tmp_path / "ref"), tensors(tmp_path / "new")
    assert sorted(a) == sorted(b)
    assert any(k.endswith(f"quant_state.bitsandbytes__{variant.lower()}") for k in b)
    if json.loads((source / "config.json").read_text()).get("tie_word_embeddings"):
        assert "lm_head.weight" not in b and "model.embed_tokens.weight" in b
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert torch.equal(a[name], b[name]), name
    assert json.loads((tmp_path / "new/config.json").read_text()) == \
        json.loads((tmp_path / "ref/config.json").read_text())

    shards = sorted(p.name for p in (tmp_path / "new").glob("*.safetensors"))
    if shard_bytes:
        index = json.loads((tmp_path / "new/model.safetensors.index.json").read_text())
        assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
        assert sorted(index["weight_map"]) == sorted(b)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
        largest = max(t.numel() * t.element_size() for t in b.values())
        for shard in shards:   # a shard closes once it reaches the limit: it is at most one tensor past it
            data = sum(b[k].numel() * b[k].element_size() for k, f in index["weight_map"].items() if f == shard)
            assert data < shard_bytes + largest, shard
    else:
        assert shards == ["model.safetensors"]

    ids = list(range(1, 40))
    assert torch.equal(logits(tmp_path / "new", ids), logits(tmp_path / "ref", ids))


def build_wide_llama(out: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, int]:
    """A random bf16 Llama written tensor by tensor (no model in memory); its 16-bit size and largest tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False,
                         dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    out.mkdir(parents=True)
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    sizes = [t.numel() for t in weights.values()]
    return {"bytes16": 2 * sum(sizes), "largest_fp32": 4 * max(sizes)}


CHILD = textwrap.dedent("""
    import json, sys
    from quantspace import nf4_stream
    from quantspace.formats import nf4

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    config = nf4.bnb_config("NF4", {"double_quant": True, "compute_dtype": "bfloat16", "skip_modules": "lm_head"})
    nf4_stream.skeleton(sys.argv[1], dict(config), __import__("torch").bfloat16)   # every import, once
    base = status("VmRSS:")
    facts = nf4.quantize_folder(sys.argv[1], sys.argv[2], config, "cpu")
    print(json.dumps({"base": base, "peak": status("VmHWM:"), **facts}))
""")


def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    """A fresh interpreter quantizes a 16-layer, hidden-1024 bf16 Llama (~500 MB): its memory grows by a few
    times its largest tensor plus a fixed allowance (bitsandbytes' and the allocator's working memory, flat
    after the first layers), far below the model's 16-bit size."""
    src = tmp_path / "wide"
    facts = build_wide_llama(src, layers=16, hidden=1024, intermediate=4096, vocab=4096)
    run = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    child = json.loads(run.stdout.strip().splitlines()[-1])
    assert child["streamed"] and child["quantized_layers"] == 16 * 7
    growth = child["peak"] - child["base"]
    bound = 4 * facts["largest_fp32"] + 128 * 1024**2
    assert bound < 0.4 * facts["bytes16"]          # so the bound proves the model was never held
    assert growth < bound, (growth, facts)
    # and what was written is the whole 4-bit model
    written = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert written > facts["bytes16"] / 5


def test_qlora_check_is_skipped_when_it_does_not_fit(tiny_bpe, tmp_path, monkeypatch, caplog):
    """With a tiny free-memory figure the check is skipped with its reason in the report, on the card and in
    the log; with the machine's real memory it runs as before."""
    from quantspace import qlora, quantize

    seen = []

    def tiny_memory(device):
        seen.append(device)
        return 1000

    monkeypatch.setattr(qlora, "available_memory", tiny_memory)
    opts = {"qlora_steps": 2, "qlora_seqlen": 32}
    report = quantize(str(tiny_bpe), method="nf4", out=tmp_path / "skipped", no_eval=True, options=opts)
    q = report.files[0].details["qlora"]
    assert seen == ["cpu"] and list(q) == ["skipped"]
    assert q["skipped"].startswith("The QLoRA check needs about ") and "1.00 KB of free RAM on cpu" in q["skipped"]
    card = (tmp_path / "skipped" / "README.md").read_text()
    assert f"## QLoRA check\n\nNot run: {q['skipped']}" in card
    assert "Loss before" not in card
    assert 'target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]' in card
    assert q["skipped"] in caplog.text

    monkeypatch.undo()
    report = quantize(str(tiny_bpe), method="nf4", out=tmp_path / "ran", no_eval=True, options=opts)
    q = report.files[0].details["qlora"]
    assert "skipped" not in q and q["steps"] == 2 and q["lora_tensors_with_gradient"] > 0
    assert "Loss before" in (tmp_path / "ran" / "README.md").read_text()
