"""coati.dataset: formats, label masking, prompt/SFT token agreement, bad input, truncation, collators."""
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
import transformers

from coati.dataset import (
    ChatTemplateError,
    DatasetFormatError,
    PretrainDataset,
    PromptCollator,
    PromptDataset,
    RewardCollator,
    RewardDataset,
    SFTCollator,
    SFTDataset,
    encode_prompt,
    format_from_name,
    read_records,
    render_prompt,
    render_segments,
    split_dataset,
)
from tests import tiny

FIX = Path(__file__).parent / "fixtures"
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer("llama")


def _decode(tok, ids):
    """Text of ``ids``. transformers 4.x (ColossalAI's pinned stack) decodes LLaMA's SentencePiece the legacy
    way, with a space before the first word and after ``</s>``; those are dropped there so the same rendered
    text compares equal (token ids are compared exactly elsewhere)."""
    text = tok.decode(ids)
    if int(transformers.__version__.split(".")[0]) < 5:
        text = text.removeprefix(" ").replace("</s> ", "</s>")
    return text


def enc(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def enc_cont(tok, text):
    """Hand rule for a segment in mid-sequence: tokenize after a newline, drop the newline's two tokens."""
    ids = enc(tok, "\n" + text)
    assert tok.convert_ids_to_tokens(ids[:2]) == ["▁", "<0x0A>"]
    return ids[2:]


def first_label(labels):
    return next(i for i, x in enumerate(labels) if x != -100)


def response_starts(labels):
    return [i for i, x in enumerate(labels) if x != -100 and (i == 0 or labels[i - 1] == -100)]


# ------------------------------------------------------------------ label masking, hand-built

def test_alpaca_masking_matches_hand_built(tok):
    rec = {"instruction": "Name the capital of France.", "input": "", "output": "Paris is the capital."}
    ds = SFTDataset([rec], tok, prompt_template="alpaca")
    prompt = ALPACA_PROMPT.format(instruction=rec["instruction"])
    resp = enc_cont(tok, rec["output"])
    assert tok.decode(resp) == "Paris is the capital."
    assert not tok.convert_ids_to_tokens(resp)[0].startswith("▁")  # no spurious word-start marker
    expected_ids = [1] + enc(tok, prompt) + resp + [2]
    expected_labels = [-100] * (1 + len(enc(tok, prompt))) + resp + [2]
    assert ds[0]["input_ids"].tolist() == expected_ids
    assert ds[0]["labels"].tolist() == expected_labels
    assert _decode(tok, ds[0]["input_ids"][1:]) == prompt + "Paris is the capital.</s>"
    # "auto" without a chat template is alpaca
    assert SFTDataset([rec], tok)[0]["input_ids"].tolist() == expected_ids


def test_alpaca_with_input_uses_input_template(tok):
    rec = {"instruction": "Translate.", "input": "chat", "output": "cat"}
    ids = SFTDataset([rec], tok, prompt_template="alpaca")[0]["input_ids"]
    assert _decode(tok, ids[1:]) == ALPACA_PROMPT_INPUT.format(**rec) + "cat</s>"


def test_two_turn_chat_masking_matches_hand_built(tok):
    ds = SFTDataset(FIX / "chat_messages.jsonl", tok, prompt_template="chatml")
    s0 = ("<|im_start|>system\nYou are a calculator.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n"
          "<|im_start|>assistant\n")
    s1 = "\n<|im_start|>user\ntimes 4?<|im_end|>\n<|im_start|>assistant\n"
    p0, r0, p1, r1 = enc(tok, s0), enc_cont(tok, "5<|im_end|>"), enc_cont(tok, s1), enc_cont(tok, "20<|im_end|>")
    ids = [1] + p0 + r0 + [2] + p1 + r1 + [2]
    labels = [-100] * (1 + len(p0)) + r0 + [2] + [-100] * len(p1) + r1 + [2]
    assert ds[0]["input_ids"].tolist() == ids
    assert ds[0]["labels"].tolist() == labels
    assert len(ds) == 3


def test_none_template_is_raw_text(tok):
    ds = SFTDataset([{"messages": [{"role": "user", "content": "12+7="}, {"role": "assistant", "content": "19"}]}],
                    tok, prompt_template="none")
    digits = tok.convert_tokens_to_ids(["1", "9"])  # split digits: one token each, no word-start marker
    assert ds[0]["input_ids"].tolist() == [1] + enc(tok, "12+7=") + digits + [2]
    assert ds[0]["labels"].tolist()[-3:] == digits + [2]
    assert (ds[0]["labels"] != -100).sum().item() == 3


def test_gpt2_no_bos_eos_appended():
    g = tiny.tokenizer("gpt2")
    ds = SFTDataset([{"instruction": "Hi", "output": "Hello"}], g, prompt_template="alpaca")
    ids = ds[0]["input_ids"].tolist()
    assert ids == enc(g, ALPACA_PROMPT.format(instruction="Hi")) + enc(g, "Hello") + [50256]
    assert ds[0]["labels"].tolist()[-2:] == enc(g, "Hello") + [50256]


def test_chat_template_segments_and_prefix_error():
    t = tiny.tokenizer("llama")
    t.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                       "[/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
    conv = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B"},
            {"role": "user", "content": "C?"}, {"role": "assistant", "content": "D"}]
    assert render_segments(conv, t) == [("<s>[INST] A? [/INST]", False), (" B </s>", True),
                                        ("[INST] C? [/INST]", False), (" D </s>", True)]
    ds = SFTDataset([{"messages": conv}], t)
    ids, labels = ds[0]["input_ids"].tolist(), ds[0]["labels"].tolist()
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 2  # template's own BOS/EOS, none added
    assert [x for x in labels if x != -100] == enc_cont(t, " B </s>") + enc_cont(t, " D </s>")
    assert encode_prompt(conv[:3], t) == ids[:response_starts(labels)[1]]
    t.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"  # not prefix-stable
    with pytest.raises(ChatTemplateError, match="prefix"):
        render_segments(conv, t)


