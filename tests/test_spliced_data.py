"""Colossal-LLaMA data: spliced, binned pretraining data and SFT data on disk, and bucket-based ordering."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from datasets import load_from_disk

from coati.dataset import IGNORE_INDEX
from coati.errors import MissingInputError
from coati.dataset.buckets import BinnedDataset, BucketSampler, bucket_order
from coati.dataset.spliced import splice, split_bins
from coati.vocab import load_source_tokenizer
from tests.scripts import load_script

MAX_LEN = 256


@pytest.fixture(scope="module")
def pretrain_dir(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    zh = json.loads((shared_data / "sft" / "alpaca_zh_demo.json").read_text())[:40]
    en = [json.loads(line) for line in (shared_data / "pretrain" / "c4_demo.jsonl").read_text().splitlines()[:30]]
    rows = [{"source": r["instruction"], "target": r["output"], "category": "zh"} for r in zh]
    rows += [{"source": "", "target": r["text"], "category": "en"} for r in en]
    (root / "in").mkdir()
    (root / "in" / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tok_dir = shared_data / "tokenizers" / "llama2"
    script = load_script("examples/colossal_llama/prepare_pretrain_dataset.py")
    summary = script.main(["--data_input_dirs", str(root / "in"), "--tokenizer_dir", str(tok_dir),
                           "--data_output_dirs", str(root / "out"), "--max_length", str(MAX_LEN),
                           "--num_spliced_dataset_bins", "3"])
    return root / "out", rows, load_source_tokenizer(tok_dir), summary


def _jsonl_rows(path):
    return [json.loads(line) for f in sorted(path.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_spliced_samples_fit_and_no_token_is_lost(pretrain_dir):
    out, rows, tok, summary = pretrain_dir
    assert set(summary) == {"zh", "en"}
    for category in ("zh", "en"):
        spliced = _jsonl_rows(out / "jsonl" / category)
        assert spliced and all(len(r["input_ids"]) == len(r["labels"]) <= MAX_LEN for r in spliced)
        assert sum(len(r["input_ids"]) for r in spliced) > MAX_LEN * 2  # several samples were joined
        cache = load_from_disk(str(out / "cache" / category))
        assert len(cache) == sum(r["category"] == category for r in rows)
        pairs = Counter(p for r in spliced for p in zip(r["input_ids"], r["labels"]))
        assert pairs == Counter(p for r in cache for p in zip(r["input_ids"], r["labels"]))
        arrow = [r for b in sorted((out / "arrow" / category).iterdir()) for r in load_from_disk(str(b))]
        assert [r["input_ids"] for r in arrow] == [r["input_ids"] for r in spliced]


def test_loss_only_on_target(pretrain_dir):
    out, rows, tok, _ = pretrain_dir
    cache = load_from_disk(str(out / "cache" / "zh"))
    zh = [r for r in rows if r["category"] == "zh"]
    for rec, sample in zip(zh, cache):
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == labels[-1]
        target = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
        prompt = [i for i, l in zip(ids, labels) if l == IGNORE_INDEX]
        assert tok.decode(target, skip_special_tokens=True).strip() == rec["target"].strip()
        assert tok.decode(prompt, skip_special_tokens=True).strip() == rec["source"].strip()


def test_bins_per_category(pretrain_dir):
    out, _, _, summary = pretrain_dir
    for category, sizes in summary.items():
        parts = sorted(p.name for p in (out / "arrow" / category).iterdir())
        assert parts == ["part-00000", "part-00001", "part-00002"]
        assert len(sizes) == 3 and max(sizes) - min(sizes) <= 1
        assert [len(load_from_disk(str(out / "arrow" / category / p))) for p in parts] == sizes


def test_splice_and_bins_by_hand():
    samples = [([1] * 3, [1] * 3), ([2] * 4, [2] * 4), ([3] * 9, [-100] * 9), ([4] * 2, [4] * 2)]
    assert [ids for ids, _ in splice(samples, 5)] == [[1, 1, 1], [2, 2, 2, 2], [3] * 5, [3] * 4, [4, 4]]
    assert [ids for ids, _ in splice(samples, 8)] == [[1, 1, 1, 2, 2, 2, 2], [3] * 8, [3, 4, 4]]
    assert [len(b) for b in split_bins(list(range(10)), 3)] == [4, 3, 3]
    assert [len(b) for b in split_bins(list(range(2)), 3)] == [1, 1]


def test_bucket_order_is_seeded_and_uses_every_bin_once(pretrain_dir):
    out, _, _, summary = pretrain_dir
    ds = BinnedDataset([out])
    assert len(ds.bins) == 2 and all(len(sub) == 3 for sub in ds.bins)
    bin_of = {i: (s, b) for s, sub in enumerate(ds.bins) for b, r in enumerate(sub) for i in r}
    first = list(BucketSampler(ds.bins, seed=7))
    assert first == list(BucketSampler(ds.bins, seed=7)) != list(BucketSampler(ds.bins, seed=8))
    sampler = BucketSampler(ds.bins, seed=7)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(ds)))  # every sample (so every bin) once per epoch
        buckets = [bin_of[i][1] for i in order]
        runs = [b for k, b in enumerate(buckets) if k == 0 or b != buckets[k - 1]]
        assert sorted(runs) == [0, 1, 2]  # each bucket walked once, as one contiguous run
        for b in range(3):  # a bucket holds bin b of every sub-dataset
            assert {bin_of[i][0] for i in order if bin_of[i][1] == b} == {0, 1}
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert bucket_order(ds.bins, 7, 1) != first
    ranks = [list(BucketSampler(ds.bins, num_replicas=2, rank=r, seed=7)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == len(ds) // 2
    item = ds[len(ds) - 1]
    assert item["input_ids"].dtype.is_floating_point is False and len(item["input_ids"]) <= MAX_LEN


def _samples(ds):
    return [ds[i]["input_ids"].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("form", ["arrow dir", "category dirs", "part dirs"])
def test_every_way_of_naming_prepared_data_gives_the_prepared_dirs_buckets(pretrain_dir, form):
    """--dataset as a prepared dir, its arrow/, its category dirs, or the part dirs Colossal-LLaMA's README
    lists: the same sub-datasets, bins and bucket order."""
    out = pretrain_dir[0]
    arrow = out / "arrow"
    dirs = {"arrow dir": [arrow], "category dirs": [arrow / "en", arrow / "zh"],
            "part dirs": sorted(arrow.glob("*/part-*"))}[form]
    whole, ds = BinnedDataset([out]), BinnedDataset(dirs)
    assert ds.names == whole.names == [f"{out.name}/en", f"{out.name}/zh"]
    assert ds.bins == whole.bins and len(ds.bins[0]) == 3
    assert bucket_order(ds.bins, 7, 1) == bucket_order(whole.bins, 7, 1)
    assert _samples(ds) == _samples(whole)


def test_part_dirs_of_one_category_are_one_sub_dataset_in_bin_order(pretrain_dir):
    arrow = pretrain_dir[0] / "arrow"
    ds = BinnedDataset([arrow / "en/part-00002", arrow / "zh/part-00001", arrow / "en/part-00000"])
    assert [len(sub) for sub in ds.bins] == [2, 1] and ds.names[0].endswith("/en")
    en = [r["input_ids"] for p in ("part-00000", "part-00002") for r in load_from_disk(str(arrow / "en" / p))]
    assert _samples(ds)[: len(en)] == en


def test_a_dir_holding_no_prepared_data_is_one_line(pretrain_dir, tmp_path):
    out = pretrain_dir[0]
    (tmp_path / "part-00000").mkdir()  # a bin's name, no dataset in it
    for d in (tmp_path, out / "jsonl" / "en", tmp_path / "part-00000"):
        with pytest.raises(MissingInputError) as err:
            BinnedDataset([out, d])
        assert str(err.value).startswith(f"{d}: no prepared data (arrow/<category>/part-00000 dirs) under it")
        assert "\n" not in str(err.value)
    with pytest.raises(MissingInputError, match="no such prepared dataset dir"):
        BinnedDataset([tmp_path / "missing"])


def test_sft_data_loss_on_assistant_turns(shared_data, tmp_path):
    chats = [{"messages": [{"from": "human", "content": f"问题 {i}"}, {"from": "assistant", "content": f"回答 {i}"},
                           {"from": "human", "content": "再说一次"}, {"from": "assistant", "content": f"好的 {i}"}],
              "category": "chat"} for i in range(5)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "sft.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
    tok_dir = shared_data / "tokenizers" / "llama2"
    script = load_script("examples/colossal_llama/prepare_sft_dataset.py")
    summary = script.main(["--data_input_dirs", str(tmp_path / "in"), "--tokenizer_dir", str(tok_dir),
                           "--data_output_dirs", str(tmp_path / "out"), "--max_length", "512",
                           "--num_spliced_dataset_bins", "2", "--llama_version", "2"])
    assert summary == {"chat": [3, 2]}
    tok = load_source_tokenizer(tok_dir)
    rows = _jsonl_rows(tmp_path / "out" / "jsonl" / "chat")
    assert len(rows) == 5 and all(r["input_ids"].count(tok.bos_token_id) == 1 for r in rows)  # not spliced
    answers = set()
    for r in rows:
        labelled = [i for i, l in zip(r["input_ids"], r["labels"]) if l != IGNORE_INDEX]
        assert labelled.count(tok.eos_token_id) == 2
        answers.add(tok.decode(labelled, skip_special_tokens=True))
    assert answers == {f"回答 {i}好的 {i}" for i in range(5)}
