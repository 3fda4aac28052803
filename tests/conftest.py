import os

import pytest
import torch

from tests import tiny

torch.set_num_threads(1)  # tiny models: threads cost more than they give on a shared 2-core box


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


@pytest.fixture(scope="session")
def shared_data():
    """The real data beside the repository (``../shared/data``). A fresh clone has none, so its tests skip;
    CI always has it, so there a missing copy fails them instead of letting them skip unseen."""
    if not tiny.SHARED_DATA.is_dir():
        reason = f"shared test data not found at {tiny.SHARED_DATA}"
        if _in_ci():
            pytest.fail(f"{reason} (CI is set: CI must provide it)", pytrace=False)
        pytest.skip(reason)
    return tiny.SHARED_DATA


@pytest.fixture(scope="session")
def llama2_tokenizer(shared_data):
    """The real LLaMA-2 tokenizer, for tests about its exact vocabulary (a fresh copy per test is not needed:
    tests must not mutate it)."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(shared_data / "tokenizers" / "llama2"))
    tok.pad_token = tok.unk_token
    return tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return tiny.save_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory):
    return tiny.save_tiny_model("gpt_neox", tmp_path_factory.mktemp("tiny_neox"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return tiny.save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny_gpt2"))
