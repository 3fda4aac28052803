
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


@pytest.fixture(scope="session")
def shared_data():
    if not tiny.SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {tiny.SHARED_DATA}")
    return tiny.SHARED_DATA


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, shared_data):
    return tiny.save_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory, shared_data):
    return tiny.save_tiny_model("gpt_neox", tmp_path_factory.mktemp("tiny_neox"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, shared_data):
    return tiny.save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny_gpt2"))
