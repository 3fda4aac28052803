"""Preference data for the policy: same tokens as SFT, labels on the final response only, every pair format,
unpaired KTO records with their mismatched KL samples, and the concatenated collators."""
import json
from pathlib import Path

import pytest
import torch

from coati.dataset import (
    PreferenceCollator, PreferenceDataset, SFTDataset, UnpairedPreferenceCollator, UnpairedPreferenceDataset,
    encode_prompt,
)
from coati.dataset.io import DatasetFormatError
from tests import tiny

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok(shared_data):
    return tiny.tokenizer("llama")


def _targets(labels: torch.Tensor) -> list[int]:
    return [t for t in labels.tolist() if t != -100]


def test_pairs_match_sft_tokens_and_label_only_the_response(tok, shared_data):
    raw = json.loads((shared_data / "preference" / "dpo_en_demo.json").read_text())[:40]
    ds = PreferenceDataset(raw, tok, max_len=4096)
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for side in ("chosen", "rejected"):
        sft = SFTDataset([{"conversations": r["conversations"] + [r[side]]} for r in raw], tok, max_len=4096)
        for i, r in enumerate(raw):
            item = ds[i]
            ids, labels = item[f"{side}_input_ids"].tolist(), item[f"{side}_labels"].tolist()
            assert ids == sft[i]["input_ids"].tolist()
            n = len(encode_prompt([{"role": roles[c["from"]], "content": c["value"]} for c in r["conversations"]], tok))
            # SFT labels every response; the pair only the final one, which starts where its prompt ends
            assert labels == [-100] * n + sft[i]["labels"].tolist()[n:]
            assert labels[n:] == ids[n:] and labels[-1] == tok.eos_token_id
    assert any(len(r["conversations"]) > 1 for r in raw)


def test_multi_turn_pairs_label_the_final_turn_only(tok):
    ds = PreferenceDataset(FIX / "hh_rlhf.jsonl", tok, prompt_template="alpaca")
    prompt = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
              {"role": "user", "content": "And of Italy?"}]
    p = encode_prompt(prompt, tok, "alpaca")
    item = ds[1]
    for side in ("chosen", "rejected"):
        ids, labels = item[f"{side}_input_ids"].tolist(), item[f"{side}_labels"].tolist()
        assert ids[:len(p)] == p
        assert labels == [-100] * len(p) + ids[len(p):]  # "Paris." (an earlier response) is not a target


def test_every_reward_format_reads(tok, shared_data):
    ranked = PreferenceDataset(shared_data / "preference/oaast_rm_zh.json", tok, max_len=96, max_datasets_size=30)
    rm = PreferenceDataset(FIX / "rm_static.jsonl", tok, prompt_template="alpaca")
    chat = PreferenceDataset([{"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                               "rejected": [{"role": "user", "content": "2+2?"},
                                            {"role": "assistant", "content": "5"}]}], tok, prompt_template="chatml")
    assert len(ranked) + ranked.num_skipped == 30 and len(rm) == 2 and len(chat) == 1
    for ds in (ranked, rm, chat):
        for i in range(len(ds)):
            item = ds[i]
            assert _targets(item["chosen_labels"]) and _targets(item["rejected_labels"])
    p = encode_prompt([{"role": "user", "content": "2+2?"}], tok, "chatml")
    for side, answer in (("chosen", "4"), ("rejected", "5")):
        ids, labels = chat[0][f"{side}_input_ids"].tolist(), chat[0][f"{side}_labels"].tolist()
        assert ids[:len(p)] == p and labels == [-100] * len(p) + ids[len(p):]
        assert tok.decode(ids[len(p):], skip_special_tokens=True).startswith(answer)


def test_kto_records_match_sft_with_kl_samples(tok, shared_data):
    path = shared_data / "preference" / "kto_en_demo.json"
    raw = json.loads(path.read_text())
    ds = UnpairedPreferenceDataset(path, tok, max_len=8192)
    assert len(ds) == 300 and sum(bool(ds[i]["desirable"]) for i in range(len(ds))) == 150
    multi = [i for i, r in enumerate(raw) if len(r["messages"]) > 2][:3]
    sft = SFTDataset([raw[i] for i in multi], tok, max_len=8192)
    for k, i in enumerate(multi):
        item = ds[i]
        assert item["input_ids"].tolist() == sft[k]["input_ids"].tolist()
        assert bool(item["desirable"]) == raw[i]["label"]
        prompt = encode_prompt(raw[i]["messages"][:-1], tok)
        assert item["labels"].tolist() == [-100] * len(prompt) + item["input_ids"].tolist()[len(prompt):]
        # the KL sample: this prompt + the previous record's completion, written for another prompt
        assert encode_prompt(raw[i - 1]["messages"][:-1], tok) != prompt
        prev = ds[i - 1]
        prev_completion = _targets(prev["labels"])
        assert item["kl_input_ids"].tolist() == prompt + prev_completion
        assert _targets(item["kl_labels"]) == prev_completion
    assert ds[0]["kl_input_ids"].tolist()[-len(_targets(ds[len(ds) - 1]["labels"])):] == _targets(ds[len(ds) - 1]["labels"])