# ------------------------------------------------------------------ formats and real files

@pytest.mark.parametrize("path,n,kw", [
    ("sft/alpaca_en_demo.json", 999, {}),
    ("sft/kochatgpt_1_SFT_conversation.jsonl", 439, {"max_len": 2048}),
    ("pretrain/c4_demo.jsonl", 300, {"max_len": 64}),  # {text}: loss on every token
])
def test_sft_real_files(llama2_tokenizer, shared_data, path, n, kw):
    """Counts of real files with the real LLaMA-2 vocabulary (truncation depends on its token lengths)."""
    ds = SFTDataset(shared_data / path, llama2_tokenizer, **kw)
    assert len(ds) == n and ds.num_skipped == 0 and ds.num_empty == 0
    if "kochat" in path:  # four <챗봇> turns per block, each response ends with EOS
        assert all((x["labels"] == 2).sum().item() == 4 for x in ds)
        assert ds.num_truncated == 0
    if "c4" in path:
        x = ds[0]
        assert x["labels"][1:].tolist() == x["input_ids"][1:].tolist() and x["labels"][0] == -100


def test_alpaca_5000_skips_two_empty_outputs(llama2_tokenizer, shared_data):
    ds = SFTDataset(shared_data / "sft/alpaca_5000.json", llama2_tokenizer)
    assert (len(ds), ds.num_empty) == (4998, 2)  # none is over max_len=512 in LLaMA-2 tokens
    with pytest.raises(DatasetFormatError, match=r"alpaca_5000\.json: record 2335: field 'output': empty"):
        SFTDataset(shared_data / "sft/alpaca_5000.json", llama2_tokenizer, empty="raise")


@pytest.mark.parametrize("name,n,responses", [
    ("chat_messages.jsonl", 3, [2, 1, 1]),
    ("colossal_messages.jsonl", 2, [1, 2]),
    ("sharegpt_sft.json", 2, [1, 2]),
    ("source_target.jsonl", 2, [1, 1]),
])
def test_sft_fixture_formats(tok, name, n, responses):
    ds = SFTDataset(FIX / name, tok, prompt_template="chatml")
    assert len(ds) == n
    assert [(x["labels"] == 2).sum().item() for x in ds] == responses


def test_sharegpt_and_colossal_render_roles(tok):
    sg = SFTDataset(FIX / "sharegpt_sft.json", tok, prompt_template="chatml")
    assert _decode(tok, sg[0]["input_ids"][1:]) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nLargest planet?<|im_end|>\n"
        "<|im_start|>assistant\nJupiter.<|im_end|></s>")
    st = SFTDataset(FIX / "source_target.jsonl", tok)
    x = st[0]
    assert x["input_ids"].tolist() == [1] + enc(tok, "Translate to French: cat\n") + enc_cont(tok, "chat") + [2]
    assert [t for t in x["labels"].tolist() if t != -100] == enc_cont(tok, "chat") + [2]


