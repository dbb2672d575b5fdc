"""Run by test_engines.py in its own interpreter: a SPAWNED vLLM engine (engine core in a child process) takes
weight pushes through a safetensors file in /dev/shm; outputs change, and restoring the weights restores them.

A separate script because vLLM spawns processes that re-import `__main__`; under pytest that would be pytest.
"""

import sys
import time

import numpy as np
import torch
from PIL import Image


def main(path):
    from vzero.config import VLLMOptions
    from vzero.engines.base import ScoreRequest
    from vzero.engines.vllm import VLLMEngine
    from vzero.models.loading import load_model
    from vzero.vlm_inputs import chat_prompt_ids

    t = time.time()
    e = VLLMEngine(
        path,
        device="cpu",
        options=VLLMOptions(max_model_len=512, in_process=False),
        min_pixels=3136,
        max_pixels=12544,
        worker_extension="actors.collective_receiver.CollectiveReceiverExtension",
    )
    print("up", round(time.time() - t, 1))
    img = Image.fromarray((np.random.RandomState(0).rand(100, 120, 3) * 255).astype("uint8"))
    ids = chat_prompt_ids(e.tokenizer, "What color is the small square?")
    resp = e.tokenizer.encode("red square", add_special_tokens=False)
    req = [ScoreRequest(ids, img, resp)]
    before = e.score(req)[0].logprobs
    sd = [(n, p.detach().clone()) for n, p in load_model(path).state_dict().items()]
    g = torch.Generator().manual_seed(0)
    e.load_weights([(n, t + 0.05 * torch.randn(t.shape, generator=g)) for n, t in sd])
    after = e.score(req)[0].logprobs
    e.load_weights(sd)
    restored = e.score(req)[0].logprobs
    print("changed", max(abs(a - b) for a, b in zip(before, after, strict=True)), "restored", before == restored)


if __name__ == "__main__":
    main(sys.argv[1])
