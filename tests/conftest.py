import pytest
import torch

from tests import goldens

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    """The language model of the shared tiny checkpoint, fp32 on CPU."""
    from kimi_ops.model.config import KimiAudioConfig
    from kimi_ops.model.modeling import KimiAudioForCausalLM
    from kimi_ops.model.weights import load_state_dict

    goldens.require()
    config = KimiAudioConfig.from_file(goldens.CHECKPOINT / "config.json")
    with torch.device("meta"):
        model = KimiAudioForCausalLM(config)
    load_state_dict(model, goldens.CHECKPOINT, torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    from kimi_ops.model.text_tokenizer import TextTokenizer

    goldens.require()
    return TextTokenizer(goldens.CHECKPOINT / "tiktoken.model")


@pytest.fixture(scope="session")
def engine():
    """The full KimiAudio API on the shared tiny checkpoint."""
    from kimi_ops.engine.api import KimiAudio

    goldens.require()
    return KimiAudio(goldens.CHECKPOINT, device="cpu")