def test_reward_real_files(llama2_tokenizer, shared_data):
    dpo = RewardDataset(shared_data / "preference/dpo_en_demo.json", llama2_tokenizer, max_len=8192)
    assert len(dpo) == 300 and dpo.num_skipped == 0  # every pair fits 8192 LLaMA-2 tokens
    ranked = RewardDataset(shared_data / "preference/oaast_rm_zh.json", llama2_tokenizer, max_len=64)
    raw = json.loads((shared_data / "preference/oaast_rm_zh.json").read_text())
    assert len(ranked) + ranked.num_skipped == sum(math.comb(len(r["output"]), 2) for r in raw) == 1809


def test_reward_fixture_formats(tok):
    hh = RewardDataset(FIX / "hh_rlhf.jsonl", tok, prompt_template="alpaca")
    rm = RewardDataset(FIX / "rm_static.jsonl", tok, prompt_template="alpaca")
    assert (len(hh), len(rm)) == (3, 2)
    # hh-rlhf: shared prefix up to the last "\n\nAssistant:" is the prompt, rendered like SFT
    prompt = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
              {"role": "user", "content": "And of Italy?"}]
    p = encode_prompt(prompt, tok, "alpaca")
    c, r = hh[1]["chosen_input_ids"].tolist(), hh[1]["rejected_input_ids"].tolist()
    assert c[:len(p)] == r[:len(p)] == p
    assert c[len(p):] == enc_cont(tok, "Rome is the capital of Italy.") + [2]
    assert r[len(p):] == enc_cont(tok, "I am not sure.") + [2]
    # rm-static: the prompt transcript is parsed the same way; replies are stripped
    p2 = encode_prompt([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                        {"role": "user", "content": "Tell me a fact about the moon."}], tok, "alpaca")
    assert rm[1]["rejected_input_ids"].tolist() == p2 + enc_cont(tok, "The Moon is made of cheese.") + [2]
    # explicit format and name mapping
    assert len(RewardDataset(FIX / "hh_rlhf.jsonl", tok, format="hh-rlhf")) == 3
    with pytest.raises(DatasetFormatError, match=r"hh_rlhf\.jsonl: line 1: field 'prompt': missing"):
        RewardDataset(FIX / "hh_rlhf.jsonl", tok, format="rm-static")


def test_format_from_name():
    assert format_from_name("Anthropic/hh-rlhf") == "hh-rlhf"
    assert format_from_name("/data/Dahoas/rm-static") == "rm-static"
    assert format_from_name("Dahoas/full-hh-rlhf") == "rm-static"
    assert format_from_name("../shared/data/preference/oaast_rm_zh.json") == "ranked"
    assert format_from_name("my_prefs.jsonl") is None


def test_prompt_files_and_extras(tok, shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="coati"):
        ko = PromptDataset(shared_data / "prompts/kochatgpt_3_PPO.jsonl", tok, max_datasets_size=50)
    assert "JSON array" in caplog.text
    assert (len(ko), ko.num_empty) == (50, 3)
    gsm = PromptDataset(shared_data / "eval/gsm8k_test.jsonl", tok, max_datasets_size=20, seed=0)
    first = json.loads((shared_data / "eval/gsm8k_test.jsonl").read_text().splitlines()[0])
    full = PromptDataset([first], tok)
    assert full[0]["answer"] == first["answer"] and full[0]["answer"].endswith("#### 18")
    assert full[0]["prompt"] == ALPACA_PROMPT.format(instruction=first["question"])
    assert full[0]["input_ids"].tolist() == [1] + enc(tok, full[0]["prompt"])
    assert len(gsm) == 20 and all(x["answer"].split("#### ")[-1] for x in gsm)
    vic = PromptDataset(shared_data / "prompts/vicuna_question_80.jsonl", tok)
    assert len(vic) == 80 and vic[0]["question_id"] == 1 and vic[0]["category"] == "generic"
    uoi = PromptDataset(shared_data / "prompts/user_oriented_instructions.jsonl", tok, max_input_len=4096)
    assert len(uoi) == 252 and "### Input:\n" in uoi[0]["prompt"] and uoi[0]["motivation_app"] == "Grammarly"


