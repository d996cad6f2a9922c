"""Split GGUF (--split-max-size): files above the limit become llama.cpp shards that load from the first, give the
same logits and metrics as the whole file, are pushed in one commit and listed on the card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantspace.errors import BadOptionError
from quantspace.formats.gguf_split import parse_size, split_file
from quantspace.report import Report
from tests.hub_fixtures import ALICE_TOKEN

# The tiny model's F16 is 3.4 MB and its Q4_K_M 1.1 MB; its largest tensor 0.52 MB: both split at 1 MB.
LIMIT = "1M"
NAME = "tiny-llama-bpe"
PROMPT = [1, 17, 250, 33, 999, 5, 64, 128]


def logits(path: Path) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    out = np.array(llm.scores[:len(PROMPT)])
    llm.close()
    return out


def split_keys(path: Path) -> dict[str, int]:
    fields = gguf.GGUFReader(path).fields
    return {k: int(f.parts[-1][0]) for k, f in fields.items() if k.startswith("split.")}


@pytest.fixture(scope="module")
def runs(tiny_bpe, tmp_path_factory):
    """The same F16 + Q4_K_M job twice, measured: split at 1 MB, and never split."""
    from quantspace import quantize

    root = tmp_path_factory.mktemp("split")
    made = {}
    for label, size in (("split", LIMIT), ("whole", "off")):
        made[label] = (root / label, quantize(str(tiny_bpe), variants="F16,Q4_K_M", out=root / label, ctx=64,
                                              max_chunks=2, options={"split_max_size": size, "imatrix": "off"}))
    return made


def test_split_files_load_in_llama_cpp_with_the_same_logits_and_metrics(runs):
    out, report = runs["split"]
    whole_out, whole = runs["whole"]
    for f, w in zip(report.files, whole.files):
        assert f.variant == w.variant and w.files is None
        n = len(f.files)
        assert n >= 2, f"{f.variant} was not split"
        assert f.files == [f"{NAME}-{f.variant}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
        assert f.filename == f.files[0]
        shards = [out / name for name in f.files]
        sizes = [p.stat().st_size for p in shards]
        # every shard is a whole file under the limit, header included (no tensor here is larger than it)
        assert max(sizes) <= parse_size(LIMIT)
        assert f.size_bytes == sum(sizes) and f.size_bytes >= w.size_bytes
        assert not (out / f"{NAME}-{f.variant}.gguf").exists()   # the whole file is gone
        n_tensors = len(gguf.GGUFReader(whole_out / w.filename).tensors)
        assert sum(len(gguf.GGUFReader(p).tensors) for p in shards) == n_tensors
        for i, p in enumerate(shards):
            assert split_keys(p) == {"split.no": i, "split.count": n, "split.tensors.count": n_tensors}
        # the model's metadata is in the first shard only, as llama-gguf-split writes it
        first, second = gguf.GGUFReader(shards[0]).fields, gguf.GGUFReader(shards[1]).fields
        assert "tokenizer.ggml.tokens" in first and "general.architecture" in first
        assert {k for k in second if not k.startswith("GGUF.")} == set(split_keys(shards[1]))
        # llama.cpp opens the set from the first shard: the same logits as the whole file
        diff = np.abs(logits(shards[0]) - logits(whole_out / w.filename)).max()
        assert diff == 0.0, f"{f.variant}: max |Δlogit| {diff}"
        assert f.metrics == w.metrics and f.metrics["perplexity"] > 1


def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own(runs, tmp_path):
    """llama.cpp cannot cut a tensor: one larger than the limit is kept whole, alone in its shard."""
    whole_out, whole = runs["whole"]
    f16 = next(f for f in whole.files if f.variant == "F16")
    path = tmp_path / f16.filename
    shutil.copyfile(whole_out / f16.filename, path)
    limit = 400_000   # token_embd and output are 524288 bytes each
    shards = split_file(path, limit)
    big = [p for p in shards if p.stat().st_size > limit]
    assert len(big) == 2 and all(len(gguf.GGUFReader(p).tensors) == 1 for p in big)
    assert all(p.stat().st_size <= limit for p in shards if p not in big)
    assert np.abs(logits(shards[0]) - logits(whole_out / f16.filename)).max() == 0.0


def test_push_holds_all_shards_in_one_commit_and_the_card_lists_them(hub, tiny_bpe, tmp_path, capsys, monkeypatch):
    from huggingface_hub import ModelCard, hf_hub_download

    from quantspace.cli import main

    hub.create_repo("quantorg/tiny-bpe")
    hub.upload_folder("quantorg/tiny-bpe", tiny_bpe)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    target = "alice/tiny-bpe-GGUF"
    code = main(["quantize", "quantorg/tiny-bpe", "--variants", "Q4_K_M", "--split-max-size", LIMIT,
                 "--imatrix", "off", "--no-eval", "--push", target, "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    files = hub.files(target)
    report = Report.from_dict(json.loads(files["quantspace.json"]))
    (q4,) = report.files
    shards = q4.files
    assert len(shards) >= 2 and set(shards) <= set(files)
    assert q4.size_bytes == sum(len(files[n]) for n in shards)
    commits = hub.commits(target)
    holding = [c for c in commits if set(shards) & set(c["changed"])]
    assert len(holding) == 1 and set(shards) <= set(holding[0]["changed"])

    card = ModelCard(files["README.md"].decode()).text
    more = len(shards) - 1
    assert f"`{shards[0]}` (+{more} more file{'s' if more > 1 else ''})" in card   # the table's row
    assert "Q4_K_M (" in card and all(f"`{n}`" in card for n in shards)   # every shard listed
    assert f"llama-cli -hf {target}:Q4_K_M" in card
    assert f'filename="{shards[0]}"' in card and f'"{shards[-1]}"' in card   # llama-cpp-python: shard 1 + the rest

    # downloaded from the Hub beside each other, they load from the first
    paths = [Path(hf_hub_download(target, n, token=ALICE_TOKEN)) for n in shards]
    assert np.array_equal(logits(paths[0]), logits(tmp_path / "out" / shards[0]))


def test_split_sizes_parse_in_decimal_units():
    assert parse_size("48G") == parse_size("48GB") == parse_size(" 48 gb ") == 48 * 10**9
    assert parse_size("2M") == parse_size("2MB") == 2_000_000 and parse_size("1.5G") == 1_500_000_000
    assert parse_size("0") == parse_size("off") == parse_size("OFF") == 0


@pytest.mark.parametrize("bad", ["-1", "abc", "1.5XB", "10K"])
def test_bad_split_sizes_are_one_line_before_any_work(bad, tiny_bpe, tmp_path, capsys):
    from quantspace import quantize
    from quantspace.cli import main

    with pytest.raises(BadOptionError, match=r"--split-max-size .* (is not a size|is below 1M)") as info:
        quantize(str(tiny_bpe), variants="Q4_K_M", out=tmp_path / "out", no_eval=True,
                 options={"split_max_size": bad})
    assert "\n" not in str(info.value)
    code = main(["quantize", str(tiny_bpe), "--variants", "Q4_K_M", "--no-eval", f"--split-max-size={bad}",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--split-max-size" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