def test_prompt_completion_records_and_unpaired_pairs(tok, shared_data):
    records = [{"prompt": "Name a colour.", "completion": "Blue.", "label": True},
               {"prompt": [{"role": "user", "content": "Name a fruit."}],
                "completion": [{"role": "assistant", "content": "A chair."}], "label": False}]
    ds = UnpairedPreferenceDataset(records, tok, prompt_template="alpaca")
    p0 = encode_prompt([{"role": "user", "content": "Name a colour."}], tok, "alpaca")
    assert ds[0]["input_ids"].tolist()[:len(p0)] == p0 and [bool(ds[i]["desirable"]) for i in range(2)] == [True, False]
    assert tok.decode(_targets(ds[1]["labels"]), skip_special_tokens=True) == "A chair."
    with pytest.raises(DatasetFormatError, match="label"):
        UnpairedPreferenceDataset([{"prompt": "x", "completion": "y", "label": "yes"}], tok)
    raw = json.loads((shared_data / "preference" / "dpo_en_demo.json").read_text())[:2]
    pairs = PreferenceDataset(raw, tok, max_len=4096)
    unpaired = UnpairedPreferenceDataset(raw, tok, max_len=4096)
    assert len(unpaired) == 4
    for i in range(2):
        for k, side in enumerate(("chosen", "rejected")):
            item = unpaired[2 * i + k]
            assert item["input_ids"].tolist() == pairs[i][f"{side}_input_ids"].tolist()
            assert item["labels"].tolist() == pairs[i][f"{side}_labels"].tolist()
            assert bool(item["desirable"]) == (side == "chosen")


def _prompt_and_completion(ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int]]:
    completion = _targets(labels)
    return ids.tolist()[: len(ids) - len(completion)], completion


def test_kto_kl_samples_of_split_pairs_pair_each_prompt_with_another_prompts_completion(tok):
    """Split pairs lie chosen, rejected, chosen, ...: the KL sample of a rejected item must not take its own
    pair's chosen answer, or z0 is estimated on matched pairs half the time."""
    ds = UnpairedPreferenceDataset(FIX / "hh_rlhf.jsonl", tok, prompt_template="alpaca")
    pairs = PreferenceDataset(FIX / "hh_rlhf.jsonl", tok, prompt_template="alpaca")
    prompts = [_prompt_and_completion(pairs[k]["chosen_input_ids"], pairs[k]["chosen_labels"])[0]
               for k in range(len(pairs))]
    answers = {(k, side): _targets(pairs[k][f"{side}_labels"]) for k in range(len(pairs))
               for side in ("chosen", "rejected")}
    assert len(ds) == 6 and len({tuple(p) for p in prompts}) == 3
    sources = []  # (pair, side) each item's KL completion was written for
    for i in range(len(ds)):
        item = ds[i]
        kl_prompt, kl_completion = _prompt_and_completion(item["kl_input_ids"], item["kl_labels"])
        assert _prompt_and_completion(item["input_ids"], item["labels"])[0] == kl_prompt == prompts[i // 2]
        sources.append(next(key for key, answer in answers.items() if answer == kl_completion))
    # both samples of pair k take the nearest earlier sample of another prompt: pair k-1's rejected answer
    assert sources == [(2, "rejected"), (2, "rejected"), (0, "rejected"), (0, "rejected"), (1, "rejected"),
                       (1, "rejected")]
    assert all(prompts[pair] != prompts[i // 2] for i, (pair, _) in enumerate(sources))


def test_kto_kl_samples_search_back_cyclically_and_warn_when_every_prompt_is_the_same(tok, caplog):
    records = [{"prompt": p, "completion": c, "label": True}
               for p, c in (("Name a colour.", "Blue."), ("Name a colour.", "Red."), ("Name a colour.", "Green."),
                            ("Name a fruit.", "A pear."))]
    ds = UnpairedPreferenceDataset(records, tok, prompt_template="alpaca")
    completions = [_targets(ds[i]["labels"]) for i in range(4)]
    # the colour items 0-2 all reach back (cyclically) to the fruit item 3; the fruit item takes item 2
    assert [completions.index(_targets(ds[i]["kl_labels"])) for i in range(4)] == [3, 3, 3, 2]
    with caplog.at_level("WARNING", logger="coati"):
        same = UnpairedPreferenceDataset(records[:3], tok, prompt_template="alpaca")
    completions = [_targets(same[i]["labels"]) for i in range(3)]
    assert [completions.index(_targets(same[i]["kl_labels"])) for i in range(3)] == [2, 0, 1]
    assert len([r for r in caplog.records if "same prompt" in r.getMessage()]) == 1


def test_collators_concatenate_chosen_first_and_carry_reference(tok, shared_data):
    ds = PreferenceDataset(shared_data / "preference" / "dpo_en_demo.json", tok, max_len=4096, max_datasets_size=3)
    ds.set_ref_logps(torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]))
    batch = PreferenceCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4
    n0 = len(ds[0]["chosen_input_ids"])
    assert batch["input_ids"][0, :n0].tolist() == ds[0]["chosen_input_ids"].tolist()
    assert batch["labels"][3, :len(ds[1]["rejected_labels"])].tolist() == ds[1]["rejected_labels"].tolist()
    assert batch["attention_mask"][2].sum() == len(ds[0]["rejected_input_ids"])
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    kto = UnpairedPreferenceDataset(shared_data / "preference" / "kto_en_demo.json", tok, max_len=4096,
                                    max_datasets_size=3)
    kto.set_ref_logps(torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]))
    kb = UnpairedPreferenceCollator(tok.pad_token_id)([kto[0], kto[2]])
    assert kb["ref_logps"].tolist() == [-1.0, -5.0] and kb["ref_kl_logps"].tolist() == [-2.0, -6.0]
    assert kb["kl_input_ids"].shape[0] == 2 and kb["desirable"].dtype == torch.bool