def test_pretrain_files(tok, shared_data):
    c4 = PretrainDataset(shared_data / "pretrain/c4_demo.jsonl", tok, max_len=128)
    wiki = PretrainDataset(shared_data / "pretrain/wiki_demo.txt", tok, max_len=128)
    assert (len(c4), len(wiki)) == (300, 30)
    assert max(len(x["input_ids"]) for x in wiki) == 128 and wiki.num_truncated == 30
    first_doc = (shared_data / "pretrain/wiki_demo.txt").read_text().splitlines()[0]
    assert wiki[0]["input_ids"].tolist() == ([1] + enc(tok, first_doc))[:128]
    chunks = PretrainDataset([{"text": first_doc}], tok, max_len=128, chunk=True)
    full = [1] + enc(tok, first_doc) + [2]
    blocks = [full[i:i + 128] for i in range(0, len(full), 128)]
    assert [x["input_ids"].tolist() for x in chunks] == [b for b in blocks if len(b) > 1]
    assert len(chunks) >= 10 and chunks[0]["labels"][0] == -100 and chunks[1]["labels"][0] == full[128]


def _items(ds):
    return [(x["input_ids"].tolist(), x["labels"].tolist()) for x in ds]


def test_pretrain_accepts_alpaca_file_as_sft_samples(tok, shared_data):
    """Coati's --pretrain_dataset was the SFT Alpaca file: LM loss on the response only, prompt masked."""
    path = shared_data / "sft/alpaca_en_demo.json"
    ptx = PretrainDataset(path, tok, max_len=512, max_datasets_size=40, seed=3)
    assert _items(ptx) == _items(SFTDataset(path, tok, max_len=512, max_datasets_size=40, seed=3))
    rec = json.loads(path.read_text())[0]
    ids, labels = _items(PretrainDataset([rec], tok, max_len=4096))[0]
    template = ALPACA_PROMPT_INPUT if rec["input"] else ALPACA_PROMPT
    n_prompt = 1 + len(enc(tok, template.format(**rec)))
    response = enc_cont(tok, rec["output"]) + [2]
    assert ids == ids[:n_prompt] + response
    assert labels == [-100] * n_prompt + response


def test_pretrain_accepts_every_sft_format_in_jsonl(tok, tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"},
                      {"role": "user", "content": "times 4?"}, {"role": "assistant", "content": "20"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"source": "Q: 1+1\nA:", "target": " 2"},
    ]
    for k, rec in enumerate(records):
        path = tmp_path / f"ptx{k}.jsonl"
        path.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
        ptx = _items(PretrainDataset(path, tok, prompt_template="chatml"))
        assert ptx == _items(SFTDataset(path, tok, prompt_template="chatml"))
        ids, labels = ptx[0]
        # the prompt (BOS and its first tokens) carries no label; labelled tokens are the input tokens there
        assert labels[:2] == [-100, -100] and all(x in (-100, t) for x, t in zip(labels, ids))
    chat_labels = _items(PretrainDataset(tmp_path / "ptx0.jsonl", tok, prompt_template="chatml"))[0][1]
    assert [x for x in chat_labels if x != -100] == (enc_cont(tok, "5<|im_end|>") + [2]
                                                     + enc_cont(tok, "20<|im_end|>") + [2])
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain words here"}) + "\n")
    (ids, labels), = _items(PretrainDataset(text, tok, prompt_template="chatml"))
    assert ids == [1] + enc(tok, "plain words here") + [2] and labels == [-100] + ids[1:]


def test_hf_disk_and_parquet_match_json(tok, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIX / "chat_messages.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    ref = [x["input_ids"].tolist() for x in SFTDataset(FIX / "chat_messages.jsonl", tok)]
    for src in ("disk", "dict", "chat.parquet"):
        assert [x["input_ids"].tolist() for x in SFTDataset(tmp_path / src, tok)] == ref
    assert read_records(tmp_path / "chat.parquet")[2].location == "row 2"


# ------------------------------------------------------------------ prompt tokens == SFT prompt tokens

@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_prompt_tokens_equal_sft_prompt(tok, shared_data, template):
    path = shared_data / "sft/alpaca_en_demo.json"
    sft = SFTDataset(path, tok, prompt_template=template, max_len=4096)
    prompts = PromptDataset(path, tok, prompt_template=template, max_input_len=4096)
    assert len(sft) == len(prompts) == 999
    for k in range(0, 999, 7):
        labels = sft[k]["labels"].tolist()
        assert prompts[k]["input_ids"].tolist() == sft[k]["input_ids"].tolist()[:first_label(labels)]
        assert "output" in prompts[k]  # the reference answer travels as an extra


def test_multi_turn_prompt_tokens_equal_sft_prefix(tok, shared_data):
    path = shared_data / "sft/kochatgpt_1_SFT_conversation.jsonl"
    sft = SFTDataset(path, tok, max_len=4096)
    prompts = PromptDataset(path, tok, max_input_len=4096)  # the last <챗봇> turn is dropped
    for k in range(0, 439, 11):
        ids, labels = sft[k]["input_ids"].tolist(), sft[k]["labels"].tolist()
        last = response_starts(labels)[-1]
        assert prompts[k]["input_ids"].tolist() == ids[:last]
        assert prompts[k]["input_ids"].tolist() == encode_prompt(
            [{"role": m["role"], "content": m["content"]} for m in read_records(path)[k].data["messages"][:-1]],
            tok)
    assert _decode(tok, prompts[0]["input_ids"][1:]) == prompts[0]["prompt"]
    assert prompts[0]["prompt"].count("</s>") == 3 and prompts[0]["prompt"].endswith("### Response:\n")


def test_render_prompt_requires_user_last(tok):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_prompt(conv[:1], tok, "alpaca") == ALPACA_PROMPT.format(instruction="hi")
    with pytest.raises(ValueError):
        render_prompt(conv, tok, "alpaca")


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("name,where,field", [
    ("bad_json_line.jsonl", "line 3", None),
    ("missing_field.json", "record 1", "output"),
    ("wrong_type.jsonl", "line 2", "output"),
    ("empty_response.jsonl", "line 2", "output"),
    ("unknown_format.jsonl", "line 1", None),
    ("empty.jsonl", None, None),
    ("bad_role.jsonl", "line 2", "messages[1].role"),
])
def test_bad_input_names_file_location_field(tok, name, where, field):
    with pytest.raises(DatasetFormatError) as info:
        SFTDataset(FIX / name, tok, empty="raise")
    msg = str(info.value)
    assert msg.startswith(str(FIX / name) + ": ")
    if where:
        assert f": {where}: " in msg
    if field:
        assert f"field '{field}'" in msg
    if name == "bad_json_line.jsonl":
        assert "invalid JSON" in msg
    if name == "unknown_format.jsonl":
        assert "['foo', 'question_id']" in msg
    if name == "empty.jsonl":
        assert "empty file" in msg


def test_empty_responses_skipped_by_default(tok):
    ds = SFTDataset(FIX / "empty_response.jsonl", tok)
    assert (len(ds), ds.num_empty) == (1, 1)


def test_bad_reward_and_prompt_records(tok, tmp_path):
    bad = tmp_path / "ranked.json"
    bad.write_text(json.dumps([{"instruction": "q", "input": "", "output": ["a", "b"]},
                               {"instruction": "q", "input": "", "output": ["a", 3]}]))
    with pytest.raises(DatasetFormatError, match=r"ranked\.json: record 1: field 'output\[1\]': expected a string"):
        RewardDataset(bad, tok)
    with pytest.raises(DatasetFormatError, match=r"unknown_format\.jsonl: line 1: unknown prompt format"):
        PromptDataset(FIX / "unknown_format.jsonl", tok)


# ------------------------------------------------------------------ over-long samples

def test_truncate_vs_skip_counts(tok):
    long_resp = {"instruction": "Say a lot.", "output": "word " * 200}
    long_prompt = {"instruction": "Read this. " + "text " * 200, "output": "ok"}
    short = {"instruction": "Hi", "output": "Hello"}
    trunc = SFTDataset([long_resp, long_prompt, short], tok, max_len=64, prompt_template="alpaca")
    assert (len(trunc), trunc.num_truncated, trunc.num_skipped) == (2, 1, 1)
    assert len(trunc[0]["input_ids"]) == 64 and (trunc[0]["labels"] != -100).sum().item() > 0
    assert trunc[0]["labels"][-1].item() != 2  # cut inside the response: no EOS
    skip = SFTDataset([long_resp, long_prompt, short], tok, max_len=64, prompt_template="alpaca", overlong="skip")
    assert (len(skip), skip.num_truncated, skip.num_skipped) == (1, 0, 2)
    with pytest.raises(DatasetFormatError, match="no SFT samples left"):
        SFTDataset([long_prompt], tok, max_len=64)

    pairs = [{"prompt": "Q", "chosen": "yes " * 100, "rejected": "no " * 100},
             {"prompt": "Q " * 100, "chosen": "a", "rejected": "b"},
             {"prompt": "Q", "chosen": "a", "rejected": "b"}]
    rt = RewardDataset(pairs, tok, max_len=64, format="rm-static")
    assert (len(rt), rt.num_truncated, rt.num_skipped) == (2, 1, 1)
    rs = RewardDataset(pairs, tok, max_len=64, format="rm-static", overlong="skip")
    assert (len(rs), rs.num_truncated, rs.num_skipped) == (1, 0, 2)

    prompts = [{"prompt": "word " * 100}, {"prompt": "short"}]
    ps = PromptDataset(prompts, tok, max_input_len=64)
    assert (len(ps), ps.num_skipped) == (1, 1) and ps[0]["prompt"].endswith("short\n\n### Response:\n")
    pt = PromptDataset(prompts, tok, max_input_len=64, overlong="truncate")
    full = encode_prompt([{"role": "user", "content": "word " * 100}], tok)
    assert (pt.num_truncated, len(full) > 64) == (1, True)
    assert pt[0]["input_ids"].tolist() == [1] + full[-63:]  # BOS + the end (question + "### Response:")


# ------------------------------------------------------------------ collators

def test_collators_pad_sides_and_masks():
    sft = SFTCollator(0)([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
                          {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}])
    assert sft["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert sft["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert sft["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    rm = RewardCollator(2)([{"chosen_input_ids": torch.tensor([1, 2]), "rejected_input_ids": torch.tensor([3])},
                            {"chosen_input_ids": torch.tensor([4]), "rejected_input_ids": torch.tensor([5, 6, 2])}])
    assert rm["chosen_input_ids"].tolist() == [[1, 2], [4, 2]]
    assert rm["chosen_attention_mask"].tolist() == [[1, 1], [1, 0]]  # a real EOS (id 2 = pad) stays attended
    assert rm["rejected_input_ids"].tolist() == [[3, 2, 2], [5, 6, 2]]
    assert rm["rejected_attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    pr = PromptCollator(0)([{"input_ids": torch.tensor([1, 9, 9]), "prompt": "a", "answer": "3"},
                            {"input_ids": torch.tensor([1, 8]), "prompt": "b"}])
    assert pr["input_ids"].tolist() == [[1, 9, 9], [0, 1, 8]]
    assert pr["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert pr["prompts"] == ["a", "b"] and pr["answer"] == ["3", None]
    assert SFTCollator(0, pad_to_multiple_of=4)([{"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}])[
        "input_ids"].shape == (1, 4)


# ------------------------------------------------------------------ subsets and splits

def test_seeded_subset_and_split(tok, shared_data):
    path = shared_data / "sft/alpaca_en_demo.json"
    a = SFTDataset(path, tok, max_datasets_size=10, seed=1)
    b = SFTDataset(path, tok, max_datasets_size=10, seed=1)
    c = SFTDataset(path, tok, max_datasets_size=10, seed=2)
    ids = lambda d: [x["input_ids"].tolist() for x in d]  # noqa: E731
    assert len(a) == 10 and ids(a) == ids(b) != ids(c)
    order = list(range(999))
    random.Random(1).shuffle(order)
    raw = json.loads(path.read_text())
    assert ids(a) == ids(SFTDataset([raw[i] for i in order[:10]], tok))
    train, ev = split_dataset(a, 0.3, seed=0)
    train2, ev2 = split_dataset(a, 0.3, seed=0)
    assert (len(train), len(ev)) == (7, 3) and list(ev.indices) == list(ev2.indices)
    assert sorted(list(train.indices) + list(ev.indices)) == list(range(10))
    assert split_dataset(a, 0.0) == (a, None)
